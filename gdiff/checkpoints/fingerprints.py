"""What identifies weights and structures.

`params_fingerprint` hashes the values of a parameter tree (a sampling manifest pins the weights it
sampled from with it); `tree_signature` lists the key paths, shapes and dtypes of a tree, and
`first_difference` / `check_params_match` name the first key where a checkpoint and the configured
network disagree.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from gdiff import distributed, errors


def params_fingerprint(tree: Any) -> str:
    """sha256 over every leaf's key path, dtype, shape and bytes, in key-path order: equal for the
    same values however they were saved (re-saved, converted again, copied), different for any
    other weights."""
    digest = hashlib.sha256()
    flat = jax.tree_util.tree_flatten_with_path(distributed.host_copy(tree))[0]
    for path, leaf in sorted(flat, key=lambda item: jax.tree_util.keystr(item[0])):
        leaf = np.ascontiguousarray(leaf)
        digest.update(f"{jax.tree_util.keystr(path)}|{leaf.dtype.str}|{leaf.shape}|".encode())
        digest.update(leaf.tobytes())
    return digest.hexdigest()


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def tree_signature(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """{"params/block/kernel": (shape, dtype name)} for every array leaf of `tree` (arrays,
    ShapeDtypeStructs or orbax array metadata alike), so two trees compare by content layout."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        "/".join(_key_name(k) for k in path): (tuple(leaf.shape), np.dtype(leaf.dtype).name)
        for path, leaf in flat
        if hasattr(leaf, "shape")
    }


def first_difference(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> str | None:
    """The first key (in sorted order) where two `tree_signature`s differ, described; None when
    they are equal."""
    for name in sorted(set(stored) | set(wanted)):
        if name not in stored:
            return f"{name} is in this config but not in the checkpoint"
        if name not in wanted:
            return f"{name} is in the checkpoint but not in this config"
        if stored[name] != wanted[name]:
            (s_shape, s_dtype), (w_shape, w_dtype) = stored[name], wanted[name]
            ckpt, this = f"{s_dtype}{list(s_shape)}", f"{w_dtype}{list(w_shape)}"
            return f"{name}: checkpoint {ckpt} vs this config {this}"
    return None


def check_params_match(params: Any, abstract_params: Any, *, what: str, where: Any) -> None:
    """Raises ConfigMismatchError unless `params` (loaded from `where`) have exactly the shapes
    and dtypes of `abstract_params` (e.g. `jax.eval_shape` of the configured network's init), so
    a wrong config is named by its first differing key instead of failing inside Flax."""
    diff = first_difference(tree_signature(params), tree_signature(abstract_params))
    if diff is not None:
        raise errors.ConfigMismatchError(
            f"the {what} config does not match the checkpoint {where} (first differing key: "
            f"{diff}); use the config it was trained or converted with"
        )
