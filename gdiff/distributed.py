"""Data parallelism over every device of every host, on one code path.

gdiff maps its work over a one-axis device mesh named "data" with `jax.jit` and `NamedSharding`
(the maintained successor of `jax.pmap`): the same program runs on one CPU, eight fake CPU
devices in tests, a GPU, or all chips of a TPU pod with one process per host.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gdiff import errors

DATA_AXIS = "data"

# A plain multi-host launch (no SLURM, no Cloud TPU) sets these three on every process; JAX reads
# the first itself but knows the count and id only on clusters it detects. JAX also reads
# JAX_LOCAL_DEVICE_IDS (which local accelerators this process uses) by itself.
ADDRESS_ENV = "JAX_COORDINATOR_ADDRESS"
COUNT_ENV = "JAX_NUM_PROCESSES"
ID_ENV = "JAX_PROCESS_ID"
# Environment variables that mean "this process is one of several": a coordinator named (by us or
# by a launcher), or a cluster JAX detects by itself (SLURM, Cloud TPU).
_COORDINATOR_ENV = (ADDRESS_ENV, "COORDINATOR_ADDRESS", "SLURM_JOB_ID", "TPU_NAME")
# initialize() keyword -> (environment variable, config key) that give it, in messages.
_SOURCES = {
    "coordinator_address": (ADDRESS_ENV, "config.coordinator_address"),
    "num_processes": (COUNT_ENV, "config.num_processes"),
    "process_id": (ID_ENV, "config.process_id"),
}


def initialize_kwargs(
    env: Mapping[str, str],
    *,
    coordinator_address: str = "",
    num_processes: int = -1,
    process_id: int = -1,
) -> dict[str, Any]:
    """The arguments of `jax.distributed.initialize` from the config keys and the environment.

    Each of coordinator_address, num_processes and process_id comes from its config key when set
    ("" / -1 mean unset), else from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
    in `env`; one given by neither is left out, for JAX's own cluster detection (SLURM, Cloud
    TPU) to fill in. A pure function: nothing is initialised.

    Raises:
      errors.ConfigError: a count or id that is not an integer, or out of range, naming where it
        came from.
    """
    given = {
        "coordinator_address": str(coordinator_address or ""),
        "num_processes": int(num_processes),
        "process_id": int(process_id),
    }
    kwargs, origin = {}, {}
    for name, value in given.items():
        env_name, key = _SOURCES[name]
        if value not in ("", -1):
            kwargs[name], origin[name] = value, f"{key}={value!r}"
        elif env.get(env_name, "").strip():
            text = env[env_name].strip()
            origin[name] = f"{env_name}={text!r}"
            kwargs[name] = text if name == "coordinator_address" else _as_int(text, env_name)
    count, index = kwargs.get("num_processes"), kwargs.get("process_id")
    if count is not None and count < 1:
        raise errors.ConfigError(f"{origin['num_processes']}: the process count must be >= 1")
    if index is not None and (index < 0 or (count is not None and index >= count)):
        bound = f"in 0..{count - 1}" if count is not None else ">= 0"
        raise errors.ConfigError(f"{origin['process_id']}: the process id must be {bound}")
    return kwargs


def _as_int(text: str, name: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise errors.ConfigError(f"{name}={text!r} is not an integer") from None


def wants_initialize(setting: Any, env: Mapping[str, str], kwargs: Mapping[str, Any]) -> bool:
    """Whether to start the distributed runtime: `config.distributed` True or False, or "auto":
    when a coordinator address is known (`kwargs`, from the config or the environment), more than
    one process is declared, or a cluster JAX detects (SLURM, Cloud TPU) is in `env`.

    Raises:
      errors.ConfigError: a setting other than auto / true / false.
    """
    if isinstance(setting, str):
        value = setting.strip().lower()
        if value not in ("auto", "true", "false", "1", "0", ""):
            raise errors.ConfigError(
                f"config.distributed must be auto, true or false; got {setting!r}"
            )
        if value != "auto":
            return value in ("true", "1")
        return (
            bool(kwargs.get("coordinator_address"))
            or kwargs.get("num_processes", 1) > 1
            or any(env.get(name) for name in _COORDINATOR_ENV)
        )
    return bool(setting)


def missing_message(kwargs: Mapping[str, Any]) -> str:
    """The one-line error for a launch JAX could not complete: what is missing and how to set it."""
    missing = [name for name in _SOURCES if name not in kwargs]
    names = " and ".join(_SOURCES[m][0] for m in missing)
    keys = " / ".join(f"--{_SOURCES[m][1]}" for m in missing)
    return (
        f"a multi-host run needs {names}, and JAX found no cluster it knows (SLURM, Cloud TPU) "
        f"to ask: on every process set "
        f"{ADDRESS_ENV}=<host:port of process 0>, {COUNT_ENV}=<number of processes> and "
        f"{ID_ENV}=<0..N-1, this process> (or {keys}), or --config.distributed=false for one "
        "process"
    )


def maybe_initialize(
    setting: Any = "auto",
    *,
    coordinator_address: str = "",
    num_processes: int = -1,
    process_id: int = -1,
    env: Mapping[str, str] | None = None,
) -> bool:
    """Calls `jax.distributed.initialize(...)` when asked to or when the environment needs it.

    Args:
      setting: True (always), False (never) or "auto" (`wants_initialize`).
      coordinator_address, num_processes, process_id: the config keys of the same names; unset
        ("" / -1), the environment's JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
        JAX_PROCESS_ID, else JAX's cluster detection (`initialize_kwargs`).
      env: the environment (default os.environ).

    Returns:
      Whether the distributed runtime was initialised by this call.

    Raises:
      errors.ConfigError: a value is malformed, or one is missing and JAX cannot detect it.
    """
    env = os.environ if env is None else env
    kwargs = initialize_kwargs(
        env,
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
    )
    if not wants_initialize(setting, env, kwargs) or jax.distributed.is_initialized():
        return False
    try:
        jax.distributed.initialize(**kwargs)
    except ValueError as e:
        # JAX's own detection (SLURM, Cloud TPU) filled in nothing: its "Number of processes must
        # be defined" names neither the variable nor the key that would set it.
        if all(name in kwargs for name in _SOURCES) or "defined" not in str(e):
            raise
        raise errors.ConfigError(missing_message(kwargs)) from e
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
