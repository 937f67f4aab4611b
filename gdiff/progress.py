"""Progress bars for every long loop: one place decides who shows them and how.

Progress is shown on process 0 only, and not when the user asked absl for errors only
(`--verbosity=-2` or lower); everywhere else `bar` returns None, so loops write
`if bar is not None: bar.update(n)`.

On a terminal it is a tqdm bar (count, rate and ETA). Anywhere else (a log file, a scheduler's
captured stderr) tqdm's carriage-return redraws pile up as hundreds of kilobytes of one long line,
so there it is a few timestamped log lines instead: one per further `LOG_STEP_PERCENT` of the total
or every `LOG_INTERVAL_S` seconds, whichever comes first.
"""

import logging as pylogging
import sys
import time
from collections.abc import Callable
from numbers import Number
from typing import Protocol

import jax
import tqdm
from absl import logging

# A slow loop still says it is alive at least this often, so a stalled job is told from a slow one.
LOG_INTERVAL_S = 30.0
# Ten lines per loop in all: enough to follow a run in its log without burying the other lines.
LOG_STEP_PERCENT = 10


class Bar(Protocol):
    """What loops may call on a bar: the subset of tqdm that both kinds of bar implement."""

    def update(self, n: int = 1) -> object: ...

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None: ...

    def close(self) -> None: ...


def enabled() -> bool:
    """Whether this process shows progress."""
    return jax.process_index() == 0 and logging.get_verbosity() >= logging.WARNING


def bar(
    total: int,
    *,
    desc: str,
    unit: str,
    initial: int = 0,
    clock: Callable[[], float] = time.monotonic,
    **kwargs,
) -> Bar | None:
    """A bar over `total` units starting at `initial` (other tqdm options in `kwargs`, e.g.
    unit_scale=True for bytes), or None where progress is off. `clock` times the log lines
    written when stderr is not a terminal (tests pass a fake one)."""
    if not enabled():
        return None
    if _is_terminal(kwargs.get("file") or sys.stderr):
        return tqdm.tqdm(
            total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, **kwargs
        )
    return _LogBar(
        total,
        desc=desc,
        unit=unit,
        initial=initial,
        clock=clock,
        unit_scale=bool(kwargs.get("unit_scale", False)),
        unit_divisor=kwargs.get("unit_divisor", 1000),
    )


def _is_terminal(stream) -> bool:
    # Replaced streams (pytest's capture, notebook outputs, a closed file) may lack isatty or
    # raise from it; none of them redraws a line in place.
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


class _LogBar:
    """tqdm's update/set_postfix/close, reported as log lines (see the module docstring).

    tqdm's display options (ncols, leave, position, ...) mean nothing in a log and are not taken;
    `unit_scale` and `unit_divisor` still shorten byte counts ("1.23G").
    """

    def __init__(
        self,
        total: int,
        *,
        desc: str,
        unit: str,
        initial: int,
        clock: Callable[[], float],
        unit_scale: bool,
        unit_divisor: int,
    ):
        self.total, self.desc, self.unit = total, desc, unit
        self.n = initial
        self._initial = initial
        self._unit_scale, self._unit_divisor = unit_scale, unit_divisor
        self._clock = clock
        self._started = self._last_line = clock()
        # The starting point counts as reported: a bar that is opened and closed with nothing done
        # (a resumed run already at its end) writes nothing.
        self._logged_n = initial
        self._next_step = self._step_after(initial)
        self.postfix = ""
        self._closed = False

    def update(self, n: int = 1) -> None:
        if self._closed:
            return
        self.n += n
        now = self._clock()
        crossed = self.total > 0 and self.n * 100 >= self._next_step * LOG_STEP_PERCENT * self.total
        if crossed or now - self._last_line >= LOG_INTERVAL_S:
            self._log(now)

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        # The same text tqdm would show, so a value reads alike on a terminal and in a log. It
        # waits for the next line: a postfix alone is not progress.
        del refresh
        postfix = dict(ordered_dict or {})
        postfix.update(sorted(kwargs.items()))
        self.postfix = ", ".join(f"{k}={_postfix_value(v)}" for k, v in postfix.items())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Where the loop stopped short of 100% (or past the last line), the log should still say
        # how far it got.
        if self.n != self._logged_n:
            self._log(self._clock())

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _line(self, now: float) -> str:
        """The report of the bar as of time `now`."""
        pct = self.n * 100 // self.total if self.total > 0 else 100
        # Units resumed from disk (`initial`) were not done by this process: counting them would
        # inflate the rate and shrink the ETA of a resumed run.
        done, elapsed = self.n - self._initial, now - self._started
        rate = done / elapsed if elapsed > 0 else None
        if self.n >= self.total:
            eta = "0:00:00"
        elif rate:
            eta = _clock_time((self.total - self.n) / rate)
        else:
            eta = "?"
        rate_text = "?" if rate is None else self._count(rate, rate=True)
        text = (
            f"{self.desc}: {self._count(self.n)}/{self._count(self.total)} {self.unit} ({pct}%), "
            f"{rate_text} {self.unit}/s, ETA {eta}"
        )
        return f"{text}, {self.postfix}" if self.postfix else text

    def _log(self, now: float) -> None:
        _info(self._line(now))
        self._last_line, self._logged_n = now, self.n
        self._next_step = self._step_after(self.n)

    def _step_after(self, n: int) -> int:
        # Steps are multiples of LOG_STEP_PERCENT of the total, kept as integers: with floats,
        # 3 * 0.1 * 100 is 30.000000000000004 and the 30% line would wait for unit 31.
        if self.total <= 0:
            return 1
        return n * 100 // (LOG_STEP_PERCENT * self.total) + 1

    def _count(self, x: float, rate: bool = False) -> str:
        if self._unit_scale:
            return tqdm.tqdm.format_sizeof(x, divisor=self._unit_divisor)
        if not rate:
            return str(x)
        # About three significant figures without exponents, from 0.0123 step/s to 12345 img/s.
        if x >= 100:
            return f"{x:.0f}"
        if x >= 10:
            return f"{x:.1f}"
        if x >= 0.1:
            return f"{x:.2f}"
        return f"{x:.3g}"


def _postfix_value(v: object) -> str:
    if isinstance(v, Number):
        return tqdm.tqdm.format_num(v)
    return str(v).strip()


def _clock_time(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def _info(line: str) -> None:
    """Logs `line` at INFO, even where absl's verbosity is WARNING.

    Progress is on at --verbosity=-1 (it is off only at -2), and `gdiff --mode=pipeline` lowers
    the verbosity to -1 by default to hide library INFO lines: `logging.info` would then drop every
    progress line, and a job whose stderr is a file would show no progress at all. The record is
    handed to absl's handlers directly instead, so it still reads as an ordinary timestamped INFO
    line of this file.
    """
    if logging.level_info():
        logging.info("%s", line)
        return
    logger = logging.get_absl_logger()
    path, lineno, func, _ = logger.findCaller()
    logger.handle(
        logger.makeRecord(logger.name, pylogging.INFO, path, lineno, "%s", (line,), None, func)
    )
