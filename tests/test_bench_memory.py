"""sparsecore/benchmarks/memory.py: the one peak-RSS helper, right in a subprocess."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sparsecore.benchmarks import common, memory, step

ROOT = Path(__file__).resolve().parents[1]
linux = pytest.mark.skipif(not Path(memory.STATUS).exists(), reason="needs /proc (Linux)")

CHILD = """
import json, sys
import numpy as np
from sparsecore.benchmarks import memory
before = memory.peak_rss_mib()
a = np.ones(int(sys.argv[1]) * 2**18, np.float32)  # N MiB, every page touched
print(json.dumps({"before": before, "peak": memory.peak_rss_mib(),
                  "now": memory.current_rss_mib()}))
"""


def _child(n_mib):
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(n_mib)],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": ""},
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


@linux
def test_a_child_reports_its_own_peak_not_its_parents():
    parent_peak_mib = 400
    big = np.ones(parent_peak_mib * 2**18, np.float32)  # the parent peaks at >= 400 MiB ...
    assert memory.peak_rss_mib() >= parent_peak_mib
    held = _child(64)  # ... while the child starts: ru_maxrss would start there
    del big  # ... and after the parent freed it (ru_maxrss keeps the parent's peak)
    freed = _child(64)
    for r in (held, freed):
        assert r["peak"] >= r["before"] + 64 * 0.95  # the child's own allocation is seen
        assert r["peak"] >= r["now"] >= 64
        # the interpreter, NumPy and 64 MiB: far below the parent's 400 MiB peak
        assert r["before"] < parent_peak_mib / 2 and r["peak"] < parent_peak_mib * 0.75


@linux
def test_reset_restarts_the_peak_at_the_current_rss():
    a = np.ones(128 * 2**18, np.float32)
    del a
    assert memory.peak_rss_mib() >= memory.current_rss_mib() + 100
    if not memory.reset_peak_rss():
        pytest.skip("/proc/self/clear_refs is not writable here")
    assert memory.peak_rss_mib() < memory.current_rss_mib() + 50


def test_the_old_names_are_the_helper():
    assert common.peak_rss_mib is memory.peak_rss_mib
    assert step.rss_mib is memory.peak_rss_mib and step.current_rss_mib is memory.current_rss_mib
    assert memory.peak_rss_mib() >= memory.current_rss_mib() * 0.99 > 0
