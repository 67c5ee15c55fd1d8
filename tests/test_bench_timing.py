"""sparsecore/benchmarks/timing.py: the one timer (warm-up, repetitions, median, device sync)."""

import time

import pytest

from sparsecore.benchmarks import common, timing


class Clock:
    """A fake perf_counter that each call of the timed function (and each sync) advances."""

    def __init__(self, monkeypatch):
        self.now = 0.0
        monkeypatch.setattr(timing.time, "perf_counter", lambda: self.now)


def test_median_of_the_timed_calls_after_the_warmup(monkeypatch):
    clock = Clock(monkeypatch)
    durations = iter([100.0, 100.0, 3.0, 1.0, 2.0, 50.0, 4.0])  # two warm-ups, then 5 timed

    def fn():
        clock.now += next(durations)

    t = timing.median_time(fn, warmup=2, reps=5)
    assert t["reps"] == 5 and t["times_s"] == [3.0, 1.0, 2.0, 50.0, 4.0]
    assert t["median_s"] == 3.0  # the warm-ups (100 s) are not counted; the outlier does not pull
    assert t["q25_s"] == 2.0 and t["q75_s"] == 4.0
    assert timing.median_s(lambda: None, warmup=0, reps=1) >= 0.0


def test_sync_is_called_inside_the_timed_region(monkeypatch):
    """A device call returns at once and its work finishes at the sync: the time of the work
    must be in the figure, so sync runs before the clock stops (and once before the first
    timed call, so that the warm-up's queued work is not counted)."""
    clock = Clock(monkeypatch)
    events = []

    def fn():  # returns at once; "queues" 5 s of work
        events.append("call")
        clock.now += 0.001

    def sync():
        events.append("sync")
        clock.now += 5.0

    t = timing.median_time(fn, warmup=1, reps=3, sync=sync)
    assert t["median_s"] == pytest.approx(5.001)
    # warm-up call + its sync, the drain before timing, then call + sync per timed call
    assert events == ["call", "sync", "sync"] + ["call", "sync"] * 3
    without = timing.median_time(fn, warmup=1, reps=3)
    assert without["median_s"] == pytest.approx(0.001)


def test_reps_fit_the_budget(monkeypatch):
    clock = Clock(monkeypatch)

    def fn():
        clock.now += 0.125  # (exact in binary: no rounding in budget / duration)

    assert timing.median_time(fn, budget_s=1.0)["reps"] == 8  # from the warm-up's 0.125 s
    assert timing.median_time(fn, budget_s=100.0, max_reps=7)["reps"] == 7
    assert timing.median_time(fn, budget_s=0.0, min_reps=4)["reps"] == 4
    calls = []
    t = timing.median_time(lambda: calls.append(fn()), warmup=0, budget_s=0.5)
    assert t["reps"] == 4 and len(calls) == 5  # no warm-up: one probe call sizes the run
    with pytest.raises(ValueError, match="reps must be >= 1"):
        timing.median_time(fn, reps=0)


def test_real_clock_and_the_old_name():
    assert common.median_time is timing.median_time
    t = timing.median_time(lambda: time.sleep(0.002), reps=3)
    assert 0.002 <= t["median_s"] < 0.5
