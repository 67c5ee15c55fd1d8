"""Training-step level of the benchmark suite: one configuration per process.

One full step of an MLP (forward, backward, optimizer; the topology update amortised over ΔT) in
one of four implementations:

- ``sparsecore``   RigL through the engine: CSR weights, nnz-sized state, fused grow;
- ``dense``        the same MLP trained densely with NumPy BLAS (the engine's ``--method dense``);
- ``torch-masked`` RigL as published implementations train it: dense weights kept zero outside a
                   0/1 mask, autograd's dense gradient, ``torch.topk`` over the dense |gradient|
                   to grow;
- ``torch-sparse`` static sparse training in torch.sparse (CSR weights whose values get autograd
                   gradients; torch.sparse cannot grow without the dense gradient, so no updates).

Timing: a few warm-up steps, then ``steps`` steps during which topology updates happen every
``steps // updates`` steps. Steps are classed as normal, update, or the step right after an update
(it rebuilds the transpose structure); the amortised step at the nominal ΔT is
``median(normal) + (mean(update) + mean(after) - 2·median(normal)) / ΔT``.

Memory: peak RSS (VmHWM) of this process above its resident memory before the model is built
(interpreter, libraries, compiled kernels, the data, whose map is faulted in first); the suite
starts one process per configuration so no configuration's memory hides another's. Result: one
JSON object on the last line of stdout.

    python -m sparsecore.benchmarks.step '{"impl": "sparsecore", "arch": [784, 1024, 1024, 10],
                                           "sparsity": 0.99}'
"""

from __future__ import annotations

import gc
import json
import sys
import time

import numpy as np

# the one peak-RSS helper (VmHWM: right in this worker process, see memory.py); old names kept
from sparsecore.benchmarks.memory import current_rss_mib
from sparsecore.benchmarks.memory import peak_rss_mib as rss_mib

DEFAULTS = dict(
    impl="sparsecore",
    arch=[784, 1024, 1024, 10],
    sparsity=0.99,
    distribution="erk",
    batch=128,
    delta_t=100,  # nominal ΔT the update cost is amortised over
    steps=30,  # timed steps
    updates=3,  # topology updates among them (not for dense / torch-sparse)
    warmup=3,
    data=None,  # prefix written by prepare_data (the suite passes it)
    samples=8192,  # MNIST training rows used when data is None (batches cycle through them)
    seed=0,
)
IMPLS = ("sparsecore", "sparsecore-auto", "dense", "torch-masked", "torch-sparse")
# sparsecore-auto: the engine with --dense-fallback auto (layers above their break-even density
# computed on BLAS, sparsecore/fallback.py), the curve beside the sparse-kernels-only one
TINY_WIDTH = 16  # the warm-up model before the measured one (loads kernels and libraries)


def prepare_data(folder, samples: int) -> str:
    """Write the first ``samples`` MNIST training rows (standardised with the engine's statistics
    of those rows, float32) and their labels as .npy files, once; workers memory-map them, so a
    worker's memory before its model is the interpreter and libraries, not a dataset copy."""
    from pathlib import Path

    from sparsecore import data as D

    folder = Path(folder)
    x_path, y_path = folder / f"mnist{samples}_x.npy", folder / f"mnist{samples}_y.npy"
    if not (x_path.exists() and y_path.exists()):
        folder.mkdir(parents=True, exist_ok=True)
        with np.load(D.BUNDLED["mnist"]) as z:
            x = z["x_train"][:samples].reshape(samples, -1).astype(np.float32)
            y = z["y_train"][:samples].astype(np.int64)
        x = (x - x.mean(dtype=np.float64)) / (x.std(dtype=np.float64) or 1.0)
        np.save(x_path, x.astype(np.float32))
        np.save(y_path, y)
    return str(folder / f"mnist{samples}")


def data_for(c: dict, prefix: str = "sparsecore-bench-"):
    """The configuration's data (``c["data"]``; standalone, None: a private copy made here and
    removed at exit, its path written back), checked against the model's inputs."""
    if c["data"] is None:
        import atexit
        import shutil
        import tempfile

        tmp = tempfile.mkdtemp(prefix=prefix)
        atexit.register(shutil.rmtree, tmp, True)
        c["data"] = prepare_data(tmp, c["samples"])
    data = load_data(c["data"])
    if data.n_features != c["arch"][0]:
        raise ValueError(f"arch starts with {c['arch'][0]} inputs; the data has {data.n_features}")
    return data


