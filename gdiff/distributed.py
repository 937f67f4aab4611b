"""Data parallelism over every device of every host, on one code path.

gdiff maps its work over a one-axis device mesh named "data" with `jax.jit` and `NamedSharding`
(the maintained successor of `jax.pmap`): the same program runs on one CPU, eight fake CPU
devices in tests, a GPU, or all chips of a TPU pod with one process per host.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gdiff import errors

DATA_AXIS = "data"

# Environment variables that mean "a coordinator is configured for this process".
_COORDINATOR_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "SLURM_JOB_ID", "TPU_NAME")


def maybe_initialize(setting: Any = "auto") -> bool:
    """Calls `jax.distributed.initialize()` when asked to or when the environment needs it.

    Args:
      setting: True (always), False (never) or "auto" (when a coordinator is configured through the
        environment, e.g. on a TPU pod or under SLURM).

    Returns:
      Whether the distributed runtime was initialised by this call.
    """
    if isinstance(setting, str):
        value = setting.strip().lower()
        if value not in ("auto", "true", "false", "1", "0", ""):
            raise errors.ConfigError(
                f"config.distributed must be auto, true or false; got {setting!r}"
            )
        setting = "auto" if value == "auto" else value in ("true", "1")
    if setting == "auto":
        setting = any(os.environ.get(name) for name in _COORDINATOR_ENV)
    if not setting or jax.distributed.is_initialized():
        return False
    jax.distributed.initialize()
    return True


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A one-axis mesh ("data") over `devices` (default: every device of every process)."""
    devices = list(jax.devices() if devices is None else devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Shards the leading (batch) axis over the mesh."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """Keeps a full copy on every device (parameters, optimiser state, scalars)."""
    return NamedSharding(mesh, P())


def check_batch_divisible(global_batch: int, what: str = "train.batch_size", mesh=None) -> None:
    """Raises errors.ConfigError (a ValueError) naming `what` and the device count unless the
    batch splits evenly over the devices."""
    n = mesh.size if mesh is not None else jax.device_count()
    if global_batch <= 0 or global_batch % n:
        raise errors.ConfigError(
            f"{what}={global_batch} must be a positive multiple of the number of devices ({n}); "
            f"try {max(n, (global_batch // n) * n) or n}"
        )


def local_batch_size(global_batch: int, mesh: Mesh | None = None) -> int:
    """The slice of a global batch that this process feeds (its devices' share)."""
    mesh = mesh if mesh is not None else data_mesh()
    check_batch_divisible(global_batch, mesh=mesh)
    local = sum(1 for d in mesh.devices.flat if d.process_index == jax.process_index())
    return global_batch // mesh.size * local


def global_batch(local_tree: Any, mesh: Mesh) -> Any:
    """Turns this process's numpy batch (leading axis = local examples) into global jax.Arrays.

    Every host passes its own shard; the result is one array per leaf whose leading axis spans all
    hosts, sharded over the mesh's "data" axis.
    """
    sharding = batch_sharding(mesh)
    return jax.tree.map(
        lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)), local_tree
    )


def to_host(tree: Any) -> Any:
    """Gathers (possibly multi-host) global arrays into numpy arrays on every process.

    A collective when an array spans several processes: every process must call it.
    """

    def fetch(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(a, tiled=True))
        return np.asarray(a)

    return jax.tree.map(fetch, tree)


def host_copy(tree: Any) -> Any:
    """Replicated (possibly multi-host) arrays -> numpy, from this process's own copy.

    No collective: every process holds a full copy of a replicated array (parameters, the metrics
    of a step), so its first addressable shard is the whole value.
    """

    def local(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return x.addressable_data(0)
        return x

    # One device_get for the whole tree: the copies start together (one wait, not one per leaf;
    # the training loop reads its ~30 metric scalars this way every step).
    return jax.tree.map(np.asarray, jax.device_get(jax.tree.map(local, tree)))


def all_agree(local_flags: np.ndarray) -> np.ndarray:
    """Elementwise AND of a bool vector over all processes: what every process holds (e.g. the
    batches every host has finished, so that all of them skip the same collective programs)."""
    if jax.process_count() == 1:
        return local_flags
    gathered = multihost_utils.process_allgather(local_flags.astype(np.int32))
    return np.all(np.asarray(gathered).reshape(jax.process_count(), -1) > 0, axis=0)


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier `name` (nothing to wait for on one)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def is_main_process() -> bool:
    return jax.process_index() == 0
