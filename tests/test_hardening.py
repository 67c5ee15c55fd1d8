"""Regression tests of the hardening issue: one group per numbered defect, each of which failed
on the code before the fix (a segfault, a wrong result, a raw traceback or accepted nonsense).

Crashing cases (a kernel reading out of bounds) run in a spawned subprocess, so that a
regression shows up as a failed test and not as a dead test runner.
"""

import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

import kernels
from kernels.formats import random_positions
from sparsecore import CSR, cli
from sparsecore import checkpoint as ckpt
from sparsecore import data as D
from sparsecore.train import TrainConfig, Trainer
from tests.cases import blobs_npz
from tests.cases import cli_error as _cli_error
from tests.data.make_checkpoint import CONFIG as V2_CONFIG
from tests.data.make_checkpoint import blobs

DATA = Path(__file__).parent / "data"


def _blob_cfg(tmp_path, **kw):
    base = dict(
        dataset=str(blobs_npz(tmp_path / "blobs.npz")),
        arch=[20, 16, 3],
        sparsity=0.7,
        delta_t=5,
        epochs=2,
        batch_size=50,
        progress=False,
        out=str(tmp_path / "run"),
    )
    return TrainConfig(**{**base, **kw})


def _trained(tmp_path, **kw):
    tr = Trainer(_blob_cfg(tmp_path, **kw))
    tr.run()
    return tr, Path(tr.cfg.out) / "checkpoint.npz"


# ------------------------------------------------------------------ 1. unsigned indptr
def _spmm_t_unsigned(dtype):
    ip = np.array([0, 3, 2], dtype)
    ix = np.array([0, 1], np.int32)
    d = np.ones(2, np.float32)
    out = []
    for W in (lambda: CSR(ip, ix, d, (2, 3)), lambda: (ip, ix, d, (2, 3))):
        try:
            kernels.spmm_t(W(), np.ones((2, 1), np.float32))
            out.append("accepted")
        except ValueError as e:
            out.append(str(e))
    return out


@pytest.mark.parametrize("dtype", [np.uint8, np.uint32, np.uint64])
def test_1_falling_unsigned_indptr_is_refused_not_read_out_of_bounds(dtype):
    with mp.get_context("spawn").Pool(1) as pool:  # a segfault must not take pytest with it
        res = pool.apply_async(_spmm_t_unsigned, (dtype,)).get(timeout=120)
    assert res == ["W.indptr must be nondecreasing, but indptr[2] = 2 < indptr[1] = 3"] * 2


def test_1_uint64_beyond_int64_is_refused():
    ip = np.array([0, 2**63 + 5, 2], np.uint64)
    with pytest.raises(ValueError, match=r"W.indptr holds 9223372036854775813, beyond the int64"):
        CSR(ip, np.array([0, 1], np.int32), np.ones(2, np.float32), (2, 3))


def test_1_crafted_checkpoint_with_a_falling_unsigned_indptr_is_refused(tmp_path, capsys):
    tr, path = _trained(tmp_path)
    bad = tmp_path / "bad.npz"
    _rewrite(path, bad, {"L0/p0/indptr": lambda a: _falling(a).astype(np.uint32)})
    msg = _cli_error(capsys, *_resume_argv(tr, bad))
    assert "L0/p0/indptr must be nondecreasing" in msg


# ------------------------------------------------------------------ 2. the trusted container
def test_2_data_assignment_is_checked():
    W = CSR.random((5, 6), 0.4, seed=0)
    for bad, err, msg in [
        (np.zeros(1, np.float32), ValueError, "W.data must be 1-D of length nnz = 12"),
        (np.zeros(W.nnz, np.float16), TypeError, "W.data must have dtype float32, got float16"),
        (np.zeros((W.nnz, 1), np.float32), ValueError, r"got shape \(12, 1\)"),
        (np.zeros(W.nnz, np.complex64), TypeError, "got complex64"),
        (np.zeros(2 * W.nnz, np.float32)[::2], ValueError, "C-contiguous"),
        ([0.0] * W.nnz, TypeError, "must be a NumPy float32 array, got list"),
    ]:
        with pytest.raises(err, match=msg):
            W.data = bad
    good = np.arange(W.nnz, dtype=np.float32)
    W.data = good
    assert W.data is good  # no copy: the optimizer's view stays the matrix's values
    np.testing.assert_array_equal(kernels.spmm(W, np.eye(6, dtype=np.float32)), W.to_dense())


def test_2_pattern_is_read_only():
    W = CSR.random((5, 6), 0.4, seed=0)
    for attr in ("indptr", "indices", "shape"):
        with pytest.raises(AttributeError):
            setattr(W, attr, getattr(W, attr))
    with pytest.raises(ValueError, match="read-only"):
        W.indptr[1] = 7
    with pytest.raises(ValueError, match="read-only"):
        W.indices[0] = 99