def load_data(prefix: str):
    """The prepared subset as a Dataset of memory-mapped arrays (batches gather their rows)."""
    from sparsecore.data import Dataset

    x = np.load(prefix + "_x.npy", mmap_mode="r")
    float(x.sum(dtype=np.float64))  # fault every page in now: not counted as the model's memory
    y = np.load(prefix + "_y.npy")
    n_classes = int(y.max()) + 1
    return Dataset("mnist-subset", x, y, x[:0], y[:0], x[:256], y[:256], n_classes)


def _summary(kinds: list[str], times: list[float], delta_t: int) -> dict:
    t = np.asarray(times)
    k = np.asarray(kinds)
    normal = t[k == "normal"]
    med = float(np.median(normal))
    out = {
        "median_step_s": med,
        "q25_step_s": float(np.quantile(normal, 0.25)),
        "q75_step_s": float(np.quantile(normal, 0.75)),
        "n_steps": int(t.size),
        "n_updates": int(np.count_nonzero(k == "update")),
        "update_step_s": None,
        "amortised_step_s": med,
    }
    if out["n_updates"]:
        upd = float(np.mean(t[k == "update"]))
        after = float(np.mean(t[k == "after"])) if np.any(k == "after") else med
        out["update_step_s"] = upd
        out["after_update_step_s"] = after
        out["amortised_step_s"] = med + (upd + after - 2.0 * med) / delta_t
    return out


def _classify(is_update: list[bool]) -> list[str]:
    kinds = []
    for i, u in enumerate(is_update):
        kinds.append("update" if u else ("after" if i and is_update[i - 1] else "normal"))
    return kinds


# ------------------------------------------------------------------------------ implementations
def check_forward(model, xb):
    """The engine's logits against a float64 scipy/NumPy forward of the same weights: a step that
    computes the wrong thing must not be timed."""
    h = xb.astype(np.float64)
    mats = model.to_scipy()
    for l, (W, b) in enumerate(mats):
        h = W.astype(np.float64) @ h + b.astype(np.float64)[:, None]
        if l < len(mats) - 1:
            h = np.maximum(h, 0.0)
    got = model.forward(xb)
    model.clear()
    err = float(np.max(np.abs(got - h))) if h.size else 0.0
    if err > 1e-3 * (1.0 + float(np.max(np.abs(h)))):
        raise AssertionError(f"the model's forward differs from the float64 reference by {err:.3g}")


