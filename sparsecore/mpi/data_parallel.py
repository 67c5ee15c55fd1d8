"""Data-parallel training: every rank holds the whole model and a slice of each global batch;
one allreduce per step; RigL's grow split by rows over the ranks (``DataParallelSelection``)."""

from __future__ import annotations

import numpy as np

from kernels import config
from kernels.cpu import sampled
from sparsecore.mpi.ranks import Ranks
from sparsecore.mpi.runtime import allgather_records, rows_cols, split
from sparsecore.rigl.selection import Local, exact_grow_checked


def __getattr__(name):  # the tunable's old name: read from its home, kernels/config.py
    if name == "SCORE_CHUNK_FLOATS":
        return config.MPI_SCORE_CHUNK_FLOATS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class DataParallelSelection(Local):
    """RigL's grow on data-parallel ranks: the exact top-k over the global batch (each rank
    scores a block of rows: DataParallel.exact_top_k), the sampled grow's scores summed over
    the ranks' columns (DataParallel.sampled_top_k). Drop and SET's draws act on identical
    weights with identical seeds: the local ones."""

    name = "data-parallel"

    def __init__(self, par):
        self.par = par

    def exact_grow(self, updater, layer, k, keep, step, index):
        flat = self.par.exact_top_k(updater, layer, k, keep) if k else np.empty(0, np.int64)
        return rows_cols(flat, *layer.W.shape)

    def sampled_grow(self, updater, layer, k, keep, step, index):
        flat = (
            self.par.sampled_top_k(updater, layer, k, keep, step, index)
            if k
            else np.empty(0, np.int64)
        )
        return rows_cols(flat, *layer.W.shape)


