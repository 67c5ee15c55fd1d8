"""Layers split by rows over the ranks: ``ShardedSparseLinear`` (this rank's rows), its
selection strategy (``RowShardedSelection``: a topology update equal to the whole layer's) and
the mode's side of training (``ShardedParallel``)."""

from __future__ import annotations

import numpy as np

from kernels.cpu import sampled as _sampled
from kernels.formats import CSR
from sparsecore.device import to_host
from sparsecore.layers import INIT_TAG, SparseLinear, sparse_init
from sparsecore.mpi.ranks import Ranks
from sparsecore.mpi.runtime import allgather_records, split
from sparsecore.mpi.select import RowShard
from sparsecore.rigl.selection import Local, exact_grow_checked


class RowShardedSelection(Local):
    """Topology updates of layers whose rows are spread over the ranks (``layer.shard`` set),
    equal to the whole layer's: K = floor(f·nnz) of the whole layer; the drop takes the global
    K smallest |w| and RigL's exact grow the global top K of |dY·Xᵀ| by the exact distributed
    selection of RowShard.offered (each rank offers about 1.5·K/N candidates, more if needed),
    in the kernels' order; SET and the sampled grow split their K (or C) uniform draws over the
    ranks by the ranks' absent counts (the same distribution as one process's draws, not the
    same draws). Layers that are not sharded are updated as by ``Local``."""

    name = "row-sharded"

    def check(self, model):
        """Sharded and whole layers may mix: each is updated its way."""

    def total(self, layer, value):
        return value if layer.shard is None else layer.shard.total(value)

    def sums(self, layer, values):
        return values if layer.shard is None else layer.shard.sums(values)

    def drop(self, updater, layer, k):
        if layer.shard is None:
            return super().drop(updater, layer, k)
        return layer.shard.smallest_of(layer.dev, layer.W.data, k)

    def exact_grow(self, updater, layer, k, keep, step, index):
        if layer.shard is None:
            return super().exact_grow(updater, layer, k, keep, step, index)
        W, shard = layer.W, layer.shard
        m, n = W.shape
        absent = m * n - _sampled.count_kept(W.indptr, keep)

        def candidates(want):  # this rank's best `want` absent entries (fused top-k)
            rows, cols, scores = exact_grow_checked(
                layer, W.indptr, W.indices, keep, layer.dy, layer.x, want, updater.tile_bytes
            )
            return rows.astype(np.int64) * n + cols, scores

        return shard.largest_of(candidates, k, min(k, absent), n)

    def sampled_grow(self, updater, layer, k, keep, step, index):
        if layer.shard is None:
            return super().sampled_grow(updater, layer, k, keep, step, index)
        W, shard = layer.W, layer.shard
        m, n = W.shape
        absents = shard.counts(m * n - _sampled.count_kept(W.indptr, keep))
        total_m = shard.m  # C candidates over the layer, split over the ranks by absent counts
        c = _sampled.n_candidates(
            total_m, n, total_m * n - int(absents.sum()), k, updater.candidates
        )
        mine = shard.split(absents, c, updater.rng(step, index))
        rng = updater.rng(step, index, 1, shard.rank)
        flat = _sampled.sample_absent(W.indptr, W.indices, keep, n, mine, rng)
        scores = _sampled.score_at(flat, n, layer.dy, layer.x, np.empty(mine, np.float32))
        return shard.largest(flat, scores, k, n)

    def uniform_grow(self, updater, layer, k, keep, step, index):
        if layer.shard is None:
            return super().uniform_grow(updater, layer, k, keep, step, index)
        W, shard = layer.W, layer.shard
        m, n = W.shape
        rng = updater.rng(step, index)
        indptr, indices, keep = map(to_host, (W.indptr, W.indices, keep))
        k = shard.split(shard.counts(m * n - _sampled.count_kept(indptr, keep)), k, rng)
        rng = updater.rng(step, index, 1, shard.rank)  # this rank's share of the k draws
        flat = _sampled.sample_absent(indptr, indices, keep, n, k, rng)
        rows = flat // np.int64(n)
        return layer.dev.asarray(rows), layer.dev.asarray(flat - rows * np.int64(n))