def test_2_every_kernel_call_rechecks_the_o1_invariants():
    """A container corrupted behind the setter's back (the private slot) is refused at the
    next call, before a kernel reads it."""
    W = CSR.random((5, 6), 0.4, seed=0)
    object.__setattr__(W, "_data", np.zeros(1, np.float32))
    X = np.ones((6, 2), np.float32)
    for call in (
        lambda: kernels.spmm(W, X),
        lambda: kernels.spmm_t(W, np.ones((5, 2), np.float32)),
        lambda: kernels.sddmm(W, np.ones((5, 2), np.float32), X),
        lambda: kernels.topk_grow(W, np.ones((5, 2), np.float32), X, 1),
        lambda: kernels.magnitude_drop(W, 1),
    ):
        with pytest.raises(ValueError, match="W.data must be 1-D of length nnz"):
            call()


# ------------------------------------------------------------------ 3. floating-point mode
def test_3_training_does_not_leave_flush_to_zero_on(tmp_path):
    tr = Trainer(_blob_cfg(tmp_path, flush_denormals=True))
    assert 1e-310 * 1.0 != 0.0  # construction changes nothing
    tr.run()
    assert 1e-310 * 1.0 != 0.0
    assert np.float32(1e-40) * np.float32(1.0) > 0


# ------------------------------------------------------------------ 4. --max-steps 0
@pytest.mark.parametrize("steps, shown", [("0", "0"), ("-3", "-3")])
def test_4_max_steps_below_one_is_one_clear_error(tmp_path, capsys, steps, shown):
    msg = _cli_error(capsys, "train", "--dataset", str(blobs_npz(tmp_path / "b.npz")),
                     "--arch", "20-8-3", "--max-steps", steps, "--out", str(tmp_path / "o"))  # fmt: skip
    assert msg.endswith(f"max_steps (--max-steps) must be >= 1, got {shown}")
    assert not (tmp_path / "o").exists()


def test_4_a_resumed_run_with_nothing_left_reports_instead_of_crashing(tmp_path, capsys):
    tr, path = _trained(tmp_path)
    rc = cli.main(_resume_argv(tr, path))
    out = capsys.readouterr().out
    assert rc == 0 and "test accuracy:" in out


# ------------------------------------------------------------------ 5. raw tracebacks
def _resume_argv(tr, path, *extra):
    c = tr.cfg
    return ["train", "--dataset", c.dataset, "--arch", "-".join(map(str, c.arch)),
            "--sparsity", str(c.sparsity), "--delta-t", str(c.delta_t), "--epochs",
            str(c.epochs), "--batch-size", str(c.batch_size), "--no-progress", "--out",
            str(Path(c.out).parent / "resumed"), "--resume", str(path), *extra]  # fmt: skip


def _rewrite(src, dst, changes: dict):
    """Copy the checkpoint ``src`` to ``dst`` with members changed: name -> f(array) (None
    removes the member)."""
    with np.load(src, allow_pickle=False) as d:
        members = {k: d[k] for k in d.files}
    for name, f in changes.items():
        out = None if f is None else f(members.get(name))
        if out is None:
            members.pop(name, None)
        else:
            members[name] = out
    np.savez(dst, **members)
    return dst


def _falling(indptr):
    """indptr with indptr[1] > indptr[2]: row 1 would read backwards."""
    a = np.array(indptr, np.int64)
    a[1] = a[2] + 1
    return a


def _meta(change):
    def f(a):
        meta = json.loads(str(a))
        change(meta)
        return np.array(json.dumps(meta))

    return f


