"""One rank of the sharded-layer test (tests/test_mpi.py): every rank builds the same model
twice from one seed, keeps one whole (the reference, computed on this rank alone) and shards the
other's sparse layers by rows over the ranks (ShardedSparseLinear); both train on the same
batches with SGD and RigL updates (exact grow). The sharded layers, gathered, must equal the
reference: the same topology after every update, values and losses to float32 tolerance.
Writes OUT/rank<r>.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sparsecore  # noqa: E402,F401
from kernels import config  # noqa: E402
from sparsecore.layers import Sequential, SoftmaxCrossEntropy, SparseLinear, mlp  # noqa: E402
from sparsecore.mpi import RowShardedSelection, ShardedSparseLinear, world  # noqa: E402
from sparsecore.optim import SGD  # noqa: E402
from sparsecore.rigl import SET, RigL, UpdateSchedule  # noqa: E402


def select_cases(comm) -> list:
    """RowShard.select against a sort of every rank's values (heavy ties: small integers, and
    zeros), smallest and largest, for k from 0 to past the total: returns the failures."""
    from sparsecore.mpi import RowShard, allgather_records

    shard = RowShard(comm, 64)
    rank = comm.Get_rank()
    rng = np.random.default_rng(100 + rank)
    values = rng.integers(0, 4, size=5 + 3 * rank).astype(np.float32) * np.float32(0.25)
    every = allgather_records(comm, {"v": values, "pos": np.arange(values.shape[0])})
    rank_of = np.repeat(np.arange(comm.Get_size()), [5 + 3 * r for r in range(comm.Get_size())])
    offset = int(np.searchsorted(rank_of, rank))
    failures = []
    for largest in (False, True):
        for k in range(0, every.shape[0] + 2):
            got = shard.select(values, k, largest)
            key = -every["v"] if largest else every["v"]
            order = np.lexsort((np.arange(every.shape[0]), key))[:k]  # ties: rank, position
            want = np.sort(order[rank_of[order] == rank] - offset)
            if not np.array_equal(got, want):
                failures.append([largest, k, got.tolist(), want.tolist()])
    return failures


def random_grow_cases(comm, sizes, dens) -> list:
    """SET and the sampled RigL grow on sharded layers: each update keeps every layer's nnz,
    grows exactly k new-or-regrown connections in valid (canonical) rows; returns failures."""
    failures = []
    sharded_rows = RowShardedSelection()
    for updater in (
        SET(UpdateSchedule(t_end=20, delta_t=2, alpha=0.3), seed=1, selection=sharded_rows),
        RigL(
            UpdateSchedule(t_end=20, delta_t=2, alpha=0.3),
            seed=1,
            grow="sampled",
            selection=sharded_rows,
        ),
    ):
        model = Sequential(
            [
                ShardedSparseLinear.shard_of(l, comm) if isinstance(l, SparseLinear) else l
                for l in mlp(sizes, dens, seed=5).layers
            ]
        )
        opt = SGD(model.params(), lr=0.05, momentum=0.9)
        rng = np.random.default_rng(9)
        for step in range(8):
            x = rng.standard_normal((sizes[0], 32)).astype(np.float32)
            y = rng.integers(0, sizes[-1], 32)
            _, dlogits, _ = SoftmaxCrossEntropy()(model.forward(x), y)
            model.backward(dlogits)
            before = [l.total_nnz() for l in model.sparse_layers()]
            if updater.is_update_step(step):
                report = updater.update(step, model, opt)
                for d, nnz in zip(report.per_layer, before, strict=True):
                    if d["nnz"] != nnz or d["grown"] != int(
                        updater.schedule.drop_fraction(step) * nnz
                    ):
                        failures.append([updater.name, step, d])
                for l in model.sparse_layers():
                    l.gather()  # builds a validated CSR: sorted, no duplicate, in range
            else:
                opt.step()
    return failures


def main():
    out = Path(sys.argv[1])
    comm = world()
    if len(sys.argv) > 2 and sys.argv[2] == "tight":
        # each rank first offers k/20 (at least 1) drop and grow candidates: the saturated ranks' retries
        config.MPI_OFFER_SHARE, config.MPI_OFFER_SLACK = 0.05 * comm.Get_size(), 0
    sizes, dens = [96, 64, 48, 10], [0.2, 0.3, 0.5]
    ref = mlp(sizes, dens, seed=3)
    sharded = Sequential(
        [
            ShardedSparseLinear.shard_of(l, comm) if isinstance(l, SparseLinear) else l
            for l in mlp(sizes, dens, seed=3).layers
        ]
    )
    opts = [SGD(m.params(), lr=0.05, momentum=0.9, weight_decay=1e-4) for m in (ref, sharded)]
    schedule = UpdateSchedule(t_end=20, delta_t=4, alpha=0.3)
    updaters = [RigL(schedule, seed=0), RigL(schedule, seed=0, selection=RowShardedSelection())]
    loss_fn = SoftmaxCrossEntropy()
    rng = np.random.default_rng(7)
    teacher = rng.standard_normal((10, sizes[0]))
    losses, topology_same, max_diff = [], [], 0.0
    for step in range(24):
        x = rng.standard_normal((sizes[0], 64)).astype(np.float32)
        y = np.argmax(teacher @ x, axis=0)
        pair = []
        for model, opt, upd in zip((ref, sharded), opts, updaters, strict=True):
            loss, dlogits, _ = loss_fn(model.forward(x), y)
            model.backward(dlogits)
            if schedule.is_update_step(step):
                upd.update(step, model, opt)
            else:
                opt.step()
            pair.append(loss)
        losses.append(pair)
        if schedule.is_update_step(step) or step == 23:
            same = []
            for a, b in zip(ref.sparse_layers(), sharded.sparse_layers(), strict=True):
                W, bias = b.gather()
                same.append(
                    bool(
                        np.array_equal(a.W.indptr, W.indptr)
                        and np.array_equal(a.W.indices, W.indices)
                    )
                )
                if same[-1]:
                    max_diff = max(max_diff, float(np.abs(a.W.data - W.data).max()))
                    max_diff = max(max_diff, float(np.abs(a.b - bias).max()))
            topology_same.append([step, same])
    rank = comm.Get_rank()
    try:
        sharded.to_scipy()
        to_scipy_refused = False
    except ValueError as e:
        to_scipy_refused = "sharded over MPI ranks" in str(e)
    select_failures = select_cases(comm)
    random_failures = random_grow_cases(comm, sizes, dens)
    local_nnz = [int(l.W.nnz) for l in sharded.sparse_layers()]
    rounds = [l.shard.rounds for l in sharded.sparse_layers()]
    full_nnz = [int(l.W.nnz) for l in ref.sparse_layers()]
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(
        json.dumps(
            {
                "losses": losses,
                "topology_same": topology_same,
                "max_diff": max_diff,
                "local_nnz": local_nnz,
                "full_nnz": full_nnz,
                "rounds": rounds,
                "to_scipy_refused": to_scipy_refused,
                "select_failures": select_failures,
                "random_grow_failures": random_failures,
            }
        )
    )


if __name__ == "__main__":
    main()
