"""Training-step level of the benchmark suite: ``sparsecore bench --levels step``.

    python bench/train_step.py --widths 4096 --sparsities 0.99      # 784-4096-4096-10 at 99%

Arguments are those of ``sparsecore bench``; see ``sparsecore bench --help``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsecore.benchmarks.suite import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["--levels", "step", *sys.argv[1:]]))
