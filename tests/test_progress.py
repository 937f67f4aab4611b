"""gdiff.progress: a tqdm bar on a terminal, a few timestamped log lines anywhere else."""

import io
import logging as pylogging
import sys

import jax
import pytest
import tqdm
from absl import logging

from gdiff import progress


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class TtyStream(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _verbosity():
    before = logging.get_verbosity()
    logging.set_verbosity(logging.INFO)
    yield
    logging.set_verbosity(before)


@pytest.fixture(autouse=True)
def _not_a_terminal(monkeypatch):
    # pytest may run with a terminal as stderr; these tests decide which kind they see.
    monkeypatch.setattr(sys, "stderr", io.StringIO())


@pytest.fixture
def lines(caplog):
    """The progress lines logged so far (absl records from gdiff/progress.py)."""
    caplog.set_level(pylogging.INFO)

    def get() -> list[str]:
        return [
            r.getMessage()
            for r in caplog.records
            if r.name == "absl" and r.filename == "progress.py" and r.levelno == pylogging.INFO
        ]

    return get


def test_one_line_per_ten_percent(lines):
    clock = FakeClock()
    bar = progress.bar(100, desc="sampling", unit="img", clock=clock)
    assert bar is not None and not isinstance(bar, tqdm.tqdm)
    for _ in range(100):
        clock.now += 1.0
        bar.update(1)
    bar.close()  # already at 100%: nothing more
    assert lines() == [
        "sampling: 10/100 img (10%), 1.00 img/s, ETA 0:01:30",
        "sampling: 20/100 img (20%), 1.00 img/s, ETA 0:01:20",
        "sampling: 30/100 img (30%), 1.00 img/s, ETA 0:01:10",
        "sampling: 40/100 img (40%), 1.00 img/s, ETA 0:01:00",
        "sampling: 50/100 img (50%), 1.00 img/s, ETA 0:00:50",
        "sampling: 60/100 img (60%), 1.00 img/s, ETA 0:00:40",
        "sampling: 70/100 img (70%), 1.00 img/s, ETA 0:00:30",
        "sampling: 80/100 img (80%), 1.00 img/s, ETA 0:00:20",
        "sampling: 90/100 img (90%), 1.00 img/s, ETA 0:00:10",
        "sampling: 100/100 img (100%), 1.00 img/s, ETA 0:00:00",
    ]


def test_thirty_seconds_alone_log_a_line(lines):
    clock = FakeClock()
    bar = progress.bar(1000, desc="train x", unit="step", clock=clock)
    clock.now = 29.0
    bar.update(1)
    assert lines() == []
    clock.now = progress.LOG_INTERVAL_S
    bar.update(1)
    # 2 steps in 30 s; 998 left at 1/15 step/s is 14970 s.
    assert lines() == ["train x: 2/1000 step (0%), 0.0667 step/s, ETA 4:09:30"]
    clock.now = 59.0
    bar.update(1)
    assert len(lines()) == 1  # the interval counts from the last line, not from the start
    clock.now = 60.0
    bar.update(1)
    assert lines()[-1] == "train x: 4/1000 step (0%), 0.0667 step/s, ETA 4:09:00"


def test_initial_is_not_counted_in_rate_or_eta(lines):
    clock = FakeClock()
    bar = progress.bar(100, desc="nll", unit="img", initial=45, clock=clock)
    for _ in range(10):
        clock.now += 2.0
        bar.update(1)
    # 5 images of this process in 10 s (not 50 in 10 s); steps stay at multiples of 10% of the
    # total, so 50% is logged and 55% is not.
    assert lines() == ["nll: 50/100 img (50%), 0.50 img/s, ETA 0:01:40"]
    bar.close()  # stopped short of 100%: the final line says where
    assert lines() == [
        "nll: 50/100 img (50%), 0.50 img/s, ETA 0:01:40",
        "nll: 55/100 img (55%), 0.50 img/s, ETA 0:01:30",
    ]
    bar.close()
    assert len(lines()) == 2


def test_resumed_at_the_end_logs_nothing(lines):
    bar = progress.bar(100, desc="train x", unit="step", initial=100, clock=FakeClock())
    bar.close()
    assert lines() == []


def test_postfix(lines):
    clock = FakeClock()
    bar = progress.bar(10, desc="nll", unit="img", clock=clock)
    clock.now = 4.0
    bar.set_postfix(bpd="1.2345")
    bar.update(2)
    bar.set_postfix(bpd=3.14159, a="x")
    clock.now = 8.0
    bar.update(2)
    assert lines() == [
        "nll: 2/10 img (20%), 0.50 img/s, ETA 0:00:16, bpd=1.2345",
        "nll: 4/10 img (40%), 0.50 img/s, ETA 0:00:12, a=x, bpd=3.14",
    ]


def test_unit_scale_bytes(lines):
    clock = FakeClock()
    bar = progress.bar(2 * 10**9, desc="read m.pt", unit="B", unit_scale=True, clock=clock)
    clock.now = 1.0
    bar.update(2 * 10**8)
    assert lines() == ["read m.pt: 200M/2.00G B (10%), 200M B/s, ETA 0:00:09"]


def test_lines_still_logged_at_verbosity_minus_one(lines):
    # Progress is on at -1 (the pipeline's default): its lines must not be dropped with INFO.
    logging.set_verbosity(logging.WARNING)
    clock = FakeClock()
    bar = progress.bar(10, desc="features", unit="img", clock=clock)
    clock.now = 1.0
    bar.update(10)
    assert lines() == ["features: 10/10 img (100%), 10.0 img/s, ETA 0:00:00"]


def test_terminal_gets_tqdm(monkeypatch):
    stream = TtyStream()
    monkeypatch.setattr(sys, "stderr", stream)
    bar = progress.bar(10, desc="sampling", unit="img", initial=2)
    try:
        assert isinstance(bar, tqdm.tqdm)
        assert bar.n == 2
        bar.update(3)
        bar.set_postfix(bpd="1.2345")
    finally:
        bar.close()
    assert "sampling" in stream.getvalue() and "bpd=1.2345" in stream.getvalue()


def test_off_on_other_processes(monkeypatch):
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    assert not progress.enabled()
    assert progress.bar(10, desc="sampling", unit="img") is None


def test_off_at_verbosity_minus_two():
    logging.set_verbosity(-2)
    assert not progress.enabled()
    assert progress.bar(10, desc="sampling", unit="img") is None
