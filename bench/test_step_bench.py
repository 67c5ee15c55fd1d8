"""pytest-benchmark view of one training step: python -m pytest bench/test_step_bench.py

The engine's RigL step (forward, backward, optimizer; no topology update inside the timed calls:
the update is benchmarked on its own) beside the same MLP trained densely with NumPy, at
784-1024-1024-10, batch 128, on MNIST batches that change every call. The model's forward is
checked against a float64 forward of its weights first. `sparsecore bench --levels step` is the
fuller version (updates amortised, peak memory per process, torch baselines).
"""

import numpy as np
import pytest

from sparsecore.benchmarks.step import check_forward, load_data, prepare_data
from sparsecore.train import TrainConfig, Trainer

ARCH, BATCH = [784, 1024, 1024, 10], 128


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return load_data(prepare_data(tmp_path_factory.mktemp("data"), 4096))


def _trainer(data, method, sparsity, delta_t=10**6):
    cfg = TrainConfig(
        arch=ARCH, sparsity=sparsity, method=method, delta_t=delta_t, batch_size=BATCH,
        epochs=10**6, max_steps=10**7, progress=False,
    )  # fmt: skip
    tr = Trainer(cfg, data)
    check_forward(tr.model, np.ascontiguousarray(data.x_train[:BATCH].T))
    batches = (i for e in range(10**6) for i in tr.batches(e))

    def step():
        idx = next(batches)
        tr.train_step(np.ascontiguousarray(data.x_train[idx].T), data.y_train[idx])

    return tr, step


@pytest.mark.parametrize("method, sparsity", [("dense", 0.5), ("rigl", 0.9), ("rigl", 0.99)],
                         ids=["dense", "rigl-90%", "rigl-99%"])  # fmt: skip
def test_step(benchmark, data, method, sparsity):
    tr, step = _trainer(data, method, sparsity)
    with tr.fp_mode():  # flush-to-zero as Trainer.run has it
        for _ in range(3):
            step()  # warm-up
        benchmark.group = f"training step 784-1024-1024-10 batch {BATCH}"
        benchmark(step)


@pytest.mark.parametrize("sparsity", [0.9, 0.99], ids=["90%", "99%"])
def test_topology_update(benchmark, data, sparsity):
    tr, step = _trainer(data, "rigl", sparsity)
    with tr.fp_mode():
        step()
        benchmark.group = f"RigL topology update 784-1024-1024-10 batch {BATCH}"
        benchmark.pedantic(lambda: tr.updater.update(1, tr.model, tr.opt), rounds=5, iterations=1)
