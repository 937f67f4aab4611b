"""One writer per output: a lock file that names its holder and notices when the holder died.

Two trainers on one workdir would both save the same steps (orbax fails on the second rename and
leaves orphan step folders) and interleave rows of one metrics file; two samplers on one output
directory would both draw every shard. `hold(directory, name)` takes `<directory>/<name>.lock`
for the duration of a run:

* The file is created with O_CREAT | O_EXCL (atomic on POSIX filesystems, NFS v3+ included) and
  holds the holder's host, pid, process start time, start date and command line.
* An existing lock whose holder runs on this host and is gone (no such pid, or the pid now belongs
  to a process started later) is stale: it is replaced, with a warning naming the dead holder. A
  run killed with SIGKILL therefore never blocks the next one.
* A live holder, or one on another host (whose liveness cannot be checked from here), makes the
  run stop before it writes anything, with a one-line `WorkdirLockedError` naming the holder and
  the file to delete if that run is known to be dead.

In a multi-host run only process 0 takes the lock: the other processes belong to the same run.
The same process may take a lock it already holds (the digits pipeline samples inside its run).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import pathlib
import socket
import sys
import uuid
from collections.abc import Iterator

import jax
from absl import logging

from gdiff import errors

# Locks this process holds: path -> how many nested `hold`s took it.
_HELD: dict[pathlib.Path, int] = {}


def lock_path(directory: str | os.PathLike, name: str) -> pathlib.Path:
    return pathlib.Path(directory).absolute() / f"{name}.lock"


def _start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (Linux /proc; None elsewhere), to tell a reused pid."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 (starttime), counted after the parenthesised command name, which may hold spaces.
    return stat.rsplit(")", 1)[1].split()[19]


def _record(what: str) -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "start_time": _start_time(os.getpid()),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "what": what,
        "command": " ".join(sys.argv)[:500],
        "token": uuid.uuid4().hex,
    }


def _alive(holder: dict) -> bool:
    """Whether the holder (on this host) still runs: its pid exists with its start time."""
    pid = int(holder.get("pid", -1))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    recorded, now = holder.get("start_time"), _start_time(pid)
    return recorded is None or now is None or recorded == now


def _read(path: pathlib.Path) -> dict | None:
    """The holder record, None when the file vanished; {} when it cannot be parsed."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def _create(path: pathlib.Path, record: dict, what: str) -> bool:
    """Writes `record` to `path` unless the file exists; whether this call created it.

    A write that fails (a full disk) removes the file it created: an empty lock would name no
    holder and block every later run.

    Raises:
      errors.DiskFullError: the disk (or quota) is full.
    """
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    except OSError as e:
        if errors.is_disk_full(e):
            raise _disk_full(path, what, e) from e
        raise
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=1)
    except BaseException as e:
        path.unlink(missing_ok=True)
        if errors.is_disk_full(e):
            raise _disk_full(path, what, e) from e
        raise
    return True


def _disk_full(path: pathlib.Path, what: str, exc: BaseException) -> errors.DiskFullError:
    return errors.DiskFullError(
        f"disk full while taking the lock {path} for the {what}: free space in {path.parent} "
        f"and rerun; nothing was written ({exc})"
    )


def _refuse(path: pathlib.Path, holder: dict, what: str) -> errors.WorkdirLockedError:
    here = socket.gethostname()
    who = f"pid {holder.get('pid')} on host {holder.get('host', '?')}"
    return errors.WorkdirLockedError(
        f"{path.parent} is in use by another {holder.get('what', what)} ({who}, started "
        f"{holder.get('started', '?')}: {holder.get('command', '?')}); wait for it to finish, "
        "use another directory, or, if that run is no longer running"
        + (" on that host" if holder.get("host") != here else "")
        + f", delete {path}"
    )


def acquire(path: pathlib.Path, what: str) -> dict:
    """Takes the lock at `path` (replacing a stale one); returns the record written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    record = _record(what)
    for _ in range(3):  # a stale lock removed by a concurrent starter: try again
        if _create(path, record, what):
            return record
        holder = _read(path)
        if holder is None:
            continue
        if holder.get("host") != record["host"] or _alive(holder):
            raise _refuse(path, holder, what)
        logging.warning(
            "%s: removing the stale lock of %s pid %s (started %s), which is no longer running",
            path,
            holder.get("what", "a run"),
            holder.get("pid"),
            holder.get("started"),
        )
        # Renamed first so that of two starters removing it, one wins and the other retries.
        with contextlib.suppress(FileNotFoundError):
            aside = path.with_name(f".{path.name}.stale-{uuid.uuid4().hex}")
            os.replace(path, aside)
            aside.unlink()
    raise _refuse(path, _read(path) or {}, what)


def release(path: pathlib.Path, record: dict) -> None:
    """Deletes the lock if it still holds `record` (never another run's lock)."""
    holder = _read(path)
    if holder and holder.get("token") == record["token"]:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def hold(directory: str | os.PathLike, name: str, *, what: str) -> Iterator[None]:
    """Holds `<directory>/<name>.lock` for the block (process 0 only; re-entrant).

    Args:
      directory: the directory the run writes (created if missing).
      name: the lock's name (e.g. "train_diffusion", "sampling").
      what: the run, for messages ("diffusion training", "sampling run").

    Raises:
      errors.WorkdirLockedError: a live run (or one on another host) holds the lock.
    """
    path = lock_path(directory, name)
    if jax.process_index() != 0:
        yield
        return
    if path in _HELD:  # this process already holds it: the outer `hold` releases it
        _HELD[path] += 1
        try:
            yield
        finally:
            _HELD[path] -= 1
        return
    record = acquire(path, what)
    _HELD[path] = 1
    try:
        yield
    finally:
        del _HELD[path]
        release(path, record)
