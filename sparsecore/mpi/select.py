"""The exact distributed selection of a layer split by rows over the ranks (``RowShard``): the
global K smallest |w| or K largest grow scores, by a radix select over float32 bits with one
small allreduce per pass, never by gathering candidates."""

from __future__ import annotations

import numpy as np

from kernels import config
from kernels.formats import split_count
from sparsecore.mpi.runtime import rows_cols, split

_MOVED = {"OFFER_SHARE": "MPI_OFFER_SHARE", "OFFER_SLACK": "MPI_OFFER_SLACK"}
_MOVED["OFFER_GROWTH"] = "MPI_OFFER_GROWTH"


def __getattr__(name):  # the tunables' old names: read from their home, kernels/config.py
    if name in _MOVED:
        return getattr(config, _MOVED[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class RowShard:
    """Rows [r0, r1) of an m-row sparse layer on this rank, and the collectives that make a
    topology update of the rows equal to the whole layer's (sparsecore/rigl/updater.py).

    The global K smallest |w| (drop) or K largest scores (grow) are found by an exact
    distributed selection, never by gathering candidates: a radix select over the float32 bit
    patterns (non-negative floats order as their bits), 8 bits per pass, one allreduce of a
    256-bin histogram per pass (4 passes: 8 KiB), finds the K-th value; every entry strictly
    better is taken, and of the entries equal to it the first ones in the layer's order (rank
    order, then local order: CSR position for the drop, flat index for the grow, the kernels'
    own tie rule), by one allgather of the ranks' tie counts. Memory O(this rank's entries);
    bytes O(1) in nnz.
    """

    def __init__(self, comm, m: int):
        from mpi4py import MPI  # (only with several ranks)

        self.MPI = MPI
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.m = int(m)
        self.r0, self.r1 = split(self.m, self.size, self.rank)
        self.bytes = {"forward": 0, "backward": 0, "update": 0}  # payload received, per kind
        # selections run per kind (more than one per update: a rank's offer was saturated)
        self.rounds = {"drop": 0, "grow": 0}

    def counts(self, value: int) -> np.ndarray:
        """Every rank's ``value`` (int64), in rank order."""
        every = np.empty(self.size, np.int64)
        self.comm.Allgather(np.array([value], np.int64), every)
        self.bytes["update"] += every.nbytes
        return every

    def sums(self, values) -> list[int]:
        """Element-wise sums over the ranks of a few integers (one allreduce)."""
        return [int(v) for v in self._allreduce(np.array(values, np.int64))]

    def total(self, value: int) -> int:
        """The sum over the ranks of ``value`` (e.g. the layer's nnz from the shards')."""
        return int(self.counts(value).sum())

    def split(self, per_rank: np.ndarray, draws: int, rng) -> int:
        """This rank's share of ``draws`` positions drawn uniformly without replacement from
        the ranks' ``per_rank`` positions (the same generator on every rank: the same split)."""
        return int(split_count(per_rank, draws, rng)[self.rank])

    def _allreduce(self, a: np.ndarray) -> np.ndarray:
        self.comm.Allreduce(self.MPI.IN_PLACE, a, op=self.MPI.SUM)
        self.bytes["update"] += a.nbytes
        return a

    def select(self, values: np.ndarray, k: int, largest: bool) -> np.ndarray:
        """Positions (into ``values``, ascending) of this rank's entries among the k smallest
        (or largest) non-negative float32 values of all ranks, ties to the lower (rank, local
        position)."""
        keys = np.ascontiguousarray(values, np.float32).view(np.uint32)
        if largest:
            keys = ~keys  # larger float -> smaller key
        total = self.total(keys.shape[0])
        k = min(int(k), total)
        if k == 0:
            return np.empty(0, np.int64)
        prefix = np.uint32(0)
        need = k  # of the entries matching the prefix so far, how many are still to be taken
        match = keys
        for shift in (24, 16, 8, 0):
            digits = (match >> np.uint32(shift)) & np.uint32(0xFF)
            hist = self._allreduce(np.bincount(digits, minlength=256).astype(np.int64))
            cum = np.cumsum(hist)
            d = int(np.searchsorted(cum, need))  # the digit of the k-th smallest key
            need -= int(cum[d - 1]) if d else 0
            prefix |= np.uint32(d << shift)
            match = match[digits == d]
        pivot = prefix  # the k-th smallest key; `need` of the keys equal to it are taken
        less = np.flatnonzero(keys < pivot)
        equal = np.flatnonzero(keys == pivot)
        ties = self.counts(equal.shape[0])
        before = int(ties[: self.rank].sum())
        take = min(max(need - before, 0), equal.shape[0])
        return np.sort(np.concatenate([less, equal[:take]]))

    def offered(self, candidates, k: int, most: int, largest: bool, what: str) -> np.ndarray:
        """The keys of this rank's entries among the layer's k smallest (or largest) values.

        ``candidates(want)`` returns this rank's best ``want`` entries (at most ``most``) as
        (keys ascending, values): CSR positions and |w| for the drop, flat indices and scores
        for the grow. Each rank first offers ceil(SHARE·k/N) + SLACK (its share of the k if they
        spread evenly, with room for unevenness; kernels/config.py: MPI_OFFER_SHARE,
        MPI_OFFER_SLACK), not k, so its buffers are O(k/N). A rank whose offer was taken whole
        while it had more (saturated) may hold more of the k: it recomputes with
        MPI_OFFER_GROWTH times the offer and the selection is repeated until no rank is
        saturated. Then every rank's offer holds all of its entries among the k
        (an entry offered but not chosen ranks before everything that rank did not offer), so
        the result is exact."""
        share = -(-int(config.MPI_OFFER_SHARE * k) // self.size)
        want = min(most, max(1, share + config.MPI_OFFER_SLACK))
        keys, values = candidates(want)
        while True:
            chosen = self.select(values, k, largest)
            saturated = chosen.shape[0] == want and want < most
            self.rounds[what] += 1
            if not self.counts(int(saturated)).any():
                return keys[chosen]
            if saturated:
                # (want >= 1: a saturated offer was taken)
                want = min(most, config.MPI_OFFER_GROWTH * want)
                keys, values = candidates(want)

    def smallest_of(self, dev, data: np.ndarray, k: int) -> np.ndarray:
        """The drop: positions (ascending) of this rank's entries among the layer's k smallest
        |w| (|w| ascending, CSR position ascending: the drop kernel's order)."""

        def candidates(want):
            pos = np.sort(dev.drop(data, want))
            return pos, np.abs(data[pos])

        return self.offered(candidates, k, min(k, data.shape[0]), False, "drop")

    def largest_of(self, candidates, k: int, most: int, n: int):
        """The exact grow: ``candidates(want)`` gives this rank's best ``want`` absent entries
        (flat indices into its rows, scores); returns (rows, cols) of those among the layer's
        k highest scores (score descending, flat index ascending: the grow kernel's order)."""

        def sorted_candidates(want):
            flat, scores = candidates(want)
            order = np.argsort(flat, kind="stable")
            return flat[order], scores[order]

        return rows_cols(self.offered(sorted_candidates, k, most, True, "grow"), self.m, n)

    def largest(self, flat: np.ndarray, scores: np.ndarray, k: int, n: int):
        """The grow: of this rank's candidates (flat indices into its rows, ascending, and their
        scores), those among the layer's k highest (score descending, flat index ascending), as
        (rows, cols) of this rank's block."""
        order = np.argsort(flat, kind="stable")
        flat, scores = flat[order], scores[order]
        return rows_cols(flat[self.select(scores, k, largest=True)], self.m, n)
