"""Where the training state lives on the mesh: a full copy on every device, or fully sharded.

`train.state_sharding` picks one of two layouts for the arrays of a `TrainState`:

* "replicated": every device holds all of it (data parallelism; the layout before FSDP existed).
* "fsdp" (fully sharded data parallelism): the parameters, every EMA copy and the optimiser
  moments are split over the mesh's one "data" axis, so each device holds about 1/N of them.
  XLA gathers a parameter where the step uses it and reduce-scatters its gradient, because the
  step is jitted with these shardings as its in/out shardings: no collective is written by hand.

The FSDP rule, per array of those three fields (`fsdp_spec`): an array with fewer than
`train.fsdp_min_elements` elements stays replicated (biases and norm scales: sharding them saves
a few KiB per device and costs one more gather per step); otherwise it is split along its
largest dimension whose size the device count divides (of equal sizes, the last one: a
convolution kernel [kh, kw, in, out] with in == out splits its output channels); an array with no
such dimension stays replicated. The step counter, rng, timestep-sampler statistics and skip
counters are always replicated. The rule depends only on the shapes and the device count, so a
layout can be computed without allocating anything (benchmarks/state_memory.py).

The state is born in its layout (initialised under jit with these out shardings, restored with
them as orbax's target), so no device holds a full copy of it at start-up (inside the step XLA
gathers a parameter only where it is used), and a checkpoint written under one layout and device
count restores under any other (orbax reads each device's part of the global array).
"""

from __future__ import annotations

import collections
import functools
import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gdiff import distributed, errors
from gdiff.train import state as state_lib

MODES = ("replicated", "fsdp")
# The TrainState fields FSDP shards; the other fields are small and always replicated.
SHARDED_FIELDS = ("params", "ema_params", "opt_state")


def check_mode(mode: str) -> str:
    """`train.state_sharding`, validated: "replicated" or "fsdp" (else errors.ConfigError)."""
    value = str(mode).strip().lower()
    if value not in MODES:
        raise errors.ConfigError(
            f"train.state_sharding must be one of {', '.join(MODES)}; got {mode!r}"
        )
    return value


def fsdp_axis(shape: tuple[int, ...], num_devices: int, min_elements: int) -> int | None:
    """The dimension FSDP splits an array of `shape` along over `num_devices`, or None (kept
    whole on every device); see the module docstring for the rule."""
    if num_devices <= 1 or math.prod(shape) < max(int(min_elements), 1):
        return None
    # Largest size first; among equal sizes the last dimension first (output channels).
    for axis in sorted(range(len(shape)), key=lambda a: (shape[a], a), reverse=True):
        if shape[axis] % num_devices == 0:
            return axis
    return None


def fsdp_spec(shape: tuple[int, ...], num_devices: int, min_elements: int) -> P:
    """The PartitionSpec of `fsdp_axis`: P() or P(None, ..., "data", ...)."""
    axis = fsdp_axis(shape, num_devices, min_elements)
    if axis is None:
        return P()
    return P(*([None] * axis + [distributed.DATA_AXIS]))


def state_shardings(
    abstract: state_lib.TrainState, mesh: Mesh, mode: str, min_elements: int
) -> state_lib.TrainState:
    """A TrainState of NamedShardings (one per array) laying `abstract` out on `mesh`.

    Args:
      abstract: the state's shapes (`jax.eval_shape` of its initialiser, or the state itself).
      mesh: the one-axis "data" mesh.
      mode: "replicated" or "fsdp" (`check_mode`).
      min_elements: `train.fsdp_min_elements` (arrays with fewer elements stay replicated).

    Returns:
      The same pytree structure with a NamedSharding at every leaf, usable as jit in/out shardings
      and as orbax restore targets.
    """
    repl = distributed.replicated(mesh)
    shardings = jax.tree.map(lambda _: repl, abstract)
    if check_mode(mode) == "replicated":
        return shardings

    def split(leaf):
        return NamedSharding(mesh, fsdp_spec(tuple(leaf.shape), mesh.size, min_elements))

    return shardings.replace(
        **{name: jax.tree.map(split, getattr(abstract, name)) for name in SHARDED_FIELDS}
    )


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """`abstract`'s leaves as jax.ShapeDtypeStructs carrying the matching leaf of `shardings`
    (a restore target: orbax reads each array straight into that layout)."""
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract, shardings
    )


@functools.lru_cache(maxsize=8)
def _gather_fn(mesh: Mesh):
    # One jitted identity per mesh: its out_shardings make XLA all-gather any sharded input.
    return jax.jit(lambda tree: tree, out_shardings=distributed.replicated(mesh))


def gathered(tree: Any, mesh: Mesh) -> Any:
    """`tree` with every array replicated over `mesh` (unchanged when it already is).

    For programs that take whole parameters (the training preview's sampler, the classifier's
    held-out evaluation): under FSDP this holds one full copy of `tree` per device while the
    caller keeps it, a transient cost next to the EMA copies and moments that stay sharded.
    """
    leaves = jax.tree.leaves(tree)
    if all(x.sharding.is_fully_replicated for x in leaves if isinstance(x, jax.Array)):
        return tree
    return _gather_fn(mesh)(tree)


def bytes_per_device(tree: Any) -> int:
    """The most bytes of `tree`'s arrays any one of this process's devices holds, counted from
    the arrays' addressable shards (what is actually resident, not what the rule predicts)."""
    held = collections.Counter()
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array):
            for shard in leaf.addressable_shards:
                held[shard.device] += shard.data.nbytes
    return max(held.values(), default=0)


def planned_bytes_per_device(abstract: Any, num_devices: int, mode: str, min_elements: int) -> int:
    """Bytes per device of the arrays of `abstract` (shapes and dtypes only) laid out by `mode`
    over `num_devices`: pure arithmetic from the rule, nothing allocated. Applies the rule to
    every leaf, so pass the sharded fields (params, EMA copies, optimiser state)."""
    total = 0
    for leaf in jax.tree.leaves(abstract):
        nbytes = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
        split = check_mode(mode) == "fsdp" and (
            fsdp_axis(tuple(leaf.shape), num_devices, min_elements) is not None
        )
        total += nbytes // num_devices if split else nbytes
    return total


def state_bytes_line(name: str, state: state_lib.TrainState, mode: str, num_devices: int) -> str:
    """The start-up log line: bytes per device of params + EMA + optimiser state, measured."""
    mib = 2.0**20
    fields = [getattr(state, f) for f in SHARDED_FIELDS]
    parts = {f: bytes_per_device(getattr(state, f)) for f in SHARDED_FIELDS}
    full = sum(x.nbytes for x in jax.tree.leaves(fields))
    return (
        f"{name}: state sharding {mode} over {num_devices} device(s): parameters + EMA + "
        f"optimizer state {bytes_per_device(fields) / mib:.2f} MiB per device (params "
        f"{parts['params'] / mib:.2f}, EMA {parts['ema_params'] / mib:.2f}, optimizer "
        f"{parts['opt_state'] / mib:.2f} MiB; one full copy {full / mib:.2f} MiB)"
    )
