"""Starting a run on several ranks: ``sparsecore train --nprocs N`` runs itself under mpiexec."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

from sparsecore.mpi.runtime import INSTALL_HINT, THREAD_VARS, MPIUnavailableError


def mpiexec() -> str:
    """The mpiexec beside this Python (the mpich wheel's, in a venv's bin), else on PATH."""
    here = Path(sys.executable).parent / "mpiexec"
    if here.exists():
        return str(here)
    found = shutil.which("mpiexec")
    if found:
        return found
    raise MPIUnavailableError(
        f"no mpiexec found beside {sys.executable} or on PATH: {INSTALL_HINT}"
    )


def strip_nprocs(argv: list[str]) -> list[str]:
    """argv without ``--nprocs N`` / ``--nprocs=N``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nprocs":
            skip = True
        elif not a.startswith("--nprocs="):
            out.append(a)
    return out


def launch(nprocs: int, argv: list[str]) -> int:
    """Run ``python -m sparsecore <argv without --nprocs>`` on ``nprocs`` ranks under mpiexec;
    returns its exit status. Each rank gets cores // nprocs threads unless the user set them."""
    if importlib.util.find_spec("mpi4py") is None:
        raise MPIUnavailableError(f"--nprocs {nprocs} needs mpi4py: {INSTALL_HINT}")
    env = dict(os.environ)
    if not any(v in env for v in THREAD_VARS):
        threads = str(max(1, (os.cpu_count() or 1) // nprocs))
        env.update({v: threads for v in THREAD_VARS})
    cmd = [mpiexec(), "-n", str(nprocs), sys.executable, "-m", "sparsecore", *strip_nprocs(argv)]
    return subprocess.call(cmd, env=env)
