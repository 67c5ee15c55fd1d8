"""The reports of the benchmarks: Markdown tables, plots, bench/RESULTS.md, the GPU suite's table.

One module for every table and plot, so that a figure is formatted in one place: the kernel
level (``kernel_markdown``, ``kernel_plots``), the whole ``sparsecore bench`` report
(``markdown``, ``plots``: the step and scaling levels with the kernel level inside; the
roofline level's tables, ``roofline_markdown``),
``write_results`` (the generated part of a Markdown file between its markers) and the GPU
suite's text table (``print_gpu_tables``). Everything here reads result dictionaries only:
it runs nothing and can rebuild a report from a saved bench.json.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sparsecore.benchmarks.common import log_crossing
from sparsecore.benchmarks.ops import KERNELS, REF_SHAPE

KERNEL_COLORS = {"sparsecore": "C3", "scipy": "C0", "torch": "C2"}  # the same in every panel
STEP_COLORS = {"sparsecore": "C3", "torch-masked": "C2", "torch-sparse": "C4", "dense": "k"}
TARGET = dict(width=4096, sparsity=0.99, speedup_dense=20.0, speedup_masked=30.0, memory=20.0)


# ------------------------------------------------------------------------------ kernel level
def break_even(rows, kernel, impl, m, batch):
    """Highest density at which the implementation still beats dense BLAS (log-interpolated)."""
    return log_crossing(
        (r["density"], r["speedup_vs_dense"])
        for r in rows
        if r["kernel"] == kernel and r["impl"] == impl and r["m"] == m and r["batch"] == batch
    )


def kernel_markdown(env, rows, grows, inter, preset):
    L = []
    L.append(f"Preset `{preset}`, {env['date']}. Command: `{env['command']}`\n")
    L.append(f"- Machine: {env['cpu']}, {env['cores']} cores; flags: {env['cpu_flags']}")
    L.append(
        f"- Python {env['python']}, NumPy {env['numpy']}, SciPy {env['scipy']}, "
        f"Numba {env['numba']}, torch {env['torch']}, sparsecore {env['sparsecore']}"
    )
    L.append(_threads_line(env["threads"], f"env {env['threads']['env']}"))
    L.append("")
    ref = [
        r
        for r in rows
        if r["m"] == REF_SHAPE["m"]
        and r["batch"] == REF_SHAPE["batch"]
        and abs(r["density"] - REF_SHAPE["density"]) < 1e-12
    ]
    if ref:
        L.append(
            f"### Reference shape: m = k = {REF_SHAPE['m']}, batch {REF_SHAPE['batch']}, "
            f"density {REF_SHAPE['density']:.0%} (nnz = {ref[0]['nnz']:,})\n"
        )
        L.append(
            "| kernel | sparsecore ms | GFLOP/s | dense BLAS ms | × dense | scipy ms | × scipy | torch ms | × torch |"
        )
        L.append("|---|---|---|---|---|---|---|---|---|")
        for k in KERNELS:
            by = {r["impl"]: r for r in ref if r["kernel"] == k}
            o = by.get("sparsecore")
            if not o:
                continue
            cells = [
                k,
                f"{o['seconds'] * 1e3:.3f}",
                f"{o['gflops']:.1f}",
                f"{o['dense_seconds'] * 1e3:.2f}",
                f"{o['speedup_vs_dense']:.1f}",
            ]
            for impl in ("scipy", "torch"):
                b = by.get(impl)
                cells += (
                    [f"{b['seconds'] * 1e3:.3f}", f"{b['seconds'] / o['seconds']:.1f}"]
                    if b
                    else ["–", "–"]
                )
            L.append("| " + " | ".join(cells) + " |")
        L.append(
            "\n(× X = how many times faster sparsecore is than X at the same shape; dense BLAS "
            "for sddmm is the full dY·Xᵀ product.)\n"
        )
    L.append("### Break-even density against dense BLAS\n")
    L.append(
        "Highest density at which each implementation is still faster than the dense product "
        "of the same shape (log-interpolated between measured densities; `>max` = faster at all).\n"
    )
    impls = sorted({r["impl"] for r in rows})
    L.append("| kernel | m | batch | " + " | ".join(impls) + " |")
    L.append("|---|---|---|" + "---|" * len(impls))
    for k in KERNELS:
        for m in sorted({r["m"] for r in rows}):
            for b in sorted({r["batch"] for r in rows}):
                cells = []
                for impl in impls:
                    be = break_even(rows, k, impl, m, b)
                    cells.append(
                        "–" if be is None else (">max" if be == float("inf") else f"{be:.1%}")
                    )
                L.append(f"| {k} | {m} | {b} | " + " | ".join(cells) + " |")
    L.append("")
    if grows:
        L.append("### Fused top-k grow (k = 1% of m·k) vs the naive dense way\n")
        L.append(
            "| m = k | batch | fused ms | naive ms | dense product alone ms | fused / product | "
            "naive / fused | fused peak extra MiB | % of dense gradient | naive peak extra MiB |"
        )
        L.append("|---|---|---|---|---|---|---|---|---|---|")
        for g in grows:
            L.append(
                f"| {g['m']} | {g['batch']} | {g['fused_s'] * 1e3:.1f} | {g['naive_s'] * 1e3:.1f} | "
                f"{g['dense_product_s'] * 1e3:.1f} | {g['fused_s'] / g['dense_product_s']:.2f} | "
                f"{g['naive_s'] / g['fused_s']:.2f} | {g['fused_peak_extra_bytes'] / 2**20:.2f} | "
                f"{100 * g['fused_peak_extra_bytes'] / g['dense_gradient_bytes']:.1f}% | "
                f"{g['naive_peak_extra_bytes'] / 2**20:.1f} |"
            )
        L.append(
            "\n(peak extra = NumPy allocations traced by tracemalloc during one call, minus the "
            "returned arrays; BLAS-internal buffers are not counted for either.)\n"
        )
    if inter:
        L.append("### Kernels interleaved with BLAS (threading setup)\n")
        L.append(
            f"m = k = {REF_SHAPE['m']}, batch {REF_SHAPE['batch']}, density 1%: each kernel alone (before "
            "any BLAS call in the process), and alternating with a 512³ BLAS product (as kernels and "
            "small dense products alternate in a training step); medians of 30 alternations.\n"
        )
        L.append(
            "| setup | kernel | alone ms | after BLAS ms | BLAS alone ms | BLAS after kernel ms |"
        )
        L.append("|---|---|---|---|---|---|")
        for label, res in inter.items():
            for k in KERNELS:
                L.append(
                    f"| {label} | {k} | {res[k + '_alone_s'] * 1e3:.3f} | {res[k + '_interleaved_s'] * 1e3:.3f} | "
                    f"{res['blas_alone_s'] * 1e3:.2f} | {res['blas_after_' + k + '_s'] * 1e3:.2f} |"
                )
        L.append("")
    L.append("<details><summary>All measurements</summary>\n")
    L.append("| kernel | impl | m | batch | density | nnz | ms | GFLOP/s | × dense |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        L.append(
            f"| {r['kernel']} | {r['impl']} | {r['m']} | {r['batch']} | {r['density']:.3g} | {r['nnz']:,} | "
            f"{r['seconds'] * 1e3:.3f} | {r['gflops']:.1f} | {r['speedup_vs_dense']:.2f} |"
        )
    L.append("\n</details>\n")
    return "\n".join(L)


def kernel_plots(rows, out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for m in sorted({r["m"] for r in rows}):
        batches = sorted({r["batch"] for r in rows if r["m"] == m})
        fig, axes = plt.subplots(len(batches), 3, figsize=(15, 4 * len(batches)), squeeze=False)
        for i, b in enumerate(batches):
            for j, k in enumerate(KERNELS):
                ax = axes[i][j]
                for impl in sorted({r["impl"] for r in rows}):
                    pts = sorted(
                        (r["density"], r["speedup_vs_dense"])
                        for r in rows
                        if r["m"] == m
                        and r["batch"] == b
                        and r["kernel"] == k
                        and r["impl"] == impl
                    )
                    if pts:
                        color = KERNEL_COLORS.get(impl, "C7")
                        ax.plot(*zip(*pts, strict=True), marker="o", label=impl, color=color)
                        be = break_even(rows, k, impl, m, b)
                        if be and be != float("inf"):
                            ax.axvline(be, ls=":", lw=1, color=color)
                ax.axhline(1.0, color="k", lw=1)
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.set_title(f"{k}: m = k = {m}, batch {b}")
                ax.set_xlabel("density")
                ax.set_ylabel("speed-up over dense BLAS")
                ax.grid(True, which="both", alpha=0.3)
                ax.legend()
        fig.tight_layout()
        path = out / f"speedup_m{m}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        files.append(path)
    return files


def write_results(md: str, path: Path):
    start, end = "<!-- generated:start -->", "<!-- generated:end -->"
    text = path.read_text() if path.exists() else f"# Benchmark results\n\n{start}\n{end}\n"
    if start not in text:
        text += f"\n{start}\n{end}\n"
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1]
    path.write_text(f"{head}{start}\n{md}\n{end}{tail}")


# ------------------------------------------------------------------------------ roofline level
def _bytes(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def roofline_markdown(r: dict) -> list[str]:
    """The roofline level (benchmarks/roofline.py): caches, STREAM, each product against the
    ceiling that applies to it, the small batches."""
    c, s = r["caches"], r["stream"]
    L = ["## Roofline: each product against the ceiling that applies to it\n"]
    src = "assumed defaults" if c["assumed"] else f"read from {c['source']}"
    l3 = (
        f"L3 {_bytes(c['l3'])} per {c['l3_shared']} CPUs ({_bytes(c['llc'])} in all)"
        if c["l3"]
        else "no L3"
    )
    L.append(
        f"- Caches ({src}): L1d {_bytes(c['l1d'])} and L2 {_bytes(c['l2'])} per "
        f"{c['l1d_shared']} / {c['l2_shared']} CPU(s), {l3}; {c['cpus']} CPUs."
    )
    L.append(
        f"- STREAM (Numba, {s['threads']} threads, 3 float64 arrays of {_bytes(s['array_bytes'])}): "
        f"copy {s['start']['copy_gbps']:.1f} / {s['end']['copy_gbps']:.1f} GB/s, triad "
        f"{s['start']['triad_gbps']:.1f} / {s['end']['triad_gbps']:.1f} GB/s (medians at the start "
        f"/ end of the level); the bandwidth bound uses {s['gbps']:.1f} GB/s.\n"
    )
    L.append(
        "L1 ceiling = the same launcher, same output rows, nnz and batch, on a gathered operand "
        "(X; dY for spmm_t) of k_L1 = ⌊L1d / (8·B)⌋ rows (`*`: nnz capped at m·k_L1, a dense "
        "pattern). Bandwidth bound = 2·nnz·B / (bytes / GB/s), bytes = operand once + result once "
        "+ (4 + index bytes) per nonzero; *no reuse*: the operand row of every nonzero from memory. "
        "Fraction = GFLOP/s over the smaller of the L1 ceiling and the bandwidth bound (the L1 "
        "fraction paired round by round with its ceiling). Operand in = the smallest cache the "
        "gathered operand fits in (L1, L2 per core; L3 over the machine).\n"
    )
    L.append(
        "| kernel | m × k | B | nnz | operand | in | GFLOP/s | L1 ceiling GFLOP/s (k_L1, nnz) "
        "| of L1 | bandwidth bound GFLOP/s (no reuse) | bound | fraction |"
    )
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for p in r["products"]:
        cap = "*" if p["l1_capped"] else ""
        L.append(
            f"| {p['kernel']} | {p['m']} × {p['k']} | {p['batch']} | {p['nnz']:,} | "
            f"{_bytes(p['operand_bytes'])} | {p['operand_in']} | {p['gflops']:.1f} | "
            f"{p['l1_gflops']:.1f} ({p['l1_k']}, {p['l1_nnz']:,}{cap}) | {p['fraction_l1']:.0%} | "
            f"{p['bw_gflops']:.0f} ({p['bw_no_reuse_gflops']:.1f}) | {p['bound']} | "
            f"**{p['fraction']:.0%}** |"
        )
    L.append("")
    if r.get("small_batch"):
        L.append("### Small batches: spmm beside dense BLAS and scipy\n")
        L.append(
            "sparsecore = the launcher on a preallocated output; public = `kernels.spmm(W, X)` "
            "(checks, new output); dense = `W_dense @ X` (NumPy BLAS); scipy = `csr_matrix @ X` "
            "(float32). × = how many times faster the launcher is (medians of per-round ratios; "
            "< 1: slower).\n"
        )
        L.append(
            "| density | B | nnz | sparsecore ms | GFLOP/s | public ms | dense ms | scipy ms "
            "| × dense | × scipy | public × scipy |"
        )
        L.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for q in r["small_batch"]:
            L.append(
                f"| {q['density']:.0%} | {q['batch']} | {q['nnz']:,} | "
                f"{q['sparsecore_s'] * 1e3:.3f} | {q['gflops']:.1f} | {q['public_s'] * 1e3:.3f} | "
                f"{q['dense_s'] * 1e3:.3f} | {q['scipy_s'] * 1e3:.3f} | {q['vs_dense']:.2f} | "
                f"{q['vs_scipy']:.2f} | {q['public_vs_scipy']:.2f} |"
            )
        L.append("")
    return L


# ------------------------------------------------------------------------------ sparsecore bench
def step_table(results: list[dict]) -> dict:
    """Per width: the dense reference and, per sparsity, each implementation's result."""
    by_w: dict = {}
    for r in results:
        c = r["config"]
        w = c["arch"][1]
        d = by_w.setdefault(w, {"dense": None, "rows": {}})
        if c["impl"] == "dense":
            d["dense"] = r
        else:
            d["rows"].setdefault(c["sparsity"], {})[c["impl"]] = r
    return by_w


