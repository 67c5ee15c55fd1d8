"""sparsecore/cost.py: parameters, state bytes and FLOPs per step of a run."""

import numpy as np
import pytest

from sparsecore.cost import describe, held_bytes, model_cost
from sparsecore.layers import SoftmaxCrossEntropy, mlp
from sparsecore.optim import Adam
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


def test_held_bytes_sums_the_arrays_the_model_and_optimizer_hold(rng):
    model = mlp([30, 40, 5], [0.3, None], seed=0)
    opt = Adam(model.params(), lr=1e-3)
    sparse, dense = model.weighted()
    W = sparse.W

    def arrays():
        n = W.data.nbytes + W.indices.nbytes + W.indptr.nbytes + sparse.gW.nbytes
        n += dense.W.nbytes + dense.gW.nbytes
        return n + sum(l.b.nbytes + l.gb.nbytes for l in (sparse, dense)) + opt.state_bytes()

    assert opt.state_bytes() == 2 * sum(p.value.nbytes for p in model.params())
    x = rng.standard_normal((30, 8)).astype(np.float32)
    model.backward(SoftmaxCrossEntropy()(model.forward(x), rng.integers(0, 5, 8))[1])
    extra = sum(a.nbytes for a in W.transpose_structure())
    extra += sparse._t_data.nbytes if sparse._t_data is not None else 0
    assert held_bytes(model, opt) == arrays() + extra
    assert held_bytes(model) == held_bytes(model, opt) - opt.state_bytes()


def test_describe_reports_the_ratios_to_dense():
    model = mlp([300, 200, 10], [0.05, None], seed=0)
    c = model_cost(model, 32)
    text = describe(c)
    p, pd = c["params"], c["params_dense"]
    assert text.startswith(f"parameters {p:,} vs dense {pd:,} ({p / pd:.1%}); training state ")
    assert f"FLOPs/step {c['flops_per_step'] / 1e6:.1f} M vs dense" in text
    assert "grow amortised 0.0 M" in text  # no schedule: no grow
