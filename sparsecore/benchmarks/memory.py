"""The benchmarks' memory measures: this process's peak RSS (sparsecore/rss.py, the one helper:
VmHWM, right in a subprocess) and the peak of CuPy's memory pool.

``device_pool_peak()`` measures device memory: the peak bytes CuPy's memory pool hands out
inside a ``with`` block.
"""

from __future__ import annotations

from sparsecore.rss import (  # noqa: F401 (the benchmarks' names for them)
    CLEAR_REFS,
    RESET_HWM,
    STATUS,
    _maxrss_mib,
    _status_mib,
    current_rss_mib,
    peak_rss_mib,
    reset_peak_rss,
)


class device_pool_peak:
    """``with device_pool_peak() as p: ...`` then ``p.peak``: the peak bytes held by CuPy's
    memory pool between enter and exit, above the level at enter (a CuPy memory hook)."""

    def __init__(self):
        from cupy.cuda import memory_hook  # optional: only where the GPU suite runs

        outer = self

        class _Hook(memory_hook.MemoryHook):
            name = "sparsecore_peak"

            def malloc_postprocess(self, **kw):
                outer.now += kw["mem_size"]
                outer.peak = max(outer.peak, outer.now)

            def free_postprocess(self, **kw):
                outer.now -= kw["mem_size"]

        self.hook = _Hook()
        self.now = self.peak = 0

    def __enter__(self):
        self.now = self.peak = 0
        self.hook.__enter__()
        return self

    def __exit__(self, *exc):
        self.hook.__exit__(*exc)