def step_break_even(entry, impl: str = "sparsecore") -> float | None:
    dense = entry["dense"]
    if dense is None:
        return None
    pts = [
        (1.0 - s, dense["amortised_step_s"] / row[impl]["amortised_step_s"])
        for s, row in entry["rows"].items()
        if impl in row
    ]
    return log_crossing(pts)


def fallback_worst(entry) -> tuple[float, float] | None:
    """(the largest step time of --dense-fallback auto over dense NumPy's, at that sparsity),
    over the sparsities it ran: "within 5% of dense at any density" is a worst case <= 1.05."""
    dense = entry["dense"]
    if dense is None:
        return None
    ratios = [
        (row["sparsecore-auto"]["amortised_step_s"] / dense["amortised_step_s"], s)
        for s, row in entry["rows"].items()
        if "sparsecore-auto" in row
    ]
    return max(ratios) if ratios else None


def fmt_density(be):
    if be is None:
        return "–"
    return ">max" if be == float("inf") else ("<min" if be == 0.0 else f"{be:.1%}")


def mib(b):
    return f"{b / 2**20:.1f}"


def markdown(res: dict) -> str:
    env = res["environment"]
    L = [
        f"Preset `{res['preset']}`, {env['date']}. Command: `{res['command']}`\n",
        f"- Machine: {env['cpu']}, {env['cores']} cores; flags: {env['cpu_flags']}",
        f"- Python {env['python']}, NumPy {env['numpy']}, SciPy {env['scipy']}, "
        f"Numba {env['numba']}, torch {env['torch']}, sparsecore {env['sparsecore']}",
    ]
    for level, how in res.get("runs", {}).items():  # results assembled from several runs
        L.append(f"- {level}: {how}")
    L.append(_threads_line(env["threads"], f"worker threads: {res['threads'] or 'all cores'}"))
    L.append("")
    if res.get("step"):
        L += step_markdown(res["step"], res["batch"], res["delta_t"])
    if res.get("scaling"):
        L += scaling_markdown(res["scaling"], res["delta_t"])
    if res.get("kernels"):
        k = res["kernels"]
        L.append("## Kernel level\n")
        md = kernel_markdown(
            k["environment"], k["products"], k["grow"], k["interleaved"], res["preset"]
        )
        L += md.splitlines()[4:]  # the machine lines are above already
    if res.get("roofline"):
        L += roofline_markdown(res["roofline"])
    return "\n".join(L) + "\n"


