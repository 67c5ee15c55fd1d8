"""Data-parallel MPI training (sparsecore/mpi) is exact: N ranks compute what one
process computes. Each test starts tests/mpi_worker.py under the [mpi] extra's mpiexec (ranks on
loopback, one thread each, bounded by a timeout) and compares what the ranks wrote.

Model: 784-32-10 at 80% sparsity (ERK), batch 128, 1024 synthetic examples (8 steps per epoch),
4 epochs, ΔT = 4: topology updates at steps 4, 8, ..., 20 (T_end = 24). Seeds are fixed: the
runs compare trajectories whose float32 roundings differ (an N-rank gradient is a sum of N
partial sums), so a near-tie at a drop or grow boundary could flip one connection. Measured for
this run: every boundary (K-th vs (K+1)-th |w| of the drop, K-th vs (K+1)-th |dY·Xᵀ| of the
grow, per layer and update) is separated by >= 1.7e-4 relative, while the runs' weights differ
by <= 6e-8 (|w| ~ 0.09, i.e. <= 1e-6 relative): a margin of two orders of magnitude.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sparsecore.mpi import step_bytes, update_bytes

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("mpi_worker.py")
MPIEXEC = Path(sys.executable).parent / "mpiexec"
MPIEXEC = str(MPIEXEC) if MPIEXEC.exists() else shutil.which("mpiexec")
TIMEOUT = 120  # seconds per launch: a hang fails the test instead of the CI job

needs_mpi = pytest.mark.skipif(
    importlib.util.find_spec("mpi4py") is None or MPIEXEC is None,
    reason="needs the [mpi] extra (mpi4py, mpich's mpiexec)",
)

ENV = {
    **{k: v for k, v in os.environ.items() if k not in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")},
    "NUMBA_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "PYTHONPATH": str(ROOT),
}


def run(cmd) -> subprocess.CompletedProcess:
    """Run cmd in its own process group; past TIMEOUT the whole group (mpiexec and every rank)
    is killed and the test fails: a hang never outlives the test."""
    proc = subprocess.Popen(
        cmd,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} hung for {TIMEOUT} s:\n{out}\n{err}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def launch(out: Path, nprocs: int, *args, check=True):
    """Run the worker on nprocs ranks (1: a plain process, no MPI at all)."""
    cmd = [sys.executable, str(WORKER), "--out", str(out), *map(str, args)]
    if nprocs > 1:
        cmd = [MPIEXEC, "-n", str(nprocs), *cmd]
    p = run(cmd)
    if check:
        assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{p.stdout}\n{p.stderr}"
    return p


def result(out: Path, rank: int = 0) -> dict:
    return json.loads((out / f"rank{rank}.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The uninterrupted runs on 1, 2 and 3 ranks, and 2 ranks stopped after epoch 2."""
    base = tmp_path_factory.mktemp("mpi")
    done = {}
    for n in (1, 2, 3):
        launch(base / f"n{n}", n)
        done[n] = base / f"n{n}"
    launch(base / "stop2", 2, "--stop-epoch", 2)
    done["stop2"] = base / "stop2"
    return done


def assert_same_run(a: dict, b: dict, steps=None):
    """Losses to float32 tolerance at every common step, identical topology after every
    update."""
    common = sorted(set(a["losses"]) & set(b["losses"]), key=int)
    if steps is not None:
        assert [int(s) for s in common] == list(steps)
    la = np.array([a["losses"][s] for s in common])
    lb = np.array([b["losses"][s] for s in common])
    np.testing.assert_allclose(la, lb, rtol=2e-5, atol=1e-6)
    updates = sorted(set(a["topology"]) & set(b["topology"]), key=int)
    assert updates, "no topology update was compared"
    for s in updates:
        assert a["topology"][s] == b["topology"][s], f"topology differs after the update at {s}"
        assert a["grown"][s] == b["grown"][s]
    return updates


def assert_same_weights(a: Path, b: Path):
    with np.load(a / "final.npz") as fa, np.load(b / "final.npz") as fb:
        assert sorted(fa.files) == sorted(fb.files)
        for key in fa.files:
            if key.endswith(("indptr", "indices")):
                np.testing.assert_array_equal(fa[key], fb[key], err_msg=key)
            else:
                np.testing.assert_allclose(fa[key], fb[key], rtol=1e-4, atol=2e-6, err_msg=key)


