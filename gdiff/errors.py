"""Errors a user can act on, reported by the command line in one line (no traceback).

A `GdiffError` carries a complete message: what went wrong, where (the file, step or key), and
what to do about it. `gdiff.cli` prints `gdiff: <message>` and exits with the error's
`exit_status` (1, or `EXIT_STOPPED` for a run that stopped on request); a library caller catches it
like any exception. Each kind also subclasses the builtin exception a Python caller would expect
(a missing input is a FileNotFoundError, a bad value a ValueError). Bugs stay ordinary exceptions
with their tracebacks.

Exit statuses of the `gdiff` command: 0 done; 1 an error (one `gdiff: ...` line); 3 stopped on a
request (SIGTERM, a scheduler's preemption) after saving: rerun the same command to resume.
"""

from __future__ import annotations

import errno
import os

# The exit status of a run that stopped on a request (SIGTERM) after saving its state, so that
# a scheduler can tell it from a finished run (0) and from a failed one (1).
EXIT_STOPPED = 3


class GdiffError(Exception):
    """A problem with the user's inputs or machine, described completely by its message."""

    exit_status = 1


class ConfigError(GdiffError, ValueError):
    """A config value that cannot work (an unknown choice, an impossible combination)."""


class CheckpointError(GdiffError):
    """No step of a checkpoint directory can be restored (each step's reason is in the message)."""


class ConfigMismatchError(GdiffError, ValueError):
    """The config does not describe what a checkpoint or an output directory holds."""


class WorkdirLockedError(GdiffError):
    """Another live run writes the same directory."""


class DiskFullError(GdiffError, OSError):
    """A write failed because the disk (or quota) is full."""


class UnknownKeyError(ConfigError, KeyError):
    """A config value names something that does not exist (an EMA copy a checkpoint lacks, a key
    a sweep model cannot override); a KeyError too, for callers that look it up."""

    __str__ = ConfigError.__str__  # the message as is (a KeyError would quote it)


class OutputExistsError(GdiffError, FileExistsError):
    """A finished output would be replaced; the message names the setting that allows it."""


class InputError(GdiffError, ValueError):
    """An input file or value that cannot be used (a malformed .npz, a truncated shard, a label
    out of range), named with what is wrong and what was expected."""


class MissingInputError(GdiffError, FileNotFoundError):
    """A path that does not exist, or a directory where a file is expected (or the reverse)."""


class StoppedError(GdiffError):
    """A run stopped on a request (SIGTERM) after saving; rerunning the command resumes it."""

    exit_status = EXIT_STOPPED


def require_file(path, what: str, hint: str) -> None:
    """Raises MissingInputError unless `path` is an existing file: `what` names it ("torch
    checkpoint", "reference batch"), `hint` says what to give instead."""
    if not os.path.exists(path):
        raise MissingInputError(f"{what} {path} does not exist: {hint}")
    if os.path.isdir(path):
        raise MissingInputError(f"{what} {path} is a directory: {hint}")


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc`, or an exception it was raised from, is "no space left on device".

    orbax and TensorStore wrap the OSError of a failed write in their own exceptions, sometimes
    only as text, so both the chain and the message are checked.
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(exc)
        if "No space left on device" in text or "Disk quota exceeded" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False