def step_markdown(results, batch, delta_t) -> list[str]:
    L = ["## Training step: sparse vs dense vs masked-dense\n"]
    L.append(
        f"MLP 784-W-W-10, batch {batch}, ERK densities, SGD with momentum; RigL's topology "
        f"update amortised over ΔT = {delta_t} (ms below are medians of the steps between "
        "updates plus the amortised update). × = how many times faster sparsecore is. State = "
        "analytical bytes of training state (weights, indices, transpose structure, gradients, "
        "moments); RSS = measured peak RSS of the configuration's own process above its baseline "
        "(interpreter, libraries, mapped data, compiled kernels), which also holds activations "
        "and allocator slack.\n"
    )
    table = step_table(results)
    for w, entry in sorted(table.items()):
        dense = entry["dense"]
        L.append(f"### W = {w}\n")
        L.append(
            "| sparsity | nnz | sparsecore ms | update ms | dense ms | × dense | masked ms | × masked "
            "| torch.sparse ms | × torch.sparse | GFLOP/step sparse / dense | state MiB sparse / dense / masked "
            "| RSS MiB sparse / dense / masked |"
        )
        L.append("|" + "---|" * 13)
        for s, row in sorted(entry["rows"].items()):
            o = row.get("sparsecore")
            m = row.get("torch-masked")
            t = row.get("torch-sparse")
            if o is None:
                continue
            ms = o["amortised_step_s"] * 1e3

            def cell(r):
                return (
                    [
                        f"{r['amortised_step_s'] * 1e3:.2f}",
                        f"{r['amortised_step_s'] * 1e3 / ms:.1f}",
                    ]
                    if r
                    else ["–", "–"]
                )

            L.append(
                "| "
                + " | ".join(
                    [
                        f"{s:.1%}",
                        f"{o['nnz']:,}",
                        f"{ms:.2f}",
                        f"{o['update_step_s'] * 1e3:.0f}" if o["update_step_s"] else "–",
                        *cell(dense),
                        *cell(m),
                        *cell(t),
                        f"{o['flops_per_step'] / 1e9:.3f} / {o['flops_per_step_dense'] / 1e9:.2f}",
                        f"{mib(o['state_bytes'])} / {mib(o['state_bytes_dense'])} / "
                        + (mib(m["state_bytes"]) if m else "–"),
                        f"{o['model_rss_mib']:.0f} / "
                        + (f"{dense['model_rss_mib']:.0f}" if dense else "–")
                        + " / "
                        + (f"{m['model_rss_mib']:.0f}" if m else "–"),
                    ]
                )
                + " |"
            )
        L.append(
            f"\nBreak-even density of the training step against dense NumPy at W = {w}: "
            f"{fmt_density(step_break_even(entry))}\n"
        )
        auto = [(s, row["sparsecore-auto"]) for s, row in sorted(entry["rows"].items())
                if "sparsecore-auto" in row]  # fmt: skip
        if auto and dense is not None:
            cells = ", ".join(
                f"{s:.0%}: {r['amortised_step_s'] * 1e3:.2f} ms "
                f"({dense['amortised_step_s'] / r['amortised_step_s']:.2f}× dense; "
                f"{'/'.join('B' if c == 'dense' else 'S' for c in r.get('layer_compute', []))})"
                for s, r in auto
            )
            worst = fallback_worst(entry)
            L.append(
                f"With `--dense-fallback auto` (layers on BLAS where timed faster; S = sparse "
                f"kernels, B = BLAS, per sparse layer): {cells}. Break-even density "
                f"{fmt_density(step_break_even(entry, 'sparsecore-auto'))}; at worst "
                f"{worst[0]:.2f}× dense's step time (at {worst[1]:.0%}).\n"
            )
    tw = table.get(TARGET["width"])
    row = tw["rows"].get(TARGET["sparsity"]) if tw else None
    if row and "sparsecore" in row and tw["dense"] is not None:
        o = row["sparsecore"]
        sd = tw["dense"]["amortised_step_s"] / o["amortised_step_s"]
        line = (
            f"**784-{TARGET['width']}-{TARGET['width']}-10 at {TARGET['sparsity']:.0%}**: step "
            f"{sd:.1f}× faster than dense NumPy (target ≥ {TARGET['speedup_dense']:.0f}×)"
        )
        m = row.get("torch-masked")
        if m:
            sm = m["amortised_step_s"] / o["amortised_step_s"]
            mem = m["state_bytes"] / o["state_bytes"]
            line += (
                f", {sm:.1f}× faster than masked-dense PyTorch RigL (target ≥ "
                f"{TARGET['speedup_masked']:.0f}×), training state 1/{mem:.0f} of masked-dense "
                f"(target ≤ 1/{TARGET['memory']:.0f})"
            )
        L.append(line + ".\n")
    return L


