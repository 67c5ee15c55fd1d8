"""Roofline level of the benchmark suite: each product beside the ceiling that applies to it.

Run through ``sparsecore bench --levels roofline``. Everything is measured in this one run, so
"close to the limit" is a number on any machine:

- **L1 ceiling of a product loop**: the same launcher (kernels/cpu spmm, spmm_t, sddmm), with the
  same output rows m, nonzeros and batch B as the measured shape, on an operand narrow enough for
  L1: the rows the loop gathers from (X for spmm and sddmm, dY for spmm_t) are only
  k_L1 = ⌊L1d / (8·B)⌋ (half of L1d, the rest for the output row and the index stream; an
  operand with fewer rows keeps its own). The CSR
  then has m rows and columns in [0, k_L1); when nnz > m·k_L1 (no room for distinct columns) its
  nnz is capped at m·k_L1 and the row says so. Its GFLOP/s is the machine's own ceiling for the
  loop; the kernel at the measured shape and this ceiling alternate round by round.
- **Bandwidth bound**: STREAM-style copy and triad (Numba prange over all threads, float64 arrays
  several times the last-level cache), measured at the start and at the end of the level; the
  bound of a product is its compulsory traffic, X once + Y once + (4 + index bytes) per nonzero
  (value + index), over the larger of the two bandwidths. The applicable ceiling of a shape is the
  smaller of the L1 ceiling and the bandwidth bound.
- **Small batches**: spmm at B = 1..8 (and 128 for reference) beside dense BLAS (W_dense @ X) and
  scipy (csr_matrix @ X), interleaved round by round.

The cache sizes come from ``cache_sizes()``: Linux sysfs (cpu0's cache/index*), else
``getconf``, else defaults marked as assumed. Results land in bench.json under ``roofline``;
the table is report.py's ``roofline_markdown``.
"""

from __future__ import annotations

import time

import numba
import numpy as np
import scipy.sparse as sp
from tqdm import tqdm

import kernels
from kernels.backend import get_backend
from kernels.formats import CSR, random_positions
from kernels.machine import CacheSizes, cache_sizes
from sparsecore.benchmarks.ops import CHECK_ENTRIES, CHECK_ROWS, CHECK_RTOL, product_calls

L1_FRACTION_DENOMINATOR = 8  # k_L1 = L1d / (8·B): X's rows (4·B bytes each) fill half of L1d

PRESETS = {
    "quick": dict(
        sizes=[4096],  # square products m = k, every kernel
        batch=128,
        density=0.01,
        sweep=dict(m=4096, nnz=167_772, ks=[48, 4096, 65536], batch=128),  # spmm only
        small=dict(m=4096, densities=[0.01, 0.1], batches=[1, 8, 128]),
        stream_factor=4,  # STREAM arrays: this many times the last-level cache, each
        stream_reps=5,
        rounds=5,
        round_s=0.02,  # each round times one implementation for about this long
    ),
    "full": dict(
        sizes=[4096, 16384],
        batch=128,
        density=0.01,
        sweep=dict(m=4096, nnz=167_772, ks=[48, 1024, 4096, 16384, 65536], batch=128),
        small=dict(m=4096, densities=[0.01, 0.1], batches=[1, 2, 4, 8, 128]),
        stream_factor=8,
        stream_reps=10,
        rounds=21,  # a shared 2-core VM moves single figures by 2x: many paired rounds
        round_s=0.05,
    ),
}