@pytest.mark.parametrize(
    "kind",
    ["empty", "random", "truncated", "dataset"],
)
def test_5_resume_from_a_file_that_is_no_checkpoint(tmp_path, capsys, kind):
    tr, path = _trained(tmp_path)
    bad = tmp_path / "bad.npz"
    if kind == "empty":
        bad.write_bytes(b"")
    elif kind == "random":
        bad.write_bytes(np.random.default_rng(0).bytes(5000))
    elif kind == "truncated":
        bad.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        shutil.copy(tr.cfg.dataset, bad)
    msg = _cli_error(capsys, *_resume_argv(tr, bad))
    assert str(bad) in msg
    assert ("dataset .npz" in msg) == (kind == "dataset")


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"meta": _meta(lambda m: m.pop("config"))}, "meta.config must be a JSON dict"),
        ({"meta": _meta(lambda m: m.update(history=5))}, "meta.history must be a JSON list"),
        ({"meta": _meta(lambda m: m.update(step=-100))}, r"meta.step must be an integer in \[0, 2\*\*62\)"),
        ({"meta": _meta(lambda m: m.update(epoch=1))}, "meta.history has 2 epochs"),
        ({"opt/t": lambda a: np.array([1, 2])}, r"opt/t has shape \(2,\), expected \(\)"),
        ({"L0/shape": lambda a: np.array([16])}, r"L0/shape has shape \(1,\)"),
        ({"L0/parts": lambda a: np.array([0, 20, 16])}, "L0/parts must run nondecreasing"),
        ({"L0/p0/indices": lambda a: a.astype(np.float64)}, "L0/p0/indices has dtype float64"),
        ({"L0/p0/indices": lambda a: a + 100}, r"L0/p0/indices must lie in \[0, 20\)"),
        ({"L0/p0/indices": lambda a: a[::-1].copy()}, "sorted and unique within each row"),
        ({"L0/p0/data": lambda a: a[:-1]}, "L0/p0/data has shape"),
        ({"L0/p0/b": lambda a: a[:1]}, r"L0/p0/b has shape \(1,\), expected \(16\)"),
        ({"L0/p0/data": lambda a: a.astype(np.complex64)}, "expected real floating-point"),
        ({"L0/p0/data": lambda a: np.where(np.arange(a.size) == 3, np.nan, a)}, "found nan"),
        ({"L0/p0/opt/momentum/W": None}, "has no member 'L0/p0/opt/momentum/W'"),
        ({"meta": _meta(lambda m: m.update(format=7))}, "format 7, newer than this sparsecore"),
    ],
)
def test_5_crafted_checkpoint_members_are_refused_by_name(tmp_path, capsys, change, expected):
    tr, path = _trained(tmp_path)
    bad = _rewrite(path, tmp_path / "bad.npz", change)
    before = [p.value.copy() for p in tr.model.params()]
    with pytest.raises(ckpt.CheckpointError, match=expected):
        tr.load_checkpoint(bad)
    for p, b in zip(tr.model.params(), before, strict=True):  # the trainer is unchanged
        np.testing.assert_array_equal(p.value, b)
    msg = _cli_error(capsys, *_resume_argv(tr, bad))
    assert str(bad) in msg


def test_5_checkpoint_with_the_wrong_nnz_is_refused(tmp_path):
    tr, path = _trained(tmp_path)
    with np.load(path) as d:
        m = {k: d[k] for k in d.files}
    keep = int(m["L0/p0/indptr"][1])  # drop row 0's entries everywhere
    m["L0/p0/indptr"] = np.concatenate([[0], m["L0/p0/indptr"][1:] - keep])
    for k in list(m):
        if k.startswith("L0/p0/") and k.split("/")[-1] in ("indices", "data", "W"):
            m[k] = m[k][keep:]
    np.savez(tmp_path / "bad.npz", **m)
    with pytest.raises(ckpt.CheckpointError, match=r"layer 0 holds \d+ connections, this config"):
        tr.load_checkpoint(tmp_path / "bad.npz")


@pytest.mark.parametrize("kind", ["empty", "truncated", "npy", "no_keys"])
def test_5_bad_dataset_files_are_one_clear_error(tmp_path, capsys, kind):
    f = tmp_path / ("d.npy" if kind == "npy" else "d.npz")
    if kind == "empty":
        f.write_bytes(b"")
    elif kind == "truncated":
        blobs_npz(tmp_path / "g.npz")
        f.write_bytes((tmp_path / "g.npz").read_bytes()[:3000])
    elif kind == "npy":
        np.save(f, np.zeros((4, 3)))
    else:
        np.savez(f, a=np.zeros(3))
    with pytest.raises(D.DatasetError):
        D.load(str(f))
    msg = _cli_error(capsys, "train", "--dataset", str(f), "--arch", "20-8-3", "--out",
                     str(tmp_path / "o"))  # fmt: skip
    assert str(f) in msg


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["train", "--grow-candidates", "inf"], "grow_candidates (--grow-candidates) must be"),
        (["train", "--max-memory", "1e400"], "--max-memory: a memory size must be between"),
        (["plan", "--arch", "784-30-10", "--grow-candidates", "inf"], "--grow-candidates"),
        (["plan", "--arch", "784-30-10", "--grow", "sampled", "--grow-candidates", "inf"],
         "--grow-candidates"),  # fmt: skip
    ],
)
def test_5_overflowing_numbers_are_refused(tmp_path, capsys, argv, expected):
    extra = ["--arch", "784-30-10", "--out", str(tmp_path / "o")] if argv[0] == "train" else []
    assert expected in _cli_error(capsys, *argv, *extra)