def scaling_markdown(results, delta_t) -> list[str]:
    L = ["## Does the step cost follow nnz or the dense size?\n"]
    fan = results[0]["config"]
    L.append(
        "MLP 784-W-W-10, uniform sparsity 1 − F/W (fixed fan-in F = "
        f"{round((1 - fan['sparsity']) * fan['arch'][1])}): doubling W doubles nnz and quadruples "
        "the dense size. Step = median of the steps between topology updates; the exact grow "
        f"(∝ dense size) is reported per update and amortised over ΔT = {delta_t}.\n"
    )
    L.append(
        "| W | nnz | dense weights | step ms | step ratio to W/2 | update ms | update ratio | "
        "amortised step ms | RSS MiB |"
    )
    L.append("|---|---|---|---|---|---|---|---|---|")
    prev = None
    for r in sorted(results, key=lambda r: r["config"]["arch"][1]):
        w = r["config"]["arch"][1]
        dense_w = sum(
            a * b for a, b in zip(r["config"]["arch"][:-1], r["config"]["arch"][1:], strict=True)
        )
        ratio = f"{r['median_step_s'] / prev['median_step_s']:.2f}" if prev else "–"
        uratio = (
            f"{r['update_step_s'] / prev['update_step_s']:.2f}"
            if prev and r["update_step_s"] and prev["update_step_s"]
            else "–"
        )
        L.append(
            f"| {w} | {r['nnz']:,} | {dense_w:,} | {r['median_step_s'] * 1e3:.2f} | {ratio} | "
            f"{(r['update_step_s'] or 0) * 1e3:.0f} | {uratio} | {r['amortised_step_s'] * 1e3:.2f} | "
            f"{r['model_rss_mib']:.0f} |"
        )
        prev = r
    L.append("")
    return L


