"""What a run costs: parameters, bytes of training state and FLOPs per step, sparse vs dense."""

from __future__ import annotations

from sparsecore.layers import SparseLinear


def model_cost(
    model,
    batch: int,
    optimizer=None,
    schedule=None,
    total_steps: int = 0,
    method: str = "rigl",
    grow: str = "exact",
    grow_candidates: float = 10,
) -> dict:
    """Analytical costs of one training step of ``model`` at a batch size, beside the same
    architecture trained densely with the same optimizer.

    FLOPs count multiply-adds as 2: forward 2·nnz·B per layer; backward 2·nnz·B for dW (SDDMM)
    plus 2·nnz·B for dX (none for the first layer); RigL's exact grow costs 2·m·n·B per layer per
    update, the sampled grow 2·C·B with C = grow_candidates·k candidates (k = the update's drop
    fraction × nnz), both amortised over the run's steps. Bytes count every array of training
    state: values, indices, indptr, the transpose structure, gradients and optimizer moments
    (activations are batch-sized and the same for both, so left out).
    """
    n_moments = len(getattr(optimizer, "state_names", ())) if optimizer is not None else 1
    out = {
        "params": 0,
        "params_dense": 0,
        "state_bytes": 0,
        "state_bytes_dense": 0,
        "flops_per_step": 0.0,
        "flops_per_step_dense": 0.0,
        "layers": [],
    }
    rigl = schedule is not None and method == "rigl"
    n_updates = schedule.n_updates() if rigl else 0
    # drop fractions of the updates: the sampled grow scores min(c·k, |absent|) candidates, with
    # k = floor(f·nnz) and |absent| = m·n - nnz + k (dropped connections may be regrown)
    fractions = (
        [
            schedule.drop_fraction(t)
            for t in range(schedule.delta_t, schedule.t_end, schedule.delta_t)
        ]
        if rigl
        else []
    )
    for l, layer in enumerate(model.weighted()):
        m, n = getattr(layer, "full_shape", layer.shape)  # a shard's: the whole layer's
        dense_w = m * n
        first = l == 0
        dense_compute = getattr(layer, "compute", "sparse") == "dense"
        if isinstance(layer, SparseLinear):
            nnz = layer.total_nnz()
            it = layer.W.indices.itemsize
            state = (
                4 * nnz * (3 + n_moments)  # values, gradient, dX scratch, moments
                + it * nnz
                + it * (m + 1)  # indices, indptr
                + it * (2 * nnz + n + 1)
            )  # transpose structure: indices, perm, indptr
            if dense_compute:  # the dense fallback: a dense copy of W and dW's scratch
                state += layer.dense_bytes()
        else:
            nnz = dense_w
            state = 4 * dense_w * (2 + n_moments)
        bias = 4 * m * (2 + n_moments)
        fwd_d = 2.0 * dense_w * batch
        fwd = fwd_d if dense_compute else 2.0 * nnz * batch  # (BLAS does the zeros too)
        bwd = fwd * (1 if first else 2)
        bwd_d = fwd_d * (1 if first else 2)
        if not isinstance(layer, SparseLinear):
            grow = 0.0
        elif grow == "sampled":
            cands = 0.0
            for f in fractions:
                k = int(f * nnz)
                cands += min(grow_candidates * k, dense_w - nnz + k)
            grow = 2.0 * cands * batch / max(total_steps, 1)
        else:
            grow = 2.0 * dense_w * batch * n_updates / max(total_steps, 1)
        out["layers"].append(
            {
                "shape": [m, n],
                "nnz": nnz,
                "density": nnz / dense_w,
                # a sparse layer's products: the kernels, or BLAS (the dense fallback)
                "compute": ("dense" if dense_compute else "sparse")
                if isinstance(layer, SparseLinear)
                else None,
                "state_bytes": state + bias,
                "flops_per_step": fwd + bwd + grow,
            }
        )
        out["params"] += nnz + m
        out["params_dense"] += dense_w + m
        out["state_bytes"] += state + bias
        out["state_bytes_dense"] += 4 * dense_w * (2 + n_moments) + bias
        out["flops_per_step"] += fwd + bwd + grow
        out["flops_per_step_dense"] += fwd_d + bwd_d
        out["grow_flops_per_step"] = out.get("grow_flops_per_step", 0.0) + grow
    return out


def held_bytes(model, optimizer=None) -> int:
    """Bytes of training state the process holds, summed from the arrays themselves: weights,
    indices, indptr, the transpose structure once built, gradients, the dX scratch, biases and
    optimizer moments (of a sharded layer: this rank's rows)."""
    held = optimizer.state_bytes() if optimizer is not None else 0
    for layer in model.weighted():
        if isinstance(layer, SparseLinear):  # (a CSR on the host, a DeviceCSR on a GPU)
            W = layer.W
            held += W.indptr.nbytes + W.indices.nbytes + W.data.nbytes + layer.gW.nbytes
            held += sum(a.nbytes for a in W._cache.get("T", ()))  # the transpose, once built
            held += layer._t_data.nbytes if layer._t_data is not None else 0
            for a in (layer._dense, layer._dense_grad):  # the dense fallback's, if any
                held += a.nbytes if a is not None else 0
        else:
            held += layer.W.nbytes + layer.gW.nbytes
        held += layer.b.nbytes + layer.gb.nbytes
    return int(held)


def describe(cost: dict) -> str:
    def mib(b):
        return f"{b / 2**20:.2f} MiB"

    c = cost
    p, pd = c["params"], c["params_dense"]
    s, sd = c["state_bytes"], c["state_bytes_dense"]
    f, fd = c["flops_per_step"] / 1e6, c["flops_per_step_dense"] / 1e6
    grow = c.get("grow_flops_per_step", 0) / 1e6
    n_dense = sum(1 for layer in c["layers"] if layer.get("compute") == "dense")
    fallback = (
        f"; {n_dense} sparse layer(s) computed on dense BLAS (dense fallback)" if n_dense else ""
    )
    return (
        f"parameters {p:,} vs dense {pd:,} ({p / pd:.1%}); "
        f"training state {mib(s)} vs dense {mib(sd)} ({s / sd:.1%}); "
        f"FLOPs/step {f:.1f} M vs dense {fd:.1f} M ({f / fd:.1%}, grow amortised {grow:.1f} M)"
        f"{fallback}"
    )


__all__ = ["model_cost", "describe", "held_bytes"]
