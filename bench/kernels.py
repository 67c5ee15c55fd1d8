"""Kernel level of the benchmark suite (kept for old commands): ``sparsecore bench --levels kernels``.

    python bench/kernels.py --preset quick --out bench/out
    python bench/kernels.py --preset full --out bench/results

Arguments are those of ``sparsecore bench``; see ``sparsecore bench --help``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsecore.benchmarks.suite import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["--levels", "kernels", *sys.argv[1:]]))