def test_5_bench_bad_widths_and_json(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:  # argparse's own usage error: exit 2, no traceback
        cli.main(["bench", "--widths", "0", "--out", str(tmp_path)])
    assert e.value.code == 2
    assert "--widths: expected comma-separated positive integers" in capsys.readouterr().err
    assert "cannot read" in _cli_error(capsys, "bench", "--from-json", str(tmp_path / "no.json"),
                                       "--out", str(tmp_path))  # fmt: skip
    (tmp_path / "bad.json").write_text("{not json")
    assert "is not JSON" in _cli_error(capsys, "bench", "--from-json",
                                       str(tmp_path / "bad.json"), "--out", str(tmp_path))  # fmt: skip
    (tmp_path / "part.json").write_text('{"environment": {}, "step": 3}')
    assert "is not a complete sparsecore bench.json" in _cli_error(
        capsys, "bench", "--from-json", str(tmp_path / "part.json"), "--out", str(tmp_path)
    )


# ------------------------------------------------------------------ 6. types in TrainConfig
def test_6_tuple_arch_and_numpy_scalars_resume(tmp_path):
    kw = dict(arch=(20, 16, 3), seed=np.int64(1), lr=np.float32(0.05), batch_size=np.int32(50))
    tr, path = _trained(tmp_path, **kw)
    assert tr.cfg.arch == [20, 16, 3] and type(tr.cfg.seed) is int
    other = Trainer(_blob_cfg(tmp_path, **kw))
    other.load_checkpoint(path)
    assert other.step == tr.step


# ------------------------------------------------------------------ 7. no link followed
def test_7_checkpoint_writer_does_not_follow_links(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (out / "checkpoint.npz.tmp").symlink_to(victim)  # the old, predictable name
    (out / "checkpoint.npz").symlink_to(victim)
    Trainer(_blob_cfg(tmp_path, epochs=1)).run()
    assert victim.read_text() == "precious"
    assert not (out / "checkpoint.npz").is_symlink()
    assert zipfile.is_zipfile(out / "checkpoint.npz")
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp") and not p.is_symlink()]


# ------------------------------------------------------------------ 8. index overflow
@pytest.mark.parametrize("shape", [(2, 2**62), (2**40, 2**40), (3, 2**70)])
def test_8_shapes_whose_flat_index_overflows_are_refused(shape):
    with pytest.raises(ValueError, match=r"beyond 2\*\*63 - 1"):
        # (the shape is checked first: the arrays are never looked at)
        CSR(np.zeros(1, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32), shape)
    with pytest.raises(ValueError, match=r"beyond 2\*\*63 - 1"):
        CSR.random(shape, 0.0)


def test_8_merge_at_the_largest_representable_shape():
    m, n = 2, 2**62 - 1  # m·n < 2**63: accepted, and the merge puts columns in their rows
    W = CSR(np.array([0, 1, 1], np.int64), np.array([n - 1], np.int64),
            np.ones(1, np.float32), (m, n))  # fmt: skip
    W2, src = kernels.merge(W, np.array([True]), np.array([1]), np.array([n - 2]))
    assert W2.indptr.tolist() == [0, 1, 2] and W2.indices.tolist() == [n - 1, n - 2]
    assert src.tolist() == [0, -1]


# ------------------------------------------------------------------ 9. fork after kernels
_FORK_CHILD = """
import multiprocessing as mp, sys, threading
import numpy as np
import kernels, sparsecore, numba

def work(i):
    W = sparsecore.CSR.random((64, 64), 0.1, seed=i)
    return float(kernels.spmm(W, np.ones((64, 4), np.float32)).sum())

def threads():
    W = sparsecore.CSR.random((300, 200), 0.1, seed=1)
    X = np.random.default_rng(0).standard_normal((200, 16)).astype(np.float32)
    want = W.to_dense().astype(np.float64) @ X
    bad = []
    def run():
        for _ in range(30):
            if not np.allclose(kernels.spmm(W, X), want, atol=1e-4):
                bad.append(1)
    ts = [threading.Thread(target=run) for _ in range(4)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    return not bad

if __name__ == "__main__":
    W = sparsecore.CSR.random((256, 256), 0.1, seed=0)
    kernels.spmm(W, np.ones((256, 8), np.float32))  # the pool is started in the parent
    layer = numba.threading_layer()
    try:
        with mp.get_context("fork").Pool(2) as pool:
            got = pool.map_async(work, range(4)).get(timeout=60)
        want = [work(i) for i in range(4)]
        fork = "ok" if np.allclose(got, want) else "wrong"
    except Exception as e:
        fork = f"{type(e).__name__}: {e}"
    print(layer, "|", fork, "|", "threads ok" if threads() else "threads wrong")
"""


def _fork_script(tmp_path, **env):
    script = tmp_path / "fork.py"
    script.write_text(_FORK_CHILD)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), **env}
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                       timeout=240, env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    return [p.strip() for p in r.stdout.strip().splitlines()[-1].split("|")]