def shard_builder(comm, sharded, seed: int, fan_in: str):
    """For layers.mlp: builds layer l (when in ``sharded``) as this rank's rows only, drawn by
    sparse_init's row blocks: the same values as those rows of the whole layer."""

    def build(l, n_in, n_out, density):
        if l not in sharded:
            return None
        rows = split(n_out, comm.Get_size(), comm.Get_rank())
        W = sparse_init(n_in, n_out, density, [seed, INIT_TAG, l], fan_in=fan_in, rows=rows)
        return ShardedSparseLinear(W, None, f"fc{l}", comm, n_out)

    return build


class ShardedParallel(Ranks):
    """One rank's side of training with sharded layers (ShardedSparseLinear): every rank runs
    every mini-batch whole; the sharded layers' collectives (forward allgather, backward
    allreduce, the updates' selections) do the exchanging, so there is nothing to reduce per
    step. Bytes per step: Σ over sharded layers of 4·m·B (forward) + 4·n·B (backward, none
    for the first layer)."""

    sharded = True

    def __init__(self, comm, timeout: float = 0.0):
        super().__init__(comm, timeout)
        self.p2p = comm.Dup()  # checkpoint traffic (point to point), apart from the world's
        self.model = None
        self.step_bytes = 0
        self.steps = 0
        self.step_bytes_total = 0
        self.eval_bytes = 0
        self._seen = 0

    @property
    def selection(self):
        """The updater's selection strategy in this mode."""
        return RowShardedSelection()

    def local_rows(self, idx: np.ndarray) -> np.ndarray:
        return idx  # the whole batch on every rank

    def allreduce(self, model, loss, correct):
        """Nothing to reduce (every rank computed the whole batch); counts the step's bytes."""
        total = self._step_traffic(model)
        self.step_bytes = total - self._seen
        self._seen = total
        self.steps += 1
        self.step_bytes_total += self.step_bytes
        return loss, correct

    def eval_sums(self, trainer, x, y):
        """Every rank evaluates every row (the sharded forward is a collective); its bytes are
        counted apart from the steps'."""
        self.beat()
        before = self._step_traffic(trainer.model)
        out = trainer.eval_sums(x, y)
        spent = self._step_traffic(trainer.model) - before
        self._seen += spent
        self.eval_bytes += spent
        self.beat()
        return out

    @staticmethod
    def _step_traffic(model) -> int:
        return sum(
            l.shard.bytes["forward"] + l.shard.bytes["backward"]
            for l in model.sparse_layers()
            if l.shard is not None
        )

    def describe(self) -> str:
        per_update = np.mean(self.update_bytes) if self.update_bytes else 0.0
        return (
            f"{self.size} ranks, sharded layers, {self.step_bytes / 1e3:.1f} kB per step "
            f"(forward allgathers + backward allreduces), {per_update / 1e3:.1f} kB per "
            f"topology update ({len(self.update_bytes)} updates)" + self.describe_memory()
        )

    def stats(self) -> dict:
        return {
            "ranks": self.size,
            "mode": "sharded",
            "memory": getattr(self, "memory", None),
            "step_bytes": self.step_bytes,
            "steps": self.steps,
            "step_bytes_total": self.step_bytes_total,
            "eval_bytes": self.eval_bytes,
            "update_bytes": list(self.update_bytes),
            "other_bytes": self.other_bytes,
            # selections per sharded layer (drop, grow): more than the updates when a rank's
            # first offer was saturated and it offered again
            "rounds": {
                l.name: dict(l.shard.rounds)
                for l in (self.model.sparse_layers() if self.model is not None else [])
                if l.shard is not None
            },
        }


