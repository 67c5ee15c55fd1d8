"""Dynamic sparse training: RigL and its baselines (SET, static), as small pieces."""

from sparsecore.rigl.distributions import erk_densities, layer_densities, uniform_densities
from sparsecore.rigl.schedule import UpdateSchedule
from sparsecore.rigl.updater import SET, RigL, Static, TopologyUpdater, UpdateReport

__all__ = [
    "RigL",
    "SET",
    "Static",
    "TopologyUpdater",
    "UpdateReport",
    "UpdateSchedule",
    "erk_densities",
    "layer_densities",
    "uniform_densities",
]
