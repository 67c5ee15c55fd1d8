"""The single-process parts of sharded layers (the MPI runs are in tests/test_mpi.py): the
row-block initialisation any rank can build alone, the uniform split of draws over parts, the
per-rank memory plan and the choice of layers, and checkpoints read by row range (format 2,
and format 1 of earlier versions)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kernels.formats import split_count
from sparsecore import checkpoint
from sparsecore.layers import INIT_BLOCK_ROWS, sparse_init
from sparsecore.plan import memory_plan, sharded_layers
from sparsecore.train import TrainConfig, Trainer
from tests.cases import blobs_npz


@pytest.mark.parametrize(
    "m, n, density, fan_in",
    [
        (300, 784, 0.1, "sparse"),
        (2 * INIT_BLOCK_ROWS + 7, 33, 0.05, "dense"),
        (1, 50, 0.5, "sparse"),
        (INIT_BLOCK_ROWS + 1, 3, 1.0, "sparse"),
        (40, 40, 0.0, "sparse"),
    ],
)
def test_any_block_of_rows_is_the_whole_layers_rows(m, n, density, fan_in):
    seed = [int(np.random.default_rng(m * n).integers(1 << 30)), 2]
    W = sparse_init(n, m, density, seed, fan_in=fan_in)
    assert W.shape == (m, n) and W.nnz == round(density * m * n)
    assert W.indices.dtype == np.int32 and W.data.dtype == np.float32
    for parts in (2, 3, 5):
        bounds = [i * m // parts for i in range(parts + 1)]
        for r0, r1 in zip(bounds[:-1], bounds[1:], strict=True):
            P = sparse_init(n, m, density, seed, fan_in=fan_in, rows=(r0, r1))
            lo, hi = W.indptr[r0], W.indptr[r1]
            assert P.shape == (r1 - r0, n)
            np.testing.assert_array_equal(P.indptr, W.indptr[r0 : r1 + 1] - lo)
            np.testing.assert_array_equal(P.indices, W.indices[lo:hi])
            np.testing.assert_array_equal(P.data, W.data[lo:hi])
    if density == 0.0 or fan_in != "sparse":
        return
    fan = np.maximum(np.diff(W.indptr), 1)  # Kaiming-uniform bound by each row's own fan-in
    bound = np.repeat(np.sqrt(2.0) * np.sqrt(3.0 / fan), np.diff(W.indptr))
    assert (np.abs(W.data) <= bound * (1 + 1e-6)).all()


def test_the_pattern_is_uniform_over_positions():
    """Across seeds, every position of a 3-block matrix is drawn about equally often (the
    blocks' counts are hypergeometric, not equal shares)."""
    m, n, d = 2 * INIT_BLOCK_ROWS + 500, 4, 0.25
    hits = np.zeros((m, n))
    counts = []
    for s in range(200):
        W = sparse_init(n, m, d, [s, 0])
        hits += W.to_dense() != 0
        counts.append(int(W.indptr[INIT_BLOCK_ROWS]))
    freq = hits / 200  # each position's frequency: d, with binomial noise sd ~ 0.031
    assert abs(freq.std() - np.sqrt(d * (1 - d) / 200)) < 0.004  # no position favoured
    for r0, r1 in ((0, INIT_BLOCK_ROWS), (INIT_BLOCK_ROWS, 2 * INIT_BLOCK_ROWS), (2048, m)):
        assert abs(freq[r0:r1].mean() - d) < 0.005  # nor any block (sd ~ 0.001 in the 3rd)
    N, good, draws = m * n, INIT_BLOCK_ROWS * n, round(d * m * n)  # first block: hypergeometric
    sd = np.sqrt(draws * good / N * (1 - good / N) * (N - draws) / (N - 1))
    assert 0.8 < np.std(counts) / sd < 1.2


def test_bad_rows_and_seeds_are_refused():
    with pytest.raises(ValueError, match="rows must be a range"):
        sparse_init(10, 20, 0.5, [0], rows=(5, 21))
    for seed in ([1.5], np.random.default_rng(0), [-1], "a"):
        with pytest.raises(ValueError, match="seed must be non-negative int"):
            sparse_init(10, 20, 0.5, seed)


@pytest.mark.parametrize(
    "sizes, total",
    [
        ([5, 5, 5], 15),
        ([10, 0, 3], 7),
        ([4], 2),
        ([10**9, 10**9, 3], 2 * 10**9 + 1),
        ([10**12] * 50, 10**7),
        ([7, 9], 0),
    ],
)
def test_split_count_is_a_valid_split(sizes, total):
    c = split_count(sizes, total, np.random.default_rng(0))
    assert c.sum() == total and (c >= 0).all() and (c <= np.array(sizes)).all()


def test_split_count_has_hypergeometric_moments_above_numpys_limit():
    """Parts of 4·10^8 and 8·10^8 positions (sum above NumPy's 10^9): the first part's share of
    10^5 draws has mean k/3 and the hypergeometric sd."""
    rng = np.random.default_rng(1)
    k, N1, N = 10**5, 4 * 10**8, 12 * 10**8
    first = np.array([split_count([N1, N - N1], k, rng)[0] for _ in range(2000)])
    p = N1 / N
    sd = np.sqrt(k * p * (1 - p) * (N - k) / (N - 1))
    assert abs(first.mean() - k * p) < 4 * sd / np.sqrt(2000)
    assert abs(first.std() / sd - 1) < 0.1


def test_a_ranks_plan_divides_the_sharded_layers_state():
    arch, kw = [784, 8192, 8192, 10], dict(sparsity=0.95, batch_size=128)
    one = memory_plan(arch, **kw)
    for ranks in (2, 4):
        p = memory_plan(arch, ranks=ranks, sharded=[0, 1], **kw)
        for piece in ("weights", "optimizer moments"):
            whole = one["pieces"][piece] - 4 * 10 * 8192 * (1 if piece == "weights" else 1)
            assert p["pieces"][piece] < whole / ranks * 1.01 + 4 * 10 * 8192
        assert p["layers"][1]["rows_per_rank"] == 8192 // ranks
        assert p["layers"][1]["nnz"] == one["layers"][1]["nnz"]
        assert p["total_bytes"] < one["total_bytes"]
        assert p["pieces"][f"shard buffers (batch {128})"] == 4 * 128 * 2 * (8192 // ranks)
    assert memory_plan(arch, ranks=2, sharded=[], **kw)["total_bytes"] == one["total_bytes"]


def _sharded(arch, sparsity, distribution, method, shard_layers, ranks):
    cfg = TrainConfig(
        arch=arch,
        sparsity=sparsity,
        distribution=distribution,
        method=method,
        shard_layers=shard_layers,
    )
    return sharded_layers(cfg, ranks)


def test_which_layers_are_sharded():
    arch = [784, 300, 100, 10]
    assert _sharded(arch, 0.9, "erk", "rigl", "all", 2) == [0, 1]  # ERK: layer 2 dense
    assert _sharded(arch, 0.9, "uniform", "rigl", "all", 2) == [0, 1, 2]
    assert _sharded(arch, 0.9, "uniform", "rigl", "all", 16) == [0, 1]  # 10 rows < 16
    assert _sharded(arch, 0.9, "erk", "rigl", [1], 2) == [1]
    assert _sharded(arch, 0.9, "erk", "rigl", "all", 1) == []
    assert _sharded(arch, 0.9, "erk", "rigl", None, 4) == []
    with pytest.raises(ValueError, match="layer 2 has 10 rows, fewer than the 16"):
        _sharded(arch, 0.9, "uniform", "rigl", [2], 16)
    with pytest.raises(ValueError, match="is dense"):
        _sharded([784, 32, 10], 0.5, "erk", "rigl", [1], 2)
    with pytest.raises(ValueError, match="does not exist"):
        _sharded(arch, 0.9, "erk", "rigl", [3], 2)
    with pytest.raises(ValueError, match="method 'dense' has none"):
        _sharded(arch, 0.9, "erk", "dense", "all", 2)


def test_config_checks_shard_layers_and_rank_timeout():
    with pytest.raises(ValueError, match=r"shard_layers \(--shard-layers\) must be 'all'"):
        TrainConfig(arch=[4, 3, 2], shard_layers="some").validate()
    with pytest.raises(ValueError, match="non-empty list"):
        TrainConfig(arch=[4, 3, 2], shard_layers=[]).validate()
    with pytest.raises(ValueError, match="must be 'all' or a non-empty list"):
        TrainConfig(arch=[4, 3, 2], shard_layers=[2]).validate()
    with pytest.raises(ValueError, match=r"rank_timeout \(--rank-timeout\)"):
        TrainConfig(rank_timeout=-1).validate()
    TrainConfig(arch=[4, 3, 2], shard_layers=[0, 1]).validate()
    with pytest.raises(ValueError, match="out must be a folder path, or None"):
        TrainConfig(out="").validate()


def _trainer(tmp_path, **kw):
    cfg = TrainConfig(
        dataset=str(blobs_npz(tmp_path / "d.npz")),
        arch=[20, 16, 3],
        sparsity=0.5,
        batch_size=32,
        epochs=1,
        delta_t=3,
        progress=False,
        out=str(tmp_path / "run"),
        **kw,
    )
    return Trainer(cfg)


def _format1(tr, path):
    """The checkpoint layout of format 1 (sparsecore before sharded layers)."""
    arrays = {
        "meta": np.array(
            json.dumps(
                {
                    "config": __import__("dataclasses").asdict(tr.cfg),
                    "step": tr.step,
                    "epoch": tr.epoch,
                    "history": tr.history,
                    "format": 1,
                }
            )
        )
    }
    for l, layer in enumerate(tr.model.weighted()):
        if hasattr(layer.W, "indptr"):
            arrays.update(
                {
                    f"L{l}/indptr": layer.W.indptr,
                    f"L{l}/indices": layer.W.indices,
                    f"L{l}/data": layer.W.data,
                    f"L{l}/shape": np.array(layer.W.shape),
                }
            )
        else:
            arrays[f"L{l}/W"] = layer.W
        arrays[f"L{l}/b"] = layer.b
    for k, v in tr.opt.state_dict().items():
        arrays[f"opt/{k}"] = v
    np.savez(path, **arrays)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_checkpoints_of_both_formats_restore_everything(tmp_path, optimizer):
    tr = _trainer(tmp_path, optimizer=optimizer, lr=0.01)
    tr.run()
    _format1(tr, tmp_path / "old.npz")
    for path in (tr.ckpt_path(), tmp_path / "old.npz"):
        other = _trainer(tmp_path, optimizer=optimizer, lr=0.01)
        other.load_checkpoint(path)
        assert other.step == tr.step and other.history == tr.history
        for a, b in zip(tr.model.weighted(), other.model.weighted(), strict=True):
            for name in ("indptr", "indices", "data"):
                if hasattr(a.W, name):
                    np.testing.assert_array_equal(getattr(a.W, name), getattr(b.W, name))
            np.testing.assert_array_equal(np.asarray(a.b), np.asarray(b.b))
        sa, sb = tr.opt.state_dict(), other.opt.state_dict()
        assert sorted(sa) == sorted(sb)
        for k in sa:
            np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)


def test_any_row_range_is_read_from_the_parts(tmp_path):
    """A sparse layer written as 3 parts (as 3 ranks write it) read back as rows [a, b) for
    ranges inside one part, across parts, whole, and as another split (2 parts)."""
    tr = _trainer(tmp_path)
    tr.run()
    layer = tr.model.weighted()[0]
    W, b = layer.W, layer.b
    mom = tr.opt.state_dict()[f"{layer.name}.W/momentum"]
    bmom = tr.opt.state_dict()[f"{layer.name}.b/momentum"]
    m = W.shape[0]
    bounds = [0, 5, 11, m]
    arrays = {"L0/shape": np.array(W.shape), "L0/parts": np.array(bounds)}
    for p, (r0, r1) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        lo, hi = W.indptr[r0], W.indptr[r1]
        arrays.update(
            {
                f"L0/p{p}/indptr": W.indptr[r0 : r1 + 1] - lo,
                f"L0/p{p}/indices": W.indices[lo:hi],
                f"L0/p{p}/data": W.data[lo:hi],
                f"L0/p{p}/b": b[r0:r1],
                f"L0/p{p}/opt/momentum/W": mom[lo:hi],
                f"L0/p{p}/opt/momentum/b": bmom[r0:r1],
            }
        )
    np.savez(tmp_path / "parts.npz", **arrays)
    np.savez_compressed(tmp_path / "zipped.npz", **arrays)
    members = checkpoint._Members(tmp_path / "parts.npz")  # memory maps: slices read alone
    assert isinstance(members["L0/p1/indices"], np.memmap)
    zipped = checkpoint._Members(tmp_path / "zipped.npz")  # compressed: read whole
    assert not isinstance(zipped["L0/p1/indices"], np.memmap)
    for d in (np.load(tmp_path / "parts.npz"), members, zipped):
        for r0, r1 in [(0, m), (1, 4), (3, 12), (0, 8), (8, m), (11, m), (5, 11)]:
            R, rb, st = checkpoint.read_rows(d, 0, layer.name, ("momentum",), r0, r1)
            lo, hi = W.indptr[r0], W.indptr[r1]
            np.testing.assert_array_equal(R.indptr, W.indptr[r0 : r1 + 1] - lo)
            np.testing.assert_array_equal(R.indices, W.indices[lo:hi])
            np.testing.assert_array_equal(R.data, W.data[lo:hi])
            np.testing.assert_array_equal(rb, b[r0:r1])
            np.testing.assert_array_equal(st[f"{layer.name}.W/momentum"], mom[lo:hi])
            np.testing.assert_array_equal(st[f"{layer.name}.b/momentum"], bmom[r0:r1])


def test_a_checkpoint_killed_mid_write_leaves_the_last_one(tmp_path, monkeypatch):
    tr = _trainer(tmp_path)
    tr.run()
    before = tr.ckpt_path().read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint._NpzWriter, "add", boom)
    with pytest.raises(OSError, match="disk full"):
        tr.save_checkpoint(tr.ckpt_path())
    assert tr.ckpt_path().read_bytes() == before
    assert not tr.ckpt_path().with_name("checkpoint.npz.tmp").exists()


