"""Errors a user can act on, reported by the command line in one line (no traceback).

A `GdiffError` carries a complete message: what went wrong, where (the file, step or key), and
what to do about it. `gdiff.cli` prints `gdiff: <message>` and exits with status 1; a library
caller catches it like any exception. Bugs stay ordinary exceptions with their tracebacks.
"""

from __future__ import annotations

import errno


class GdiffError(Exception):
    """A problem with the user's inputs or machine, described completely by its message."""


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
