"""The roofline level: the cache reader, the L1 ceiling's matrices, the bandwidth arithmetic,
and `sparsecore bench --levels roofline` end to end at a tiny size."""

import argparse
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from kernels import machine as M
from kernels.backend import get_backend
from sparsecore.benchmarks import roofline as R
from sparsecore.benchmarks import suite
from sparsecore.benchmarks.ops import product_calls
from sparsecore.benchmarks.report import roofline_markdown


# ---------------------------------------------------------------------------------- caches
def _fake_sysfs(root: Path, entries):
    """entries: (level, type, size, shared_cpu_list or None) per index directory."""
    for i, (level, kind, size, shared) in enumerate(entries):
        d = root / f"index{i}"
        d.mkdir(parents=True)
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(f"{kind}\n")
        (d / "size").write_text(f"{size}\n")
        if shared is not None:
            (d / "shared_cpu_list").write_text(f"{shared}\n")
    return str(root)


def test_sizes_and_cpu_lists_parse():
    assert M.parse_size("32K") == 32768
    assert M.parse_size("1024K\n") == 1 << 20
    assert M.parse_size("32M") == 32 << 20
    assert M.parse_size("4096") == 4096
    assert M.parse_cpu_list("0") == 1
    assert M.parse_cpu_list("0-1\n") == 2
    assert M.parse_cpu_list("0-3,8-11") == 8
    assert M.parse_cpu_list("0,2,4") == 3


def test_cache_sizes_on_this_machine():
    c = M.cache_sizes()
    assert c.source in ("sysfs", "getconf", "assumed")
    assert c.l1d > 0 and c.llc >= c.l1d
    if c.l2:
        assert c.l2 >= c.l1d
    assert M.cache_sizes() is c  # read once
    root = Path(M.SYSFS_CACHE)
    if root.is_dir():  # Linux: the first data L1 in sysfs, read here by hand
        assert c.source == "sysfs"
        for d in sorted(root.glob("index*")):
            if (d / "level").read_text().strip() == "1" and (d / "type").read_text().strip() != (
                "Instruction"
            ):
                assert c.l1d == M.parse_size((d / "size").read_text())
                break


def test_cache_sizes_from_a_fake_sysfs(tmp_path):
    root = _fake_sysfs(
        tmp_path / "cache",
        [
            (1, "Data", "48K", "0,8"),
            (1, "Instruction", "32K", "0,8"),
            (2, "Unified", "2048K", "0,8"),
            (3, "Unified", "98304K", "0-7,16-23"),
        ],
    )
    c = M.cache_sizes(root, getconf=False)
    assert c.source == "sysfs" and not c.assumed
    assert (c.l1d, c.l2, c.l3) == (48 << 10, 2 << 20, 96 << 20)  # the instruction L1 ignored
    assert (c.l1d_shared, c.l2_shared, c.l3_shared) == (2, 2, 16)
    assert c.line == 64  # no coherency_line_size: the common 64 bytes
    (Path(root) / "index0" / "coherency_line_size").write_text("128\n")
    M.cache_sizes.cache_clear()
    assert M.cache_sizes(root, getconf=False).line == 128  # (an Apple-M-like line)
    (Path(root) / "index0" / "coherency_line_size").write_text("7\n")
    M.cache_sizes.cache_clear()
    assert M.cache_sizes(root, getconf=False).line == 64  # nonsense is not taken
    M.cache_sizes.cache_clear()


def test_cache_sizes_without_sysfs(tmp_path):
    missing = str(tmp_path / "no-such-dir")
    c = M.cache_sizes(missing, getconf=False)
    assert c.assumed and c.source == "assumed"
    assert (c.l1d, c.l2, c.l3) == (M.ASSUMED["l1d"], M.ASSUMED["l2"], M.ASSUMED["l3"])
    assert c.as_dict()["assumed"] is True
    # an index without a readable size and no L1 at all: not enough, the fallback again
    root = _fake_sysfs(tmp_path / "partial", [(1, "Data", "lots", "0"), (2, "Unified", "1M", "0")])
    assert M.cache_sizes(root, getconf=False).source == "assumed"
    g = M.cache_sizes(missing, getconf=True)
    assert g.source in ("getconf", "assumed")
    if shutil.which("getconf") is None:
        assert g.source == "assumed"


def test_cache_totals_and_levels():
    c = M.CacheSizes(l1d=32 << 10, l2=1 << 20, l3=32 << 20, l3_shared=8, cpus=16, source="sysfs")
    assert c.total(1) == 16 * (32 << 10) and c.total(2) == 16 << 20
    assert c.total(3) == 2 * (32 << 20) == c.llc  # two L3 instances of 8 CPUs each
    assert [c.level_of(b) for b in (16 << 10, 512 << 10, 40 << 20, 65 << 20)] == [
        "L1", "L2", "L3", "DRAM",
    ]  # fmt: skip
    no_l3 = M.CacheSizes(l1d=64 << 10, l2=4 << 20, l3=0, l2_shared=4, cpus=8)
    assert no_l3.llc == 2 * (4 << 20) and no_l3.level_of(5 << 20) == "DRAM"


