"""The byte model of MPI training (what each collective moves) and the 32-bit count limits of
MPI libraries older than MPI-4."""

from __future__ import annotations

from sparsecore.mpi.runtime import split


def step_bytes(n_params: int) -> int:
    """Bytes of the per-step allreduce: every parameter's gradient (nnz per sparse weight, the
    biases, a dense layer's weights), the loss and the correct count, float32."""
    return 4 * (n_params + 2)


def update_bytes(shapes, ks, batch_size: int, ranks: int, rank: int = 0, candidates=None) -> int:
    """Bytes rank ``rank`` receives in one exact-RigL topology update of weighted layers of
    ``shapes`` [(m, n)] growing ``ks`` connections each: per layer the global batch's X
    (4·B·n, allgather), its block of dY's rows (4·B·m/N, all-to-all), the candidate counts
    (8·N) and the candidates (12 bytes each, at most k per rank: ``candidates`` gives the true
    total where a rank's block holds fewer than k absent entries); then the guard's two int64
    hashes per layer and rank (16·N·layers). Independent of nnz; never m·n."""
    total = 0
    for l, ((m, n), k) in enumerate(zip(shapes, ks, strict=True)):
        if k:
            r0, r1 = split(m, ranks, rank)
            c = ranks * k if candidates is None else candidates[l]
            total += 4 * batch_size * (n + r1 - r0) + 8 * ranks + 12 * c
    return total + 16 * ranks * len(shapes)


MAX_COUNT = 2**31 - 1  # MPI's counts and displacements are C ints


def check_counts(trainer, size: int, mpi_version=None):
    """With an MPI library older than MPI-4 (no large-count calls), refuse a run whose messages
    would exceed the C-int counts (elements) of MPI's calls: the data-parallel gradient buffer;
    a sharded layer's gathered outputs (m·B), dX (n·B) and its entries (a rank's, sent to rank
    0 in checkpoints: bounded by the layer's). Every rank computes the same limits, so all or
    none refuse. MPI-4 libraries (mpi4py uses their large-count calls) need no check."""
    if mpi_version is None:
        from mpi4py import MPI

        mpi_version = MPI.Get_version()
    if tuple(mpi_version) >= (4, 0):
        return
    B = trainer.cfg.batch_size
    checks = []
    if trainer.sharded:
        for layer in trainer.model.sparse_layers():
            if layer.shard is not None:
                m, n = layer.full_shape
                checks += [
                    (m * B, f"{layer.name}'s outputs for a batch (m·B)"),
                    (n * B, f"{layer.name}'s dX for a batch (n·B)"),
                    (layer.total_nnz(), f"{layer.name}'s entries"),
                ]
    else:
        total = sum(p.value.size for p in trainer.model.params()) + 2
        checks.append((total, "the gradients of all parameters (the per-step allreduce)"))
    for count, what in checks:
        if count > MAX_COUNT:
            raise ValueError(
                f"MPI message counts are 32-bit: {what} is {count:,} elements, above "
                f"{MAX_COUNT:,}; lower the batch size, or shard the layer over more ranks"
            )