def _tbb_installed():
    from importlib import metadata

    try:
        metadata.version("tbb")
        return True
    except metadata.PackageNotFoundError:
        return False


@pytest.mark.skipif(not _tbb_installed(), reason="the tbb wheel is not installed here")
def test_9_a_forked_pool_works_after_kernels_ran_and_threads_still_do(tmp_path):
    """The default layer (tbb, from the wheel) is fork-safe and thread-safe."""
    assert _fork_script(tmp_path) == ["tbb", "ok", "threads ok"]


def test_9_without_tbb_a_forked_kernel_fails_fast_with_what_to_do(tmp_path):
    """On GNU OpenMP (where no tbb wheel exists) the forked worker raises an error that
    reaches the parent, instead of dying and leaving the pool hanging."""
    layer, fork, threads = _fork_script(tmp_path, NUMBA_THREADING_LAYER="omp")
    assert layer == "omp" and threads == "threads ok"
    assert fork.startswith("ForkedOpenMPError: kernels.spmm was called in a process forked")
    assert "pip install 'tbb>=2021.6'" in fork and "get_context('spawn')" in fork


# ------------------------------------------------------------------ 10. accepted nonsense
@pytest.mark.parametrize(
    "kw, expected",
    [
        (dict(lr_gamma=-1.0), r"lr_gamma \(--lr-gamma\) must be a finite number in \(0, ∞\)"),
        (dict(lr_gamma=float("nan")), r"lr_gamma .* got nan"),
        (dict(warmup_steps=-10), r"warmup_steps \(--warmup-steps\) must be >= 0, got -10"),
        (dict(sparsity=0.99999), r"leaves weighted layer \d .* with no connection"),
        (dict(alpha=float("nan")), r"alpha \(--alpha\) must be a finite number in \[0, 1\]"),
        (dict(max_steps=-3), r"max_steps \(--max-steps\) must be >= 1, got -3"),
        (dict(seed=-1), r"seed \(--seed\) must be >= 0"),
        (dict(momentum=1.0), r"momentum \(--momentum\) must be a finite number in \[0, 1\)"),
        (dict(nesterov="yes"), "nesterov must be True or False"),
    ],
)
def test_10_nonsense_settings_are_refused(tmp_path, kw, expected):
    with pytest.raises((ValueError, TypeError), match=expected):
        _blob_cfg(tmp_path, **kw).validate()


def test_10_plan_and_nprocs(capsys):
    assert "batch_size (--batch-size) must be >= 1, got 0" in _cli_error(
        capsys, "plan", "--arch", "784-30-10", "--batch-size", "0"
    )
    for n in ("0", "-1"):
        assert f"--nprocs must be >= 1 (processes to start), got {n}" in _cli_error(
            capsys, "train", "--nprocs", n, "--arch", "784-30-10"
        )


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"L0/p0/b": lambda a: a[:1]}, r"L0/p0/b has shape \(1,\), expected \(16\)"),
        ({"L1/b": lambda a: a[:1]}, r"L1/b has shape \(1,\), expected \(3\)"),
        ({"L1/W": lambda a: a.astype(np.complex128)}, "L1/W has dtype complex128"),
        ({"meta": _meta(lambda m: m.update(step=-100))}, r"meta.step must be an integer in \["),
    ],
)
def test_10_checkpoint_values_that_would_be_broadcast_or_cast(tmp_path, change, expected):
    tr, path = _trained(tmp_path, sparsity=0.3)  # ERK: the 16×3 classifier comes out dense
    with np.load(path) as d:
        assert "L1/W" in d.files
    bad = _rewrite(path, tmp_path / "bad.npz", change)
    with pytest.raises(ckpt.CheckpointError, match=expected):
        tr.load_checkpoint(bad)


def test_10_from_scipy_does_not_trust_the_canonical_flag():
    M = sp.csr_array((np.array([1.0, 2.0, 3.0]), np.array([2, 0, 2]), np.array([0, 3])), (1, 4))
    M.has_canonical_format = True  # a lie: unsorted, with a duplicate
    W = CSR.from_scipy(M)
    assert W.indices.tolist() == [0, 2] and W.data.tolist() == [2.0, 4.0]
    assert M.indices.tolist() == [2, 0, 2]  # the caller's matrix is not touched


