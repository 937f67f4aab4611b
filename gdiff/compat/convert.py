"""Maps a reference (PyTorch) state dict onto a gdiff Flax module's parameters.

The Flax modules name their submodules after the reference's state dict keys (`.` before an index
written as `_`), so each Flax parameter path has exactly one reference name:

    input_blocks_4_1/qkv/kernel  <->  input_blocks.4.1.qkv.weight

and only the layouts differ: conv kernels OIHW -> HWIO, Linear (out, in) -> (in, out), 1x1 Conv1d
(out, in, 1) -> Dense (in, out), GroupNorm weight -> scale, Embedding weight -> embedding, the
attention pool's positional embedding (C, L) -> (L, C). The expected tree comes from
`jax.eval_shape(module.init, ...)`, so nothing is allocated before the names check out.
"""

import re
from collections.abc import Mapping

import flax.traverse_util
import jax
import numpy as np

from gdiff.models import unet

# Leaf names of the reference's 1x1 Conv1d layers (attention projections), stored (out, in, 1).
_CONV1D_MODULES = {"qkv", "proj_out", "qkv_proj", "c_proj"}
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def reference_name(path: tuple[str, ...]) -> str:
    """Flax parameter path -> reference state dict key (`("out_2", "kernel")` -> `out.2.weight`)."""
    *modules, leaf = path
    parts = [re.sub(r"_(\d+)(?=_|$)", r".\1", m) for m in modules]
    parts.append(_LEAF_NAMES.get(leaf, leaf))
    return ".".join(parts)


def _reference_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape the reference stores for a Flax parameter of `shape` at `path`."""
    leaf, module = path[-1], path[-2] if len(path) > 1 else ""
    if leaf == "kernel" and len(shape) == 4:  # HWIO -> OIHW
        return (shape[3], shape[2], shape[0], shape[1])
    if leaf == "kernel" and len(shape) == 2:  # (in, out) -> Linear (out, in) or Conv1d (out, in, 1)
        return (shape[1], shape[0], 1) if module in _CONV1D_MODULES else (shape[1], shape[0])
    if leaf == "positional_embedding":
        return (shape[1], shape[0])
    return tuple(shape)


def _to_flax(path: tuple[str, ...], array: np.ndarray) -> np.ndarray:
    """Reference layout -> Flax layout (the inverse of `_reference_shape`)."""
    leaf = path[-1]
    if leaf == "kernel" and array.ndim == 4:
        return array.transpose(2, 3, 1, 0)
    if leaf == "kernel" and array.ndim == 3:
        return array[:, :, 0].T
    if leaf == "kernel" and array.ndim == 2:
        return array.T
    if leaf == "positional_embedding":
        return array.T
    return array


def _to_reference(path: tuple[str, ...], array: np.ndarray) -> np.ndarray:
    """Flax layout -> reference layout (the inverse of `_to_flax`)."""
    leaf, module = path[-1], path[-2] if len(path) > 1 else ""
    if leaf == "kernel" and array.ndim == 4:
        return array.transpose(3, 2, 0, 1)
    if leaf == "kernel" and array.ndim == 2:
        return array.T[:, :, None] if module in _CONV1D_MODULES else array.T
    if leaf == "positional_embedding":
        return array.T
    return array


def to_state_dict(params) -> dict[str, np.ndarray]:
    """The inverse of `convert_state_dict`: a Flax parameter tree (or anything shaped like it:
    gradients, optimiser moments) -> {reference state-dict name: numpy array, reference layout}."""
    flat = flax.traverse_util.flatten_dict(params)
    return {reference_name(path): _to_reference(path, np.asarray(v)) for path, v in flat.items()}


def _natural_key(name: str):
    """Sorts `input_blocks.2` before `input_blocks.10`, so errors list layers in network order."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def expected_params(module, *, image_size: int | None = None) -> dict:
    """The module's parameter shapes, {flax path tuple: ShapeDtypeStruct}, without allocating."""
    args, kwargs = unet.example_inputs(module, image_size=image_size)
    variables = jax.eval_shape(module.init, jax.random.key(0), *args, **kwargs)
    return flax.traverse_util.flatten_dict(variables["params"])


def convert_state_dict(
    module, state_dict: Mapping[str, np.ndarray], *, image_size: int | None = None
) -> dict:
    """Converts a reference state dict into Flax variables for `module`.

    Args:
      module: a gdiff UNetModel, SuperResModel or EncoderUNetModel built with the checkpoint's
        architecture (e.g. by `gdiff.compat.openai.create_model`).
      state_dict: {reference key: array}, e.g. from `load_torch_state_dict`; float16/bfloat16
        checkpoints are cast to float32.
      image_size: the input size used to trace the module when it carries no `image_size`.

    Returns:
      {"params": nested dict of float32 numpy arrays}, ready for `module.apply`.

    Raises:
      ValueError: listing, in one message, every missing key, every unexpected key and every
        mis-shaped key with the checkpoint's and the model's shapes (in the reference layout).
    """
    expected = flax.traverse_util.unflatten_dict(expected_params(module, image_size=image_size))
    params = convert_params(expected, state_dict, target=type(module).__name__)
    return {"params": params}


def convert_params(params_like, state_dict: Mapping[str, np.ndarray], *, target: str) -> dict:
    """`convert_state_dict` onto a known parameter tree: `params_like` is any pytree of nested
    dicts shaped like the Flax parameters (arrays or ShapeDtypeStructs, e.g. a training state's
    abstract `params`); `target` names it in the error message. Returns the nested dict of
    float32 numpy arrays. Also converts anything laid out like parameters (EMA copies, optimiser
    moments)."""
    expected = flax.traverse_util.flatten_dict(params_like)
    params, missing, mismatched = {}, [], []
    used = set()
    for path, spec in expected.items():
        name = reference_name(path)
        want = _reference_shape(path, spec.shape)
        if name not in state_dict:
            missing.append(f"  {name}: model expects {want}")
            continue
        used.add(name)
        array = np.asarray(state_dict[name])
        if tuple(array.shape) != want:
            mismatched.append(
                f"  {name}: checkpoint has {tuple(array.shape)}, model expects {want}"
            )
            continue
        params[path] = np.asarray(_to_flax(path, array), np.float32)
    unexpected = [f"  {k}: {tuple(np.shape(v))}" for k, v in state_dict.items() if k not in used]
    if missing or mismatched or unexpected:
        sections = []
        for title, rows in (
            ("mis-shaped", mismatched),
            ("missing from the checkpoint", missing),
            ("unexpected in the checkpoint", unexpected),
        ):
            if rows:
                rows = sorted(rows, key=_natural_key)
                sections.append(f"{len(rows)} {title}:\n" + "\n".join(rows))
        raise ValueError(
            f"checkpoint does not match {target} (wrong config for these weights?)\n"
            + "\n".join(sections)
        )
    return flax.traverse_util.unflatten_dict(params)
