"""When topology updates happen and how much they change (RigL's Algorithm 1)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class UpdateSchedule:
    """Update at steps t with t % delta_t == 0 and 0 < t < t_end.

    Drop fraction f(t) = alpha/2·(1 + cos(π·t/t_end)) ("cosine", the paper's default) or alpha
    ("constant"). With n connections in a layer, an update drops and grows K = floor(f(t)·n).
    """

    t_end: int
    delta_t: int = 100
    alpha: float = 0.3
    decay: str = "cosine"

    def __post_init__(self):
        if not isinstance(self.delta_t, int) or self.delta_t <= 0:
            raise ValueError(f"delta_t (ΔT) must be a positive integer, got {self.delta_t!r}")
        if not isinstance(self.t_end, int) or self.t_end < 0:
            raise ValueError(f"t_end must be a non-negative integer, got {self.t_end!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha!r}")
        if self.decay not in ("cosine", "constant"):
            raise ValueError(f"decay must be 'cosine' or 'constant', got {self.decay!r}")

    @classmethod
    def for_training(cls, total_steps: int, *, end_fraction: float = 0.75, **kw) -> UpdateSchedule:
        if not 0.0 <= end_fraction <= 1.0:
            raise ValueError(f"end_fraction (T_end) must be in [0, 1], got {end_fraction!r}")
        return cls(t_end=int(end_fraction * total_steps), **kw)

    def is_update_step(self, t: int) -> bool:
        return 0 < t < self.t_end and t % self.delta_t == 0

    def drop_fraction(self, t: int) -> float:
        if self.decay == "constant":
            return self.alpha
        return self.alpha / 2.0 * (1.0 + math.cos(math.pi * t / self.t_end))

    def n_updates(self) -> int:
        return max(0, (self.t_end - 1) // self.delta_t)
