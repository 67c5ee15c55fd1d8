"""What every benchmark needs: the machine's description, optional torch, the break-even rule.

The timer lives in timing.py and the peak-RSS helper in memory.py; their old names here
(``median_time``, ``peak_rss_mib``) still resolve.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time

import numpy as np

import sparsecore
from sparsecore.benchmarks.memory import peak_rss_mib  # noqa: F401  (old path)
from sparsecore.benchmarks.timing import median_time  # noqa: F401  (old path)


def try_torch(threads: int | None = None):
    """torch, set to the same thread count, or None when it is not installed."""
    try:
        import warnings

        import torch

        warnings.filterwarnings("ignore", message=".*Sparse.*")
        if threads:
            torch.set_num_threads(threads)
        return torch
    except ImportError:
        return None


def torch_csr(torch, W):
    """A sparsecore CSR as a torch sparse CSR tensor (int64 indices, shared float32 values)."""
    return torch.sparse_csr_tensor(
        torch.from_numpy(W.indptr.astype(np.int64)),
        torch.from_numpy(W.indices.astype(np.int64)),
        torch.from_numpy(W.data),
        size=W.shape,
    )


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    keep = [x for x in flags if x.startswith(("avx", "fma", "amx"))]
                    return " ".join(sorted(keep))
    except OSError:
        pass
    return "unknown"


def environment(torch=None) -> dict:
    import numba
    import scipy

    env = {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "numba": numba.__version__,
        "torch": torch.__version__ if torch is not None else "not installed",
        "sparsecore": sparsecore.__version__,
        "threads": sparsecore.threading_info(),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    return env


def log_crossing(points):
    """The highest x at which y >= 1 (e.g. density and speed-up over dense: the break-even
    density), log-interpolated between the densest point with y >= 1 and the next denser one;
    inf if the densest point has y >= 1, 0 if no point has, None without points."""
    pts = sorted((float(x), max(float(y), 1e-12)) for x, y in points)
    if not pts:
        return None
    if pts[-1][1] >= 1.0:
        return float("inf")
    above = [i for i, (_, y) in enumerate(pts) if y >= 1.0]
    if not above:
        return 0.0
    (x0, y0), (x1, y1) = pts[above[-1]], pts[above[-1] + 1]
    t = np.log(y0) / (np.log(y0) - np.log(y1))  # where log y crosses 0
    return float(np.exp(np.log(x0) + t * (np.log(x1) - np.log(x0))))
