"""The torch level of ``sparsecore bench`` (sparsecore/benchmarks/torch_step.py) and the thread
set-up of sparsecore.torch (sparsecore/torch/threads.py), at tiny shapes: the five
implementations run, agree with the engine through a topology update, are timed in blocks that
hold one update each, and a broken bridge fails the level's guard instead of posting a number.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import sparsecore.benchmarks.torch_step as T  # noqa: E402
from sparsecore.benchmarks import step, suite  # noqa: E402
from sparsecore.torch import threads  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(arch=[784, 48, 40, 10], sparsity=0.9, batch=16, rounds=1, every=5, every_slow=5,
            dense_block=2, n_batches=3)  # fmt: skip


@pytest.fixture(scope="module")
def data_prefix(tmp_path_factory):
    return step.prepare_data(tmp_path_factory.mktemp("torchbench"), 256)


@pytest.fixture(scope="module")
def level(data_prefix):
    return T.run(dict(TINY, data=data_prefix))


def test_every_implementation_runs_and_agrees_with_the_engine(level):
    assert set(level["impls"]) == set(T.IMPLS)
    ch = level["check"]
    assert ch["ok"] and ch["steps"] == TINY["every"] + 2  # through the first update
    ref = ch["losses"]["engine"]
    for name in ("bridge", "masked", "torch-sparse"):  # masked: every_slow == every here
        np.testing.assert_allclose(ch["losses"][name], ref, rtol=1e-3)
    for name, r in level["impls"].items():
        n_upd = 0 if name == "dense" else TINY["rounds"]
        assert r["n_updates"] == n_upd, name
        block = TINY["dense_block"] if name == "dense" else TINY["every"]
        assert r["n_steps"] == TINY["rounds"] * (block - 1)  # (the first of a block untimed)
        if n_upd:  # the block ends with the update and the step after it
            assert r["kinds"][-2:] == ["update", "after"]
        for f in ("median", "mean", "amortised"):
            assert r[f"{f}_step_s"] > 0
            assert level["ratios"][name][f] == pytest.approx(
                r[f"{f}_step_s"] / level["impls"]["bridge"][f"{f}_step_s"]
            )
    assert len(level["impls"]["bridge"]["rigl_update_s"]) == 1 + TINY["rounds"]  # + warm-up's
    assert {t["impl"] for t in level["targets"]} == {"engine", "dense", "masked", "torch-sparse"}
    assert not any(t["at_target_config"] for t in level["targets"])


def test_the_report_and_json(level):
    md = T.markdown(json.loads(json.dumps(level)))  # (from the JSON alone)
    for name in T.IMPLS:
        assert f"| {name} |" in md
    assert "Correctness guard passed" in md and "torch.sparse" in md
    assert "only indicative" in md  # not the target configuration


def test_a_broken_bridge_fails_the_guard(data_prefix, monkeypatch):
    build = T.Bridge.__init__

    def broken(self, c):
        build(self, c)
        with torch.no_grad():
            self.model[0].values.mul_(1.05)  # a wrong weight: a different loss

    monkeypatch.setattr(T.Bridge, "__init__", broken)
    with pytest.raises(AssertionError, match="correctness guard"):
        T.run(dict(TINY, data=data_prefix, impls=["engine", "bridge"]))


def test_the_level_refuses_what_it_cannot_compare(data_prefix):
    with pytest.raises(ValueError, match="impls"):
        T.run(dict(TINY, data=data_prefix, impls=["engine", "nope"]))
    with pytest.raises(ValueError, match="sparse layers only"):
        T.run(
            dict(TINY, data=data_prefix, distribution="erk", arch=[784, 64, 64, 10], sparsity=0.5)
        )


def test_torch_sparse_stand_in_gradients_match_dense_autograd():
    rng = np.random.default_rng(3)
    m, n, B = 7, 9, 5
    from kernels.formats import CSR

    W = CSR.random((m, n), 0.4, seed=4)
    W.data[:] = rng.standard_normal(W.nnz).astype(np.float32)
    L = T._CSRLayer(torch, W, m, n)
    with torch.no_grad():
        L.bias.copy_(torch.from_numpy(rng.standard_normal(m).astype(np.float32)))
    x = torch.from_numpy(rng.standard_normal((B, n)).astype(np.float32)).requires_grad_()
    g = torch.from_numpy(rng.standard_normal((B, m)).astype(np.float32))
    T._csr_function(torch).apply(L.values, L.bias, x, L).backward(g)
    dense = torch.from_numpy(W.to_dense()).requires_grad_()
    b = L.bias.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    (x2 @ dense.T + b).backward(g)
    rows, cols = W.row_ids().astype(np.int64), W.indices.astype(np.int64)
    torch.testing.assert_close(L.values.grad, dense.grad[rows, cols])
    torch.testing.assert_close(L.bias.grad, b.grad)
    torch.testing.assert_close(x.grad, x2.grad)


def test_torch_sparse_random_grow_keeps_a_canonical_pattern(data_prefix):
    c = dict(T.DEFAULTS, **TINY, peer_grow="random", data=data_prefix)
    peer = T.TorchSparse(c)
    batches = T._batches(c, step.load_data(data_prefix), torch)
    before = [L.values.shape[0] for L in peer.layers]
    for i in range(c["every"] + 1):  # through one update
        peer.step(batches[i % len(batches)])
    for L, nnz in zip(peer.layers, before, strict=True):
        flat = L.rows() * L.shape[1] + L.col
        assert flat.shape[0] == nnz and bool((flat.diff() > 0).all())  # sorted, distinct
        assert int(L.crow[-1]) == nnz


def test_suite_runs_the_torch_level_and_skips_it_without_torch(tmp_path, monkeypatch, capsys):
    args = ["--levels", "torch", "--widths", "32", "--batch-sizes", "16", "--sparsities", "0.9",
            "--no-progress", "--out", str(tmp_path)]  # fmt: skip
    monkeypatch.setitem(
        T.PRESETS, "quick", dict(T.PRESETS["quick"], rounds=1, every=4, every_slow=4, dense_block=2)
    )
    assert suite.main(args) == 0
    res = json.loads((tmp_path / "bench.json").read_text())
    assert res["torch"]["config"]["arch"] == [784, 32, 32, 10]
    assert "## PyTorch bridge" in (tmp_path / "bench.md").read_text()
    assert (
        suite.main(
            [*args[:-1], str(tmp_path / "again"), "--from-json", str(tmp_path / "bench.json")]
        )
        == 0
    )
    monkeypatch.setattr(T, "available", lambda: False)
    capsys.readouterr()
    assert suite.main([*args[:-1], str(tmp_path / "none")]) == 0
    assert "torch is not installed: the torch level is skipped" in capsys.readouterr().out
    assert "torch" not in json.loads((tmp_path / "none" / "bench.json").read_text())


def test_torch_is_not_a_default_level():
    import argparse

    p = argparse.ArgumentParser()
    suite.add_arguments(p)
    assert "torch" not in p.parse_args([]).levels.split(",")


# ---------------------------------------------------------------------------- threads.py
def test_configure_sets_torch_threads_and_reports():
    before = torch.get_num_threads()
    try:
        info = threads.configure(1, warn=False)
        assert torch.get_num_threads() == 1 and info["torch_threads"] == 1
        threads.configure(None, warn=False)
        assert torch.get_num_threads() == 1  # None: left as it is
        for bad in (0, "2", True):
            with pytest.raises(ValueError):
                threads.configure(bad)
    finally:
        torch.set_num_threads(before)
    info = threads.threading_info()
    for k in ("torch_threads", "numba_threads", "torch_gomp_spincount", "torch_imported_first"):
        assert k in info
    assert "numba_threading_layer" in info["engine"]


@pytest.mark.parametrize("torch_first", [False, True])
def test_the_import_order_decides_torch_pool_spin_count(torch_first):
    first, second = ("torch", "sparsecore") if torch_first else ("sparsecore", "torch")
    code = (
        f"import {first}, {second}, warnings, json\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    from sparsecore.torch import threads\n"
        "at_import = any('imported before sparsecore' in str(x.message) for x in w)\n"
        "warnings.simplefilter('error')\n"
        "try:\n"
        "    info = threads.configure()\n"
        "    said = False\n"
        "except UserWarning:\n"
        "    info, said = threads.threading_info(), True\n"
        "print(json.dumps([info['torch_imported_first'], info['torch_gomp_spincount'], said, "
        "at_import]))"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    env.pop("SPARSECORE_THREAD_SETUP", None)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env=env, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    first_seen, spin, said, at_import = json.loads(r.stdout.strip().splitlines()[-1])
    assert first_seen is torch_first
    if sys.platform.startswith("linux"):
        assert spin == ("default" if torch_first else "10000")
    assert said is (torch_first and threads.torch_openmp_library() is not None)
    assert at_import is said  # (importing sparsecore.torch says it once, changing nothing)