def run_engine(c: dict, data) -> dict:
    from sparsecore.cost import model_cost
    from sparsecore.train import TrainConfig, Trainer

    dense = c["impl"] == "dense"
    every = max(2, c["steps"] // max(c["updates"], 1))
    cfg = TrainConfig(
        arch=list(c["arch"]),
        sparsity=c["sparsity"] if not dense else 0.5,
        distribution=c["distribution"],
        method="dense" if dense else "rigl",
        dense_fallback="auto" if c["impl"] == "sparsecore-auto" else "off",
        delta_t=every,
        batch_size=c["batch"],
        epochs=10**6,
        max_steps=10**7,  # T_end far away: every `every`-th step updates, at the full α
        progress=False,
        seed=c["seed"],
    )
    tr = Trainer(cfg, data)
    check_forward(tr.model, np.ascontiguousarray(data.x_train[: c["batch"]].T))
    batches = (i for e in range(10**6) for i in tr.batches(e))
    flags, times = [], []
    with tr.fp_mode():  # flush-to-zero as in Trainer.run (the torch baseline flushes too)
        for s in range(c["warmup"] + c["steps"]):
            idx = next(batches)
            xb = np.ascontiguousarray(data.x_train[idx].T)
            yb = data.y_train[idx]
            t0 = time.perf_counter()
            _, _, report = tr.train_step(xb, yb)
            dt = time.perf_counter() - t0
            if s >= c["warmup"]:
                times.append(dt)
                flags.append(report is not None)
    cost = model_cost(tr.model, c["batch"], tr.opt)
    out = _summary(_classify(flags), times, c["delta_t"])
    out["layer_compute"] = [r["compute"] for r in tr.fallback]  # sparse layers: kernels / BLAS
    out.update(
        nnz=int(sum(l["nnz"] for l in cost["layers"])),
        state_bytes=int(cost["state_bytes"]),
        state_bytes_dense=int(cost["state_bytes_dense"]),
        layer_densities=[round(float(l["density"]), 6) for l in cost["layers"]],
        flops_per_step_dense=float(cost["flops_per_step_dense"]),
    )
    # analytical FLOPs: forward 2·nnz·B, dW 2·nnz·B, dX 2·nnz·B (not for the first layer), and
    # for RigL the exact grow, 2·m·n·B per sparse layer per update, amortised over ΔT
    grow = (
        sum(
            2.0 * l["shape"][0] * l["shape"][1] * c["batch"]
            for l in cost["layers"]
            if l["density"] < 1.0
        )
        if not dense
        else 0.0
    )
    out["grow_flops_per_update"] = grow
    out["flops_per_step"] = float(cost["flops_per_step"]) + grow / c["delta_t"]
    if not dense:
        out["grow_s_per_update"] = out["update_step_s"]
    return out


def _dense_flops(shapes, batch) -> float:
    """2·size·B forward, 2·size·B for dW, 2·size·B for dX except in the first layer."""
    return float(sum(2.0 * m * n * batch * (2 if l == 0 else 3) for l, (m, n) in enumerate(shapes)))


def _torch_layers(c, torch):
    """Per-layer (m, n, density) for the configuration, and the ERK/uniform densities."""
    from sparsecore.rigl.distributions import layer_densities

    arch = c["arch"]
    shapes = [(o, i) for i, o in zip(arch[:-1], arch[1:], strict=True)]
    dens = layer_densities(c["sparsity"], shapes, c["distribution"])
    return shapes, dens


def run_torch_masked(c: dict, data, torch) -> dict:
    """Masked-dense RigL as published implementations train (rigl-torch and the like): dense
    weights kept zero outside the mask, so the forward uses W itself and autograd's W.grad is the
    full dense gradient; at an update a drop by |w| and a grow by torch.topk of the dense
    |gradient| over absent entries (new weights and their momentum zeroed) and no optimizer step;
    otherwise the gradient is masked, SGD with momentum steps, and the weights are masked."""
    torch.manual_seed(c["seed"])
    shapes, dens = _torch_layers(c, torch)
    Ws, bs, masks = [], [], []
    for (m, n), d in zip(shapes, dens, strict=True):
        bound = (6.0 / max(1.0, d * n)) ** 0.5
        mask = (torch.rand(m, n) < d).float()
        Ws.append(((torch.rand(m, n) * 2 - 1) * bound * mask).requires_grad_())
        bs.append(torch.zeros(m, requires_grad=True))
        masks.append(mask)
    opt = torch.optim.SGD([*Ws, *bs], lr=0.1, momentum=0.9, weight_decay=1e-4)
    xs, ys = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train.astype(np.int64))
    every = max(2, c["steps"] // max(c["updates"], 1))
    nb = xs.shape[0] // c["batch"]
    flags, times = [], []
    for step in range(c["warmup"] + c["steps"]):
        s0 = (step % nb) * c["batch"]
        xb, yb = xs[s0 : s0 + c["batch"]], ys[s0 : s0 + c["batch"]]
        is_update = step > 0 and step % every == 0
        t0 = time.perf_counter()
        h = xb
        for l, (W, b) in enumerate(zip(Ws, bs, strict=True)):
            h = h @ W.t() + b  # W is zero outside the mask
            if l < len(Ws) - 1:
                h = torch.relu(h)
        loss = torch.nn.functional.cross_entropy(h, yb)
        opt.zero_grad(set_to_none=False)
        loss.backward()
        with torch.no_grad():
            if is_update:
                for W, mk, d in zip(Ws, masks, dens, strict=True):
                    if d >= 1.0:
                        continue
                    k = int(0.3 * mk.sum().item())
                    before = mk.clone()
                    inf = torch.full_like(W, float("inf"))
                    drop = torch.topk(
                        torch.where(mk.bool(), W.abs(), inf).flatten(), k, largest=False
                    ).indices
                    mk.view(-1)[drop] = 0
                    grow = torch.topk(
                        torch.where(mk.bool(), -inf, W.grad.abs()).flatten(), k
                    ).indices
                    new = grow[before.view(-1)[grow] == 0]  # dropped and regrown: kept
                    mk.view(-1)[grow] = 1
                    W.view(-1)[new] = 0
                    buf = opt.state.get(W, {}).get("momentum_buffer")
                    if buf is not None:
                        buf.view(-1)[new] = 0
                    W.mul_(mk)
            else:
                for W, mk in zip(Ws, masks, strict=True):
                    W.grad.mul_(mk)
                opt.step()
                for W, mk in zip(Ws, masks, strict=True):
                    W.mul_(mk)
        dt = time.perf_counter() - t0
        if step >= c["warmup"]:
            times.append(dt)
            flags.append(is_update)
    n_dense = sum(m * n for m, n in shapes)
    bias = sum(m for m, _ in shapes)
    out = _summary(_classify(flags), times, c["delta_t"])
    out.update(
        nnz=int(sum(mk.sum().item() for mk in masks)),
        # weights, mask, gradient, momentum: all dense; biases with gradient and momentum
        state_bytes=4 * 4 * n_dense + 4 * 3 * bias,
        state_bytes_dense=4 * 3 * n_dense + 4 * 3 * bias,
        flops_per_step=_dense_flops(shapes, c["batch"]),
        flops_per_step_dense=_dense_flops(shapes, c["batch"]),
    )
    return out


def run_torch_sparse(c: dict, data, torch) -> dict:
    """Static sparse training in torch.sparse: CSR weights (int64 indices) whose values are the
    leaves autograd differentiates; SGD with momentum on the values. No topology updates: growing
    would need the dense gradient, which torch.sparse does not give."""
    from sparsecore import CSR

    torch.manual_seed(c["seed"])
    shapes, dens = _torch_layers(c, torch)
    layers = []
    rng = np.random.default_rng(c["seed"])
    for (m, n), d in zip(shapes, dens, strict=True):
        W = CSR.random((m, n), min(d, 1.0), seed=int(rng.integers(1 << 31)))
        bound = (6.0 / max(1.0, d * n)) ** 0.5
        vals = torch.from_numpy(rng.uniform(-bound, bound, W.nnz).astype(np.float32))
        vals.requires_grad_()
        crow = torch.from_numpy(W.indptr.astype(np.int64))
        col = torch.from_numpy(W.indices.astype(np.int64))
        layers.append((crow, col, vals, torch.zeros(m, 1, requires_grad=True), (m, n)))
    params = [p for L in layers for p in (L[2], L[3])]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4)
    xs = torch.from_numpy(np.ascontiguousarray(data.x_train.T))  # feature-major, as sparsecore
    ys = torch.from_numpy(data.y_train.astype(np.int64))
    nb = ys.shape[0] // c["batch"]
    times = []
    for step in range(c["warmup"] + c["steps"]):
        s0 = (step % nb) * c["batch"]
        xb, yb = xs[:, s0 : s0 + c["batch"]].contiguous(), ys[s0 : s0 + c["batch"]]
        t0 = time.perf_counter()
        h = xb
        for l, (crow, col, vals, b, shape) in enumerate(layers):
            W = torch.sparse_csr_tensor(crow, col, vals, size=shape)
            h = torch.sparse.mm(W, h) + b
            if l < len(layers) - 1:
                h = torch.relu(h)
        loss = torch.nn.functional.cross_entropy(h.t(), yb)
        opt.zero_grad(set_to_none=False)
        loss.backward()
        opt.step()
        dt = time.perf_counter() - t0
        if step >= c["warmup"]:
            times.append(dt)
    nnz = sum(L[2].numel() for L in layers)
    rows = sum(L[4][0] + 1 for L in layers)
    bias = sum(L[4][0] for L in layers)
    out = _summary(["normal"] * len(times), times, c["delta_t"])
    out.update(
        nnz=int(nnz),
        # values, gradient, momentum (float32); column indices and row pointers (int64)
        state_bytes=int(4 * 3 * nnz + 8 * (nnz + rows) + 4 * 3 * bias),
        state_bytes_dense=int(4 * 3 * sum(m * n for m, n in shapes) + 4 * 3 * bias),
        flops_per_step=_dense_flops([(nz, 1) for nz in [L[2].numel() for L in layers]], c["batch"]),
        flops_per_step_dense=_dense_flops(shapes, c["batch"]),
    )
    return out