@needs_mpi
@pytest.mark.parametrize("n", [2, 3])
def test_n_ranks_equal_one_rank(runs, n):
    """Same global batches on N ranks (3: an uneven 42/43/43 split of 128) = one process:
    losses of all 32 steps, topology after each of the 5 updates, final weights."""
    one, many = result(runs[1]), result(runs[n])
    assert many["ranks"] == n and one["ranks"] == 1
    updates = assert_same_run(one, many, steps=range(32))
    assert [int(s) for s in updates] == [4, 8, 12, 16, 20]
    assert_same_weights(runs[1], runs[n])
    # every rank saw the same (the guard checks this too, after every update)
    for r in range(1, n):
        other = result(runs[n], r)
        assert other["topology"] == many["topology"] and other["losses"] == many["losses"]
    # only rank 0 wrote metrics and checkpoints
    lines = (runs[n] / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4
    assert [json.loads(x)["train_loss"] for x in lines] == pytest.approx(
        [h["train_loss"] for h in one["history"]], rel=2e-5
    )


@needs_mpi
@pytest.mark.parametrize("n", [2, 3])
def test_bytes_per_step_are_the_nnz_sized_gradients(runs, n):
    """One allreduce per step of 4·(Σ nnz + Σ biases + 2) bytes: <= 1.1x the nnz-sized
    gradients and biases; per update the grow's batch-sized gathers and 12-byte candidates."""
    res = result(runs[n])
    comm = res["comm"]
    grads = 4 * (res["nnz"] + res["biases"])
    assert res["params"] == res["nnz"] + res["biases"]  # every layer sparse here
    assert comm["step_bytes"] == grads + 8
    assert comm["step_bytes"] <= 1.1 * grads
    assert comm["step_bytes_total"] == comm["steps"] * comm["step_bytes"]
    assert comm["steps"] == 32
    assert comm["step_bytes"] == step_bytes(res["params"])
    # per update (rank 0): X (4·B·n) and its rows of dY (4·B·m/N) per layer, the 12-byte
    # candidates (<= k per rank: fewer where a block of rows has fewer absent entries), the
    # counts and the guard's hashes: the cost model exactly
    assert len(comm["update_bytes"]) == 5
    cands = comm["update_candidates"]
    for got, ks, c in zip(comm["update_bytes"], res["grown"].values(), cands, strict=True):
        assert all(ci <= n * k for ci, k in zip(c, ks, strict=True))
        assert got == update_bytes(res["shapes"], ks, 128, n, candidates=c)
        assert got < 4 * 128 * sum(m + c for m, c in res["shapes"]) + 16 * n * sum(ks) + 256


@needs_mpi
def test_bytes_per_step_do_not_depend_on_the_dense_size(runs, tmp_path):
    """784-32-10 at 80% and 1568-32-10 at 90%: the same nnz (to rounding), twice the dense
    size; the allreduce is the same size."""
    launch(tmp_path, 2, "--arch", "1568-32-10", "--sparsity", 0.9, "--epochs", 1)
    small, big = result(runs[2]), result(tmp_path)
    assert big["dense"] > 1.9 * small["dense"]
    assert abs(big["nnz"] - small["nnz"]) <= 0.01 * small["nnz"]
    assert big["comm"]["step_bytes"] == 4 * (big["nnz"] + big["biases"] + 2)
    ratio = big["comm"]["step_bytes"] / small["comm"]["step_bytes"]
    assert abs(ratio - 1) <= 0.01


def _checkpoint_arrays(path: Path) -> dict:
    with np.load(path) as f:
        return {k: f[k] for k in f.files if k != "meta"}


@needs_mpi
def test_checkpoint_from_two_ranks_resumes_on_three_and_on_one(runs, tmp_path):
    """Stopped after epoch 2 on 2 ranks; resumed on 3 ranks and on 1 process: the same losses
    and topologies as the uninterrupted 2-rank run over epochs 3-4."""
    ckpt = runs["stop2"] / "run" / "checkpoint.npz"
    meta = json.loads(str(np.load(ckpt)["meta"]))
    assert meta["step"] == 16 and meta["epoch"] == 2
    full = result(runs[2])
    for n in (3, 1):
        launch(tmp_path / f"r{n}", n, "--resume", ckpt)
        resumed = result(tmp_path / f"r{n}")
        updates = assert_same_run(full, resumed, steps=range(16, 32))
        assert [int(s) for s in updates] == [16, 20]
        assert_same_weights(runs[2], tmp_path / f"r{n}")
    # the stopped run's checkpoint holds what the uninterrupted run had at step 16, bit for bit
    stop = result(runs["stop2"])
    assert {s: full["losses"][s] for s in stop["losses"]} == stop["losses"]


@needs_mpi
@pytest.mark.parametrize("how", ["exit", "raise"])
def test_a_failing_rank_stops_the_others_and_the_checkpoint_stays(runs, tmp_path, how):
    """Rank 1 dies (os._exit) or raises at step 20, in epoch 3: the job ends with an error
    within the timeout instead of hanging in the next allreduce, and the checkpoint of epoch 2
    is intact (the same arrays as the 2-rank run stopped there)."""
    p = launch(tmp_path, 2, "--die", f"1:20:{how}", check=False)
    assert p.returncode != 0
    if how == "raise":
        assert "injected failure in rank 1 at step 20" in p.stderr
    assert not (tmp_path / "rank0.json").exists()  # rank 0 did not finish either
    ckpt = tmp_path / "run" / "checkpoint.npz"
    meta = json.loads(str(np.load(ckpt)["meta"]))
    assert meta["step"] == 16
    good = _checkpoint_arrays(runs["stop2"] / "run" / "checkpoint.npz")
    got = _checkpoint_arrays(ckpt)
    assert sorted(got) == sorted(good)
    for k in good:
        np.testing.assert_array_equal(got[k], good[k], err_msg=k)


@needs_mpi
def test_diverged_ranks_are_caught_after_the_next_update(tmp_path):
    """A weight of rank 1 nudged at step 5: the guard after the update at step 8 stops the job
    with an error naming the layer."""
    p = launch(tmp_path, 2, "--perturb", "1:5", "--epochs", 2, check=False)
    assert p.returncode != 0
    assert "after the topology update at step 8" in p.stderr
    assert "fc0 differ across MPI ranks" in p.stderr


@needs_mpi
def test_sampled_grow_on_two_ranks_equals_one_process(tmp_path):
    """RigL's sampled grow: the same candidates on every rank, scores summed over the ranks'
    columns (one allreduce of the candidates' partial sums)."""
    launch(tmp_path / "one", 1, "--grow", "sampled", "--epochs", 2)
    launch(tmp_path / "two", 2, "--grow", "sampled", "--epochs", 2)
    one, two = result(tmp_path / "one"), result(tmp_path / "two")
    assert [int(s) for s in assert_same_run(one, two, steps=range(16))] == [4, 8]
    assert_same_weights(tmp_path / "one", tmp_path / "two")


@needs_mpi
def test_cli_nprocs_launches_mpiexec_and_only_rank_0_reports(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 20)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0)
    np.savez(tmp_path / "d.npz", x_train=x[:256], y_train=y[:256], x_test=x[256:], y_test=y[256:])
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "sparsecore", "train", "--nprocs", "2"]
    cmd += ["--dataset", str(tmp_path / "d.npz"), "--arch", "20-16-3", "--sparsity", "0.5"]
    cmd += ["--batch-size", "32", "--epochs", "2", "--delta-t", "3", "--no-progress"]
    cmd += ["--out", str(out)]
    p = run(cmd)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("test accuracy:") == 1
    assert p.stdout.count("communication: 2 ranks (local batch 16)") == 1
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert (out / "checkpoint.npz").exists()


