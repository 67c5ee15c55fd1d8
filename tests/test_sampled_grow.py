"""The O(k) absent-connection sampler, the scores at sampled coordinates, and RigL's sampled grow."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import reference as R
from kernels.cpu import grow as G
from kernels.cpu import sampled as S
from sparsecore import CSR
from sparsecore.layers import SoftmaxCrossEntropy, mlp
from sparsecore.optim import SGD
from sparsecore.rigl import RigL, UpdateSchedule
from tests import cases
from tests.cases import blobs_npz


def _absent_mask(W, keep=None):
    return ~R.pattern(W.indptr, W.indices, W.shape, keep)


def _check_sample(W, keep, k, seed):
    m, n = W.shape
    flat = S.sample_absent(W.indptr, W.indices, keep, n, k, np.random.default_rng(seed))
    assert flat.dtype == np.int64 and flat.shape == (k,)
    assert np.all(np.diff(flat) > 0)  # distinct, ascending
    if k:
        assert flat.min() >= 0 and flat.max() < m * n
        assert _absent_mask(W, keep).ravel()[flat].all()  # never a kept connection
    return flat


@pytest.mark.parametrize("name", cases.NAMES)
def test_sampler_on_named_cases(name, rng):
    W = cases.make(name, rng)
    m, n = W.shape
    keep = rng.random(W.nnz) < 0.6
    for kp in (None, keep):
        n_absent = int(_absent_mask(W, kp).sum())
        for k in sorted({0, 1, n_absent // 3, n_absent // 2, n_absent // 2 + 1, n_absent}):
            if k > n_absent:
                continue
            flat = _check_sample(W, kp, k, int(rng.integers(1 << 30)))
            if k == n_absent:  # all of them: must terminate, and be every absent entry
                np.testing.assert_array_equal(flat, np.flatnonzero(_absent_mask(W, kp).ravel()))


def test_sampler_edge_cases_drawn():
    # 1 x N:   x . x . . .      the dropped entry (col 2) is eligible again
    W = CSR(np.array([0, 2]), np.array([0, 2]), np.ones(2, np.float32), (1, 6))
    keep = np.array([True, False])
    flat = S.sample_absent(W.indptr, W.indices, keep, 6, 5, np.random.default_rng(0))
    np.testing.assert_array_equal(flat, [1, 2, 3, 4, 5])
    # full rows and empty rows:   x x x
    #                             . . .
    #                             x x x
    W = CSR.from_dense(np.array([[1, 1, 1], [0, 0, 0], [1, 1, 1]], np.float32))
    for k in range(4):
        for seed in range(5):
            flat = S.sample_absent(W.indptr, W.indices, None, 3, k, np.random.default_rng(seed))
            assert set(flat.tolist()) <= {3, 4, 5} and len(flat) == k
    # a huge sparse matrix: int64 flat indices beyond 2**31, nothing m×n allocated
    W = CSR.random((200_000, 300_000), 1e-7, seed=1)
    flat = S.sample_absent(W.indptr, W.indices, None, 300_000, 1000, np.random.default_rng(2))
    assert flat.shape == (1000,) and flat.max() > 2**31
    assert not np.isin(flat, W.row_ids().astype(np.int64) * 300_000 + W.indices).any()


@settings(max_examples=60, deadline=None)
@given(
    m=st.integers(1, 30),
    n=st.integers(1, 30),
    density=st.floats(0.0, 1.0),
    frac=st.floats(0.0, 1.0),
    drop=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31),
)
def test_sampler_invariants(m, n, density, frac, drop, seed):
    W = CSR.random((m, n), density, seed=seed)
    keep = np.random.default_rng(seed).random(W.nnz) >= drop
    n_absent = m * n - int(keep.sum())
    k = int(frac * n_absent)
    a = _check_sample(W, keep, k, seed)
    np.testing.assert_array_equal(a, _check_sample(W, keep, k, seed))  # same seed, same result


@pytest.mark.parametrize("k_frac", [0.05, 0.4, 0.8])  # rejection, rejection near 1/2, enumeration
def test_sampler_is_uniform(k_frac):
    """Every absent entry is chosen with probability k/|A|: a chi-square over many draws.

    8 x 10 with rows of 0, 2, 5, 9 and 10 present (a full row, an empty row) and two dropped
    entries that are eligible again. The bound (p < 1e-6 under uniformity) fails a sampler that
    favours low flat indices, rows with few present entries or the first draws.
    """
    rng = np.random.default_rng(12345)
    mask = np.zeros((8, 10), bool)
    for i, c in enumerate([0, 2, 5, 9, 10, 3, 1, 7]):
        mask[i, rng.choice(10, c, replace=False)] = True
    W = CSR.from_dense(mask.astype(np.float32))
    keep = np.ones(W.nnz, bool)
    keep[[3, 20]] = False
    absent = np.flatnonzero(_absent_mask(W, keep).ravel())
    k = max(1, int(k_frac * absent.size))
    trials = 4000
    counts = np.zeros(80, np.int64)
    for t in range(trials):
        f = S.sample_absent(W.indptr, W.indices, keep, 10, k, np.random.default_rng([7, t]))
        counts[f] += 1
    assert counts[np.setdiff1d(np.arange(80), absent)].sum() == 0
    obs = counts[absent]
    expected = trials * k / absent.size
    # each count is Binomial(trials, k/|A|): the variance has the (1 - k/|A|) factor
    chi2 = (((obs - expected) ** 2) / (expected * (1 - k / absent.size))).sum()
    dof = absent.size - 1
    assert chi2 < dof + 7 * np.sqrt(2 * dof), (chi2, dof)
    # ... and a biased sampler fails the same bound: the lower half of the flat indices drawn
    # 1.5 times as often as the upper half
    biased = obs.astype(float).copy()
    biased[: absent.size // 2] *= 1.5
    biased *= obs.sum() / biased.sum()
    chi2_b = (((biased - expected) ** 2) / (expected * (1 - k / absent.size))).sum()
    assert chi2_b > dof + 7 * np.sqrt(2 * dof)


@pytest.mark.parametrize("name", ["odd_37x53", "empty_rows", "wide_3x5000", "col_Nx1"])
def test_scores_at_coordinates_match_float64(name, rng):
    W = cases.make(name, rng)
    m, n = W.shape
    dy = rng.standard_normal((m, 19)).astype(np.float32)
    x = rng.standard_normal((n, 19)).astype(np.float32)
    dy[0, :3] = 1e-40  # subnormals read as zero
    flat = S.sample_absent(W.indptr, W.indices, None, n, (m * n - W.nnz) // 2, rng)
    out = S.score_at(flat, n, dy, x, np.full(flat.shape[0], np.nan, np.float32))
    ref = np.abs(dy.astype(np.float64) @ x.astype(np.float64).T).ravel()[flat]
    absprod = (np.abs(dy.astype(np.float64)) @ np.abs(x.astype(np.float64)).T).ravel()[flat]
    assert np.all(np.abs(out - ref) <= 1e-5 * absprod + 1e-30)


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(1, 30),
    n=st.integers(1, 30),
    density=st.floats(0.0, 0.9),
    frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31),
)
def test_sampled_grow_covering_all_absent_equals_exact(m, n, density, frac, seed):
    """With candidates·k >= |absent| every absent connection is scored: exact RigL's top-k
    (integer-valued inputs: float32 scores are exact, so ties are real ties)."""
    rng = np.random.default_rng(seed)
    W = CSR.random((m, n), density, seed=seed)
    keep = rng.random(W.nnz) < 0.7
    K = int(frac * (W.nnz - keep.sum()))
    dy = rng.integers(-2, 3, size=(m, 4)).astype(np.float32)
    x = rng.integers(-2, 3, size=(n, 4)).astype(np.float32)
    rows, cols, sc = S.sampled_grow(W.indptr, W.indices, keep, dy, x, K, m * n + 1, rng)
    rr, cc, ss = R.topk_grow(W.indptr, W.indices, W.shape, dy, x, K, keep)
    np.testing.assert_array_equal(rows, rr)
    np.testing.assert_array_equal(cols, cc)
    np.testing.assert_array_equal(sc, ss)
    r2, c2, _ = G.topk_grow(W.indptr, W.indices, keep, dy, x, K)
    np.testing.assert_array_equal(rows, r2)
    np.testing.assert_array_equal(cols, c2)


def test_sampled_grow_is_the_top_k_of_its_candidates(rng):
    W = CSR.random((60, 70), 0.1, seed=3)
    keep = rng.random(W.nnz) < 0.7
    dy = rng.standard_normal((60, 8)).astype(np.float32)
    x = rng.standard_normal((70, 8)).astype(np.float32)
    k, c = 40, 5
    rows, cols, sc = S.sampled_grow(
        W.indptr, W.indices, keep, dy, x, k, c, np.random.default_rng(9)
    )
    cand = S.sample_absent(W.indptr, W.indices, keep, 70, k * c, np.random.default_rng(9))
    cs = S.score_at(cand, 70, dy, x, np.empty(cand.shape[0], np.float32))
    best = np.sort(cand[np.lexsort((cand, -cs))[:k]])
    np.testing.assert_array_equal(rows.astype(np.int64) * 70 + cols, best)
    assert rows.dtype == cols.dtype == np.int32 and sc.dtype == np.float32
    assert not R.pattern(W.indptr, W.indices, W.shape, keep)[rows, cols].any()


def test_rigl_sampled_update_invariants(rng):
    model = mlp([30, 40, 20, 5], [0.3, 0.3, 0.3], seed=int(rng.integers(1 << 30)))
    opt = SGD(model.params(), lr=0.05, momentum=0.9)
    x = rng.standard_normal((30, 16)).astype(np.float32)
    y = rng.integers(0, 5, 16)
    for _ in range(3):
        model.backward(SoftmaxCrossEntropy()(model.forward(x), y)[1])
        opt.step(0.05)
    before = [
        (l.W.copy(), opt.state[f"{l.name}.W"]["momentum"].copy()) for l in model.sparse_layers()
    ]
    model.backward(SoftmaxCrossEntropy()(model.forward(x), y)[1])
    upd = RigL(
        UpdateSchedule(t_end=1000, delta_t=10, alpha=0.3), seed=0, grow="sampled", candidates=3
    )
    report = upd.update(10, model, opt)
    for (W0, m0), layer, rep in zip(before, model.sparse_layers(), report.per_layer, strict=True):
        W1 = layer.W
        assert W1.nnz == W0.nnz and rep["grown"] == rep["dropped"] > 0
        f0 = W0.row_ids().astype(np.int64) * W0.shape[1] + W0.indices
        old = dict(zip(f0.tolist(), zip(W0.data, m0, strict=True), strict=True))
        m1 = opt.state[f"{layer.name}.W"]["momentum"]
        n_new = 0
        f1 = W1.row_ids().astype(np.int64) * W1.shape[1] + W1.indices
        for f, v, mv in zip(f1.tolist(), W1.data, m1, strict=True):
            if f in old:
                assert (v, mv) == old[f]
            else:
                assert v == 0 and mv == 0
                n_new += 1
        assert n_new == rep["new"]
    # same seed, same topology
    model2 = mlp([30, 40, 20, 5], [0.3, 0.3, 0.3], seed=1)
    model3 = mlp([30, 40, 20, 5], [0.3, 0.3, 0.3], seed=1)
    for mdl in (model2, model3):
        mdl.backward(SoftmaxCrossEntropy()(mdl.forward(x), y)[1])
        RigL(UpdateSchedule(t_end=100, delta_t=10), seed=4, grow="sampled").update(0, mdl)
    for a, b in zip(model2.sparse_layers(), model3.sparse_layers(), strict=True):
        np.testing.assert_array_equal(a.W.indices, b.W.indices)
        np.testing.assert_array_equal(a.W.indptr, b.W.indptr)


def test_rigl_grow_options_are_checked():
    with pytest.raises(ValueError, match="grow must be one of"):
        RigL(UpdateSchedule(t_end=10), grow="approx")
    with pytest.raises(ValueError, match="candidates .* must be >= 1"):
        RigL(UpdateSchedule(t_end=10), grow="sampled", candidates=0.5)


def test_plan_counts_the_sampled_grow(tmp_path):
    from sparsecore.plan import memory_plan

    arch = [784, 1_000_000, 1_000_000, 10]
    exact = memory_plan(arch, 0.99998, grow="exact")
    sampled = memory_plan(arch, 0.99998, grow="sampled", grow_candidates=10)
    more = memory_plan(arch, 0.99998, grow="sampled", grow_candidates=20)
    t = "topology update (transient)"
    assert sampled["pieces"][t] > exact["pieces"][t]  # candidates outweigh a 2 MiB tile here
    assert more["pieces"][t] > sampled["pieces"][t]
    assert sampled["state_bytes"] == exact["state_bytes"]
    with pytest.raises(ValueError, match="grow must be exact or sampled"):
        memory_plan(arch, 0.99998, grow="nope")


def test_training_with_sampled_grow_end_to_end(tmp_path, capsys):
    from sparsecore.cli import main
    from sparsecore.train import TrainConfig, Trainer

    data = cases.mnist_subset(640, 128)
    cfg = dict(
        arch=[784, 64, 10],
        sparsity=0.9,
        delta_t=5,
        epochs=2,
        batch_size=64,
        lr=0.05,
        progress=False,
        grow="sampled",
        grow_candidates=4,
    )
    tr = Trainer(TrainConfig(out=str(tmp_path / "a"), **cfg), data)
    summary = tr.run()
    assert tr.updates and all(u["layers"][0]["grown"] > 0 for u in tr.updates[:2])
    assert summary["test_acc"] > 0.5
    assert tr.plan["grow"] == "sampled"
    # resume: grow is structural (like method), grow_candidates a result setting
    other = Trainer(TrainConfig(out=str(tmp_path / "b"), **{**cfg, "grow": "exact"}), data)
    with pytest.raises(ValueError, match=r"written with grow='sampled', this run has grow='exact'"):
        other.load_checkpoint(tmp_path / "a" / "checkpoint.npz")
    more = Trainer(TrainConfig(out=str(tmp_path / "c"), **{**cfg, "grow_candidates": 8}), data)
    with pytest.warns(UserWarning, match=r"grow_candidates \(4 -> 8\)"):
        more.load_checkpoint(tmp_path / "a" / "checkpoint.npz")
    with pytest.raises(ValueError, match="applies to method rigl"):
        TrainConfig(method="set", grow="sampled").validate()
    # the CLI
    argv = ["--arch", "784-1000000-1000000-10", "--sparsity", "0.99998", "--grow", "sampled"]
    assert main(["plan", *argv, "--grow-candidates", "20"]) == 0
    assert "sampled grow, 20 candidates" in capsys.readouterr().out


def test_random_pattern_of_a_large_dense_ish_matrix_is_o_nnz():
    """CSR.random above 2**24 entries and density 1/50: rejection, not a shuffle of all m·n
    positions (which would take 8·m·n = 160 MB here)."""
    import tracemalloc

    tracemalloc.start()
    W = CSR.random((4, 5_000_000), 0.1, seed=3)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert W.nnz == 2_000_000 and W.indices.dtype == np.int32
    CSR(W.indptr, W.indices, W.data, W.shape)  # canonical
    assert peak < 8 * 4 * 5_000_000, (
        peak
    )  # less than the m·n int64 positions alone (measured 97 MB)
    per_row = np.diff(W.indptr)
    assert np.all(np.abs(per_row - 500_000) < 5 * np.sqrt(500_000))
    np.testing.assert_array_equal(CSR.random((4, 5_000_000), 0.1, seed=3).indices, W.indices)


def test_exact_grow_tile_is_fitted_to_the_memory_budget(tmp_path):
    """--max-memory a little under the default plan: the exact grow gets a smaller tile (the
    plan then fits) instead of a refusal, and the grown topology is the same as with the
    default tile; far under it, the run is still refused."""
    from sparsecore.plan import MIN_GROW_TILE_BYTES, memory_plan
    from sparsecore.train import MemoryBudgetExceeded, TrainConfig, Trainer, check_memory

    base = dict(arch=[784, 4096, 4096, 10], sparsity=0.99, batch_size=32, progress=False)
    default = memory_plan(base["arch"], 0.99, batch_size=32)
    budget = default["total_bytes"] - (1 << 20)
    plan = check_memory(TrainConfig(max_memory=budget, **base))
    assert MIN_GROW_TILE_BYTES <= plan["grow_tile_bytes"] < 2 << 20
    assert default["total_bytes"] - (2 << 20) < plan["total_bytes"] <= budget
    with pytest.raises(MemoryBudgetExceeded):
        check_memory(TrainConfig(max_memory=default["total_bytes"] - (8 << 20), **base))
    assert check_memory(TrainConfig(max_memory=10**12, **base))["grow_tile_bytes"] is None
    # the fitted tile reaches the kernel, and the topology does not depend on it
    rng = np.random.default_rng(0)
    x = rng.random((784, 32), dtype=np.float32)
    y = rng.integers(0, 10, 32)
    tops = []
    for max_memory in (None, budget):
        tr = Trainer(TrainConfig(max_memory=max_memory, out=str(tmp_path), **base), _tiny_data())
        assert tr.updater.tile_bytes == (None if max_memory is None else plan["grow_tile_bytes"])
        tr.model.backward(tr.loss_fn(tr.model.forward(x), y)[1])
        tr.updater.update(1, tr.model, tr.opt)
        tops.append([l.W.indices.copy() for l in tr.model.sparse_layers()])
    for a, b in zip(*tops, strict=True):
        np.testing.assert_array_equal(a, b)


def _tiny_data():
    return cases.mnist_subset(64, 32)


def test_cli_train_with_the_sampled_grow(tmp_path, capsys):
    from sparsecore.cli import main

    p = blobs_npz(tmp_path / "toy.npz")
    argv = ["train", "--dataset", str(p), "--arch", "20-32-3", "--sparsity", "0.5"]
    argv += ["--epochs", "3", "--batch-size", "32", "--delta-t", "5", "--no-progress"]
    rc = main([*argv, "--grow", "sampled", "--grow-candidates", "3", "--out", str(tmp_path / "r")])
    out = capsys.readouterr().out
    assert rc == 0
    assert float(out.strip().splitlines()[-1].split(":")[1].strip().rstrip("%")) > 90.0
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cfg["grow"] == "sampled" and cfg["grow_candidates"] == 3
    rc = main([*argv, "--method", "set", "--grow", "sampled", "--out", str(tmp_path / "s")])
    assert rc == 2 and "applies to method rigl" in capsys.readouterr().err


def test_cost_counts_the_sampled_grow_by_candidates():
    from sparsecore.cost import model_cost
    from sparsecore.layers import mlp
    from sparsecore.rigl.schedule import UpdateSchedule

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
    from sparsecore.cost import model_cost
    from sparsecore.layers import mlp
    from sparsecore.rigl.schedule import UpdateSchedule

    model = mlp([100, 100, 3], [0.5, None], seed=0)  # half of 100 × 100 present
    nnz = model.sparse_layers()[0].W.nnz
    sched = UpdateSchedule(t_end=150, delta_t=100, alpha=0.3, decay="constant")  # one update
    out = model_cost(model, 10, None, sched, 1, "rigl", grow="sampled", grow_candidates=10)
    k = int(0.3 * nnz)
    assert 10 * k > 100 * 100 - nnz + k  # the cap binds: every absent connection is scored
    assert out["grow_flops_per_step"] == pytest.approx(2.0 * (100 * 100 - nnz + k) * 10)