class DataParallel(Ranks):
    """One rank's side of data-parallel training (see the module header)."""

    def __init__(self, comm, batch_size: int, timeout: float = 0.0):
        super().__init__(comm, timeout)
        self.batch_size = int(batch_size)
        self.lo, self.hi = split(self.batch_size, self.size, self.rank)
        self.local_batch = self.hi - self.lo
        self.weight = self.local_batch / self.batch_size  # of this rank's mean loss
        parts = [split(self.batch_size, self.size, r) for r in range(self.size)]
        self.col_counts = np.array([h - l for l, h in parts], np.int64)  # B_r of every rank
        self._buf = None
        # bytes: payload (result size on one rank) of each collective
        self.step_bytes = 0  # of the last per-step allreduce
        self.steps = 0
        self.step_bytes_total = 0
        self.eval_bytes = 0

    def eval_sums(self, trainer, x, y):
        """This rank's contiguous part of the rows, then one allreduce of (correct, loss sum)."""
        lo, hi = split(x.shape[0], self.size, self.rank)
        self.beat()
        sums = np.array(trainer.eval_sums(x[lo:hi], y[lo:hi]), np.float64)
        self.comm.Allreduce(self.MPI.IN_PLACE, sums, op=self.MPI.SUM)
        self.eval_bytes += sums.nbytes
        self.beat()
        return float(sums[0]), float(sums[1])

    # -------------------------------------------------------------- per step
    def local_rows(self, idx: np.ndarray) -> np.ndarray:
        """This rank's contiguous slice of a global mini-batch's indices."""
        return idx[self.lo : self.hi]

    def allreduce(self, model, loss, correct):
        """Sum the ranks' gradients (each scaled by B_r/B) in place, with the loss and the count
        of correct predictions, in one allreduce; returns the global batch's (loss, correct)."""
        params = model.params()
        n = sum(p.grad.size for p in params) + 2
        buf = self._buf
        if buf is None or buf.shape[0] != n:
            buf = self._buf = np.empty(n, np.float32)
        w = np.float32(self.weight)
        o = 0
        for p in params:
            g = p.grad.reshape(-1)
            np.multiply(g, w, out=buf[o : o + g.shape[0]])
            o += g.shape[0]
        buf[o] = float(loss) * self.weight
        buf[o + 1] = correct
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)
        o = 0
        for p in params:
            g = p.grad.reshape(-1)
            g[...] = buf[o : o + g.shape[0]]
            o += g.shape[0]
        self.step_bytes = buf.nbytes
        self.steps += 1
        self.step_bytes_total += buf.nbytes
        return float(buf[o]), int(round(float(buf[o + 1])))

    # -------------------------------------------------------------- topology updates
    @property
    def selection(self):
        """The updater's selection strategy in this mode (RigL's grow over the global batch)."""
        return DataParallelSelection(self)

    def exact_top_k(self, updater, layer, k, keep) -> np.ndarray:
        """The global batch's top k absent entries of ``layer`` (ascending flat indices): rows
        split over the ranks, candidates merged."""
        W = layer.W
        m, n = W.shape
        X = self.gather_columns(layer.x)  # (n, B): the global batch's input
        r0, r1 = split(m, self.size, self.rank)
        dY = self.rows_of_columns(layer.dy, r0, r1)  # (r1 - r0, B), global-mean-loss scale
        lo, hi = int(W.indptr[r0]), int(W.indptr[r1])
        indptr = W.indptr[r0 : r1 + 1] - W.indptr[r0]
        block_keep = keep[lo:hi]
        absent = (r1 - r0) * n - int(np.count_nonzero(block_keep))
        rows, cols, scores = exact_grow_checked(
            layer, indptr, W.indices[lo:hi], block_keep, dY, X, min(k, absent), updater.tile_bytes
        )
        flat = (rows.astype(np.int64) + r0) * n + cols
        return self.merge_top_k(flat, scores, k)

    def sampled_top_k(self, updater, layer, k, keep, step, index) -> np.ndarray:
        """The k best of the sampled candidates, scored over the global batch (partial sums
        over each rank's columns, one allreduce): ascending flat indices."""
        W = layer.W
        m, n = W.shape
        rng = updater.rng(step, index)  # as RigL.grow: the same draws
        c = sampled.n_candidates(m, n, sampled.count_kept(W.indptr, keep), k, updater.candidates)
        flat = sampled.sample_absent(W.indptr, W.indices, keep, n, c, rng)
        partial = np.empty(c, np.float32)  # Σ_b dY[i, b]·X[j, b] over this rank's columns
        dy, x = layer.dy, layer.x
        w = np.float32(self.weight)
        chunk = max(1, config.MPI_SCORE_CHUNK_FLOATS // max(1, dy.shape[1]))
        for s in range(0, c, chunk):
            f = flat[s : s + chunk]
            i = f // n
            np.einsum("cb,cb->c", dy[i], x[f - i * n], out=partial[s : s + chunk])
        partial *= w
        self.comm.Allreduce(self.MPI.IN_PLACE, partial, op=self.MPI.SUM)
        self.other_bytes += partial.nbytes
        scores = np.abs(partial)
        if c > k:  # the k best, ties to the lower flat index (flat is ascending)
            order = np.lexsort((flat, -scores))[:k]
            flat = np.sort(flat[order])
        return flat

    def gather_columns(self, a: np.ndarray) -> np.ndarray:
        """(r, B_r) on each rank -> (r, B) on every rank: the global batch's columns, in order."""
        r = a.shape[0]
        counts = self.col_counts * r
        displs = np.concatenate(([0], np.cumsum(counts)[:-1]))
        out = np.empty((self.batch_size, r), np.float32)
        send = np.ascontiguousarray(a.T, dtype=np.float32)
        self.comm.Allgatherv(send, [out, counts.tolist(), displs.tolist(), self.MPI.FLOAT])
        self.other_bytes += out.nbytes
        return np.ascontiguousarray(out.T)

    def rows_of_columns(self, dy: np.ndarray, r0: int, r1: int) -> np.ndarray:
        """Rows [r0, r1) of the global dY (m, B), from every rank's columns (m, B_r) scaled by
        B_r/B: one all-to-all, each rank receiving only its block of rows."""
        m = dy.shape[0]
        local = np.ascontiguousarray(dy * np.float32(self.weight), dtype=np.float32)  # (m, B_r)
        blocks = [split(m, self.size, q) for q in range(self.size)]
        send_counts = np.array([(h - l) * self.local_batch for l, h in blocks])
        send_displs = np.array([l * self.local_batch for l, _ in blocks])
        recv_counts = (r1 - r0) * self.col_counts
        recv_displs = np.concatenate(([0], np.cumsum(recv_counts)[:-1]))
        recv = np.empty(int(recv_counts.sum()), np.float32)
        F = self.MPI.FLOAT
        self.comm.Alltoallv(
            [local, send_counts.tolist(), send_displs.tolist(), F],
            [recv, recv_counts.tolist(), recv_displs.tolist(), F],
        )
        self.other_bytes += recv.nbytes
        out = np.empty((r1 - r0, self.batch_size), np.float32)
        c0 = 0
        for s, bs in enumerate(self.col_counts):
            part = recv[recv_displs[s] : recv_displs[s] + recv_counts[s]]
            out[:, c0 : c0 + bs] = part.reshape(r1 - r0, bs)
            c0 += bs
        return out

    def merge_top_k(self, flat: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
        """The global top k of every rank's candidates (score descending, flat index ascending),
        as ascending flat indices: the fused kernel's own order, so the result is exact."""
        every = allgather_records(self.comm, {"score": scores, "flat": flat})
        self.other_bytes += 8 * self.size + every.nbytes
        if self.update_candidates:
            self.update_candidates[-1].append(every.shape[0])
        order = np.lexsort((every["flat"], -every["score"]))[:k]
        return np.sort(every["flat"][order])

    def describe(self) -> str:
        """One line for the command line's report."""
        per_update = np.mean(self.update_bytes) if self.update_bytes else 0.0
        return (
            f"{self.size} ranks (local batch {self.local_batch}), {self.step_bytes / 1e3:.1f} kB "
            f"per step (one allreduce), {per_update / 1e6:.2f} MB per topology update "
            f"({len(self.update_bytes)} updates)" + self.describe_memory()
        )

    def stats(self) -> dict:
        """Bytes communicated (payload of each collective, counted on this rank)."""
        return {
            "ranks": self.size,
            "mode": "data-parallel",
            "memory": getattr(self, "memory", None),
            "eval_bytes": self.eval_bytes,
            "local_batch": self.local_batch,
            "step_bytes": self.step_bytes,
            "steps": self.steps,
            "step_bytes_total": self.step_bytes_total,
            "update_bytes": list(self.update_bytes),
            "update_candidates": list(self.update_candidates),
            "other_bytes": self.other_bytes,
        }
