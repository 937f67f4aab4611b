"""Checkpoints: orbax behind one small module.

Two kinds live on disk:

* Training checkpoints: an orbax `CheckpointManager` directory (one sub-folder per step, written
  atomically by orbax: a killed save leaves the previous step usable) plus `gdiff_config.json`, the
  fingerprint of the configuration that wrote them. A run whose configuration differs refuses to
  resume from it instead of silently loading mismatched weights.
* Parameter checkpoints (`save_params`): inference weights only, e.g. a converted OpenAI checkpoint.
  Layout `<dir>/params` (orbax) + `<dir>/gdiff_metadata.json`, built in a temporary folder and
  renamed into place, so a finished one is never half-overwritten.

Workdir conventions (what `load_params(workdir, kind=...)` looks for, in order):
  kind "model":      `<workdir>/checkpoints`, `<workdir>/model_params`
  kind "classifier": `<workdir>/classifier_checkpoints`, `<workdir>/classifier_params`
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import uuid
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

CONFIG_FILE = "gdiff_config.json"
METADATA_FILE = "gdiff_metadata.json"
PARAMS_ITEM = "params"
WORKDIR_LAYOUT = {
    "model": ("checkpoints", "model_params"),
    "classifier": ("classifier_checkpoints", "classifier_params"),
}


def _jsonable(tree: Any) -> Any:
    """Config dicts -> plain JSON values (tuples become lists) so fingerprints compare stably."""
    return json.loads(json.dumps(tree, sort_keys=True, default=str))


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in a or key not in b:
                out.append(f"{name} (only in {'checkpoint' if key in a else 'this run'})")
            else:
                out.extend(_diff_keys(a[key], b[key], name))
        return out
    return [] if a == b else [f"{prefix}: checkpoint {a!r} vs this run {b!r}"]


def _atomic_write_text(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    tmp.write_text(text)
    os.replace(tmp, path)


class CheckpointManager:
    """Periodic, atomic, resumable training checkpoints.

    Args:
      directory: where the step folders go (created if missing).
      max_to_keep: how many recent steps survive.
      config_fingerprint: a JSON-able dict describing what the checkpoint holds (model, diffusion,
        optimiser shapes...). Opening a directory written under a different fingerprint raises
        ValueError naming the differing keys, before anything is written.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int = 3,
        config_fingerprint: Mapping[str, Any] | None = None,
    ):
        self.directory = pathlib.Path(directory).absolute()
        self.directory.mkdir(parents=True, exist_ok=True)
        if config_fingerprint is not None:
            self._check_fingerprint(_jsonable(dict(config_fingerprint)))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=True
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def _check_fingerprint(self, fingerprint: dict) -> None:
        path = self.directory / CONFIG_FILE
        if path.exists():
            stored = json.loads(path.read_text())
            diffs = _diff_keys(stored, fingerprint)
            if diffs:
                raise ValueError(
                    f"{self.directory} holds checkpoints of another configuration; refusing to "
                    "resume from or overwrite them. Use a fresh workdir or the original config. "
                    "Differences: " + "; ".join(diffs[:20])
                )
        elif jax.process_index() == 0:
            _atomic_write_text(path, json.dumps(fingerprint, indent=1, sort_keys=True))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, *, force: bool = False) -> bool:
        """Starts an asynchronous, atomic save of `state` at `step`; returns whether it saved."""
        return self._manager.save(int(step), args=ocp.args.StandardSave(state), force=force)

    def restore(self, abstract_state: Any, step: int | None = None) -> Any:
        """Restores into the structure, dtypes and shardings of `abstract_state`.

        `abstract_state` is typically `jax.eval_shape(init_fn)` with shardings attached, so the
        restored arrays are born on the right devices.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        return self._manager.restore(int(step), args=ocp.args.StandardRestore(abstract_state))

    def restore_raw(self, step: int | None = None) -> Any:
        """Restores without a target: nested dicts of arrays, as saved."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        return self._manager.restore(int(step), args=ocp.args.StandardRestore())

    def wait_until_finished(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def save_params(
    directory: str | os.PathLike,
    params: Any,
    *,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> pathlib.Path:
    """Writes inference parameters atomically to `directory`.

    The checkpoint is assembled in a temporary sibling folder and renamed into place; an existing
    finished checkpoint is left untouched unless `overwrite` is set (and even then it is replaced
    only after the new one is complete).
    """
    directory = pathlib.Path(directory).absolute()
    if directory.exists() and not overwrite:
        raise FileExistsError(
            f"{directory} already exists; refusing to overwrite a finished checkpoint "
            "(pass overwrite=True or choose another directory)"
        )
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.tmp-{uuid.uuid4().hex}")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp / PARAMS_ITEM, params)
    checkpointer.wait_until_finished()
    meta = {"kind": "params", **_jsonable(dict(metadata or {}))}
    if jax.process_index() == 0:
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{uuid.uuid4().hex}")
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    return directory


def read_metadata(directory: str | os.PathLike) -> dict:
    """The metadata dict stored by `save_params` (empty for training checkpoints)."""
    path = pathlib.Path(directory) / METADATA_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _is_manager_dir(path: pathlib.Path) -> bool:
    return path.is_dir() and any(p.is_dir() and p.name.isdigit() for p in path.iterdir())


def _resolve(path: pathlib.Path, kind: str) -> pathlib.Path:
    if (path / METADATA_FILE).exists() or _is_manager_dir(path):
        return path
    if path.name.isdigit() and _is_manager_dir(path.parent):
        return path
    if kind not in WORKDIR_LAYOUT:
        raise ValueError(f"kind must be one of {sorted(WORKDIR_LAYOUT)}; got {kind!r}")
    for name in WORKDIR_LAYOUT[kind]:
        candidate = path / name
        if (candidate / METADATA_FILE).exists() or _is_manager_dir(candidate):
            return candidate
    raise FileNotFoundError(
        f"no {kind} checkpoint at {path}: expected a parameter checkpoint (with {METADATA_FILE}), "
        f"a training checkpoint directory, or a workdir containing one of "
        f"{', '.join(WORKDIR_LAYOUT[kind])}"
    )


def load_params(
    path: str | os.PathLike, *, ema_rate: str | float | None = None, kind: str = "model"
) -> Any:
    """Loads inference parameters from any gdiff checkpoint.

    Args:
      path: a `save_params` directory, a training checkpoint directory (newest step is used), one
        step folder of it, or a workdir (see the module docstring for where it looks).
      ema_rate: which EMA copy of a training checkpoint to return (e.g. "0.9999"); default the
        slowest (largest) rate stored, the one the reference samples from; the raw parameters when
        the checkpoint has no EMA.
      kind: "model" or "classifier", for workdir look-up.

    Returns:
      The parameter pytree (nested dicts of arrays), ready for `module.apply({"params": p}, ...)`.
    """
    path = pathlib.Path(path).absolute()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    path = _resolve(path, kind)
    if (path / METADATA_FILE).exists():
        return ocp.StandardCheckpointer().restore(path / PARAMS_ITEM)
    if path.name.isdigit() and not _is_manager_dir(path):
        manager, step = CheckpointManager(path.parent), int(path.name)
    else:
        manager, step = CheckpointManager(path), None
    state = manager.restore_raw(step)
    manager.close()
    ema = state.get("ema_params") or {}
    if not ema:
        return state["params"]
    if ema_rate in (None, ""):
        key = sorted(ema, key=float, reverse=True)[0] if len(ema) > 1 else next(iter(ema))
    else:
        matches = [k for k in ema if np.isclose(float(k), float(ema_rate))]
        if not matches:
            raise KeyError(f"{path} has EMA rates {sorted(ema)}, not {ema_rate}")
        key = matches[0]
    return ema[key]