class ShardedSparseLinear(SparseLinear):
    """Rows [r0, r1) of an m × n sparse layer, on this rank: its weights, indices, bias,
    gradients and optimizer state are those rows only (memory ≈ 1/N of the layer).

    forward: this rank's rows of y = W·x + b (x, n × B, is on every rank), then one allgather
    of the rows: every rank holds y (m × B; 4·m·B bytes). backward: dW and db of its rows from
    its rows of dY, and the partial dX = W_rowsᵀ·dY_rows (through the feeding ReLU's gate, which
    is elementwise and so commutes with the sum), summed over the ranks by one allreduce
    (4·n·B bytes; none for the first layer, whose dX nobody needs). Every rank runs the whole
    batch; layers that are not sharded (ReLUs, a dense classifier) are replicated and compute
    the same on every rank. A topology update goes through ``shard`` (RowShard), so the result
    equals the unsharded layer's.
    """

    def __init__(self, W_rows, bias, name, comm, m: int):
        super().__init__(W_rows, bias, name)
        self.shard = RowShard(comm, m)
        self.comm = comm
        self.m = int(m)
        self.r0, self.r1 = self.shard.r0, self.shard.r1
        if W_rows.shape[0] != self.r1 - self.r0:
            raise ValueError(
                f"{name}: rank {comm.Get_rank()} holds rows [{self.r0}, {self.r1}) of {m}, "
                f"got a block of {W_rows.shape[0]} rows"
            )

    @classmethod
    def shard_of(cls, layer, comm) -> ShardedSparseLinear:
        """This rank's rows of a whole SparseLinear (copied)."""
        W = layer.W
        m, n = W.shape
        r0, r1 = split(m, comm.Get_size(), comm.Get_rank())
        lo, hi = int(W.indptr[r0]), int(W.indptr[r1])
        rows = CSR(
            W.indptr[r0 : r1 + 1] - W.indptr[r0],
            W.indices[lo:hi].copy(),
            W.data[lo:hi].copy(),
            (r1 - r0, n),
        )
        return cls(rows, layer.b[r0:r1].copy(), layer.name, comm, m)

    def _row_counts(self, per_row: int):
        size = self.comm.Get_size()
        parts = [split(self.m, size, r) for r in range(size)]
        return [(h - l) * per_row for l, h in parts], [l * per_row for l, _ in parts]

    @property
    def full_shape(self) -> tuple[int, int]:
        return self.m, self.W.shape[1]

    def total_nnz(self) -> int:
        return self.shard.total(self.W.nnz)

    def forward(self, x, relu: bool = False):
        MPI = self.shard.MPI
        mine = super().forward(x, relu)  # (r1 - r0, B)
        y = np.empty((self.m, x.shape[1]), np.float32)
        counts, displs = self._row_counts(x.shape[1])
        self.comm.Allgatherv(mine, [y, counts, displs, MPI.FLOAT])
        self.shard.bytes["forward"] += y.nbytes
        return y

    def backward(self, dy, need_dx=True, gate=None):
        MPI = self.shard.MPI
        dx = super().backward(np.ascontiguousarray(dy[self.r0 : self.r1]), need_dx, gate)
        if dx is not None:
            self.comm.Allreduce(MPI.IN_PLACE, dx, op=MPI.SUM)
            self.shard.bytes["backward"] += dx.nbytes
        return dx

    def gather(self):
        """The whole layer (CSR, bias) on every rank: for tests (the whole layer's memory)."""
        W = self.W
        every = allgather_records(
            self.comm,
            {"row": W.row_ids().astype(np.int64) + self.r0, "col": W.indices, "w": W.data},
        )
        b = np.empty(self.m, np.float32)
        MPI = self.shard.MPI
        counts, displs = self._row_counts(1)
        self.comm.Allgatherv(self.b, [b, counts, displs, MPI.FLOAT])
        indptr = np.zeros(self.m + 1, W.indptr.dtype)
        np.cumsum(np.bincount(every["row"], minlength=self.m), out=indptr[1:])
        full = CSR(indptr, every["col"].astype(W.indices.dtype), every["w"], (self.m, W.shape[1]))
        return full, b
