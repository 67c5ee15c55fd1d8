"""This process's resident memory: its peak (right in a subprocess) and now, in MiB.

The one peak-RSS helper of the project: the benchmarks (sparsecore/benchmarks/memory.py) and
the MPI ranks' memory report use it. It imports nothing of the project.

``peak_rss_mib()`` reads ``VmHWM`` from /proc/self/status (Linux): the high-water mark of this
process's own address space. Why not ``resource.getrusage(RUSAGE_SELF).ru_maxrss``: that is a
per-process maximum kept across exec, and at exec the kernel folds the old address space's
high-water mark into it. Python's ``subprocess`` starts a child with vfork (or fork) + exec, so
the child's ``ru_maxrss`` starts at the *parent's* peak (vfork shares the parent's address
space until exec) or the parent's RSS at the fork. A worker started by a suite that already
held a big model would report the suite's memory, not its own. ``VmHWM`` belongs to the address
space, which exec replaces: it starts afresh in the child. (``RUSAGE_CHILDREN`` does not help
either: it is the largest ``ru_maxrss`` among the waited-for children, with the same flaw.)

A child made by a bare ``fork()`` (multiprocessing's "fork") keeps its parent's address space,
and its ``VmHWM`` starts at the RSS it inherited; ``reset_peak_rss()`` (``/proc/self/clear_refs``
with "5") restarts the mark at the current RSS, e.g. at the start of the measured region.

Outside Linux the functions fall back to ``ru_maxrss`` (macOS: bytes; elsewhere KiB), with the
flaw above, and to NaN where there is no ``resource`` module (Windows); ``reset_peak_rss`` then
returns False.
"""

from __future__ import annotations

import sys

try:
    import resource
except ImportError:  # not POSIX (Windows)
    resource = None

STATUS = "/proc/self/status"
CLEAR_REFS = "/proc/self/clear_refs"
RESET_HWM = "5"  # clear_refs command: reset the peak RSS to the current RSS (Linux >= 4.0)


def _status_mib(field: str) -> float:
    with open(STATUS) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise KeyError(field)


def _maxrss_mib() -> float:
    if resource is None:
        return float("nan")
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (MiB): VmHWM, which starts afresh at exec
    (see the module docstring for why not ru_maxrss)."""
    try:
        return _status_mib("VmHWM")
    except (OSError, KeyError):  # not Linux
        return _maxrss_mib()


def current_rss_mib() -> float:
    """Resident memory of this process now (MiB): VmRSS (the peak where it cannot be read)."""
    try:
        return _status_mib("VmRSS")
    except (OSError, KeyError):
        return peak_rss_mib()


def reset_peak_rss() -> bool:
    """Restart the peak at the current RSS (after a bare fork, or between measurements in one
    process); False where the system cannot (not Linux, or /proc not writable)."""
    try:
        with open(CLEAR_REFS, "w") as f:
            f.write(RESET_HWM)
        return True
    except OSError:
        return False