def test_10_random_scale_and_float32_overflow():
    with pytest.raises(ValueError, match="scale must be a finite number >= 0, got nan"):
        CSR.random((4, 4), 0.5, scale=float("nan"))
    W = CSR.random((4, 3), 0.5, seed=0)
    X = np.ones((3, 2))
    X[1, 1] = 1e300
    with pytest.raises(OverflowError, match=r"X holds 1e\+300 at index \(1, 1\), beyond float32"):
        kernels.spmm(W, X)


def test_10_labels_and_empty_sets():
    with pytest.raises(D.DatasetError, match=r"y_train holds the label 1e\+20, beyond"):
        D.from_arrays(np.ones((2, 3)), np.array([0.0, 1e20]), np.ones((1, 3)), [0])
    with pytest.raises(D.DatasetError, match=r"x_train is empty \(0 rows\)"):
        D.from_arrays(np.ones((0, 3)), np.zeros(0), np.ones((1, 3)), [0])
    with pytest.raises(D.DatasetError, match=r"y_train holds the label 18446744073709551615"):
        D.from_arrays(np.ones((1, 3)), np.array([2**64 - 1], np.uint64), np.ones((1, 3)), [0])


def test_10_diverged_run_in_a_reused_folder_names_no_stale_checkpoint(tmp_path):
    _trained(tmp_path)  # an earlier run left run/checkpoint.npz
    tr = Trainer(_blob_cfg(tmp_path, lr=1e30, epochs=1))
    with pytest.raises(Exception, match="this run wrote no checkpoint yet") as e:
        tr.run()
    assert "checkpoint.npz" not in str(e.value)


def test_10_kill_during_a_write_then_resume_leaves_no_duplicate_metrics_row(tmp_path):
    tr, path = _trained(tmp_path, epochs=2)
    out = Path(tr.cfg.out)
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2
    # as if killed while writing epoch 2's checkpoint: the metrics row of epoch 2 was appended,
    # the checkpoint on disk is epoch 1's
    one = Trainer(_blob_cfg(tmp_path, epochs=1, out=str(tmp_path / "one")))
    one.run()
    again = Trainer(_blob_cfg(tmp_path, epochs=2))
    with pytest.warns(UserWarning, match="epochs"):
        again.load_checkpoint(Path(one.cfg.out) / "checkpoint.npz")
    again.run()
    epochs = [json.loads(r)["epoch"] for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]


# ------------------------------------------------------------------ format versions
def test_a_format_2_checkpoint_of_the_previous_release_resumes(tmp_path):
    """tests/data/checkpoint_v2.npz was written by sparsecore before this change
    (tests/data/make_checkpoint.py); it resumes and trains on."""
    from sparsecore.data import from_arrays

    tr = Trainer(TrainConfig(**{**V2_CONFIG, "epochs": 3}, out=str(tmp_path)),
                 from_arrays(*blobs()))  # fmt: skip
    with pytest.warns(UserWarning, match="epochs"):
        tr.load_checkpoint(DATA / "checkpoint_v2.npz")
    assert tr.epoch == 2 and tr.step == 2 * (600 // 50)
    tr.run()
    assert tr.epoch == 3 and np.isfinite(tr.history[-1]["train_loss"])


def test_a_newer_format_is_refused_naming_both_versions(tmp_path):
    from sparsecore.data import from_arrays

    bad = _rewrite(DATA / "checkpoint_v2.npz", tmp_path / "v9.npz",
                   {"meta": _meta(lambda m: m.update(format=9))})  # fmt: skip
    tr = Trainer(TrainConfig(**V2_CONFIG), from_arrays(*blobs()))
    with pytest.raises(ckpt.CheckpointError, match=r"format 9, newer .* reads \(formats 1, 2; it writes 2\)"):
        tr.load_checkpoint(bad)


def test_random_positions_stays_in_range():
    rng = np.random.default_rng(0)
    flat = random_positions(3, 7, 10, rng)
    assert flat.min() >= 0 and flat.max() < 21 and np.unique(flat).size == 10


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch, capsys):
    import errno

    tr, path = _trained(tmp_path, epochs=1)
    good = path.read_bytes()
    calls = {"n": 0}
    real_add = ckpt._NpzWriter.add

    def add(self, name, array):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_add(self, name, array)

    monkeypatch.setattr(ckpt._NpzWriter, "add", add)
    with pytest.warns(UserWarning, match="epochs"):
        msg = _cli_error(capsys, *_resume_argv(tr, path, "--epochs", "2", "--out", tr.cfg.out))
    assert "No space left on device" in msg
    assert path.read_bytes() == good
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


# ------------------------------------------------------------------ found in review
def _in_spawn(fn, *args):
    """fn(*args) in a spawned process: a segfault there fails the test, not pytest."""
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply_async(fn, args).get(timeout=120)