# ---------------------------------------------------------------------------------- matrices
def test_l1_columns():
    assert R.l1_columns(32 << 10, 128) == 32
    assert R.l1_columns(48 << 10, 128) == 48
    assert R.l1_columns(32 << 10, 1) == 4096
    assert R.l1_columns(1024, 512) == 1  # at least one column


def test_narrow_csr_keeps_rows_and_nnz_or_caps():
    rng = np.random.default_rng(0)
    W, capped = R.narrow_csr(50, 300, 10, rng)
    assert not capped and W.shape == (50, 10) and W.nnz == 300
    assert int(W.indices.max()) < 10
    assert len(np.unique(W.row_ids().astype(np.int64) * 10 + W.indices)) == 300  # distinct
    W, capped = R.narrow_csr(50, 700, 10, rng)
    assert capped and W.shape == (50, 10) and W.nnz == 500  # every (row, column): dense
    assert np.array_equal(np.diff(W.indptr), np.full(50, 10))
    with pytest.raises(ValueError, match="nnz must lie"):
        R.random_csr(4, 4, 17, rng)


def test_transposed_is_the_transpose():
    rng = np.random.default_rng(1)
    W = R.random_csr(7, 5, 12, rng)
    T = R.transposed(W)
    assert T.shape == (5, 7) and np.array_equal(T.to_dense(), W.to_dense().T)


# ---------------------------------------------------------------------------------- bandwidth
def test_traffic_and_bandwidth_bound_by_hand():
    # 4 output rows, 6 gathered rows of 2 floats, 5 nonzeros: 4·2·(6 + 4) + 8·5 = 120 bytes
    assert R.traffic_bytes(4, 6, 2, 5) == 120
    assert R.traffic_bytes(4, 6, 2, 5, index_bytes=8) == 140
    # 20 flops moving 120 bytes at 10 GB/s: 12 ns, 20 / 12 flop/ns
    assert R.bandwidth_gflops(20, 120, 10.0) == pytest.approx(20 / 12)
    # the reference shape: m = k = 4096, B = 128, 1% (167,772 nonzeros), at 20 GB/s
    nbytes = R.traffic_bytes(4096, 4096, 128, 167_772)
    assert nbytes == 4 * 128 * 8192 + 8 * 167_772 == 5_536_480
    assert R.bandwidth_gflops(2 * 167_772 * 128, nbytes, 20.0) == pytest.approx(155.1514, rel=1e-6)


def _row(**kw):
    row = dict(batch=2, nnz=5, index_bytes=4, out_rows=4, in_rows=6, gflops=1.0,
               l1_gflops=3.0, fraction_l1=0.3)  # fmt: skip
    row.update(kw)
    return row


def test_the_applicable_ceiling_is_the_smaller():
    # bandwidth bound 20 / 12 GFLOP/s at 10 GB/s, below the L1 ceiling of 3: bandwidth applies
    r = R.with_bandwidth(_row(), 10.0)
    assert r["traffic_bytes"] == 120 and r["bw_gflops"] == pytest.approx(20 / 12)
    assert r["bound"] == "bandwidth" and r["fraction"] == pytest.approx(1.0 / (20 / 12))
    # no reuse: one 2-float operand row per nonzero, 4·2·(5 + 4) + 8·5 = 112 bytes
    assert r["bw_no_reuse_gflops"] == pytest.approx(20 * 10 / 112)
    # at 100 GB/s the bound is 16.7 GFLOP/s: the L1 ceiling applies, with its paired fraction
    r = R.with_bandwidth(_row(), 100.0)
    assert r["bound"] == "L1" and r["fraction"] == 0.3


# ---------------------------------------------------------------------------------- timing, checks
def test_interleaved_alternates_and_pairs():
    order = []
    fns = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    t = R.interleaved(fns, rounds=4, round_s=0.0)  # one call per round
    assert [len(t["a"]), len(t["b"])] == [4, 4] and min(t["a"] + t["b"]) > 0
    assert order[4:] == ["a", "b", "b", "a", "a", "b", "b", "a"]  # after warm-up and probes
    assert R.paired_ratio([2.0, 4.0, 9.0], [1.0, 2.0, 3.0]) == 2.0


def test_check_calls_catches_a_wrong_product():
    rng = np.random.default_rng(2)
    W = R.random_csr(40, 30, 200, rng)
    X = rng.standard_normal((30, 8), dtype=np.float32)
    dY = rng.standard_normal((40, 8), dtype=np.float32)
    calls = product_calls(get_backend("cpu"), W, X, dY, via="launcher")
    R.check_calls(W, X, dY, calls, rng)
    for name in ("spmm", "spmm_t", "sddmm"):
        wrong = dict(calls, **{name: lambda f=calls[name]: f() * 1.01})
        with pytest.raises(AssertionError, match=name):
            R.check_calls(W, X, dY, wrong, rng, (name,))


