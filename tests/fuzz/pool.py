"""Long-lived spawn-started worker processes that run cases with a per-case timeout.

A worker imports the library once and runs case after case. A case that kills it (a signal, a
segfault, an abort) or runs past its timeout is reported as a crash or a hang with the Python
stack faulthandler wrote at that moment; the worker is then restarted (lazily), so the parent
(pytest, or ``python -m tests.fuzz``) never dies with it.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from multiprocessing.connection import wait
from pathlib import Path

WORKER_MEMORY_BYTES = 6 << 30  # address-space limit of a worker: an absurd allocation fails fast
WARMUP_TIMEOUT_S = 300.0


def worker_main(conn, work: str, wid: int, mem_limit: int | None):
    """Entry point of a worker (spawned)."""
    import faulthandler

    work_p = Path(work)
    work_p.mkdir(parents=True, exist_ok=True)
    # the worker's own noise (C-level prints, numba warnings) goes to a log, not the terminal
    log = open(work_p / "worker.log", "w")  # noqa: SIM115
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    crash = open(work_p / "crash.txt", "w")  # noqa: SIM115
    faulthandler.enable(file=crash, all_threads=False)
    os.environ.setdefault("MPLBACKEND", "Agg")
    if mem_limit:
        try:
            import resource

            resource.setrlimit(resource.RLIMIT_AS, (mem_limit, mem_limit))
        except (ImportError, ValueError, OSError):
            pass
    from tests.fuzz import execute

    ctx = execute.Ctx(work_p)
    execute.warm_up(ctx)
    conn.send(("ready", None))
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        cid, case, timeout = msg
        crash.seek(0)
        crash.truncate()
        # a hang: dump the stack shortly before the parent gives up on us
        faulthandler.dump_traceback_later(max(0.5, timeout - 0.7), repeat=False, file=crash)
        out = execute.run_case(case, ctx)
        faulthandler.cancel_dump_traceback_later()
        try:
            conn.send((cid, out))
        except Exception as e:  # an unpicklable outcome: a harness bug
            conn.send((cid, {"status": "harness_error", "detail": f"unpicklable outcome: {e}"}))


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


class Worker:
    def __init__(self, root: Path, wid: int, mem_limit):
        self.root, self.wid, self.mem_limit = root, wid, mem_limit
        self.work = root / f"w{wid}"
        self.proc = None
        self.conn = None
        self.busy = None  # (cid, case, started, timeout)
        self.starts = 0

    def start(self):
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=worker_main, args=(child, str(self.work), self.wid, self.mem_limit), daemon=True
        )
        self.proc.start()
        child.close()
        self.conn = parent
        self.starts += 1
        self.ready = False

    def ensure(self):
        if self.proc is None or not self.proc.is_alive():
            self.start()
        if not self.ready:
            if not self.conn.poll(WARMUP_TIMEOUT_S):
                self.kill()
                raise RuntimeError(f"fuzz worker {self.wid} did not start in {WARMUP_TIMEOUT_S} s")
            try:
                tag, _ = self.conn.recv()
            except EOFError:
                tail = _read(self.work / "worker.log")[-2000:]
                raise RuntimeError(f"fuzz worker {self.wid} died while starting:\n{tail}") from None
            assert tag == "ready"
            self.ready = True

    def kill(self):
        if self.proc is not None and self.proc.is_alive():
            self.proc.kill()
        if self.proc is not None:
            self.proc.join(5)
        self.proc = None
        self.ready = False

    def stop(self):
        if self.proc is not None and self.proc.is_alive():
            try:
                self.conn.send(None)
                self.proc.join(3)
            except (OSError, BrokenPipeError):
                pass
        self.kill()

    def submit(self, cid, case, timeout):
        self.ensure()
        self.conn.send((cid, case, timeout))
        self.busy = (cid, case, time.monotonic(), timeout)

    def collect(self):
        """(cid, outcome) once the busy case is done, or None while it runs."""
        cid, case, started, timeout = self.busy
        try:
            if self.conn.poll(0):
                rcid, out = self.conn.recv()
                self.busy = None
                return rcid, out
        except (EOFError, OSError):
            self.proc.join(5)
            code = self.proc.exitcode
            stack = _read(self.work / "crash.txt")
            self.proc = None
            self.ready = False
            self.busy = None
            sig = -code if code is not None and code < 0 else None
            name = signal.Signals(sig).name if sig else f"exit code {code}"
            return cid, {"status": "crash", "signal": name, "stack": stack[-3000:]}
        if time.monotonic() - started > timeout:
            time.sleep(0.3)  # let faulthandler's dump land
            stack = _read(self.work / "crash.txt")
            self.kill()
            self.busy = None
            return cid, {"status": "timeout", "timeout": timeout, "stack": stack[-3000:]}
        return None


class Pool:
    def __init__(self, root, n_workers=1, mem_limit=WORKER_MEMORY_BYTES):
        self.root = Path(root)
        self.workers = [Worker(self.root, i, mem_limit) for i in range(n_workers)]

    def start(self):
        for w in self.workers:  # spawn them all first: they import and warm up in parallel
            if w.proc is None:
                w.start()
        for w in self.workers:
            w.ensure()

    def restarts(self) -> int:
        return sum(max(0, w.starts - 1) for w in self.workers)

    def run(self, items, deadline=None):
        """items: iterable of (cid, case, timeout). Yields (cid, outcome) as cases finish; stops
        submitting new ones after ``deadline`` (time.monotonic())."""
        it = iter(items)
        exhausted = False
        while True:
            for w in self.workers:
                if w.busy is None and not exhausted:
                    if deadline is not None and time.monotonic() > deadline:
                        exhausted = True
                        break
                    nxt = next(it, None)
                    if nxt is None:
                        exhausted = True
                        break
                    w.submit(*nxt)
            busy = [w for w in self.workers if w.busy is not None]
            if not busy:
                return
            soonest = min(w.busy[2] + w.busy[3] for w in busy) - time.monotonic()
            wait([w.conn for w in busy] + [w.proc.sentinel for w in busy if w.proc], max(0.01, min(soonest, 1.0)))
            for w in busy:
                r = w.collect()
                if r is not None:
                    yield r

    def run_one(self, case, timeout, fresh=False):
        """Run one case on worker 0 (``fresh``: in a newly started process)."""
        w = self.workers[0]
        if fresh:
            w.kill()
        w.submit(0, case, timeout)
        while True:
            conns = [w.conn] + ([w.proc.sentinel] if w.proc is not None else [])
            wait(conns, 0.5)
            r = w.collect()
            if r is not None:
                return r[1]

    def close(self):
        for w in self.workers:
            w.stop()