def _convert_bad_scipy(kind):
    if kind == "csc":
        M = sp.csc_array((np.ones(2), np.array([0, 10**8]), np.array([0, 1, 2])), shape=(3, 2))
    else:
        M = sp.coo_array((np.ones(2), (np.array([0, 1]), np.array([0, 1]))), shape=(3, 2))
        M.row[1] = 10**8  # mutated after scipy checked it
    try:
        kernels.spmm(M, np.ones((2, 1), np.float32))
        return "accepted"
    except ValueError as e:
        return str(e)


@pytest.mark.parametrize("kind, expected", [("csc", "W (CSC): row indices must lie in [0, 3)"),
                                            ("coo", "W (COO): row indices must lie in [0, 3)")])  # fmt: skip
def test_scipy_arrays_are_checked_before_scipy_converts_them(kind, expected):
    assert _in_spawn(_convert_bad_scipy, kind) == expected


def test_with_pattern_validates_and_thread_blocks_are_read_only():
    W = CSR.random((4, 5), 0.5, seed=0)
    ip = np.array([0, 1, 1, 1, 1], np.int32)
    with pytest.raises(ValueError, match=r"W.indices must lie in \[0, n_cols = 5\)"):
        W.with_pattern(ip, np.array([10**9], np.int32), np.ones(1, np.float32))
    for blocks in (W.row_blocks(), W.col_blocks()):
        with pytest.raises(ValueError, match="read-only"):
            blocks[-1] = 10**8
    alias = np.zeros(2, np.int32)
    with pytest.raises(ValueError, match="shares memory with the matrix's index arrays"):
        CSR(np.array([0, 1], np.int32), alias[:1], alias[:1].view(np.float32), (1, 3), check=False)


def test_layers_check_operand_shapes():
    from sparsecore.layers import SparseLinear, mlp

    layer = SparseLinear(CSR.random((30, 20), 0.3, seed=0))
    with pytest.raises(ValueError, match=r"x has shape \(3, 8\), expected \(20, batch\)"):
        layer.forward(np.ones((3, 8), np.float32))
    layer.forward(np.ones((20, 8), np.float32))
    with pytest.raises(ValueError, match=r"dy has shape \(30, 5\), expected"):
        layer.backward(np.ones((30, 5), np.float32))
    model = mlp([20, 16, 3], [0.5, None])
    with pytest.raises(ValueError, match=r"x has shape \(4, 7\), expected \(N, 20\)"):
        model.predict(np.ones((4, 7), np.float32))


def test_dense_method_checkpoint_resumes(tmp_path):
    tr, path = _trained(tmp_path, method="dense", sparsity=0.0)
    other = Trainer(_blob_cfg(tmp_path, method="dense", sparsity=0.0))
    other.load_checkpoint(path)
    assert other.step == tr.step


@pytest.mark.parametrize(
    "history, expected",
    [([{}, {}], r"meta.history\[0\].epoch must be a number, got None"),
     ([{"epoch": 2, "step": 1, "train_loss": 1.0, "train_acc": 0.5, "test_loss": 1.0,
        "test_acc": 0.5}] * 2, r"meta.history\[0\].epoch must be 1, got 2")],  # fmt: skip
)
def test_a_crafted_history_is_refused(tmp_path, history, expected):
    tr, path = _trained(tmp_path)
    bad = _rewrite(path, tmp_path / "bad.npz", {"meta": _meta(lambda m: m.update(history=history))})
    with pytest.raises(ckpt.CheckpointError, match=expected):
        tr.load_checkpoint(bad)


def test_turning_momentum_on_or_off_is_refused_on_resume(tmp_path):
    tr, path = _trained(tmp_path, momentum=0.0)
    with pytest.raises(ckpt.CheckpointError, match="written with momentum=0.0, this run has momentum=0.9"):
        Trainer(_blob_cfg(tmp_path, momentum=0.9)).load_checkpoint(path)


def test_empty_test_set_seed_and_huge_widths(tmp_path, capsys):
    with pytest.raises(D.DatasetError, match=r"x_test is empty \(0 rows\)"):
        D.from_arrays(np.ones((4, 3)), [0, 1, 0, 1], np.ones((0, 3)), np.zeros(0))
    with pytest.raises(ValueError, match=r"seed \(--seed\) must be below 2\*\*63"):
        _blob_cfg(tmp_path, seed=10**30).validate()
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--widths", "1" + "0" * 400, "--out", str(tmp_path)])
    assert e.value.code == 2 and "--widths: expected" in capsys.readouterr().err