# ---------------------------------------------------------------------------------- the level
TINY = dict(
    sizes=[512],
    batch=64,
    density=0.02,
    sweep=dict(m=512, nnz=5000, ks=[16, 2048], batch=64),
    small=dict(m=256, densities=[0.05], batches=[1, 4]),
    stream_factor=1 / 16,
    stream_reps=3,
    rounds=3,
    round_s=0.003,
)


def test_the_level_runs_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(R.PRESETS, "quick", TINY)
    out = tmp_path / "b"
    assert suite.main(["--levels", "roofline", "--out", str(out), "--no-progress"]) == 0
    res = json.loads((out / "bench.json").read_text())
    r = res["roofline"]
    assert set(res) >= {"roofline", "environment"} and "kernels" not in res
    assert r["caches"]["l1d"] == M.cache_sizes().l1d
    assert r["stream"]["gbps"] > 0
    got = [(p["sweep"], p["kernel"], p["m"], p["k"]) for p in r["products"]]
    assert got == [
        ("square", "spmm", 512, 512), ("square", "spmm_t", 512, 512),
        ("square", "sddmm", 512, 512), ("size", "spmm", 512, 16), ("size", "spmm", 512, 2048),
    ]  # fmt: skip
    k1 = R.l1_columns(r["caches"]["l1d"], 64)
    for p in r["products"]:
        assert p["nnz"] == (5000 if p["sweep"] == "size" else round(0.02 * 512 * 512))
        assert p["l1_k"] == min(k1, p["in_rows"])
        assert p["l1_nnz"] == min(p["nnz"], p["out_rows"] * p["l1_k"])
        assert p["l1_capped"] == (p["nnz"] > p["out_rows"] * p["l1_k"])
        for key in ("gflops", "l1_gflops", "bw_gflops", "bw_no_reuse_gflops"):
            assert math.isfinite(p[key]) and p[key] > 0, key
        # a fraction of a ceiling measured in the same run: near 1 or below, but this tiny
        # preset times 3 rounds of 3 ms, and one preempted round of the ceiling's probe has
        # made it 3.5 (2 runs in 14 on the 2-core VM); the bound catches unit mistakes
        for key in ("fraction_l1", "fraction"):
            assert 0 < p[key] <= 10, (key, p)
        assert p["bound"] in ("L1", "bandwidth")
    assert [(q["density"], q["batch"]) for q in r["small_batch"]] == [(0.05, 1), (0.05, 4)]
    for q in r["small_batch"]:
        assert q["nnz"] == round(0.05 * 256 * 256)
        for key in ("sparsecore_s", "public_s", "dense_s", "scipy_s", "vs_dense", "vs_scipy"):
            assert math.isfinite(q[key]) and q[key] > 0, key
    md = (out / "bench.md").read_text()
    assert "## Roofline: each product against the ceiling that applies to it" in md
    assert "| spmm_t | 512 × 512 | 64 |" in md and "### Small batches" in md
    # the report rebuilds from the JSON alone
    capsys.readouterr()
    again = tmp_path / "again"
    assert suite.main(["--from-json", str(out / "bench.json"), "--out", str(again)]) == 0
    assert (again / "bench.md").read_text() == md


def test_the_flags_reach_the_level(monkeypatch):
    seen = {}

    def fake_run(cfg, rng, progress=True):
        seen.update(cfg)
        return {}

    monkeypatch.setattr(R, "run", fake_run)
    p = argparse.ArgumentParser()
    suite.add_arguments(p)
    args = p.parse_args(["--widths", "256,1024", "--batch-sizes", "32,64", "--densities", "0.05"])
    suite.roofline_level(args, progress=False)
    assert seen["sizes"] == [256, 1024] and seen["batch"] == 32 and seen["density"] == 0.05
    assert seen["sweep"] == R.PRESETS["quick"]["sweep"]


def test_roofline_is_a_level_but_not_a_default_one():
    p = argparse.ArgumentParser()
    suite.add_arguments(p)
    assert "roofline" not in p.parse_args([]).levels.split(",")


def test_the_markdown_marks_a_capped_ceiling():
    row = R.with_bandwidth(
        _row(
            kernel="spmm",
            sweep="square",
            m=4,
            k=6,
            operand_bytes=48,
            operand_in="L1",
            l1_k=1,
            l1_nnz=4,
            l1_capped=True,
        ),  # fmt: skip
        10.0,
    )
    res = dict(
        caches=M.CacheSizes(l1d=32 << 10, l2=1 << 20, l3=0, cpus=2).as_dict(),
        stream=dict(
            start=dict(copy_gbps=10.0, triad_gbps=9.0),
            end=dict(copy_gbps=10.0, triad_gbps=9.5),
            gbps=10.0,
            array_bytes=1 << 20,
            threads=2,
        ),  # fmt: skip
        products=[row],
        small_batch=[],
    )
    md = "\n".join(roofline_markdown(res))
    assert "(1, 4*)" in md and "no L3" in md and "**60%**" in md