def plots(res: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    if res.get("kernels"):
        files += kernel_plots(res["kernels"]["products"], out)
    if res.get("step"):
        table = step_table(res["step"])
        widths = sorted(table)
        for kind in ("speedup", "memory"):
            fig, axes = plt.subplots(1, len(widths), figsize=(6 * len(widths), 4.5), squeeze=False)
            for ax, w in zip(axes[0], widths, strict=True):
                entry = table[w]
                dense = entry["dense"]
                for impl in ("sparsecore", "torch-masked", "torch-sparse"):
                    pts = sorted(
                        (1 - s, row[impl]) for s, row in entry["rows"].items() if impl in row
                    )
                    if not pts:
                        continue
                    xs = [p[0] for p in pts]
                    if kind == "speedup" and dense is not None:
                        ys = [dense["amortised_step_s"] / p[1]["amortised_step_s"] for p in pts]
                    elif kind == "memory":
                        ys = [max(p[1]["model_rss_mib"], 0.1) for p in pts]
                        ax.plot(
                            xs,
                            [p[1]["state_bytes"] / 2**20 for p in pts],
                            ls="--",
                            color=STEP_COLORS[impl],
                            alpha=0.6,
                            label=f"{impl} state (analytical)",
                        )
                    else:
                        continue
                    ax.plot(xs, ys, marker="o", color=STEP_COLORS[impl], label=impl)
                if kind == "speedup":
                    ax.axhline(1.0, color="k", lw=1, label="dense NumPy")
                    be = step_break_even(entry)
                    if be and be != float("inf"):
                        ax.axvline(
                            be,
                            ls=":",
                            color=STEP_COLORS["sparsecore"],
                            label=f"break-even {be:.0%}",
                        )
                    ax.set_ylabel("speed-up of a training step over dense NumPy")
                elif dense is not None:
                    ax.axhline(
                        dense["state_bytes"] / 2**20, color="k", ls="--", lw=1,
                        label="dense NumPy state (analytical)",
                    )  # fmt: skip
                    ax.axhline(
                        max(dense["model_rss_mib"], 0.1), color="k", lw=1, label="dense NumPy (RSS)"
                    )
                    ax.set_ylabel("MiB (peak RSS above baseline; dashed: state bytes)")
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.set_xlabel("density")
                ax.set_title(f"784-{w}-{w}-10, batch {res['batch']}")
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(fontsize=8)
            fig.tight_layout()
            path = out / f"step_{kind}.png"
            fig.savefig(path, dpi=90)
            plt.close(fig)
            files.append(path)
    if res.get("scaling"):
        rs = sorted(res["scaling"], key=lambda r: r["config"]["arch"][1])
        ws = np.array([r["config"]["arch"][1] for r in rs], float)
        step = np.array([r["median_step_s"] for r in rs]) * 1e3
        upd = np.array([r["update_step_s"] or np.nan for r in rs]) * 1e3
        fig, ax = plt.subplots(figsize=(7, 5))
        ax.plot(ws, step, marker="o", color="C3", label="step between updates (sparsecore)")
        ax.plot(ws, upd, marker="s", color="C1", label="topology update (exact grow)")
        ax.plot(ws, step[0] * ws / ws[0], ls=":", color="C3", label="∝ nnz (∝ W)")
        ax.plot(ws, step[0] * (ws / ws[0]) ** 2, ls="--", color="k", label="∝ dense size (∝ W²)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("hidden width W (fixed fan-in)")
        ax.set_ylabel("ms")
        ax.set_title("Time per step vs width at fixed fan-in")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / "step_scaling.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        files.append(path)
    return files


# ------------------------------------------------------------------------------ GPU suite
def fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def print_gpu_tables(res):
    print()
    print(f"{'op':10} {'shape':34} {'ok':3} {'ms':>9} {'cuSPARSE':>9} {'dense':>9} "
          f"{'GFLOP/s':>8} {'x cuSP':>7} {'x dense':>7}")  # fmt: skip
    for r in res["kernels"]:
        print(
            f"{r['op']:10} {r['shape']:34} {'y' if r['correct'] else 'NO':3} "
            f"{fmt(r['ms']):>9} {fmt(r['cusparse_ms']):>9} {fmt(r['dense_ms']):>9} "
            f"{fmt(r['gflops'], '.0f'):>8} {fmt(r['vs_cusparse'], '.2f'):>7} "
            f"{fmt(r['vs_dense'], '.2f'):>7}"
        )
    print()
    for g in res["grow_memory"]:
        print(
            f"topk_grow {g['shape']:34} k={g['k']:<9} peak extra "
            f"{g['peak_extra_bytes'] / 2**20:8.1f} MiB = {100 * g['fraction_of_dense']:5.2f}% "
            f"of the dense gradient ({g['dense_gradient_bytes'] / 2**20:.0f} MiB)"
        )
    ts = res.get("train_step")
    if ts:
        print()
        print(
            f"train step {ts['dims']} B={ts['batch']} density={ts['density']}: sparse "
            f"{ts['sparse_ms']:.2f} ms, dense cuBLAS {ts['dense_cublas_ms']:.2f} ms "
            f"({ts['speedup_vs_dense']:.2f}x), torch masked-dense "
            f"{fmt(ts.get('torch_masked_dense_ms'), '.2f')} ms"
        )
        if "engine_ms" in ts:
            print(
                f"engine step (Trainer, device='cuda', head sparse too): {ts['engine_ms']:.2f} ms "
                f"({ts['engine_speedup_vs_dense']:.2f}x vs dense cuBLAS); one RigL topology "
                f"update {ts['engine_update_ms']:.1f} ms"
            )
        if "engine_error" in ts:
            print(f"engine step FAILED: {ts['engine_error']}")


def _threads_line(th: dict, tail: str) -> str:
    """The report's line on the threading setup (sparsecore.threading_info()), then ``tail``."""
    blas = ", ".join(
        f"{b['internal_api']} {b['version']} ({b['num_threads']} threads)" for b in th["blas"]
    )
    return (
        f"- Threads: Numba `{th['numba_threading_layer']}` × {th['numba_threads']}; BLAS: {blas}; "
        + tail
    )