def run(config: dict) -> dict:
    c = {**DEFAULTS, **config}
    if c["impl"] not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {c['impl']!r}")
    torch = None
    if c["impl"].startswith("torch"):
        import warnings

        import numba
        import torch

        warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
        torch.set_num_threads(numba.get_num_threads())
        torch.set_flush_denormal(True)  # as the engine does (TrainConfig.flush_denormals)
    data = data_for(c)
    impl = {"torch-masked": run_torch_masked, "torch-sparse": run_torch_sparse}.get(c["impl"])
    fn = (lambda cc: impl(cc, data, torch)) if impl else (lambda cc: run_engine(cc, data))
    # a tiny model first: loads the compiled kernels and the libraries' code, so the baseline
    # below holds them and the peak above it is the model's own memory
    tiny = [c["arch"][0], TINY_WIDTH, TINY_WIDTH, c["arch"][-1]]
    # (at most 90% sparse: a 16-wide layer at the measured model's sparsity may keep no
    # connection, which the config refuses)
    fn(
        {
            **c,
            "arch": tiny,
            "sparsity": min(c["sparsity"], 0.9),
            "steps": 4,
            "updates": 2,
            "warmup": 1,
        }
    )
    gc.collect()
    rss_base = current_rss_mib()
    res = fn(c)
    res["peak_rss_mib"] = rss_mib()
    res["base_rss_mib"] = rss_base  # interpreter + libraries + mapped data, before the model
    res["model_rss_mib"] = res["peak_rss_mib"] - rss_base
    res["config"] = c
    return res


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    print(json.dumps(run(json.loads(argv[0]))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