def test_mpi_messages_above_32_bit_counts_are_refused():
    """Before MPI-4, counts are C ints: a sharded layer whose gathered outputs for a batch
    exceed 2^31-1 elements is refused before training, naming the layer and what to change."""
    from types import SimpleNamespace

    from sparsecore.mpi import check_counts as _check_counts

    class Layer(SimpleNamespace):
        pass

    big = Layer(name="fc1", shard=object(), full_shape=(20_000_000, 1000), total_nnz=lambda: 10)
    model = SimpleNamespace(sparse_layers=lambda: [big], params=lambda: [])
    tr = SimpleNamespace(cfg=SimpleNamespace(batch_size=128), sharded=[1], model=model)
    with pytest.raises(ValueError, match=r"fc1's outputs for a batch \(m·B\) is 2,560,000,000"):
        _check_counts(tr, 2, mpi_version=(3, 1))
    _check_counts(tr, 2, mpi_version=(4, 0))  # large-count calls: no limit
    tr.cfg.batch_size = 64  # 1.28·10^9 elements: fits
    _check_counts(tr, 2, mpi_version=(3, 1))


def test_npz_members_of_every_header_version_and_a_lying_header(tmp_path):
    """_Members maps .npy members of format 1.0 and 2.0 (Fortran order, empty arrays too),
    reads a 3.0 member whole, and refuses a member whose header claims more bytes than it has."""
    import zipfile

    a = np.arange(24, dtype=np.float32).reshape(4, 6)
    cases = {"v1": (a, (1, 0)), "v2": (a, (2, 0)), "v3": (a, (3, 0)), "fortran": (a.T, (1, 0))}
    cases["empty"] = (np.empty((0, 3), np.int32), (1, 0))
    with zipfile.ZipFile(tmp_path / "v.npz", "w", zipfile.ZIP_STORED) as zf:
        for name, (arr, version) in cases.items():
            with zf.open(name + ".npy", "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, arr, version=version)
    members = checkpoint._Members(tmp_path / "v.npz")
    for name, (arr, _) in cases.items():
        got = members[name]
        np.testing.assert_array_equal(got, arr, err_msg=name)
        assert isinstance(got, np.memmap) == (name in ("v1", "v2", "fortran"))
    members.close()
    with zipfile.ZipFile(tmp_path / "bad.npz", "w", zipfile.ZIP_STORED) as zf:
        buf = __import__("io").BytesIO()
        np.lib.format.write_array(buf, a)
        zf.writestr("x.npy", buf.getvalue()[:-8])  # 2 floats short of what the header says
    with pytest.raises(ValueError, match="shorter than its header says"):
        checkpoint._Members(tmp_path / "bad.npz")["x"]


def test_a_local_updater_refuses_a_sharded_model_before_changing_anything():
    """An updater built without the row-sharded selection cannot update a layer whose rows are
    spread over ranks (it would choose by this rank's rows alone): it refuses before the first
    layer changes, naming the layer and the strategy to pass."""
    from sparsecore.layers import mlp
    from sparsecore.rigl import SET, RigL, UpdateSchedule

    for make in (lambda s: RigL(s, seed=0), lambda s: SET(s, seed=0)):
        model = mlp([12, 10, 8, 4], [0.5, 0.5, 0.5], seed=1)
        first, second = model.sparse_layers()[:2]
        second.shard = object()  # as a ShardedSparseLinear's RowShard
        before = (first.W.indices.copy(), first.W.data.copy())
        rng = np.random.default_rng(0)
        x = rng.standard_normal((12, 5)).astype(np.float32)
        model.backward(model.forward(x) - 1.0)
        with pytest.raises(ValueError, match=r"layer fc1 is split by rows .*RowShardedSelection"):
            make(UpdateSchedule(t_end=10, delta_t=1, alpha=0.3)).update(1, model)
        np.testing.assert_array_equal(first.W.indices, before[0])
        np.testing.assert_array_equal(first.W.data, before[1])


def test_the_names_before_the_house_still_work():
    """sharded_layers' old positional form, the offer tunables' old homes (read from
    kernels/config.py), and mpi.parallel(trainer) of one process (None, as before)."""
    from kernels import config
    from sparsecore import mpi
    from sparsecore.mpi import data_parallel, select

    arch = [784, 300, 100, 10]
    assert sharded_layers(arch, 0.9, "erk", "rigl", "all", 2) == _sharded(
        arch, 0.9, "erk", "rigl", "all", 2
    )
    assert sharded_layers(arch, 0.9, "uniform", "rigl", [2], 2) == [2]
    assert select.OFFER_SHARE == config.MPI_OFFER_SHARE and select.OFFER_GROWTH == 4
    assert data_parallel.SCORE_CHUNK_FLOATS == config.MPI_SCORE_CHUNK_FLOATS
    with pytest.raises(AttributeError):
        select.NO_SUCH_TUNABLE  # noqa: B018
    from sparsecore import data as D
    from sparsecore.parallel import SINGLE

    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((40, 8)).astype(np.float32), rng.integers(0, 3, 40)
    cfg = TrainConfig(arch=[8, 6, 3], sparsity=0.5, epochs=1, batch_size=8, progress=False)
    tr = Trainer(cfg, D.from_arrays(x[:32], y[:32], x[32:], y[32:]))
    assert mpi.parallel(tr) is None and mpi.parallel() is SINGLE  # one process