def test_importing_sparsecore_never_imports_mpi4py():
    code = (
        "import sys, sparsecore, sparsecore.train, sparsecore.distributed, sparsecore.mpi, sparsecore.cli\n"
        "from sparsecore.distributed import world\n"
        "assert world() is None\n"
        "assert 'mpi4py' not in sys.modules, 'mpi4py imported'\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert p.returncode == 0, p.stderr


def test_split_and_strip_nprocs():
    from sparsecore.distributed import split, strip_nprocs

    assert [split(128, 3, r) for r in range(3)] == [(0, 42), (42, 85), (85, 128)]
    assert [split(2, 3, r) for r in range(3)] == [(0, 0), (0, 1), (1, 2)]
    argv = ["train", "--nprocs", "3", "--epochs", "2", "--nprocs=4"]
    assert strip_nprocs(argv) == ["train", "--epochs", "2"]


def test_several_ranks_without_mpi4py_is_one_clear_error(monkeypatch):
    """Started by a launcher with 2 ranks but mpi4py missing: the error says how to get it."""
    from sparsecore import mpi
    from sparsecore.mpi import runtime

    monkeypatch.setattr(runtime, "_world", {})
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setattr(runtime.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(mpi.MPIUnavailableError, match=r"\[mpi\] extra"):
        mpi.world()
    with pytest.raises(mpi.MPIUnavailableError, match=r"--nprocs 2 needs mpi4py"):
        mpi.launch(2, ["train"])
    monkeypatch.setenv("PMI_SIZE", "1")  # one rank: a single process, MPI never started
    monkeypatch.setattr(runtime, "_world", {})
    assert mpi.world() is None and mpi.is_root()


@needs_mpi
@pytest.mark.parametrize("n, offer", [(2, "even"), (3, "even"), (2, "tight"), (3, "tight")])
def test_sharded_layers_equal_unsharded(tmp_path, n, offer):
    """96-64-48-10, every sparse layer sharded by rows over n ranks (ShardedSparseLinear): 24
    SGD steps on the full batch with RigL updates (exact grow) at 4, 8, 12, 16; gathered, the
    sharded layers have the reference's topology after every update and its values and losses
    to float32 tolerance; each rank holds only its rows (the ranks' nnz add up to the layer's)."""
    p = run(
        [
            MPIEXEC,
            "-n",
            str(n),
            sys.executable,
            str(WORKER.with_name("mpi_shard_worker.py")),
            str(tmp_path),
            offer,
        ]
    )
    assert p.returncode == 0, p.stdout + p.stderr
    ranks = [result(tmp_path, r) for r in range(n)]
    for res in ranks:
        assert [s for s, _ in res["topology_same"]] == [4, 8, 12, 16, 23]
        assert all(all(same) for _, same in res["topology_same"])
        assert res["max_diff"] < 1e-5
        losses = np.array(res["losses"])
        np.testing.assert_allclose(losses[:, 1], losses[:, 0], rtol=1e-5)
    local = np.array([res["local_nnz"] for res in ranks])
    assert (local.sum(axis=0) == ranks[0]["full_nnz"]).all()
    assert (local < np.array(ranks[0]["full_nnz"])).all()
    for what in ("drop", "grow"):  # selections per layer in the 4 updates: retries if tight
        rounds = np.array([r[what] for r in ranks[0]["rounds"]])
        assert (rounds == 4).all() if offer == "even" else (rounds > 4).all()
    assert all(res["to_scipy_refused"] for res in ranks)
    for res in ranks:  # the distributed selection, with ties; SET and sampled grow sharded
        assert res["select_failures"] == []
        assert res["random_grow_failures"] == []


# ---------------------------------------------------------------------- sharded layers
@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory):
    """784-32-10 with --shard-layers all (fc0: 32 × 784 and fc1: 10 × 32, both sparse, split
    by rows) on 2 and 3 ranks, and on 2 ranks stopped after epoch 2."""
    base = tmp_path_factory.mktemp("sharded")
    done = {}
    for n in (2, 3):
        launch(base / f"s{n}", n, "--shard-layers", "all")
        done[n] = base / f"s{n}"
    launch(base / "stop2", 2, "--shard-layers", "all", "--stop-epoch", 2)
    done["stop2"] = base / "stop2"
    return done


@needs_mpi
@pytest.mark.parametrize("n", [2, 3])
def test_sharded_training_equals_one_process(runs, sharded_runs, n):
    """Every sparse layer split by rows over n ranks (3: 32 rows as 10 + 11 + 11): the same
    losses at all 32 steps, topology after each of the 5 updates and final weights as one
    process training the whole layers; each rank holds only its rows."""
    one = result(runs[1])
    ranks = [result(sharded_runs[n], r) for r in range(n)]
    assert ranks[0]["sharded"] == ["fc0", "fc1"] and ranks[0]["ranks"] == n
    updates = assert_same_run(one, ranks[0], steps=range(32))
    assert [int(s) for s in updates] == [4, 8, 12, 16, 20]
    assert_same_weights(runs[1], sharded_runs[n])
    local = np.array([res["local_nnz"] for res in ranks])
    assert (local.sum(axis=0) == one["local_nnz"]).all()  # the shards add up to the layers
    assert (local.max(axis=0) < 0.6 * np.array(one["local_nnz"])).all()
    for res in ranks[1:]:
        assert res["losses"] == ranks[0]["losses"]
    # the training state each rank holds (measured from its arrays, gathered to every rank)
    held = np.array(ranks[0]["comm"]["memory"])[:, 1]
    assert (held == [res["held"] for res in ranks]).all()
    assert held.max() < 1.25 * one["held"] / n


@needs_mpi
@pytest.mark.parametrize("n", [2, 3])
def test_sharded_bytes_follow_the_cost_model(sharded_runs, n):
    """Per step: 4·m·B (forward allgather) for every sharded layer and 4·n·B (backward
    allreduce of dX) for all but the first: 4·128·(32 + 10 + 32) bytes, evaluation apart. Per
    update: a radix select's four 256-bin histograms for the drop and for the grow of each
    layer, with a few counts: independent of nnz and of the dense size."""
    res = result(sharded_runs[n])
    comm = res["comm"]
    assert comm["mode"] == "sharded"
    assert comm["rounds"] == {l: {"drop": 5, "grow": 5} for l in ("fc0", "fc1")}  # 1 per update
    assert comm["step_bytes"] == 4 * 128 * (32 + 10 + 32)
    assert comm["step_bytes_total"] == 32 * comm["step_bytes"]
    assert len(comm["update_bytes"]) == 5
    histograms = 2 * 2 * 4 * 256 * 8  # (drop, grow) × 2 layers × 4 passes × 256 int64
    for got in comm["update_bytes"]:
        assert histograms <= got <= histograms + 64 * 8 * n + 16 * n * 2


@needs_mpi
def test_sharded_checkpoints_resume_on_any_number_of_ranks(runs, sharded_runs, tmp_path):
    """A checkpoint of 2 sharded ranks (each layer written as 2 parts, streamed to rank 0)
    resumes sharded on 3 ranks and whole in one process; a data-parallel checkpoint resumes
    sharded. All equal the uninterrupted run over epochs 3-4."""
    ckpt = sharded_runs["stop2"] / "run" / "checkpoint.npz"
    with np.load(ckpt) as f:
        assert f["L0/parts"].tolist() == [0, 16, 32] and f["L1/parts"].tolist() == [0, 5, 10]
        assert "L0/p1/opt/momentum/W" in f.files
    full = result(runs[1])
    cases = {
        "s3": (3, ckpt, "all"),
        "one": (1, ckpt, None),
        "dp-to-s3": (3, runs["stop2"] / "run" / "checkpoint.npz", "all"),
    }
    for name, (n, path, shard) in cases.items():
        extra = ["--shard-layers", shard] if shard else []
        launch(tmp_path / name, n, "--resume", path, *extra)
        resumed = result(tmp_path / name)
        updates = assert_same_run(full, resumed, steps=range(16, 32))
        assert [int(s) for s in updates] == [16, 20]
        assert_same_weights(runs[1], tmp_path / name)


@needs_mpi
@pytest.mark.parametrize("shard", [None, "all"])
def test_a_slow_checkpoint_write_is_not_a_hung_rank(tmp_path, shard):
    """Each checkpoint takes 3-7 s to write (0.15 s per .npz member), longer than
    --rank-timeout 2: the watchdog pauses during the write (the other ranks wait at a
    barrier), so the job completes."""
    extra = ["--shard-layers", shard] if shard else []
    p = launch(
        tmp_path, 3, "--epochs", 2, "--rank-timeout", 2, "--slow-write", 0.15, *extra, check=False
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert result(tmp_path)["steps"] == 16


@needs_mpi
def test_sharded_training_without_an_output_folder(tmp_path):
    """out=None (the API's default): no checkpoint is written by any rank, and none waits for
    one (a rank must not send its rows to a rank 0 that writes nothing)."""
    launch(tmp_path, 2, "--shard-layers", "all", "--epochs", 2, "--no-out", "--rank-timeout", 20)
    assert result(tmp_path)["steps"] == 16
    assert not (tmp_path / "run").exists()


@needs_mpi
def test_a_dying_sharded_rank_stops_the_job_and_the_checkpoint_stays(sharded_runs, tmp_path):
    p = launch(tmp_path, 2, "--shard-layers", "all", "--die", "1:20:exit", check=False)
    assert p.returncode != 0
    assert not (tmp_path / "rank0.json").exists()
    good = _checkpoint_arrays(sharded_runs["stop2"] / "run" / "checkpoint.npz")
    got = _checkpoint_arrays(tmp_path / "run" / "checkpoint.npz")
    assert sorted(got) == sorted(good)
    for k in good:
        np.testing.assert_array_equal(got[k], good[k], err_msg=k)


@needs_mpi
@pytest.mark.parametrize("shard", [None, "all"])
def test_a_hung_rank_stops_every_rank_after_the_timeout(tmp_path, shard):
    """Rank 1 stays alive but stops making progress at step 20: the others would wait in the
    next collective forever; the watchdog ends the job after --rank-timeout (3 s here) with a
    message, and the checkpoint of epoch 2 stays."""
    extra = ["--shard-layers", shard] if shard else []
    p = launch(tmp_path, 2, "--hang", "1:20", "--rank-timeout", 3, *extra, check=False)
    assert p.returncode != 0
    assert "made no progress for" in p.stderr and "rank_timeout 3 s" in p.stderr
    meta = json.loads(str(np.load(tmp_path / "run" / "checkpoint.npz")["meta"]))
    assert meta["step"] == 16


@needs_mpi
def test_cli_a_layer_too_big_for_one_rank_trains_on_two(tmp_path):
    """--max-memory per rank between the 2-rank and the 1-rank plan of a model whose sparse
    layers are sharded: one process refuses before allocating, 2 ranks train it."""
    from sparsecore.plan import memory_plan

    rng = np.random.default_rng(0)
    x = rng.standard_normal((600, 24)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0)
    np.savez(tmp_path / "d.npz", x_train=x[:512], y_train=y[:512], x_test=x[512:], y_test=y[512:])
    arch = [24, 3000, 3000, 3]
    kw = dict(sparsity=0.9, batch_size=64)
    one = memory_plan(arch, **kw)["total_bytes"]
    two = memory_plan(arch, ranks=2, sharded=[0, 1], **kw)["total_bytes"]
    assert two < 0.8 * one
    budget = str((one + two) // 2)
    cmd = [sys.executable, "-m", "sparsecore", "train", "--dataset", str(tmp_path / "d.npz")]
    cmd += ["--arch", "24-3000-3000-3", "--sparsity", "0.9", "--batch-size", "64"]
    cmd += ["--epochs", "1", "--delta-t", "3", "--no-progress", "--shard-layers"]
    cmd += ["--max-memory", budget, "--out", str(tmp_path / "run")]
    p = run(cmd)
    assert p.returncode == 2
    assert "more than --max-memory" in p.stderr and "--nprocs N" in p.stderr
    assert not (tmp_path / "run").exists()
    p = run([*cmd, "--nprocs", "2"])
    assert p.returncode == 0, p.stdout + p.stderr
    assert "communication: 2 ranks, sharded layers" in p.stdout
    assert p.stdout.count("test accuracy:") == 1
    with np.load(tmp_path / "run" / "checkpoint.npz") as f:
        assert f["L1/parts"].tolist() == [0, 1500, 3000]


def test_the_abort_hook_is_undone_by_its_restore():
    """abort_on_uncaught_exceptions replaces sys.excepthook for the run that needs it; the
    function it returns puts the previous hook back (an outer install is not stacked twice)."""
    from sparsecore.mpi.runtime import abort_on_uncaught_exceptions

    before = sys.excepthook
    restore = abort_on_uncaught_exceptions()
    try:
        assert sys.excepthook is not before and sys.excepthook.sparsecore_abort
        inner = abort_on_uncaught_exceptions()  # already in place: a no-op, and so its restore
        inner()
        assert sys.excepthook.sparsecore_abort
    finally:
        restore()
    assert sys.excepthook is before
