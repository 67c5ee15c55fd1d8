"""sparsecore/cost.py: parameters, state bytes and FLOPs per step of a run."""

import pytest

from sparsecore.cost import model_cost
from sparsecore.layers import mlp
from sparsecore.rigl.schedule import UpdateSchedule


def test_cost_counts_the_sampled_grow_by_candidates():
    model = mlp([300, 200, 10], [0.05, None], seed=0)
    sched = UpdateSchedule(t_end=750, delta_t=100, alpha=0.3)
    total, batch, c = 1000, 32, 10
    exact = model_cost(model, batch, None, sched, total, "rigl")
    sampled = model_cost(
        model, batch, None, sched, total, "rigl", grow="sampled", grow_candidates=c
    )
    nnz = model.sparse_layers()[0].W.nnz
    fs = [sched.drop_fraction(t) for t in range(100, 750, 100)]
    assert len(fs) == sched.n_updates() == 7
    assert exact["grow_flops_per_step"] == pytest.approx(2.0 * 200 * 300 * batch * 7 / total)
    want = sum(min(c * int(f * nnz), 200 * 300 - nnz + int(f * nnz)) for f in fs)
    assert sampled["grow_flops_per_step"] == pytest.approx(2.0 * want * batch / total)
    assert sampled["grow_flops_per_step"] < exact["grow_flops_per_step"]
    base = exact["flops_per_step"] - exact["grow_flops_per_step"]
    assert sampled["flops_per_step"] - sampled["grow_flops_per_step"] == pytest.approx(base)


def test_cost_caps_the_sampled_candidates_at_the_absent_connections():
    model = mlp([100, 100, 3], [0.5, None], seed=0)  # half of 100 × 100 present
    nnz = model.sparse_layers()[0].W.nnz
    sched = UpdateSchedule(t_end=150, delta_t=100, alpha=0.3, decay="constant")  # one update
    out = model_cost(model, 10, None, sched, 1, "rigl", grow="sampled", grow_candidates=10)
    k = int(0.3 * nnz)
    assert 10 * k > 100 * 100 - nnz + k  # the cap binds: every absent connection is scored
    assert out["grow_flops_per_step"] == pytest.approx(2.0 * (100 * 100 - nnz + k) * 10)