def l1_columns(l1d: int, batch: int) -> int:
    """k_L1 = ⌊L1d / (8·B)⌋, at least 1: rows of 4·B bytes that fill half of L1d."""
    return max(1, l1d // (L1_FRACTION_DENOMINATOR * batch))


# ---------------------------------------------------------------------------------- matrices
def random_csr(m: int, n: int, nnz: int, rng) -> CSR:
    """An m × n CSR with exactly ``nnz`` distinct positions drawn uniformly (as CSR.random
    draws them), values ~ N(0, 1)."""
    if not 0 <= nnz <= m * n:
        raise ValueError(f"nnz must lie in [0, {m * n}] for a {m} × {n} matrix, got {nnz}")
    flat = random_positions(m, n, nnz, rng)
    rows = flat // n
    idx = np.int32 if max(m, n, nnz) < 2**31 else np.int64
    indptr = np.zeros(m + 1, idx)
    np.cumsum(np.bincount(rows, minlength=m), out=indptr[1:])
    indices = (flat - rows * n).astype(idx)
    data = rng.standard_normal(nnz, dtype=np.float32)
    return CSR(indptr, indices, data, (m, n))


def narrow_csr(m: int, nnz: int, k: int, rng) -> tuple[CSR, bool]:
    """The L1 ceiling's matrix: m rows, the same nnz, every column in [0, k). Returns
    (CSR, capped): when nnz > m·k distinct columns cannot hold it and nnz is capped at m·k
    (a dense m × k pattern), capped = True."""
    capped = nnz > m * k
    return random_csr(m, k, min(nnz, m * k), rng), capped


def transposed(W: CSR) -> CSR:
    """Wᵀ as a CSR (spmm_t's ceiling: the pattern its loop walks is W's transpose structure)."""
    T = W.to_scipy().T.tocsr()
    T.sort_indices()
    return CSR(T.indptr, T.indices, T.data.astype(np.float32), T.shape)


# ---------------------------------------------------------------------------------- bandwidth
def traffic_bytes(out_rows: int, in_rows: int, batch: int, nnz: int, index_bytes: int = 4) -> int:
    """Compulsory bytes of a product: the gathered operand once (in_rows × B float32), the
    dense result or operand on the other side once (out_rows × B float32), and per nonzero a
    float32 value (or sddmm's output) plus its column index."""
    return 4 * batch * (in_rows + out_rows) + (4 + index_bytes) * nnz


def bandwidth_gflops(flops: float, nbytes: float, gbps: float) -> float:
    """GFLOP/s of a product that moves ``nbytes`` at ``gbps`` GB/s: flops / (bytes / bandwidth)."""
    return flops * gbps / nbytes


@numba.njit(parallel=True, cache=True)
def _stream_fill(a, v):
    for i in numba.prange(a.shape[0]):
        a[i] = v


@numba.njit(parallel=True, cache=True)
def _stream_copy(dst, src):
    for i in numba.prange(dst.shape[0]):
        dst[i] = src[i]


@numba.njit(parallel=True, cache=True)
def _stream_triad(a, b, c, s):
    for i in numba.prange(a.shape[0]):
        a[i] = b[i] + s * c[i]


def stream(array_bytes: int, reps: int) -> dict:
    """STREAM copy (16 B per element moved) and triad (24 B) over three float64 arrays of
    ``array_bytes`` each, on Numba's threads (first touch on them too); medians and bests of
    ``reps`` alternated rounds, GB/s = 1e9 bytes per second (write-allocate traffic not
    counted, as in STREAM)."""
    n = max(1, array_bytes // 8)
    a, b, c = (np.empty(n) for _ in range(3))
    for arr, v in ((a, 0.0), (b, 1.0), (c, 2.0)):
        _stream_fill(arr, v)
    _stream_copy(a, b)
    _stream_triad(a, b, c, 3.0)  # compiled and warm
    times = {"copy": [], "triad": []}
    for _ in range(reps):
        t0 = time.perf_counter()
        _stream_copy(a, b)
        t1 = time.perf_counter()
        _stream_triad(a, b, c, 3.0)
        t2 = time.perf_counter()
        times["copy"].append(t1 - t0)
        times["triad"].append(t2 - t1)
    if not a[0] == 1.0 + 3.0 * 2.0:
        raise AssertionError("STREAM triad computed a wrong value")
    moved = {"copy": 16 * n, "triad": 24 * n}
    out = {"array_bytes": 8 * n, "reps": reps, "threads": numba.get_num_threads()}
    for name, ts in times.items():
        out[f"{name}_gbps"] = moved[name] / float(np.median(ts)) / 1e9
        out[f"{name}_best_gbps"] = moved[name] / float(np.min(ts)) / 1e9
    return out


# ---------------------------------------------------------------------------------- timing
def interleaved(fns: dict, rounds: int, round_s: float) -> dict:
    """Alternate the calls round by round (order reversed every other round): each round times
    one implementation for about ``round_s`` (a loop of calls sized from a probe, so its caches
    stay warm as in steady use). Returns name -> per-call seconds of each round."""
    inner = {}
    for name, fn in fns.items():
        fn()  # warm-up: compilation, first touch
        t0 = time.perf_counter()
        fn()
        inner[name] = int(min(10_000, max(1, round_s / max(time.perf_counter() - t0, 1e-7))))
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            fn, n = fns[name], inner[name]
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            times[name].append((time.perf_counter() - t0) / n)
    return times


def paired_ratio(a, b) -> float:
    """Median over rounds of a[i] / b[i]: a same-run ratio, robust to drift between rounds."""
    return float(np.median(np.asarray(a) / np.asarray(b)))


# ---------------------------------------------------------------------------------- checks
def check_calls(W: CSR, X, dY, calls: dict, rng, which=("spmm", "spmm_t", "sddmm")):
    """The launcher calls (ops.product_calls(..., via="launcher")) against float64 on sampled
    rows / columns / entries; raises AssertionError on a mismatch."""
    m, n = W.shape
    W64 = W.to_scipy().astype(np.float64)
    if "spmm" in which:
        rows = rng.choice(m, size=min(m, CHECK_ROWS), replace=False)
        _close("spmm", calls["spmm"]()[rows], W64[rows] @ X.astype(np.float64),
               abs(W64[rows]) @ np.abs(X.astype(np.float64)))  # fmt: skip
    if "spmm_t" in which:
        WT = W64.T.tocsr()
        cols = rng.choice(n, size=min(n, CHECK_ROWS), replace=False)
        _close("spmm_t", calls["spmm_t"]()[cols], WT[cols] @ dY.astype(np.float64),
               abs(WT[cols]) @ np.abs(dY.astype(np.float64)))  # fmt: skip
    if "sddmm" in which and W.nnz:
        pos = rng.choice(W.nnz, size=min(W.nnz, CHECK_ENTRIES), replace=False)
        r, c = W.row_ids()[pos], W.indices[pos]
        d, x = dY[r].astype(np.float64), X[c].astype(np.float64)
        _close("sddmm", calls["sddmm"]()[pos], np.einsum("ij,ij->i", d, x),
               np.einsum("ij,ij->i", np.abs(d), np.abs(x)))  # fmt: skip


def _close(name, got, ref, scale):
    bad = np.abs(got - ref) > CHECK_RTOL * scale + 1e-30
    if np.any(bad):
        raise AssertionError(f"{name}: {int(bad.sum())} entries differ from the float64 reference")


# ---------------------------------------------------------------------------------- the level
def product_row(kernel, W: CSR, batch: int, caches: CacheSizes, rng, cfg, sweep):
    """One product at W's shape beside its L1 ceiling (interleaved); ``with_bandwidth`` adds
    the bandwidth bound and the fraction of the applicable ceiling."""
    cpu = get_backend("cpu")
    m, n = W.shape
    # the loop's output rows and the rows of the operand it gathers from, per nonzero
    out_rows, in_rows = (n, m) if kernel == "spmm_t" else (m, n)
    X = rng.standard_normal((n, batch), dtype=np.float32)
    dY = rng.standard_normal((m, batch), dtype=np.float32)
    calls = product_calls(cpu, W, X, dY, via="launcher")
    check_calls(W, X, dY, calls, rng, (kernel,))

    k1 = min(l1_columns(caches.l1d, batch), in_rows)  # (an operand already narrower: as is)
    L, capped = narrow_csr(out_rows, W.nnz, k1, rng)
    if kernel == "spmm_t":  # dY narrow: W is k1 × out_rows, its transpose structure is L
        Wn = transposed(L)
        Xn = rng.standard_normal((out_rows, batch), dtype=np.float32)
        dYn = rng.standard_normal((k1, batch), dtype=np.float32)
    else:  # X narrow
        Wn = L
        Xn = rng.standard_normal((k1, batch), dtype=np.float32)
        dYn = rng.standard_normal((out_rows, batch), dtype=np.float32)
    ceiling = product_calls(cpu, Wn, Xn, dYn, via="launcher")
    check_calls(Wn, Xn, dYn, ceiling, rng, (kernel,))

    t = interleaved({"kernel": calls[kernel], "l1": ceiling[kernel]}, cfg["rounds"], cfg["round_s"])
    flops, flops_l1 = 2.0 * W.nnz * batch, 2.0 * L.nnz * batch
    secs, secs_l1 = float(np.median(t["kernel"])), float(np.median(t["l1"]))
    gflops, l1_gflops = flops / secs / 1e9, flops_l1 / secs_l1 / 1e9
    # fraction of the L1 ceiling, paired round by round: (flops / t) / (flops_l1 / t_l1)
    frac_l1 = paired_ratio(t["l1"], t["kernel"]) * flops / flops_l1
    in_bytes = 4 * batch * in_rows
    return dict(
        kernel=kernel,
        sweep=sweep,
        m=m,
        k=n,
        batch=batch,
        nnz=W.nnz,
        density=W.nnz / (m * n),
        out_rows=out_rows,
        in_rows=in_rows,
        index_bytes=W.indices.itemsize,
        operand_bytes=in_bytes,
        operand_in=caches.level_of(in_bytes),
        seconds=secs,
        gflops=gflops,
        l1_k=k1,
        l1_nnz=L.nnz,
        l1_capped=capped,
        l1_seconds=secs_l1,
        l1_gflops=l1_gflops,
        fraction_l1=frac_l1,
        rounds=len(t["kernel"]),
    )


def with_bandwidth(row: dict, gbps: float) -> dict:
    """The row with its bandwidth bound at ``gbps`` GB/s (compulsory traffic, and the traffic
    with every nonzero's operand row read from memory: no reuse in any cache), the applicable
    ceiling (the smaller of L1 and bandwidth) and the fraction of it."""
    b, nnz, ib = row["batch"], row["nnz"], row["index_bytes"]
    flops = 2.0 * nnz * b
    nbytes = traffic_bytes(row["out_rows"], row["in_rows"], b, nnz, ib)
    bw = bandwidth_gflops(flops, nbytes, gbps)
    no_reuse = traffic_bytes(row["out_rows"], nnz, b, nnz, ib)  # one operand row per nonzero
    bound = "L1" if row["l1_gflops"] <= bw else "bandwidth"
    return dict(
        row,
        traffic_bytes=nbytes,
        bw_gflops=bw,
        bw_no_reuse_gflops=bandwidth_gflops(flops, no_reuse, gbps),
        bound=bound,
        fraction=row["fraction_l1"] if bound == "L1" else row["gflops"] / bw,
    )


def small_batch_rows(cfg: dict, rng, progress=True) -> list[dict]:
    """spmm at small batches: the launcher (preallocated output) and the public kernels.spmm
    beside dense BLAS (W_dense @ X) and scipy (csr_matrix @ X), interleaved."""
    cpu = get_backend("cpu")
    sc = cfg["small"]
    m = sc["m"]
    rows = []
    bar = tqdm(total=len(sc["densities"]) * len(sc["batches"]), desc="small batches",
               disable=not progress)  # fmt: skip
    for density in sc["densities"]:
        W = random_csr(m, m, int(round(density * m * m)), rng)
        Wd = W.to_dense()
        Wsp = sp.csr_matrix(W.to_scipy())
        for batch in sc["batches"]:
            X = rng.standard_normal((m, batch), dtype=np.float32)
            calls = product_calls(cpu, W, X, X, via="launcher")
            check_calls(W, X, X, calls, rng, ("spmm",))
            fns = {
                "sparsecore": calls["spmm"],
                "public": lambda: kernels.spmm(W, X),
                "dense": lambda: Wd @ X,
                "scipy": lambda: Wsp @ X,
            }
            W64, X64 = Wsp.astype(np.float64), X.astype(np.float64)
            ref, scale = W64 @ X64, abs(W64) @ np.abs(X64)
            for name in ("public", "scipy"):  # the peers compute the same product
                _close(name, np.asarray(fns[name]()), ref, scale)
            t = interleaved(fns, cfg["rounds"], cfg["round_s"])
            med = {k: float(np.median(v)) for k, v in t.items()}
            flops = 2.0 * W.nnz * batch
            rows.append(
                dict(
                    m=m,
                    batch=batch,
                    density=density,
                    nnz=W.nnz,
                    **{f"{k}_s": v for k, v in med.items()},
                    gflops=flops / med["sparsecore"] / 1e9,
                    vs_dense=paired_ratio(t["dense"], t["sparsecore"]),
                    vs_scipy=paired_ratio(t["scipy"], t["sparsecore"]),
                    public_vs_scipy=paired_ratio(t["scipy"], t["public"]),
                    rounds=len(t["sparsecore"]),
                )
            )
            bar.update()
        Wd = None
    bar.close()
    return rows


def run(cfg: dict, rng, progress=True) -> dict:
    """The roofline level: caches, STREAM (start and end), the products against their
    ceilings, the small batches."""
    t_start = time.perf_counter()
    caches = cache_sizes()
    array_bytes = int(cfg["stream_factor"] * caches.llc)
    s0 = stream(array_bytes, cfg["stream_reps"])
    jobs = [("square", kern, m, m, int(round(cfg["density"] * m * m)), cfg["batch"])
            for m in cfg["sizes"] for kern in ("spmm", "spmm_t", "sddmm")]  # fmt: skip
    sw = cfg["sweep"]
    jobs += [("size", "spmm", sw["m"], k, sw["nnz"], sw["batch"]) for k in sw["ks"]]
    products = []
    matrices = {}
    for sweep, kern, m, k, nnz, batch in tqdm(jobs, desc="roofline", disable=not progress):
        key = (m, k, nnz)
        if key not in matrices:
            matrices = {key: random_csr(m, k, nnz, rng)}  # one matrix alive at a time
        products.append(product_row(kern, matrices[key], batch, caches, rng, cfg, sweep))
    matrices = None
    small = small_batch_rows(cfg, rng, progress)
    s1 = stream(array_bytes, cfg["stream_reps"])
    # the bandwidth ceiling: the best median of copy and triad, at the start or at the end
    gbps = max(s[f"{op}_gbps"] for s in (s0, s1) for op in ("copy", "triad"))
    return dict(
        caches=caches.as_dict(),
        stream=dict(
            start=s0,
            end=s1,
            gbps=gbps,
            array_bytes=s0["array_bytes"],
            threads=s0["threads"],
        ),
        products=[with_bandwidth(r, gbps) for r in products],
        small_batch=small,
        config={k: v for k, v in cfg.items()},
        seconds=time.perf_counter() - t_start,
    )