def test_metrics_file_link_is_replaced_not_followed(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (out / "metrics.jsonl").symlink_to(victim)
    Trainer(_blob_cfg(tmp_path, epochs=1)).run()
    assert victim.read_text() == "precious" and not (out / "metrics.jsonl").is_symlink()


# ------------------------------------------------------------------ found by the fuzzer
def test_grow_on_an_empty_batch_is_the_lowest_absent_entries_without_a_dense_scan(rng):
    for _ in range(20):
        m, n = (int(v) for v in rng.integers(1, 12, 2))
        W = CSR.random((m, n), float(rng.random()), seed=int(rng.integers(1 << 30)))
        for keep in (None, rng.random(W.nnz) < 0.5):
            absent = m * n - (W.nnz if keep is None else int(keep.sum()))
            for k in sorted({0, absent // 2, absent}):
                got = kernels.topk_grow(W, np.zeros((m, 0), np.float32),
                                        np.zeros((n, 0), np.float32), k, keep=keep)  # fmt: skip
                want = kernels.topk_grow(W, np.zeros((m, 1), np.float32),
                                         np.zeros((n, 1), np.float32), k, keep=keep)  # fmt: skip
                for g, w in zip(got, want, strict=True):
                    assert g.dtype == w.dtype and np.array_equal(g, w)
    tall = CSR.random((200_000, 4), 0.25, seed=1)  # many rows, every absent entry: vectorised
    k = 4 * 200_000 - tall.nnz
    got = kernels.topk_grow(tall, np.zeros((200_000, 0), np.float32), np.zeros((4, 0), np.float32), k)
    want = kernels.topk_grow(tall, np.zeros((200_000, 1), np.float32), np.zeros((4, 1), np.float32), k)
    assert all(np.array_equal(g, w) for g, w in zip(got, want, strict=True))
    big = CSR(np.array([0, 2, 2], np.int64), np.array([0, 2], np.int64),
              np.ones(2, np.float32), (2, 2**40))  # fmt: skip
    r, c, s = kernels.topk_grow(big, np.zeros((2, 0), np.float32),
                                np.empty((2**40, 0), np.float32), 3)  # fmt: skip
    assert r.tolist() == [0, 0, 0] and c.tolist() == [1, 3, 4] and not s.any()


def test_allocations_beyond_the_machine_are_refused_before_they_start(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"row pointers .* needs .* GiB, more than"):
        CSR.from_dense(np.empty((2**40, 0)))
    with pytest.raises(ValueError, match="CSR.random of shape"):
        CSR.random((2, 2**40), 1.0, seed=0)
    msg = _cli_error(capsys, "train", "--arch", "784-16-99999999999", "--out", str(tmp_path))
    assert "more than this machine's memory" in msg or "address-space limit" in msg


def test_random_keeps_its_invariants():
    with pytest.raises(ValueError, match=r"CSR.random values \(scale 1e\+39\) must be finite"):
        CSR.random((1, 1), 1.0, seed=0, scale=1e39)
    d = np.float32(0.3)  # 0.30000001192...: round(d·475) = 143 in float64, 142 in float32
    assert CSR.random((19, 25), d, seed=0).nnz == round(float(d) * 19 * 25) == 143


def test_out_may_not_overlap_the_callers_scipy_arrays():
    M = sp.csr_matrix((np.array([0.5], np.float32), np.array([0], np.int32),
                       np.array([0, 1], np.int32)), shape=(1, 1))  # fmt: skip
    X = np.ones((1, 2), np.float32)
    with pytest.raises(ValueError, match="out overlaps an input array"):
        kernels.sddmm(M, X, X, out=M.data)


def test_integer_duplicates_are_summed_without_wrapping():
    """scipy sums duplicates in the data's dtype (uint8: 255 + 1 = 0); from_scipy sums them as
    the values they are."""
    M = sp.csr_array((np.ones(3, np.float32), np.array([0, 1, 2], np.int32),
                      np.array([0, 3], np.int32)), shape=(1, 3))  # fmt: skip
    M.data = np.array([1, 255, 6], dtype=np.uint8)
    M.indices = np.array([0, 0, 2], dtype=np.int32)
    assert CSR.from_scipy(M).data.tolist() == [256.0, 6.0]
    C = sp.coo_array((np.array([255, 1], np.uint8), (np.array([0, 0]), np.array([1, 1]))), (1, 3))
    assert CSR.from_scipy(C).data.tolist() == [256.0]


def test_a_header_that_breaks_numpys_tokenizer_is_a_checkpoint_error(tmp_path):
    tr, path = _trained(tmp_path)
    raw = bytearray(path.read_bytes())
    at = raw.find(b"{'descr'")  # the first member's .npy header dict
    raw[at + 1] = ord("(")  # an unclosed bracket: tokenize.TokenError inside NumPy
    bad = tmp_path / "bad.npz"
    bad.write_bytes(bytes(raw))
    with pytest.raises(ckpt.CheckpointError):
        tr.load_checkpoint(bad)
