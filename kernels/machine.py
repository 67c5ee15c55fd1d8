"""The machine's data caches, read once: what the kernels' cache-aware choices and the roofline
level of the benchmarks (sparsecore/benchmarks/roofline.py) size themselves from.

``cache_sizes()`` reads Linux sysfs (cpu0's cache/index*), else ``getconf``, else defaults
marked as assumed. kernels/config.py's cache-derived tunables read it at call time; a user can
override them there.
"""

from __future__ import annotations

import math
import os
import subprocess
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

SYSFS_CACHE = "/sys/devices/system/cpu/cpu0/cache"
ASSUMED = dict(l1d=32 << 10, l2=1 << 20, l3=32 << 20)  # when the machine does not say


@dataclass(frozen=True)
class CacheSizes:
    """Data-cache sizes in bytes, per instance (one L1d per core, an L3 per chiplet or socket),
    with the number of logical CPUs sharing one instance. ``source``: "sysfs", "getconf" or
    "assumed" (defaults: the machine said nothing)."""

    l1d: int
    l2: int
    l3: int  # 0: no L3
    l1d_shared: int = 1
    l2_shared: int = 1
    l3_shared: int = 1
    cpus: int = 1
    source: str = "assumed"
    line: int = 64  # bytes of the L1d's cache line (coherency_line_size), 64 when unsaid

    def total(self, level: int) -> int:
        """Bytes of that level over the whole machine (instances = CPUs / CPUs per instance)."""
        size, shared = {1: (self.l1d, self.l1d_shared), 2: (self.l2, self.l2_shared),
                        3: (self.l3, self.l3_shared)}[level]  # fmt: skip
        return size * max(1, math.ceil(self.cpus / max(1, shared)))

    @property
    def llc(self) -> int:
        """Bytes of the last-level cache over the machine (L3, or L2 without an L3)."""
        return self.total(3) if self.l3 else self.total(2)

    @property
    def assumed(self) -> bool:
        return self.source == "assumed"

    def level_of(self, nbytes: int) -> str:
        """The smallest level an operand of ``nbytes`` fits in whole ("L1", "L2", "L3", "DRAM"):
        L1 and L2 per instance (one core's view), L3 over the machine."""
        if nbytes <= self.l1d:
            return "L1"
        if nbytes <= self.l2:
            return "L2"
        if self.l3 and nbytes <= self.total(3):
            return "L3"
        return "DRAM"

    def as_dict(self) -> dict:
        return dict(asdict(self), llc=self.llc, assumed=self.assumed)


def parse_size(text: str) -> int:
    """sysfs cache sizes: "32K", "1024K", "32M", "1G" or plain bytes."""
    t = text.strip().upper().removesuffix("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    return int(t[:-1] if scale != 1 else t) * scale


def parse_cpu_list(text: str) -> int:
    """How many CPUs a sysfs list names ("0", "0-1", "0-3,8-11")."""
    n = 0
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n


def _read_sysfs(root: Path) -> dict | None:
    found = {}
    for d in sorted(root.glob("index*")):
        try:
            level = int((d / "level").read_text())
            kind = (d / "type").read_text().strip()
            size = parse_size((d / "size").read_text())
        except (OSError, ValueError):
            continue  # an unreadable index: the others may still say enough
        if kind == "Instruction" or level not in (1, 2, 3):
            continue
        try:
            shared = parse_cpu_list((d / "shared_cpu_list").read_text())
        except (OSError, ValueError):
            shared = 1
        name = "l1d" if level == 1 else f"l{level}"
        found[name] = size
        if level == 1:
            try:
                line = int((d / "coherency_line_size").read_text())
                if line in (32, 64, 128, 256):
                    found["line"] = line
            except (OSError, ValueError):
                pass
        found[f"{name}_shared"] = max(1, shared)
    return found if found.get("l1d") else None


def _read_getconf() -> dict | None:
    found = {}
    for name, var in (("l1d", "LEVEL1_DCACHE_SIZE"), ("l2", "LEVEL2_CACHE_SIZE"),
                      ("l3", "LEVEL3_CACHE_SIZE")):  # fmt: skip
        try:
            out = subprocess.run(
                ["getconf", var], capture_output=True, text=True, check=False, timeout=5
            ).stdout.strip()
            if int(out) > 0:
                found[name] = int(out)
        except (OSError, ValueError, subprocess.SubprocessError):
            continue
    return found if found.get("l1d") else None


@lru_cache(maxsize=8)
def cache_sizes(root: str | None = SYSFS_CACHE, getconf: bool = True) -> CacheSizes:
    """The machine's data caches, read once: sysfs under ``root`` (Linux), else ``getconf``
    (glibc; sharing unknown: L1/L2 taken per CPU, L3 as one instance), else ``ASSUMED``.
    ``root=None`` skips sysfs; ``getconf=False`` skips getconf (tests)."""
    cpus = os.cpu_count() or 1
    got = _read_sysfs(Path(root)) if root else None
    if got:
        return CacheSizes(
            l1d=got["l1d"],
            l2=got.get("l2", 0),
            l3=got.get("l3", 0),
            l1d_shared=got.get("l1d_shared", 1),
            l2_shared=got.get("l2_shared", 1),
            l3_shared=got.get("l3_shared", cpus),
            cpus=cpus,
            source="sysfs",
            line=got.get("line", 64),
        )
    got = _read_getconf() if getconf else None
    if got:
        return CacheSizes(got["l1d"], got.get("l2", 0), got.get("l3", 0), 1, 1, cpus, cpus,
                          source="getconf")  # fmt: skip
    return CacheSizes(**ASSUMED, l3_shared=cpus, cpus=cpus, source="assumed")
