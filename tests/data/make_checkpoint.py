"""Writes tests/data/checkpoint_v2.npz: a format-2 checkpoint as sparsecore wrote it before the
hardening change (run with that version's code: `git worktree add /tmp/old 648cf8a`, then
`cd /tmp/old && python /path/to/tests/data/make_checkpoint.py OUT`). The test that resumes it
(tests/test_hardening.py) rebuilds the same config and dataset."""

import sys
from pathlib import Path

import numpy as np

CONFIG = dict(
    arch=[20, 16, 3],
    sparsity=0.7,
    method="rigl",
    optimizer="adam",
    lr=0.01,
    delta_t=5,
    epochs=2,
    batch_size=50,
    seed=3,
    progress=False,
)


def blobs(seed=0):
    """The dataset of tests/cases.py's blobs_npz, as arrays."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((3, 20)) * 3
    ytr, yte = rng.integers(0, 3, 600), rng.integers(0, 3, 200)
    return (
        centers[ytr] + rng.standard_normal((600, 20)),
        ytr,
        centers[yte] + rng.standard_normal((200, 20)),
        yte,
    )


if __name__ == "__main__":
    from sparsecore.data import from_arrays
    from sparsecore.train import TrainConfig, Trainer

    out = Path(sys.argv[1])
    tr = Trainer(TrainConfig(**CONFIG, out=str(out)), from_arrays(*blobs()))
    tr.run()
    print(out / "checkpoint.npz")
