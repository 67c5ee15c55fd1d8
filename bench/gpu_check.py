"""One unattended check of sparsecore's CUDA path on a GPU machine: tests, exactness probes,
compute-sanitizer, timings, the GPU suite and the MNIST device run, in one go.

    python bench/gpu_check.py --out bench/results/gpu_check        (at most --budget-s, 540 s)
    python bench/gpu_check.py --quick --steps probe,grow,timings    (about a minute)

Needs CuPy and a CUDA device (no network). Without them it writes env.txt and summary.json, prints
one line (``gpu_check: no CUDA device (...)``) and exits with status 2.

Steps, in this order, each with its own wall-clock budget inside one global deadline
(--budget-s): a step that no longer fits is skipped and recorded as skipped. The steps are
independent: a failure, crash or timeout of one is recorded and the next one runs. The GPU steps
(probe, grow, timings) run in a child process of this script (hidden flag ``--only STEP``), so
that a sticky CUDA error or a hang in one cannot take the others down.

  1. env        platform, Python, NumPy/SciPy/Numba, nvidia-smi, nvcc, compute-sanitizer,
                cupy.show_config(), hashes of kernels/cuda/* (the code that ran)   -> env.txt
                (always runs, whatever --steps says)
  2. tests      pytest -k "cuda and not emulated" over bench/gpu_suite.py's TEST_FILES and the
                device and build tests; tests/test_torch_device.py in a second run when torch
                sees CUDA; counts from pytest's summary line                     -> tests.log
  3. probe      spmm, spmm_t (ReLU-backward gate) and sddmm (bias gradient) through the CUDA
                launchers: int32/int64 indices, B in {1, 3, 4, 16, 127, 128, 132}, the float4
                path on and off, dense operands as 16-byte-aligned and misaligned views into
                larger buffers, outputs pre-filled with NaN, each against a float64 reference
                (bound: a multiple of the sum of |terms|); the public kernels.* per index dtype
                                                                                  -> probe.json
  4. grow       (a) the public topk_grow beyond 2**32 entries (m = n = 65600, B = 4), answer known
                by construction (all-zero ties: the lowest flat indices; nonzero scores only in
                the last rows); (b) the launcher with 4 KiB (and 64 B) tiles and a 1.01 buffer
                against the float64 reference on random, integer, few-level, all-zero and
                subnormal-score inputs; (c) the GPU magnitude drop on subnormals and +-0 against
                the CPU's                                                         -> grow.json
  5. sanitizer  steps 3 and 4(b) at small sizes under compute-sanitizer memcheck, racecheck and
                synccheck, CuPy's memory pool off (so out-of-bounds accesses are seen)
                                                                                  -> sanitizer.log
  6. timings    host overhead per launch (1,000 tiny launches), spmm/spmm_t/sddmm at 4096² 1%
                (B = 16, 64, 128), the grow at 16384² (B = 128, k = 0.3·nnz) with its host syncs
                (calls of kernels.cuda.grow.to_host), launches and tile               -> timings.json
  7. suite      bench/gpu_suite.py --skip-tests (--quick when little time is left)
                                                                       -> gpu_suite/gpu_suite.json
  8. mnist      the GPU-vs-CPU RigL MNIST test of tests/test_device_training.py, if time is left
                                                                       (appended to tests.log)

summary.json (rewritten after every step, so a killed run still shows where it was): per step its
name, status (ok / failed / skipped / error), seconds, key figures and error text; then a table
is printed. At most 8 files in --out. Exit status: 0 when every step that ran is ok, 1 otherwise,
2 without a CUDA device. A run takes at most --budget-s (540 s by default: it fits one 10-minute
command); the tests, the sanitizer runs and the suite take most of it, the probes well under a
minute each. Give the command a timeout above the budget (e.g. 600 s).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import datetime
import glob
import hashlib
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import traceback
from collections import deque

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.abspath(__file__)
# bench/ holds a kernels.py: put the repository first so that `import kernels` is the package
sys.path.insert(0, ROOT)

# (importing these needs no GPU: CuPy is imported only inside the GPU steps)
import kernels  # noqa: E402
from kernels import config  # noqa: E402
from kernels import reference as R  # noqa: E402

# ---------------------------------------------------------------------------- settings
STEPS = ("env", "tests", "probe", "grow", "sanitizer", "timings", "suite", "mnist")
WORKER_STEPS = ("probe", "grow", "timings")  # run in a child process (--only)
FILES = {
    "env": "env.txt",
    "tests": "tests.log",  # (the mnist step appends to it)
    "probe": "probe.json",
    "grow": "grow.json",
    "sanitizer": "sanitizer.log",
    "timings": "timings.json",
    "suite": "gpu_suite",  # a folder: gpu_suite/gpu_suite.json
    "summary": "summary.json",
}
# step: (at most, at least) seconds. A step gets min(at most, what the deadline leaves); one that
# cannot get its least is skipped.
BUDGETS = {
    "env": (90, 0),
    "tests": (150, 40),
    "probe": (60, 15),
    "grow": (90, 25),
    "sanitizer": (180, 45),
    "timings": (60, 15),
    "suite": (300, 60),
    "mnist": (150, 45),
}
RESERVE_S = 5  # kept for the summary at the end
SANITIZER_TOOLS = ("memcheck", "racecheck", "synccheck")
SANITIZER_TOOL_S = 60  # at most, per tool
SANITIZER_MIN_TOOL_S = 20
SUITE_QUICK_BELOW_S = 280  # gpu_suite.py --quick when its step gets less than this
MAX_OUT_FILES = 8  # what the result transfer takes back
MAX_LOG_BYTES = 8 << 20
OUT_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
GPU_INSTALL_HINT = 'pip install -e ".[gpu]"'
PYTEST = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=10"]
CUDA_K = "cuda and not emulated"  # the real-device cases (the emulated ones run in CI)
FALLBACK_TEST_FILES = [  # bench/gpu_suite.py's TEST_FILES, if that file cannot be read
    "tests/test_products.py",
    "tests/test_grow.py",
    "tests/test_topology.py",
    "tests/test_cuda_device.py",
    "tests/test_bench_ops.py",
]
DEVICE_TEST_FILES = ["tests/test_cuda_device.py", "tests/test_cuda_build.py"]
TORCH_TEST_FILE = "tests/test_torch_device.py"
MNIST_TEST = ("tests/test_device_training.py", "mnist and gpu")

SUBNORMAL_MIN = 2.0**-149  # the smallest float32 subnormal
NORMAL_MIN = 2.0**-126  # the smallest normal float32
ATOL = 1e-30  # products: an output whose every term is 0 must be exactly 0
EPS32 = 2.0**-24

# (float4 on?, offset in floats of the dense operands' views): safest first, so that a sticky
# CUDA error (a misaligned float4 access) costs as little of the probe as possible
PROBE_VARIANTS = [(False, 4), (False, 1), (True, 4), (True, 1)]
PROBE_SIZES = {
    "full": {
        "matrices": [(37, 53, 0.3), (37, 53, 0.0), (300, 500, 0.02), (300, 500, 0.3)],
        "batches": [1, 3, 4, 16, 127, 128, 132],
        "public_batches": [3, 16],
    },
    "quick": {
        "matrices": [(37, 53, 0.3), (300, 500, 0.02)],
        "batches": [1, 3, 4, 16, 127, 128, 132],
        "public_batches": [16],
    },
    "small": {"matrices": [(37, 53, 0.3)], "batches": [1, 3, 4, 132], "public_batches": [4]},
}
GROW_KINDS = ["float", "ints", "levels", "subnormal", "zero"]
GROW_SIZES = {
    "full": {
        "big": 65600,  # m = n: m·n = 4.30e9 > 2**32
        "big_batch": 4,
        "big_variants": ["zero", "tail", "tail_cut"],
        "ref": [(37, 53, 64), (37, 53, 4096), (64, 300, 4096)],  # (m, n, tile_bytes)
        "kinds": GROW_KINDS,
        "buffer_factor": 1.01,
        "drop_nnz": 4000,
    },
    "quick": {
        "big": 65600,
        "big_batch": 4,
        "big_variants": ["zero", "tail"],
        "ref": [(37, 53, 4096), (64, 300, 4096)],
        "kinds": GROW_KINDS,
        "buffer_factor": 1.01,
        "drop_nnz": 4000,
    },
    "small": {  # under compute-sanitizer: step 4(b) only
        "big": 0,
        "big_batch": 4,
        "big_variants": [],
        "ref": [(37, 53, 4096)],
        "kinds": ["float", "ints", "subnormal"],
        "buffer_factor": 1.01,
        "drop_nnz": 0,
    },
}
TIMING_SIZES = {
    "full": {
        "launches": 1000,
        "products": (4096, 4096, 0.01),
        "batches": [16, 64, 128],
        "grow": (16384, 16384, 128, 0.01),
        "grow_fraction": 0.3,
    },
    "quick": {
        "launches": 1000,
        "products": (4096, 4096, 0.01),
        "batches": [16, 128],
        "grow": (8192, 8192, 128, 0.01),
        "grow_fraction": 0.3,
    },
}
TIMING_SIZES["small"] = TIMING_SIZES["quick"]
SIZES = {"probe": PROBE_SIZES, "grow": GROW_SIZES, "timings": TIMING_SIZES}


# ---------------------------------------------------------------------------- arguments
def parse_steps(text: str) -> tuple:
    """'tests,probe' -> ('tests', 'probe') in the script's order; unknown names are an error."""
    names = [s.strip() for s in str(text).split(",") if s.strip()]
    bad = [s for s in names if s not in STEPS]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown step(s) {', '.join(bad) or '(none given)'}; choose from {', '.join(STEPS)}"
        )
    return tuple(s for s in STEPS if s in names)


def parse_worker_steps(text: str) -> tuple:
    names = parse_steps(text)
    bad = [s for s in names if s not in WORKER_STEPS]
    if bad:
        raise argparse.ArgumentTypeError(f"--only takes {', '.join(WORKER_STEPS)}, not {bad}")
    return names


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python bench/gpu_check.py",
        description=(
            "One unattended GPU check: CUDA tests, exactness probes of the products and the "
            "grow, compute-sanitizer, timings, bench/gpu_suite.py and the MNIST device test. "
            "Writes at most 8 files into --out. Needs CuPy and a CUDA device (exit status 2 "
            "without them)."
        ),
    )
    p.add_argument("--out", default="bench/results/gpu_check", help="output folder")
    p.add_argument(
        "--budget-s",
        type=float,
        default=540.0,
        help="global deadline in seconds: steps that no longer fit are skipped (default 540)",
    )
    p.add_argument("--quick", action="store_true", help="smaller sizes")
    p.add_argument(
        "--steps",
        type=parse_steps,
        default=STEPS,
        help=f"comma-separated subset of {','.join(STEPS)} (env always runs)",
    )
    p.add_argument("--seed", type=int, default=20261126)
    # the child processes of the GPU steps and of the sanitizer runs
    p.add_argument("--only", type=parse_worker_steps, default=None, help=argparse.SUPPRESS)
    p.add_argument("--small", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-pool", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.budget_s > 0:
        p.error(f"--budget-s must be positive, got {args.budget_s}")
    return args


def run_mode(args) -> str:
    return "small" if args.small else "quick" if args.quick else "full"


# ---------------------------------------------------------------------------- budget
class Clock:
    """The global deadline: seconds since the start against the budget."""

    def __init__(self, budget_s: float, now=time.monotonic):
        self.budget_s = float(budget_s)
        self._now = now
        self.t0 = now()

    def elapsed(self) -> float:
        return self._now() - self.t0

    def remaining(self) -> float:
        return self.budget_s - self.elapsed()


def plan_timeout(nominal_s, minimum_s, remaining_s, reserve_s=RESERVE_S):
    """The seconds a step gets: min(nominal, what is left after the reserve), or None (skip)
    when that is less than the step's minimum (and at least 1 s)."""
    avail = remaining_s - reserve_s
    if avail < max(minimum_s, 1.0):
        return None
    return float(min(nominal_s, avail))


# ---------------------------------------------------------------------------- results
@dataclasses.dataclass
class StepRecord:
    name: str
    status: str = "pending"  # ok / failed / skipped / error (pending, running while it runs)
    seconds: float = 0.0
    figures: dict = dataclasses.field(default_factory=dict)
    error: str | None = None

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "status": self.status,
            "seconds": round(float(self.seconds), 1),
            "figures": self.figures,
            "error": self.error,
        }


def json_clean(obj):
    """JSON-safe copy: NumPy scalars and arrays to Python, non-finite floats to strings."""
    if isinstance(obj, dict):
        return {str(k): json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_clean(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else str(f)
    if obj is None or isinstance(obj, str):
        return obj
    return str(obj)


def write_json(path: str, obj) -> None:
    """Written whole or not at all (a temporary file renamed over the old one)."""
    text = json.dumps(json_clean(obj), indent=1, allow_nan=False)
    tmp = os.path.join(os.path.dirname(path) or ".", "." + os.path.basename(path) + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    os.replace(tmp, path)


def read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def summary_dict(records, meta: dict) -> dict:
    steps = [r.as_dict() for r in records]
    counts: dict = {}
    for s in steps:
        counts[s["status"]] = counts.get(s["status"], 0) + 1
    return {**meta, "counts": counts, "steps": steps}


def write_summary(path: str, records, meta: dict) -> dict:
    """Write summary.json; returns what was written (JSON-safe)."""
    data = json_clean(summary_dict(records, meta))
    write_json(path, data)
    return data


def headline(rec: StepRecord) -> str:
    text = rec.figures.get("headline") if isinstance(rec.figures, dict) else None
    if not text and rec.error:
        text = rec.error.strip().splitlines()[0] if rec.error.strip() else ""
    text = str(text or "")
    return text if len(text) <= 90 else text[:87] + "..."


def format_table(records) -> str:
    lines = [f"{'step':<10} {'status':<8} {'seconds':>8}  figures", "-" * 72]
    for r in records:
        lines.append(f"{r.name:<10} {r.status:<8} {r.seconds:>8.1f}  {headline(r)}")
    return "\n".join(lines)


def out_files_problems(out_dir: str) -> list[str]:
    """Why the result transfer could not take everything in out_dir back (empty: it can)."""
    problems, files = [], []
    for dirpath, dirnames, filenames in os.walk(out_dir):
        rel = os.path.relpath(dirpath, out_dir)
        depth = 0 if rel == "." else rel.count(os.sep) + 1
        for name in dirnames + filenames:
            if not OUT_NAME.match(name):
                problems.append(
                    f"name {os.path.join(rel, name)!r} has characters beyond [A-Za-z0-9._-]"
                )
        for name in filenames:
            path = os.path.join(dirpath, name)
            files.append(path)
            if depth > 2:
                problems.append(f"{os.path.relpath(path, out_dir)} is more than 2 folders deep")
            if os.path.getsize(path) > 16 << 20:
                problems.append(f"{os.path.relpath(path, out_dir)} is larger than 16 MiB")
    if len(files) > MAX_OUT_FILES:
        problems.append(f"{len(files)} files, more than {MAX_OUT_FILES}")
    return problems


# ---------------------------------------------------------------------------- subprocesses
def _kill_group(proc) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


def run_streamed(
    cmd,
    timeout_s,
    *,
    log_path=None,
    echo=False,
    prefix="  | ",
    collect=None,
    cwd=ROOT,
    tail_lines=80,
):
    """Run cmd (its own process group), its output line by line into log_path (appended, capped
    at MAX_LOG_BYTES) and, with echo, onto our stdout; killed after timeout_s. Returns
    {returncode, timed_out, seconds, tail, collected (lines matching the regex collect)}."""
    t0 = time.monotonic()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    tail: deque = deque(maxlen=tail_lines)
    collected: list = []
    pattern = re.compile(collect) if collect else None
    log = open(log_path, "a", encoding="utf-8", errors="replace") if log_path else None
    try:
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            bufsize=1,
            start_new_session=True,
        )
    except OSError as e:
        if log:
            log.close()
        return {
            "returncode": None,
            "timed_out": False,
            "seconds": 0.0,
            "tail": f"could not start {cmd[0]}: {e}",
            "collected": [],
        }
    written = [0]

    def pump():
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            if pattern is not None and len(collected) < 400 and pattern.search(line):
                collected.append(line)
            if log is not None and written[0] <= MAX_LOG_BYTES:
                with contextlib.suppress(ValueError, OSError):
                    log.write(line + "\n")
                    written[0] += len(line) + 1
                    if written[0] > MAX_LOG_BYTES:
                        log.write("[gpu_check: log truncated here]\n")
            if echo:
                print(prefix + line, flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        rc = proc.wait(timeout=max(1.0, float(timeout_s)))
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(proc)
        rc = proc.returncode
    reader.join(timeout=10)
    if log is not None:
        with contextlib.suppress(ValueError, OSError):
            if timed_out:
                log.write(f"[gpu_check: killed after {timeout_s:.0f} s]\n")
            log.close()
    return {
        "returncode": rc,
        "timed_out": timed_out,
        "seconds": round(time.monotonic() - t0, 1),
        "tail": "\n".join(tail),
        "collected": collected,
    }


def run_capture(cmd, timeout_s=20):
    """(returncode, output) of a short command; (None, why) when it cannot run."""
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)
    except FileNotFoundError:
        return None, f"{cmd[0]}: not found"
    except subprocess.TimeoutExpired:
        return None, f"{' '.join(cmd)}: timed out after {timeout_s} s"
    except OSError as e:
        return None, f"{cmd[0]}: {e}"
    return res.returncode, (res.stdout + res.stderr).strip()


_PYTEST_COUNT = re.compile(
    r"(\d+) (passed|failed|skipped|deselected|xfailed|xpassed|errors?|warnings?)\b"
)


def parse_pytest_summary(text: str):
    """Counts from pytest's last summary line ('3 passed, 1 skipped in 2.5s'), or None."""
    for line in reversed((text or "").splitlines()):
        s = line.strip().strip("=").strip()
        if not re.search(r"\bin \d+(?:\.\d+)?s\b", s):
            continue
        found = _PYTEST_COUNT.findall(s)
        if not found and "no tests ran" not in s:
            continue
        counts = {
            k: 0
            for k in ("passed", "failed", "skipped", "error", "deselected", "xfailed", "xpassed")
        }
        for n, word in found:
            word = {"errors": "error", "warnings": "warning"}.get(word, word)
            counts[word] = counts.get(word, 0) + int(n)
        counts["seconds"] = float(re.search(r"\bin (\d+(?:\.\d+)?)s\b", s).group(1))
        counts["line"] = s
        return counts
    return None


def parse_sanitizer_summary(text: str) -> dict:
    """compute-sanitizer's verdict: errors (from 'ERROR SUMMARY: N errors', or racecheck's
    'RACECHECK SUMMARY: H hazards displayed (E errors, W warnings)'; None when neither line is
    there), api_errors (reports of a CUDA API call returning an error: 'Program hit ...', which
    may come from CuPy rather than from sparsecore's kernels), the summary lines and the first
    error lines."""
    errors = race = None
    api = 0
    summary, first = [], []
    for line in (text or "").splitlines():
        m = re.search(r"ERROR SUMMARY:\s*(\d+) error", line)
        if m:
            errors = (errors or 0) + int(m.group(1))
        m = re.search(r"RACECHECK SUMMARY:.*?\((\d+) errors?", line)
        if m:
            race = (race or 0) + int(m.group(1))
        if "SUMMARY" in line:
            summary.append(line.strip())
            continue
        if line.startswith("=========") and "Program hit" in line:
            api += 1
        if line.startswith("=========") and len(first) < 12:
            body = line.strip("= ").strip()
            if body and re.search(
                r"Invalid|Race|race|hazard|Hazard|Barrier|barrier|Error|error|Program hit", body
            ):
                first.append(line.strip())
    return {
        "errors": errors if errors is not None else race,
        "api_errors": api,
        "summary_lines": summary[-8:],
        "first_errors": first,
    }


def find_sanitizer():
    """compute-sanitizer: on PATH, in a CUDA toolkit, or in the nvidia-cuda-sanitizer-api wheel."""
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    candidates = []
    for base in filter(None, (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"))):
        candidates += [os.path.join(base, "bin", "compute-sanitizer")]
    candidates += ["/usr/local/cuda/bin/compute-sanitizer"]
    candidates += ["/usr/local/cuda/compute-sanitizer/compute-sanitizer"]
    candidates += sorted(glob.glob("/usr/local/cuda-*/bin/compute-sanitizer"), reverse=True)
    for key in ("purelib", "platlib"):
        site = sysconfig.get_paths().get(key)
        if site:
            candidates += glob.glob(
                os.path.join(
                    site, "nvidia", "cuda_sanitizer_api", "compute-sanitizer", "compute-sanitizer"
                )
            )
    for c in candidates:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def find_nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    for c in ["/usr/local/cuda/bin/nvcc", *sorted(glob.glob("/usr/local/cuda-*/bin/nvcc"))]:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def suite_test_files() -> list[str]:
    """bench/gpu_suite.py's TEST_FILES, read from its source (not imported)."""
    try:
        with open(os.path.join(ROOT, "bench", "gpu_suite.py"), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "TEST_FILES" for t in node.targets
            ):
                return [str(p) for p in ast.literal_eval(node.value)]
    except (OSError, SyntaxError, ValueError):
        pass
    return list(FALLBACK_TEST_FILES)


def cuda_test_files() -> list[str]:
    out: list[str] = []
    for p in suite_test_files() + DEVICE_TEST_FILES:
        if p not in out and os.path.exists(os.path.join(ROOT, p)):
            out.append(p)
    return out


# ---------------------------------------------------------------------------- step 1: env
ENV_PROBE = r"""
import contextlib, io, json
out = {}
try:
    import cupy
except Exception as e:
    out["cupy_error"] = f"{type(e).__name__}: {e}"
else:
    out["cupy"] = cupy.__version__
    try:
        out["device_count"] = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as e:
        out["device_error"] = f"{type(e).__name__}: {e}"
    try:
        out["cuda_runtime"] = int(cupy.cuda.runtime.runtimeGetVersion())
        out["cuda_driver"] = int(cupy.cuda.runtime.driverGetVersion())
    except Exception:
        pass
    devices = []
    for d in range(out.get("device_count") or 0):
        try:
            p = cupy.cuda.runtime.getDeviceProperties(d)
            name = p["name"].decode() if isinstance(p["name"], bytes) else str(p["name"])
            devices.append({"id": d, "name": name, "cc": f"{p['major']}.{p['minor']}",
                            "memory_gib": round(p["totalGlobalMem"] / 2**30, 1),
                            "sms": int(p["multiProcessorCount"])})
        except Exception as e:
            devices.append({"id": d, "error": f"{type(e).__name__}: {e}"})
    out["devices"] = devices
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            cupy.show_config()
        out["show_config"] = buf.getvalue()
    except Exception as e:
        out["show_config"] = buf.getvalue() + f"\ncupy.show_config() failed: {type(e).__name__}: {e}"
print("GPU_CHECK_ENV " + json.dumps(out))
"""


def probe_cupy(timeout_s=90.0) -> dict:
    """Import CuPy and count devices in a child process (a broken driver cannot hang us)."""
    rc, text = run_capture([sys.executable, "-c", ENV_PROBE], timeout_s)
    for line in text.splitlines() if rc is not None else []:
        if line.startswith("GPU_CHECK_ENV "):
            try:
                return json.loads(line[len("GPU_CHECK_ENV ") :])
            except ValueError:
                break
    return {"probe_error": text[-2000:] or f"exit status {rc}"}


def no_device_message(probe: dict):
    """The one line saying why there is no device (None when there is one)."""
    if not probe:
        why = "the CuPy probe gave no answer"
    elif "probe_error" in probe:
        lines = str(probe["probe_error"]).strip().splitlines() or ["?"]
        why = f"the CuPy probe failed: {lines[-1]}"
    elif "cupy_error" in probe:
        err = str(probe["cupy_error"])
        if err.startswith("ModuleNotFoundError") or "No module named" in err:
            why = f"CuPy not installed: {GPU_INSTALL_HINT}"
        else:
            why = f"CuPy does not import: {err}"
    elif "device_error" in probe:
        why = f"CuPy {probe.get('cupy', '?')}: {probe['device_error']}"
    elif not probe.get("device_count"):
        why = f"CuPy {probe.get('cupy', '?')} sees no device"
    else:
        return None
    return f"gpu_check: no CUDA device ({why})"


def source_hashes() -> dict:
    """sha256 (12 hex digits) of every file of kernels/cuda: which version of the code ran."""
    out = {}
    for path in sorted(glob.glob(os.path.join(ROOT, "kernels", "cuda", "*.*"))):
        if path.endswith((".py", ".cu")):
            with open(path, "rb") as f:
                out[os.path.relpath(path, ROOT)] = hashlib.sha256(f.read()).hexdigest()[:12]
    for name in ("kernels/config.py", "bench/gpu_check.py"):
        with contextlib.suppress(OSError), open(os.path.join(ROOT, name), "rb") as f:
            out[name] = hashlib.sha256(f.read()).hexdigest()[:12]
    return out


def cuda_config() -> dict:
    return {k: getattr(config, k) for k in dir(config) if k.startswith("CUDA_")}


def step_env(ctx, timeout_s):
    import numba
    import scipy

    t_end = time.monotonic() + timeout_s
    host = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": f"{platform.python_version()} ({sys.executable})",
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "numba": numba.__version__,
    }
    sections = [("host", "\n".join(f"{k}: {v}" for k, v in host.items()))]
    tools = {}
    nvcc, sanitizer = find_nvcc(), find_sanitizer()
    for name, cmd in (
        ("nvidia-smi", ["nvidia-smi"]),
        ("nvcc --version", [nvcc or "nvcc", "--version"]),
        ("compute-sanitizer --version", [sanitizer or "compute-sanitizer", "--version"]),
    ):
        rc, text = run_capture(cmd, max(1.0, min(20.0, t_end - time.monotonic())))
        tools[name] = rc == 0
        sections.append((name, text if rc is not None else f"(not available: {text})"))
    probe = probe_cupy(max(5.0, min(90.0, t_end - time.monotonic())))
    show = probe.pop("show_config", None)
    sections.append(("cupy", json.dumps(probe, indent=1)))
    sections.append(("cupy.show_config()", show or "(CuPy did not import)"))
    sections.append(("kernels.config (CUDA)", json.dumps(json_clean(cuda_config()), indent=1)))
    sources = source_hashes()
    sections.append(("sources (sha256)", "\n".join(f"{k}: {v}" for k, v in sources.items())))
    with open(os.path.join(ctx.out, FILES["env"]), "w", encoding="utf-8") as f:
        stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        f.write(f"gpu_check env, {stamp}\n")
        for title, body in sections:
            f.write(f"\n== {title} ==\n{body.rstrip()}\n")
    ctx.no_device = no_device_message(probe)
    ctx.sources = sources
    devices = probe.get("devices") or []
    name = devices[0].get("name") if devices else None
    ctx.device_name = name
    figures = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "cupy": probe.get("cupy"),
        "device_count": probe.get("device_count", 0),
        "devices": devices,
        "cuda_runtime": probe.get("cuda_runtime"),
        "cuda_driver": probe.get("cuda_driver"),
        "nvidia_smi": tools["nvidia-smi"],
        "nvcc": nvcc,
        "compute_sanitizer": sanitizer,
    }
    cupy_text = f"CuPy {probe['cupy']}" if probe.get("cupy") else "no CuPy"
    figures["headline"] = f"{name or 'no device'}, {cupy_text}, Python {platform.python_version()}"
    return "ok", figures, ctx.no_device


# ---------------------------------------------------------------------------- steps 2, 8: pytest
TORCH_PROBE = (
    "import json, torch; print('GPU_CHECK_TORCH ' + json.dumps({'torch': torch.__version__, "
    "'cuda': torch.version.cuda, 'available': bool(torch.cuda.is_available())}))"
)


def torch_cuda_state(timeout_s=60.0) -> dict:
    rc, text = run_capture([sys.executable, "-c", TORCH_PROBE], timeout_s)
    for line in text.splitlines() if rc == 0 else []:
        if line.startswith("GPU_CHECK_TORCH "):
            return json.loads(line[len("GPU_CHECK_TORCH ") :])
    last = text.strip().splitlines()[-1] if text.strip() else f"exit status {rc}"
    return {"available": False, "error": last}


def pytest_run(name, args, timeout_s, log_path) -> dict:
    """One pytest subprocess into log_path; its counts and verdict."""
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(
            f"\n===== gpu_check {name}: pytest {' '.join(args)} (timeout {timeout_s:.0f} s)\n"
        )
    print(f"  {name}: pytest {' '.join(args)} (up to {timeout_s:.0f} s)", flush=True)
    res = run_streamed(PYTEST + list(args), timeout_s, log_path=log_path)
    counts = parse_pytest_summary(res["tail"]) or {}
    out = {
        "returncode": res["returncode"],
        "timed_out": res["timed_out"],
        "seconds": res["seconds"],
    }
    out.update({k: v for k, v in counts.items() if k != "line"})
    out["summary"] = counts.get("line") or ("timed out" if res["timed_out"] else res["tail"][-300:])
    print(f"  {name}: {out['summary']}", flush=True)
    return out


def pytest_status(run: dict) -> str:
    if run.get("timed_out") or run.get("returncode") == 1:
        return "failed"
    if run.get("returncode") == 0:
        return "ok"
    return "error"  # interrupted, internal error, usage error, nothing collected


def step_tests(ctx, timeout_s):
    t_end = time.monotonic() + timeout_s
    log = os.path.join(ctx.out, FILES["tests"])
    with open(log, "w", encoding="utf-8") as f:
        f.write("gpu_check tests: the CUDA cases of the test suite on this device\n")
    torch_state = torch_cuda_state(min(60.0, timeout_s / 4))
    runs = {}
    files = cuda_test_files()
    share = 0.75 if torch_state.get("available") else 1.0
    runs["cuda_cases"] = pytest_run(
        "cuda_cases", ["-k", CUDA_K, *files], max(10.0, share * (t_end - time.monotonic())), log
    )
    if torch_state.get("available"):
        left = t_end - time.monotonic()
        if left >= 20:
            runs["torch_device"] = pytest_run(
                "torch_device", ["-k", CUDA_K, TORCH_TEST_FILE], left, log
            )
        else:
            runs["torch_device"] = {"skipped": f"no time left ({left:.0f} s)"}
    figures = {"torch": torch_state, "files": files, "runs": runs}
    done = [r for r in runs.values() if "returncode" in r]
    for key in ("passed", "failed", "skipped", "error"):
        figures[key] = sum(int(r.get(key, 0) or 0) for r in done)
    statuses = [pytest_status(r) for r in done]
    status = "error" if "error" in statuses else "failed" if "failed" in statuses else "ok"
    torch_note = "" if torch_state.get("available") else " (torch device tests: no torch CUDA)"
    figures["headline"] = (
        f"{figures['passed']} passed, {figures['failed']} failed, {figures['skipped']} skipped, "
        f"{figures['error']} errors{torch_note}"
    )
    error = None
    if status != "ok":
        error = "; ".join(f"{k}: {r.get('summary')}" for k, r in runs.items() if "returncode" in r)
    return status, figures, error


def step_mnist(ctx, timeout_s):
    path, expr = MNIST_TEST
    run = pytest_run(
        "mnist", ["-rA", path, "-k", expr], timeout_s, os.path.join(ctx.out, FILES["tests"])
    )
    figures = {k: v for k, v in run.items()}
    figures["headline"] = run.get("summary")
    if run.get("returncode") == 5:
        return "error", figures, f"no test matched -k '{expr}' in {path}"
    if run.get("returncode") == 0 and not run.get("passed") and run.get("skipped"):
        return "skipped", figures, "the MNIST GPU test skipped itself (see tests.log)"
    status = pytest_status(run)
    return status, figures, None if status == "ok" else run.get("summary")


# ---------------------------------------------------------------------------- pure checks
def product_rtol(n_terms: int) -> float:
    """Relative bound (of the sum of |terms|) on a float32 sum of n_terms products in any
    order: gamma_n ≈ n·u, with room; never below the tests' 1e-5."""
    return max(1e-5, 2.0 * (int(n_terms) + 2) * EPS32)


def compare_product(got, ref, absref, rtol: float) -> dict:
    """got (float32) against the float64 ref, bound rtol·(sum of |terms|) + ATOL per element."""
    got = np.asarray(got)
    ref = np.asarray(ref, np.float64)
    bound = rtol * np.asarray(absref, np.float64) + ATOL
    nan_left = int(np.isnan(got).sum())
    if got.shape != ref.shape:
        return {"ok": False, "max_err": None, "max_ratio": None, "nan_left": nan_left,
                "error": f"shape {got.shape}, expected {ref.shape}"}  # fmt: skip
    err = np.abs(got.astype(np.float64) - ref)
    finite = np.isfinite(err)
    ok = bool(nan_left == 0 and finite.all() and (err[finite] <= bound[finite]).all())
    max_err = float(err[finite].max()) if finite.any() else 0.0
    ratio = float((err[finite] / bound[finite]).max()) if finite.any() else 0.0
    return {"ok": ok, "max_err": max_err, "max_ratio": ratio, "nan_left": nan_left}


def merge_checks(*checks) -> dict:
    out = {"ok": all(c["ok"] for c in checks), "nan_left": sum(c["nan_left"] for c in checks)}
    for key in ("max_err", "max_ratio"):
        vals = [c[key] for c in checks if c.get(key) is not None]
        out[key] = max(vals) if vals else None
    errors = [c["error"] for c in checks if c.get("error")]
    if errors:
        out["error"] = "; ".join(errors)
    return out


def as_float32_scores(scores) -> np.ndarray:
    """Scores as float32 (a launcher returning the int32 score keys is viewed as float32)."""
    s = np.asarray(scores)
    if s.dtype.kind in "iu" and s.dtype.itemsize == 4:
        return s.view(np.float32)
    return s.astype(np.float32)


def compare_grow_exact(rows, cols, scores, ref_rows, ref_cols, ref_scores, n: int) -> dict:
    """A grow against the reference, exactly: the same (row, col) in the same (ascending flat)
    order and the same float32 scores (subnormals compared as themselves, +0 == -0)."""
    rows, cols = np.asarray(rows), np.asarray(cols)
    k = int(np.asarray(ref_rows).shape[0])
    out = {"k": k, "got": int(rows.shape[0]), "index_dtype": str(rows.dtype)}
    if rows.shape[0] != k or cols.shape[0] != k:
        return {**out, "ok": False, "error": f"returned {rows.shape[0]} entries, expected {k}"}
    if rows.dtype != cols.dtype or rows.dtype.kind not in "iu":
        return {**out, "ok": False, "error": f"rows {rows.dtype}, cols {cols.dtype}"}
    gf = rows.astype(np.int64) * n + cols.astype(np.int64)
    rf = np.asarray(ref_rows, np.int64) * n + np.asarray(ref_cols, np.int64)
    gs, rs = as_float32_scores(scores), np.asarray(ref_scores).astype(np.float32)
    wrong = np.flatnonzero(gf != rf)
    bad_s = np.flatnonzero(gs != rs)
    out.update(
        ok=bool(not wrong.size and not bad_s.size),
        wrong_entries=int(wrong.size),
        wrong_scores=int(bad_s.size),
        max_flat=int(gf.max()) if k else None,
    )
    if wrong.size:
        p = int(wrong[0])
        out["error"] = (
            f"entry {p}: got ({gf[p] // n}, {gf[p] % n}) score {gs[p]!r}, expected "
            f"({rf[p] // n}, {rf[p] % n}) score {rs[p]!r}"
        )
    elif bad_s.size:
        p = int(bad_s[0])
        out["error"] = f"entry {p} ({rf[p] // n}, {rf[p] % n}): score {gs[p]!r}, expected {rs[p]!r}"
    return out


def check_float_grow(S, bound, rows, cols, scores, k: int) -> dict:
    """A grow on float inputs, where float32 rounding may reorder near-ties: k distinct absent
    entries in ascending flat order, scores right within the bound, and every chosen score at
    least every unchosen absent score up to the bounds. S: float64 scores with -inf at present
    entries (reference.grow_scores); bound: the rounding bound per entry (same shape)."""
    m, n = S.shape
    rows, cols = np.asarray(rows), np.asarray(cols)
    out = {"k": k, "got": int(rows.shape[0]), "index_dtype": str(rows.dtype)}
    if rows.shape != (k,) or cols.shape != (k,):
        return {**out, "ok": False, "error": f"returned {rows.shape[0]} entries, expected {k}"}
    flat = rows.astype(np.int64) * n + cols.astype(np.int64)
    if k and (flat.min() < 0 or flat.max() >= m * n):
        return {**out, "ok": False, "error": "an entry outside the matrix"}
    if np.any(np.diff(flat) <= 0):
        return {**out, "ok": False, "error": "not in ascending flat order, or repeated"}
    chosen = np.zeros(S.size, bool)
    chosen[flat] = True
    Sf, bf = S.ravel(), np.asarray(bound, np.float64).ravel()
    if not np.all(np.isfinite(Sf[chosen])):
        return {**out, "ok": False, "error": "a present connection was grown"}
    err = np.abs(as_float32_scores(scores).astype(np.float64) - Sf[flat])
    tol = float(bf.max()) if bf.size else 0.0
    out["max_score_err"] = float(err.max()) if k else 0.0
    if k and err.max() > tol:
        return {**out, "ok": False, "error": f"a score is off by {err.max():.3g} > {tol:.3g}"}
    rest = ~chosen & np.isfinite(Sf)
    if k and rest.any():
        worst_in = float((Sf + bf)[chosen].min())
        best_out = float((Sf - bf)[rest].max())
        out["margin"] = worst_in - best_out
        if worst_in < best_out:
            return {**out, "ok": False, "error": "an unchosen absent entry scores clearly higher"}
    return {**out, "ok": True}


def _lowbit_exponent(t: np.ndarray) -> np.ndarray:
    """For nonzero float64 t: the exponent e of the lowest set bit (t is an odd multiple of 2^e)."""
    mant, exp = np.frexp(t)
    M = np.abs(mant * 2.0**53).astype(np.int64)
    low = M & -M
    return exp.astype(np.int64) - 53 + np.log2(low.astype(np.float64)).astype(np.int64)


def exact_in_float32(dY, X) -> bool:
    """True when every score sum_b dY[i,b]·X[j,b] is computed exactly by float32 arithmetic in
    any order (so a GPU result can be compared with the float64 reference bit for bit): per
    (i, j), all its terms are multiples of 2^q with q >= -149 (the subnormal spacing) and the
    sum of their magnitudes stays below 2^(q + 24)."""
    T = np.asarray(dY, np.float64)[:, None, :] * np.asarray(X, np.float64)[None, :, :]
    nz = T != 0
    if not nz.any():
        return True
    low = np.full(T.shape, np.iinfo(np.int64).max, dtype=np.int64)
    low[nz] = _lowbit_exponent(T[nz])
    q = low.min(axis=2)
    has = nz.any(axis=2)
    if np.any(q[has] < -149):
        return False
    mag = np.abs(T).sum(axis=2)
    return bool(np.all(mag[has] < np.ldexp(1.0, (q[has] + 24).astype(np.int32))))


def float32_subnormal(a) -> np.ndarray:
    a = np.abs(np.asarray(a, np.float64))
    return (a > 0) & (a < NORMAL_MIN)


def lowest_absent(excluded, count: int) -> np.ndarray:
    """The `count` smallest non-negative integers not in `excluded` (int64)."""
    excluded = np.unique(np.asarray(excluded, np.int64))
    cand = np.arange(count + excluded.size, dtype=np.int64)
    return cand[~np.isin(cand, excluded)][:count]


def csr_from_mask(mask, rng, index_dtype=np.int32):
    m, n = mask.shape
    rows, cols = np.nonzero(mask)
    return csr_from_coords(m, n, rows, cols, rng, index_dtype)


def csr_from_coords(m, n, rows, cols, rng, index_dtype=np.int32):
    """A CSR (values ~ N(0, 1)) of the distinct coordinates (rows, cols), sorted."""
    flat = np.unique(np.asarray(rows, np.int64) * n + np.asarray(cols, np.int64))
    r, c = flat // n, flat % n
    indptr = np.zeros(m + 1, dtype=index_dtype)
    np.cumsum(np.bincount(r, minlength=m), out=indptr[1:])
    data = rng.standard_normal(flat.shape[0]).astype(np.float32)
    return kernels.CSR(indptr, c.astype(index_dtype), data, (m, n), index_dtype=index_dtype)


def probe_matrix(rng, m, n, density, index_dtype):
    """Random pattern with an empty row (1) and, unless density is 0, a full row (m - 2)."""
    mask = rng.random((m, n)) < density
    if m > 2:
        mask[1, :] = False
    if density > 0 and m > 4:
        mask[m - 2, :] = True
    return csr_from_mask(mask, rng, index_dtype)


def probe_inputs(rng, W, batch: int, subnormal_gate=False) -> dict:
    """Operands of one (matrix, batch) and their float64 references and |term| sums.
    subnormal_gate: a third of the gate values are ±subnormal (a positive one lets dX through,
    as on the CPU: gate > 0; a float compare under flush-to-zero would block it)."""
    m, n = W.shape
    X = rng.standard_normal((n, batch)).astype(np.float32)
    dY = rng.standard_normal((m, batch)).astype(np.float32)
    gate = rng.standard_normal((n, batch)).astype(np.float32)
    gate[rng.random((n, batch)) < 0.125] = 0.0  # exactly 0: gated off too
    if subnormal_gate:
        pick = rng.random((n, batch)) < 1 / 3
        tiny = rng.choice([1.0, 1000.0, 2.0**22], size=(n, batch)) * SUBNORMAL_MIN
        gate[pick] = (np.sign(gate[pick]) * tiny[pick]).astype(np.float32)
    Wd = R.dense(W.indptr, W.indices, W.data, W.shape)
    Wa = np.abs(Wd)
    X64, dY64 = X.astype(np.float64), dY.astype(np.float64)
    row_len = np.diff(W.indptr)
    col_len = np.bincount(W.indices, minlength=n) if W.nnz else np.zeros(n, np.int64)
    return {
        "X": X,
        "dY": dY,
        "gate": gate,
        "spmm": (Wd @ X64, Wa @ np.abs(X64), int(row_len.max(initial=0))),
        "spmm_t": (
            np.where(gate > 0, Wd.T @ dY64, 0.0),
            Wa.T @ np.abs(dY64),
            int(col_len.max(initial=0)),
        ),
        # the same with subnormal gate values flushed to 0 first (a kernel under -ftz=true)
        "spmm_t_flushed": (
            np.where((gate > 0) & ~float32_subnormal(gate), Wd.T @ dY64, 0.0),
            Wa.T @ np.abs(dY64),
            int(col_len.max(initial=0)),
        ),
        "sddmm": (
            R.sddmm(W.indptr, W.indices, W.shape, dY64, X64),
            R.sddmm(W.indptr, W.indices, W.shape, np.abs(dY64), np.abs(X64)),
            batch,
        ),
        "bias": (dY64.sum(axis=1), np.abs(dY64).sum(axis=1), batch),
    }


def address(a) -> int:
    ptr = getattr(getattr(a, "data", None), "ptr", None)
    return int(ptr) if ptr is not None else int(a.ctypes.data)


def offset_view(xp, shape, offset: int, values=None, fill=np.nan):
    """A C-contiguous float32 view of `shape` starting `offset` floats after a 16-byte boundary
    of a larger flat buffer that ends where the view ends (so an access past its end leaves the
    allocation). Filled with `values`, else `fill`."""
    size = int(np.prod(shape))
    buf = xp.full(size + offset, fill, dtype=np.float32)
    shift = (-address(buf) % 16) // 4
    if shift:  # (NumPy's buffers may start off a 16-byte boundary; CuPy's never do)
        buf = xp.full(size + offset + shift, fill, dtype=np.float32)
        shift = (-address(buf) % 16) // 4
    start = shift + offset
    v = buf[start : start + size].reshape(shape)
    if values is not None:
        host = np.ascontiguousarray(values, dtype=np.float32).reshape(shape)
        if hasattr(v, "set"):  # CuPy: a memcpy, bit-exact (no kernel that could flush)
            v.set(host)
        else:
            v[...] = host
    return v


# -------------------------------------------------------------- grow cases (NumPy only)
def grow_pattern(rng, m, n, density=0.15):
    """A pattern with an empty row 0 and a full middle row."""
    mask = rng.random((m, n)) < density
    mask[0, :] = False
    if m > 3:
        mask[m // 2, :] = True
    return csr_from_mask(mask, rng, np.int32)


def subnormal_operands(rng, m, n):
    """B = 1 operands whose products are exact float32 values from 9 down to 2^-145: each a
    ±{1, 3}·2^a times a ±{1, 3}·2^b, with dY ~ 1e-20 (2^-66 ...) and X ~ 1e-19 (2^-63 ...) on
    some rows, so that many scores |dY·Xᵀ| are subnormal floats, and some rows exactly 0."""
    a = rng.choice([0, -1, -3, -66, -70, -75], size=m)
    b = rng.choice([0, -2, -60, -63, -70], size=n)
    cy = rng.choice([1.0, 3.0], size=m) * rng.choice([-1.0, 1.0], size=m)
    cx = rng.choice([1.0, 3.0], size=n) * rng.choice([-1.0, 1.0], size=n)
    dY = (cy * np.exp2(a)).astype(np.float32)[:, None]
    X = (cx * np.exp2(b)).astype(np.float32)[:, None]
    dY[rng.random(m) < 0.1] = 0.0
    X[rng.random(n) < 0.1] = 0.0
    return dY, X


def grow_case(kind, rng, m, n) -> dict:
    """Operands of one reference grow case; `exact`: scores are exact in float32 (checked by
    exact_in_float32), so the GPU must match the reference bit for bit."""
    W = grow_pattern(rng, m, n)
    if kind == "float":
        dY = rng.standard_normal((m, 8)).astype(np.float32)
        X = rng.standard_normal((n, 8)).astype(np.float32)
    elif kind == "ints":  # small integers: exact, many ties
        dY = rng.integers(-2, 3, size=(m, 5)).astype(np.float32)
        X = rng.integers(-2, 3, size=(n, 5)).astype(np.float32)
    elif kind == "levels":  # a few dyadic levels: exact, heavy ties
        dY = rng.choice([-1.0, -0.5, 0.0, 0.5, 1.0], size=(m, 3)).astype(np.float32)
        X = rng.choice([-2.0, -1.0, 0.0, 1.0, 2.0], size=(n, 3)).astype(np.float32)
    elif kind == "subnormal":
        dY, X = subnormal_operands(rng, m, n)
    elif kind == "zero":  # every score ties at 0: the lowest absent flat indices
        dY = np.zeros((m, 4), np.float32)
        X = rng.standard_normal((n, 4)).astype(np.float32)
    else:
        raise KeyError(kind)
    keeps = [None] if kind == "float" else [None, rng.random(W.nnz) < 0.6]
    return {"kind": kind, "W": W, "dY": dY, "X": X, "keeps": keeps, "exact": kind != "float"}


def grow_ks(S) -> list[int]:
    """k values for scores S (float64, -inf at present entries): the edges, and the k whose
    cut falls inside the subnormal scores and just into the zeros."""
    s = S[np.isfinite(S)]
    absent = int(s.size)
    n_normal = int((s >= NORMAL_MIN).sum())
    n_sub = int(float32_subnormal(s).sum())
    ks = {1, 7, absent // 10, absent // 2, absent, n_normal + n_sub // 2, n_normal + n_sub + 3}
    return sorted(k for k in ks if 1 <= k <= absent)


def score_classes(S) -> dict:
    s = S[np.isfinite(S)]
    return {
        "absent": int(s.size),
        "normal": int((s >= NORMAL_MIN).sum()),
        "subnormal": int(float32_subnormal(s).sum()),
        "zero": int((s == 0).sum()),
    }


def expected_grow(n, present, tail_flats, tail_scores, k):
    """The exact grow when the only nonzero scores are tail_scores at tail_flats: the best of
    them (score desc, flat asc), then the lowest-flat absent zero-score entries."""
    present = np.unique(np.asarray(present, np.int64))
    tf = np.asarray(tail_flats, np.int64)
    ts = np.asarray(tail_scores, np.float64)
    keep = ~np.isin(tf, present)
    tf, ts = tf[keep], ts[keep]
    order = np.lexsort((tf, -ts))
    if k <= tf.size:
        f, s = tf[order[:k]], ts[order[:k]]
    else:
        extra = lowest_absent(np.union1d(present, tf), k - tf.size)
        f = np.concatenate((tf, extra))
        s = np.concatenate((ts, np.zeros(extra.size)))
    o = np.argsort(f, kind="stable")
    f, s = f[o], s[o]
    return f // n, f % n, s


def big_grow_case(m, n, variant, rng, batch=4, n_zero=300, tail_rows=3, tail_cols=60) -> dict:
    """A grow whose exact answer is known without the m × n scores (for m·n > 2**32).

    variant "zero": dY = 0, every score ties at 0: the answer is the k = n_zero absent entries
    of lowest flat index. "tail" / "tail_cut": nonzero scores (powers of 2, exact, with ties)
    only in the last tail_rows rows (flat indices beyond 2**32 when m = n = 65600) at tail_cols
    columns; "tail": k = all of them + n_zero zero-score entries, "tail_cut": half of them."""
    first = np.array([0, 2, 3, 7], np.int64)
    present = [first[first < n], rng.integers(0, m * n, size=40, dtype=np.int64)]
    dY = np.zeros((m, batch), np.float32)
    X = rng.standard_normal((n, batch)).astype(np.float32)
    tail_flats = np.zeros(0, np.int64)
    tail_scores = np.zeros(0)
    if variant != "zero":
        rows = (m - 1 - np.arange(min(tail_rows, m))).astype(np.int64)
        cols = rng.choice(n, size=min(tail_cols, n), replace=False).astype(np.int64)
        er = rng.integers(0, 4, size=rows.size)
        fc = rng.integers(0, 6, size=cols.size)
        dY[rows, 0] = rng.choice([-1.0, 1.0], size=rows.size) * np.exp2(-er.astype(np.float64))
        X[:, 0] = 0.0
        X[cols, 0] = rng.choice([-1.0, 1.0], size=cols.size) * np.exp2(-fc.astype(np.float64))
        tail_flats = (rows[:, None] * n + cols[None, :]).ravel()
        tail_scores = np.exp2(-(er[:, None] + fc[None, :]).astype(np.float64)).ravel()
        present.append(rng.choice(tail_flats, size=min(5, tail_flats.size), replace=False))
    present = np.unique(np.concatenate(present))
    W = csr_from_coords(m, n, present // n, present % n, rng, np.int32)
    n_tail = int((~np.isin(tail_flats, present)).sum())
    k = {"zero": n_zero, "tail": n_tail + n_zero, "tail_cut": max(1, n_tail // 2)}[variant]
    rows, cols, scores = expected_grow(n, present, tail_flats, tail_scores, k)
    return {"W": W, "dY": dY, "X": X, "k": k, "expected": (rows, cols, scores), "variant": variant}


def drop_values(rng, nnz: int) -> np.ndarray:
    """float32 weights with +0, -0, subnormals (with ties), values near the smallest normal and
    tied normal values: the cases where a float compare under flush-to-zero goes wrong."""
    kind = rng.choice(6, size=nnz, p=[0.4, 0.08, 0.08, 0.24, 0.08, 0.12])
    sign = rng.choice([-1.0, 1.0], size=nnz)
    v = rng.standard_normal(nnz)
    v[kind == 1] = 0.0
    sub = rng.choice([1.0, 2.0, 3.0, 1000.0, 2.0**20, 2.0**23 - 1], size=nnz) * SUBNORMAL_MIN
    v[kind == 3] = sub[kind == 3] * sign[kind == 3]
    near = rng.choice([NORMAL_MIN, 1.5 * NORMAL_MIN, 2 * NORMAL_MIN], size=nnz)
    v[kind == 4] = near[kind == 4] * sign[kind == 4]
    v[kind == 5] = np.round(v[kind == 5], 1)
    out = v.astype(np.float32)
    out[kind == 2] = np.float32(-0.0)
    return out


def drop_ks(data) -> list[int]:
    a = np.abs(data.astype(np.float64))
    nnz, n_zero, n_sub = data.size, int((a == 0).sum()), int(float32_subnormal(a).sum())
    ks = {0, 1, n_zero - 1, n_zero, n_zero + 1, n_zero + n_sub // 2, n_zero + n_sub}
    ks |= {nnz // 2, nnz - 1, nnz}
    return sorted(k for k in ks if 0 <= k <= nnz)


# ---------------------------------------------------------------------------- GPU steps
class StepAbort(Exception):
    """The rest of this step cannot run: a CUDA error that poisons the context, or a source
    that does not compile (every later case would recompile it and fail the same way)."""


STICKY = ("cudaError", "CUDA_ERROR", "CUDARuntimeError", "CUDADriverError", "CompileException")


def is_sticky(e: BaseException) -> bool:
    text = f"{type(e).__name__}: {e}"
    return any(s in text for s in STICKY)


class Side:
    """Where the GPU steps' arrays live: CuPy on the device; NumPy when the tests run these steps
    on the CPU with the launches emulated (tests/test_cuda_emulated.py's NumPy models)."""

    def __init__(self, xp):
        self.xp = xp
        self.gpu = xp is not np

    def sync(self):
        if self.gpu:
            self.xp.cuda.get_current_stream().synchronize()

    def host(self, a) -> np.ndarray:
        if self.gpu and not isinstance(a, np.ndarray):
            return self.xp.asnumpy(a)
        return np.asarray(a)

    def put(self, a):
        return self.xp.asarray(a) if self.gpu else np.array(a, copy=True)

    def device_csr(self, W):
        from kernels.formats import DeviceCSR

        return DeviceCSR(self.put(W.indptr), self.put(W.indices), self.put(W.data), W.shape)

    def view(self, shape, offset, values=None):
        return offset_view(self.xp, shape, offset, values)

    def free(self):
        if self.gpu:
            self.sync()
            self.xp.get_default_memory_pool().free_all_blocks()


class Report:
    """A GPU step's JSON file, rewritten as it goes (a timeout still leaves the cases so far)."""

    def __init__(self, path, step, mode, print_limit=20):
        self.path = path
        self.data = {"step": step, "mode": mode, "status": "running", "complete": False,
                     "figures": {}, "errors": [], "cases": []}  # fmt: skip
        self.failures: list[str] = []
        self.print_limit = print_limit
        self.t0 = time.perf_counter()

    @property
    def status(self) -> str:
        return self.data["status"]

    @property
    def figures(self) -> dict:
        return self.data["figures"]

    def case(self, rec: dict) -> dict:
        self.data["cases"].append(rec)
        if not rec.get("ok"):
            what = f"{rec.get('case')}: {rec.get('error') or self._numbers(rec)}"
            self.failures.append(what)
            if len(self.failures) <= self.print_limit:
                print(f"  FAIL {what}", flush=True)
        return rec

    @staticmethod
    def _numbers(rec) -> str:
        keys = ("max_ratio", "nan_left", "max_err", "wrong_entries", "wrong_scores")
        return ", ".join(f"{k}={rec[k]:.3g}" if isinstance(rec[k], float) else f"{k}={rec[k]}"
                         for k in keys if k in rec)  # fmt: skip

    def abort(self, text: str):
        self.data["errors"].append(text)
        print(f"  ERROR {text.strip().splitlines()[-1] if text.strip() else text}", flush=True)

    def save(self):
        if self.path:
            write_json(self.path, self.data)

    def finish(self, headline_text=None):
        cases = self.data["cases"]
        n_failed = len(self.failures)
        self.data["status"] = "error" if self.data["errors"] else "failed" if n_failed else "ok"
        f = self.data["figures"]
        f.update(n_cases=len(cases), n_failed=n_failed, failures=self.failures[:10])
        f["seconds"] = round(time.perf_counter() - self.t0, 1)
        if self.data["errors"]:
            f["errors"] = [e.strip().splitlines()[-1] for e in self.data["errors"] if e.strip()]
        base = headline_text or f"{len(cases) - n_failed}/{len(cases)} cases ok"
        f["headline"] = base + ("" if not self.data["errors"] else " (aborted: see errors)")
        self.data["complete"] = True
        self.save()


def run_case(rep: Report, label: str, fn, **meta) -> dict:
    """fn() -> dict with "ok"; an exception is a failed case (and a sticky CUDA error ends
    the step)."""
    t0 = time.perf_counter()
    try:
        rec = fn()
    except Exception as e:
        rec = {"case": label, **meta, "ok": False, "error": f"{type(e).__name__}: {e}"[:600]}
        rep.case(rec)
        if is_sticky(e):
            raise StepAbort(f"CUDA error in {label}: {type(e).__name__}: {e}") from e
        return rec
    return rep.case(
        {"case": label, **meta, **rec, "ms": round(1e3 * (time.perf_counter() - t0), 2)}
    )


def vector_width(batch, *arrays):
    """The width the spmm plan picks (kernels/cuda/spmm.py), or None if it cannot be asked."""
    from kernels.cuda import spmm as cu_spmm

    try:
        return int(cu_spmm.vector_width(batch, *arrays))
    except Exception:
        return None


@contextlib.contextmanager
def float4(on: bool):
    old = config.CUDA_SPMM_FLOAT4
    config.CUDA_SPMM_FLOAT4 = bool(on)
    try:
        yield
    finally:
        config.CUDA_SPMM_FLOAT4 = old


def _probe_product(side, D, inp, op, batch, offset) -> dict:
    """One launcher call on views at `offset` with NaN-filled outputs, against the reference."""
    from kernels.cuda import sddmm as cu_sddmm
    from kernels.cuda import spmm as cu_spmm
    from kernels.cuda import spmm_t as cu_spmm_t

    m, n = D.shape
    if op == "spmm":
        x = side.view((n, batch), offset, inp["X"])
        out = side.view((m, batch), offset)
        vec = vector_width(batch, x, out)
        cu_spmm.spmm(D.indptr, D.indices, D.data, x, out)
        side.sync()
        ref, absref, terms = inp["spmm"]
        res = compare_product(side.host(out), ref, absref, product_rtol(terms))
    elif op == "spmm_t":
        t_indptr, t_indices, t_perm = D.transpose_structure()
        dy = side.view((m, batch), offset, inp["dY"])
        gate = side.view((n, batch), offset, inp["gate"])
        out = side.view((n, batch), offset)
        vec = vector_width(batch, dy, out, gate)
        cu_spmm_t.spmm_t(t_indptr, t_indices, t_perm, D.data, dy, out, gate=gate)
        side.sync()
        ref, absref, terms = inp["spmm_t"]
        res = compare_product(side.host(out), ref, absref, product_rtol(terms))
    else:
        dy = side.view((m, batch), offset, inp["dY"])
        x = side.view((n, batch), offset, inp["X"])
        out = side.view((D.nnz,), offset)
        bias = side.view((m,), offset)
        vec = None
        cu_sddmm.sddmm(D.indptr, D.indices, dy, x, out, bias_grad=bias)
        side.sync()
        ref, absref, terms = inp["sddmm"]
        bref, babs, bterms = inp["bias"]
        res = merge_checks(
            compare_product(side.host(out), ref, absref, product_rtol(terms)),
            compare_product(side.host(bias), bref, babs, product_rtol(bterms)),
        )
    return {**res, "vec": vec}


def probe_step(side, cfg, rep: Report, seed: int):
    """Step 3: the products through the launchers, every variant, against float64."""
    import kernels as K

    rng = np.random.default_rng(seed)
    mats = []
    for m, n, d in cfg["matrices"]:
        for idx in (np.int32, np.int64):
            W = probe_matrix(rng, m, n, d, idx)
            mats.append((W, side.device_csr(W), f"{m}x{n} d={d:g} {np.dtype(idx).name}"))
    inputs = {}
    for i, (W, _, _) in enumerate(mats):
        for B in cfg["batches"]:
            inputs[i, B] = probe_inputs(rng, W, B)
    vec_mismatch = 0
    by_variant = {}
    for f4, offset in PROBE_VARIANTS:
        t0 = time.perf_counter()
        n_before, f_before = len(rep.data["cases"]), len(rep.failures)
        with float4(f4):
            for i, (W, D, name) in enumerate(mats):
                for B in cfg["batches"]:
                    for op in ("spmm", "spmm_t", "sddmm"):
                        label = f"{op} {name} B={B} float4={'on' if f4 else 'off'} offset={offset}"
                        meta = dict(op=op, shape=list(W.shape), nnz=W.nnz, index=name.split()[-1],
                                    B=B, float4=f4, offset=offset)  # fmt: skip
                        rec = run_case(
                            rep,
                            label,
                            lambda: _probe_product(side, D, inputs[i, B], op, B, offset),
                            **meta,
                        )
                        want = 4 if (f4 and B % 4 == 0 and offset % 4 == 0) else 1
                        if op != "sddmm" and rec.get("vec") is not None and rec["vec"] != want:
                            vec_mismatch += 1
                            rec["vec_expected"] = want
        key = f"float4={'on' if f4 else 'off'} offset={offset}"
        n_cases = len(rep.data["cases"]) - n_before
        n_bad = len(rep.failures) - f_before
        by_variant[key] = {"cases": n_cases, "failed": n_bad}
        rep.figures["by_variant"] = by_variant
        rep.save()
        print(
            f"probe {key}: {n_cases - n_bad}/{n_cases} ok ({time.perf_counter() - t0:.1f} s)",
            flush=True,
        )
    # spmm_t's ReLU-backward gate at subnormal activations (the float4 and scalar kernels): the
    # CPU kernel keeps a positive subnormal (gate > 0); a kernel under CuPy's -ftz=true flushes
    # it (as the CPU training does under flush_denormals). Either is recorded; neither fails.
    semantics = {}
    for W, D, name in mats[:2]:
        for B in (4, 5):
            inp = probe_inputs(rng, W, B, subnormal_gate=True)

            def gate_case(inp=inp, D=D, B=B):
                keep = _probe_product(side, D, inp, "spmm_t", B, 4)
                if keep["ok"]:
                    return {**keep, "gate": "keeps subnormals"}
                flushed = {**inp, "spmm_t": inp["spmm_t_flushed"]}
                alt = _probe_product(side, D, flushed, "spmm_t", B, 4)
                if alt["ok"]:
                    return {**alt, "gate": "flushes subnormals"}
                return {**keep, "gate": "neither", "error": "matches neither gate semantics"}

            rec = run_case(rep, f"spmm_t subnormal gate {name} B={B}", gate_case,
                           op="spmm_t_subnormal_gate", B=B, index=name.split()[-1])  # fmt: skip
            semantics[f"{name.split()[-1]} B={B}"] = rec.get("gate")
    rep.figures["subnormal_gate"] = semantics
    # the public functions once per index dtype (validation, default outputs, misaligned out=)
    for W, _, name in mats[:2]:
        m, n = W.shape
        for B in cfg["public_batches"]:
            inp = probe_inputs(rng, W, B)

            def public(inp=inp, W=W, B=B):
                D = side.device_csr(W)
                X, dY = side.put(inp["X"]), side.put(inp["dY"])
                checks = []
                ref, absref, terms = inp["spmm"]
                checks.append(
                    compare_product(side.host(K.spmm(D, X)), ref, absref, product_rtol(terms))
                )
                out = side.view((m, B), 1)
                checks.append(
                    compare_product(
                        side.host(K.spmm(D, X, out=out)), ref, absref, product_rtol(terms)
                    )
                )
                dX_ref = R.spmm_t(W.indptr, W.indices, W.data, W.shape, inp["dY"])
                _, absT, termsT = inp["spmm_t"]
                checks.append(
                    compare_product(side.host(K.spmm_t(D, dY)), dX_ref, absT, product_rtol(termsT))
                )
                ref, absref, terms = inp["sddmm"]
                checks.append(
                    compare_product(side.host(K.sddmm(D, dY, X)), ref, absref, product_rtol(terms))
                )
                return merge_checks(*checks)

            run_case(rep, f"public spmm/spmm_t/sddmm {name} B={B}", public, op="public", B=B)
    cases = rep.data["cases"]
    ratios = [c["max_ratio"] for c in cases if isinstance(c.get("max_ratio"), float)]
    rep.figures.update(
        max_err_over_bound=max(ratios) if ratios else None,
        nan_left=sum(int(c.get("nan_left") or 0) for c in cases),
        vec_mismatch=vec_mismatch,
    )
    ok = len(cases) - len(rep.failures)
    worst = f", max err/bound {max(ratios):.3g}" if ratios else ""
    rep.finish(f"{ok}/{len(cases)} cases ok{worst}, {vec_mismatch} float4 choices off")


def _grow_launcher(side, W, D, dy, x, k, keep, tile_bytes, factor):
    from kernels.cuda import grow as cu_grow

    kp = None if keep is None else side.put(keep)
    r, c, s = cu_grow.topk_grow(
        D.indptr, D.indices, kp, dy, x, k, tile_bytes=tile_bytes, buffer_factor=factor
    )
    side.sync()
    return side.host(r), side.host(c), side.host(s)


def _grow_check(case, S, bound, got, k, keep):
    W = case["W"]
    if case["exact"]:
        rr, cc, ss = R.topk_grow(W.indptr, W.indices, W.shape, case["dY"], case["X"], k, keep)
        return compare_grow_exact(*got, rr, cc, ss, W.shape[1])
    return check_float_grow(S, bound, *got, k)


def grow_big(side, cfg, rep, rng):
    """Step 4(a): the public topk_grow beyond 2**32 entries, exact answer by construction."""
    m = n = int(cfg["big"])
    for variant in cfg["big_variants"]:
        case = big_grow_case(m, n, variant, rng, batch=cfg["big_batch"])

        def run(case=case):
            D = side.device_csr(case["W"])
            dy, x = side.put(case["dY"]), side.put(case["X"])
            t0 = time.perf_counter()
            r, c, s = kernels.topk_grow(D, dy, x, case["k"])
            side.sync()
            secs = time.perf_counter() - t0
            got = (side.host(r), side.host(c), side.host(s))
            res = compare_grow_exact(*got, *case["expected"], n)
            res["grow_s"] = round(secs, 3)
            er, ec, _ = case["expected"]
            # (the exact comparison covers them; these say whether the case reached that far)
            res["expected_beyond_2_32"] = bool(er.size and int(er[-1]) * n + int(ec[-1]) >= 2**32)
            res["beyond_2_32"] = bool(res.get("max_flat") is not None and res["max_flat"] >= 2**32)
            return res

        rec = run_case(
            rep,
            f"big grow {m}x{n} {variant}",
            run,
            part="big",
            m=m,
            n=n,
            variant=variant,
            k=case["k"],
        )
        print(
            f"grow big {variant}: {'ok' if rec['ok'] else 'FAILED'} ({rec.get('grow_s', '?')} s)",
            flush=True,
        )
        side.free()
        rep.save()


def grow_reference(side, cfg, rep, rng):
    """Step 4(b): the launcher with tiny tiles and a 1.01 buffer against the reference."""
    factor = cfg["buffer_factor"]
    for m, n, tile_bytes in cfg["ref"]:
        t0 = time.perf_counter()
        for kind in cfg["kinds"]:
            case = grow_case(kind, rng, m, n)
            W, dY, X = case["W"], case["dY"], case["X"]
            if case["exact"] and not exact_in_float32(dY, X):  # (a bug of this script)
                bad = {"ok": False, "error": "the case is not exact in float32"}
                run_case(rep, f"grow {kind} {m}x{n} construction", lambda bad=bad: bad, part="ref")
                continue
            D = side.device_csr(W)
            dy, x = side.put(dY), side.put(X)
            if kind == "subnormal":
                rep.figures["subnormal_products"] = _cublas_subnormals(side, dy, x, dY, X)
            bound = 1e-5 * (np.abs(dY.astype(np.float64)) @ np.abs(X.astype(np.float64)).T) + 1e-30
            for ki, keep in enumerate(case["keeps"]):
                S = R.grow_scores(W.indptr, W.indices, W.shape, dY, X, keep)
                classes = score_classes(S)
                for k in grow_ks(S):
                    label = (
                        f"grow {kind} {m}x{n} tile={tile_bytes} keep={'yes' if ki else 'no'} k={k}"
                    )

                    def run(k=k, keep=keep, S=S):
                        got = _grow_launcher(side, W, D, dy, x, k, keep, tile_bytes, factor)
                        return _grow_check(case, S, bound, got, k, keep)

                    run_case(rep, label, run, part="ref", kind=kind, m=m, n=n, tile_bytes=tile_bytes,
                             keep=bool(ki), k=k, scores=classes)  # fmt: skip
            # the public function once per case (validation, the keep mask, tile_bytes)
            keep = case["keeps"][-1]
            S = R.grow_scores(W.indptr, W.indices, W.shape, dY, X, keep)
            k = grow_ks(S)[len(grow_ks(S)) // 2]

            def public(k=k, keep=keep, S=S):
                kp = None if keep is None else side.put(keep)
                r, c, s = kernels.topk_grow(D, dy, x, k, keep=kp, tile_bytes=4096)
                side.sync()
                return _grow_check(
                    case, S, bound, (side.host(r), side.host(c), side.host(s)), k, keep
                )

            run_case(
                rep, f"public grow {kind} {m}x{n} k={k}", public, part="public", kind=kind, k=k
            )
        print(
            f"grow reference {m}x{n} tile={tile_bytes}: {len(rep.failures)} failed so far ({time.perf_counter() - t0:.1f} s)",
            flush=True,
        )
        rep.save()


def _cublas_subnormals(side, dy, x, dY, X) -> dict:
    """Does the device's sgemm keep subnormal products (the grow cannot rank what cuBLAS
    flushed)? Counts against the exact float64 products."""
    G = side.host(side.xp.matmul(dy, x.T))
    G64 = dY.astype(np.float64) @ X.astype(np.float64).T
    return {
        "expected_subnormal": int(float32_subnormal(G64).sum()),
        "sgemm_subnormal": int(float32_subnormal(G).sum()),
        "sgemm_exact": bool(np.array_equal(G.astype(np.float64), G64)),
    }


def grow_drop(side, cfg, rep, rng):
    """Step 4(c): the GPU magnitude drop against the CPU's on subnormals and ±0."""
    from kernels.cpu import drop as cpu_drop
    from kernels.cuda import drop as cu_drop

    data = drop_values(rng, int(cfg["drop_nnz"]))
    d = side.put(data)
    rep.figures["drop_values"] = {
        "nnz": int(data.size),
        "zeros": int((data == 0).sum()),
        "negative_zeros": int(((data == 0) & np.signbit(data)).sum()),
        "subnormal": int(float32_subnormal(data).sum()),
    }
    for k in drop_ks(data):

        def run(k=k):
            got = side.host(cu_drop.magnitude_drop(d, k))
            side.sync()
            want = cpu_drop.magnitude_drop(data, k)
            ref = R.magnitude_drop(data, k)
            if not np.array_equal(want, ref):
                return {"ok": False, "error": "the CPU drop differs from the float64 reference"}
            diff = np.setxor1d(got, want)
            out = {"ok": bool(np.array_equal(got, want)), "differ": int(diff.size)}
            if not out["ok"]:
                kinds = np.where(
                    data[diff] == 0,
                    "zero",
                    np.where(float32_subnormal(data[diff]), "subnormal", "normal"),
                )
                out["error"] = (
                    f"{diff.size} positions differ from the CPU's ({', '.join(sorted(set(kinds.tolist())))})"
                )
            return out

        run_case(rep, f"drop k={k}", run, part="drop", k=k)

    def public():
        k = drop_ks(data)[len(drop_ks(data)) // 2]
        got = side.host(kernels.magnitude_drop(d, k))
        return {"ok": bool(np.array_equal(got, cpu_drop.magnitude_drop(data, k))), "k": k}

    run_case(rep, "public magnitude_drop", public, part="drop")
    rep.save()


def grow_step(side, cfg, rep: Report, seed: int):
    rng = np.random.default_rng(seed + 1)
    rep.figures["config"] = {k: v for k, v in cuda_config().items() if "TOPK" in k}
    if cfg["big"]:
        grow_big(side, cfg, rep, rng)
    grow_reference(side, cfg, rep, rng)
    if cfg["drop_nnz"]:
        grow_drop(side, cfg, rep, rng)
    parts = {}
    for c in rep.data["cases"]:
        p = parts.setdefault(c.get("part", "?"), [0, 0])
        p[0] += 1
        p[1] += bool(c.get("ok"))
    rep.figures["parts"] = {k: {"cases": v[0], "ok": v[1]} for k, v in parts.items()}
    big = [c for c in rep.data["cases"] if c.get("part") == "big"]
    rep.figures["big"] = [
        {k: c.get(k) for k in ("variant", "k", "ok", "grow_s", "max_flat", "beyond_2_32", "error")}
        for c in big
    ]
    text = ", ".join(f"{k} {ok}/{n}" for k, (n, ok) in parts.items())
    rep.finish(text or "no cases")


@contextlib.contextmanager
def grow_hooks():
    """Count what one GPU grow does: host reads (kernels.cuda.grow.to_host: every host read of
    the launcher goes through that name), kernel launches by name, and the tile it chose."""
    from kernels.cuda import _module
    from kernels.cuda import grow as cu_grow

    rec = {"to_host": 0, "launches": {}, "tile_shape": None, "tile_bytes": None}
    saved = []

    def patch(mod, name, wrapper):
        if hasattr(mod, name):
            real = getattr(mod, name)
            saved.append((mod, name, real))
            setattr(mod, name, wrapper(real))

    def counting_to_host(real):
        def f(a):
            rec["to_host"] += 1
            return real(a)

        return f

    def counting_launch(real):
        def f(plan):
            name = getattr(plan, "kernel", "?")
            rec["launches"][name] = rec["launches"].get(name, 0) + 1
            return real(plan)

        return f

    def recording_tile_shape(real):
        def f(m, n, tile_bytes, *a, **kw):
            out = real(m, n, tile_bytes, *a, **kw)
            rec["tile_shape"], rec["tile_bytes"] = [int(v) for v in out], int(tile_bytes)
            return out

        return f

    def recording_auto(real):
        def f(*a, **kw):
            out = real(*a, **kw)
            rec["auto_tile_bytes"] = int(out)
            return out

        return f

    patch(cu_grow, "to_host", counting_to_host)
    patch(_module, "launch", counting_launch)
    patch(cu_grow, "tile_shape", recording_tile_shape)
    patch(cu_grow, "auto_tile_bytes", recording_auto)
    try:
        yield rec
    finally:
        for mod, name, real in reversed(saved):
            setattr(mod, name, real)


def timings_step(side, cfg, rep: Report, seed: int):
    """Step 6: host overhead per launch, product throughput, the grow's time and syncs."""
    from kernels.cuda import grow as cu_grow
    from kernels.cuda import sddmm as cu_sddmm
    from kernels.cuda import spmm as cu_spmm
    from kernels.cuda import spmm_t as cu_spmm_t
    from sparsecore.benchmarks.timing import median_s

    rng = np.random.default_rng(seed + 2)
    timing = dict(sync=side.sync, warmup=2, min_reps=5, max_reps=200, budget_s=0.3)

    def launches():  # (a)
        W = kernels.CSR.random((4, 4), 0.5, seed=seed)
        D = side.device_csr(W)
        x, out = side.put(np.ones((4, 1), np.float32)), side.put(np.empty((4, 1), np.float32))
        n = int(cfg["launches"])
        res = {"launches": n}
        calls = {
            "launcher_us": lambda: cu_spmm.spmm(D.indptr, D.indices, D.data, x, out),
            "public_us": lambda: kernels.spmm(D, x, out=out),
            "cupy_fill_us": lambda: out.fill(0),  # CuPy's own launch, for scale
        }
        for key, fn in calls.items():
            for _ in range(20):
                fn()
            side.sync()
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            side.sync()
            res[key] = round(1e6 * (time.perf_counter() - t0) / n, 2)
        res["ok"] = True
        return res

    rec = run_case(rep, f"{cfg['launches']} tiny launches", launches, part="launch")
    rep.figures["launch"] = {k: rec.get(k) for k in ("launcher_us", "public_us", "cupy_fill_us")}
    rep.save()

    m, n, d = cfg["products"]
    W = kernels.CSR.random((m, n), d, seed=seed + 3)
    D = side.device_csr(W)
    Ws = W.to_scipy()
    rows = np.repeat(np.arange(m), np.diff(W.indptr))
    row_terms = int(np.diff(W.indptr).max(initial=0))
    col_terms = int(np.bincount(W.indices, minlength=n).max(initial=0))
    t_indptr, t_indices, t_perm = D.transpose_structure()
    products = {}
    for B in cfg["batches"]:
        X = rng.standard_normal((n, B)).astype(np.float32)
        dY = rng.standard_normal((m, B)).astype(np.float32)
        x, dy = side.put(X), side.put(dY)
        y, dx, dw = (
            side.put(np.empty((m, B), np.float32)),
            side.put(np.empty((n, B), np.float32)),
            side.put(np.empty(W.nnz, np.float32)),
        )
        X64, dY64 = X.astype(np.float64), dY.astype(np.float64)
        Wa = abs(Ws).astype(np.float64)
        ops = {
            "spmm": (
                lambda: cu_spmm.spmm(D.indptr, D.indices, D.data, x, y),
                y,
                Ws @ X64,
                Wa @ np.abs(X64),
                row_terms,
            ),
            "spmm_t": (
                lambda: cu_spmm_t.spmm_t(t_indptr, t_indices, t_perm, D.data, dy, dx),
                dx,
                Ws.T @ dY64,
                Wa.T @ np.abs(dY64),
                col_terms,
            ),
            "sddmm": (
                lambda: cu_sddmm.sddmm(D.indptr, D.indices, dy, x, dw),
                dw,
                (dY64[rows] * X64[W.indices]).sum(1),
                (np.abs(dY64[rows]) * np.abs(X64[W.indices])).sum(1),
                B,
            ),
        }
        for op, (fn, out, ref, absref, terms) in ops.items():

            def run(fn=fn, out=out, ref=ref, absref=absref, terms=terms, B=B):
                fn()
                side.sync()
                res = compare_product(side.host(out), ref, absref, product_rtol(terms))
                if not res["ok"]:
                    return res  # a wrong kernel gets no time
                t = median_s(fn, **timing)
                return {
                    **res,
                    "ms": round(1e3 * t, 4),
                    "gflops": round(2.0 * W.nnz * B / t / 1e9, 1),
                }

            r = run_case(
                rep, f"{op} {m}x{n} d={d:g} B={B}", run, part="products", op=op, B=B, nnz=W.nnz
            )
            products[f"{op} B={B}"] = {"ms": r.get("ms"), "gflops": r.get("gflops"), "ok": r["ok"]}
    rep.figures["products"] = products
    D = Ws = None  # (freed before the grow)
    side.free()
    rep.save()

    gm, gn, gB, gd = cfg["grow"]

    def grow():  # (c)
        Wg = kernels.CSR.random((gm, gn), gd, seed=seed + 4)
        Dg = side.device_csr(Wg)
        k = int(cfg["grow_fraction"] * Wg.nnz)
        dy = side.put(rng.standard_normal((gm, gB)).astype(np.float32))
        x = side.put(rng.standard_normal((gn, gB)).astype(np.float32))
        call = lambda: cu_grow.topk_grow(Dg.indptr, Dg.indices, None, dy, x, k)  # noqa: E731
        call()  # warm-up: compilation, memory pool
        side.sync()
        with grow_hooks() as hooks:
            t0 = time.perf_counter()
            r, c, _ = call()
            side.sync()
            first = time.perf_counter() - t0
        flat = side.host(r).astype(np.int64) * gn + side.host(c)
        ok = bool(flat.shape[0] == k and np.all(np.diff(flat) > 0))
        t = median_s(call, sync=side.sync, warmup=0, min_reps=2, max_reps=5, budget_s=2.0)
        t0 = time.perf_counter()
        kernels.topk_grow(Dg, dy, x, k)
        side.sync()
        public = time.perf_counter() - t0
        tr, tc = hooks["tile_shape"] or (None, None)
        return {
            "ok": ok,
            "error": None if ok else "not k distinct entries in ascending flat order",
            "m": gm, "n": gn, "B": gB, "density": gd, "nnz": Wg.nnz, "k": k,
            "ms": round(1e3 * t, 2), "counted_call_ms": round(1e3 * first, 2),
            "public_ms": round(1e3 * public, 2),
            "gflops": round(2.0 * gm * gn * gB / t / 1e9, 1),
            "host_syncs": hooks["to_host"],
            "launches": hooks["launches"],
            "tile_bytes": hooks["tile_bytes"], "auto_tile_bytes": hooks.get("auto_tile_bytes"),
            "tile_shape": hooks["tile_shape"],
            "tiles": (-(-gm // tr)) * (-(-gn // tc)) if tr else None,
        }  # fmt: skip

    g = run_case(rep, f"grow {gm}x{gn} B={gB} d={gd:g}", grow, part="grow")
    keys = ("ms", "gflops", "host_syncs", "tiles", "tile_bytes", "tile_shape", "k", "public_ms")
    rep.figures["grow"] = {key: g.get(key) for key in keys}
    p = products.get(f"spmm B={cfg['batches'][-1]}", {})
    rep.finish(
        f"launch {rep.figures['launch'].get('launcher_us')} µs, spmm B={cfg['batches'][-1]} "
        f"{p.get('gflops')} GFLOP/s, grow {gm}² {g.get('ms')} ms ({g.get('host_syncs')} syncs)"
    )


WORKER_FUNCS = {"probe": probe_step, "grow": grow_step, "timings": timings_step}


def run_worker_step(name, side, cfg, mode, out_dir, seed) -> Report:
    """One GPU step in this process, its JSON in out_dir (out_dir None: not written)."""
    path = os.path.join(out_dir, FILES[name]) if out_dir else None
    rep = Report(path, name, mode)
    print(f"{name} ({mode}) starting", flush=True)
    try:
        WORKER_FUNCS[name](side, cfg, rep, seed)
    except StepAbort as e:
        rep.abort(str(e))
        rep.finish()
    except Exception:
        rep.abort(traceback.format_exc(limit=8))
        rep.finish()
    finally:
        with contextlib.suppress(Exception):
            side.free()
    print(f"{name}: {rep.status}: {rep.figures.get('headline')}", flush=True)
    return rep


def worker_main(args) -> int:
    """--only: run GPU steps in this process (a child of the main run, or of compute-sanitizer)."""
    from kernels.validation import gpu_unavailable_reason

    reason = gpu_unavailable_reason()
    if reason is not None:
        print(
            f"gpu_check: no CUDA device ({reason}; {GPU_INSTALL_HINT})", file=sys.stderr, flush=True
        )
        return 2
    import cupy

    if args.no_pool:  # every array its own cudaMalloc: memcheck sees out-of-bounds accesses
        cupy.cuda.set_allocator(None)
    side = Side(cupy)
    mode = run_mode(args)
    os.makedirs(args.out, exist_ok=True)
    statuses = [
        run_worker_step(n, side, SIZES[n][mode], mode, args.out, args.seed).status
        for n in args.only
    ]
    return 0 if all(s == "ok" for s in statuses) else 1


# ---------------------------------------------------------------------------- the main run
@dataclasses.dataclass
class Context:
    out: str
    quick: bool
    seed: int
    clock: Clock
    no_device: str | None = None
    device_name: str | None = None
    sources: dict = dataclasses.field(default_factory=dict)


def step_worker(name):
    def run(ctx, timeout_s):
        path = os.path.join(ctx.out, FILES[name])
        with contextlib.suppress(OSError):
            os.remove(path)  # never read a previous run's results
        cmd = [sys.executable, SCRIPT, "--only", name, "--out", ctx.out, "--seed", str(ctx.seed)]
        cmd += ["--quick"] if ctx.quick else []
        res = run_streamed(cmd, timeout_s, echo=True, prefix=f"  {name}| ")
        data = read_json(path)
        figures = dict(data.get("figures", {})) if data else {}
        if data and data.get("complete"):
            status = data["status"]
            error = "; ".join(figures.get("failures", [])[:3] + figures.get("errors", [])) or None
            return status, figures, error
        if res["timed_out"]:
            n = len(data.get("cases", [])) if data else 0
            figures["headline"] = f"timed out after {timeout_s:.0f} s ({n} cases done)"
            return (
                "failed",
                figures,
                f"timed out after {timeout_s:.0f} s; partial results in {FILES[name]}",
            )
        if res["returncode"] == 2:
            return "skipped", figures, res["tail"][-500:]
        return "error", figures, f"exit status {res['returncode']}: {res['tail'][-1500:]}"

    return run


def step_sanitizer(ctx, timeout_s):
    exe = find_sanitizer()
    if not exe:
        return (
            "skipped",
            {"headline": "compute-sanitizer not found"},
            (
                "compute-sanitizer not found (PATH, $CUDA_HOME/bin, /usr/local/cuda*/bin, the "
                "nvidia-cuda-sanitizer-api wheel)"
            ),
        )
    t_end = time.monotonic() + timeout_s
    log = os.path.join(ctx.out, FILES["sanitizer"])
    with open(log, "w", encoding="utf-8") as f:
        f.write(f"gpu_check sanitizer: {exe}\n")
    tools = {}
    for i, tool in enumerate(SANITIZER_TOOLS):
        left = t_end - time.monotonic()
        per = min(SANITIZER_TOOL_S, left / (len(SANITIZER_TOOLS) - i))
        if per < SANITIZER_MIN_TOOL_S:
            tools[tool] = {"status": "skipped", "error": f"no time left ({left:.0f} s)"}
            continue
        tmp = tempfile.mkdtemp(prefix="gpu_check_san_")
        cmd = [exe, "--tool", tool, "--error-exitcode", "1", "--print-limit", "50"]
        cmd += [sys.executable, SCRIPT, "--only", "probe,grow", "--small", "--no-pool"]
        cmd += ["--out", tmp, "--seed", str(ctx.seed)]
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"\n===== {tool}: {' '.join(cmd)} (timeout {per:.0f} s)\n")
        print(f"  sanitizer {tool} (up to {per:.0f} s)", flush=True)
        res = run_streamed(cmd, per, log_path=log, collect=r"^=========")
        verdict = parse_sanitizer_summary("\n".join(res["collected"]))
        if verdict["errors"] is None:  # (more report lines than were collected: the end)
            verdict = {
                **parse_sanitizer_summary(res["tail"]),
                "first_errors": verdict["first_errors"],
            }
        apps = {
            n: (read_json(os.path.join(tmp, FILES[n])) or {}).get("status")
            for n in ("probe", "grow")
        }
        shutil.rmtree(tmp, ignore_errors=True)
        clean = verdict["errors"] == 0 and not res["timed_out"]
        entry = {
            "status": "ok" if clean and res["returncode"] == 0 else "failed",
            "returncode": res["returncode"],
            "timed_out": res["timed_out"],
            "seconds": res["seconds"],
            "errors": verdict["errors"],
            "api_errors": verdict["api_errors"],
            "summary": verdict["summary_lines"],
            "first_errors": verdict["first_errors"],
            "checks_under_tool": apps,
        }
        if verdict["errors"] is None and not res["timed_out"]:
            entry["error"] = "no ERROR SUMMARY line: " + res["tail"][-400:]
        tools[tool] = entry
        print(
            f"  sanitizer {tool}: {entry['status']} (errors {entry['errors']}, {res['seconds']} s)",
            flush=True,
        )
    statuses = [t["status"] for t in tools.values()]
    status = "failed" if "failed" in statuses else "ok" if "ok" in statuses else "skipped"
    figures = {"sanitizer": exe, "tools": tools}
    figures["headline"] = ", ".join(
        f"{k} {v['status']}" + (f" ({v.get('errors')} errors)" if v.get("errors") else "")
        for k, v in tools.items()
    )
    error = None
    if status != "ok":
        error = "; ".join(
            f"{k}: {(v.get('first_errors') or [v.get('error') or v['status']])[0]}"
            for k, v in tools.items()
            if v["status"] != "ok"
        )
    return status, figures, error


def step_suite(ctx, timeout_s):
    out = os.path.join(ctx.out, FILES["suite"])
    path = os.path.join(out, "gpu_suite.json")
    with contextlib.suppress(OSError):
        os.remove(path)
    quick = ctx.quick or timeout_s < SUITE_QUICK_BELOW_S
    limit = max(30, int(timeout_s - 40))
    cmd = [sys.executable, os.path.join(ROOT, "bench", "gpu_suite.py"), "--skip-tests"]
    cmd += ["--out", out, "--time-limit", str(limit)] + (["--quick"] if quick else [])
    res = run_streamed(cmd, timeout_s, echo=True, prefix="  suite| ")
    data = read_json(path) or {}
    rows = data.get("kernels", [])
    wrong = [f"{r.get('op')} {r.get('shape')}" for r in rows if not r.get("correct")]
    train = data.get("train_step") or {}
    figures = {
        "quick": quick,
        "time_limit": limit,
        "returncode": res["returncode"],
        "kernel_rows": len(rows),
        "wrong": wrong,
        "skipped": data.get("skipped", []),
        "speedup_vs_dense": train.get("speedup_vs_dense"),
        "engine_speedup_vs_dense": train.get("engine_speedup_vs_dense"),
    }
    best = {}
    for r in rows:
        if r.get("gflops"):
            best[r["op"]] = max(best.get(r["op"], 0.0), float(r["gflops"]))
    figures["best_gflops"] = best
    figures["headline"] = (
        f"{'quick' if quick else 'full'}: {len(rows)} kernel rows, {len(wrong)} wrong"
        + (
            f", MLP step {train['speedup_vs_dense']:.2f}x dense"
            if train.get("speedup_vs_dense")
            else ""
        )
    )
    if res["timed_out"]:
        return "failed", figures, f"timed out after {timeout_s:.0f} s"
    if res["returncode"] == 0:
        return "ok", figures, None
    if res["returncode"] == 1:
        return (
            "failed",
            figures,
            "wrong results: " + "; ".join(wrong) if wrong else res["tail"][-800:],
        )
    if res["returncode"] == 2:
        return "skipped", figures, res["tail"][-500:]
    return "error", figures, f"exit status {res['returncode']}: {res['tail'][-1500:]}"


STEP_FUNCS = {
    "env": step_env,
    "tests": step_tests,
    "probe": step_worker("probe"),
    "grow": step_worker("grow"),
    "sanitizer": step_sanitizer,
    "timings": step_worker("timings"),
    "suite": step_suite,
    "mnist": step_mnist,
}


def run_step(ctx, rec: StepRecord, timeout_s: float, save) -> None:
    print(
        f"\n[gpu_check] {rec.name}: start (budget {timeout_s:.0f} s, {ctx.clock.remaining():.0f} s left)",
        flush=True,
    )
    rec.status = "running"
    save()
    t0 = time.monotonic()
    try:
        out = STEP_FUNCS[rec.name](ctx, timeout_s)
        status, figures, error = out
        if rec.name == "env":
            status, error = "ok", None  # (its third value is the no-device line)
        rec.status, rec.figures, rec.error = status, figures or {}, error
    except Exception:
        rec.status, rec.error = "error", traceback.format_exc(limit=6)
    rec.seconds = time.monotonic() - t0
    save()
    print(f"[gpu_check] {rec.name}: {rec.status} ({rec.seconds:.1f} s) {headline(rec)}", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.only:
        return worker_main(args)
    clock = Clock(args.budget_s)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    ctx = Context(out=out, quick=args.quick, seed=args.seed, clock=clock)
    records = [StepRecord(name) for name in STEPS]
    by_name = {r.name: r for r in records}
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    meta = {
        "script": "bench/gpu_check.py",
        "started": started,
        "budget_s": args.budget_s,
        "mode": "quick" if args.quick else "full",
        "selected": list(args.steps),
        "seed": args.seed,
        "device": None,
        "exit_status": None,
    }
    summary_path = os.path.join(out, FILES["summary"])

    def save():
        meta["elapsed_s"] = round(clock.elapsed(), 1)
        meta["device"] = ctx.device_name
        meta["sources"] = ctx.sources
        write_summary(summary_path, records, meta)

    print(f"gpu_check: budget {args.budget_s:.0f} s, out {out}", flush=True)
    env_timeout = plan_timeout(*BUDGETS["env"], clock.remaining()) or 1.0
    run_step(ctx, by_name["env"], env_timeout, save)
    if ctx.no_device:
        meta["no_device"] = ctx.no_device
        for r in records[1:]:
            r.status, r.error = "skipped", "not run: " + ctx.no_device.replace("gpu_check: ", "")
        meta["exit_status"] = 2
        save()
        print("\n" + format_table(records), flush=True)
        print(ctx.no_device, file=sys.stderr, flush=True)
        return 2
    for rec in records[1:]:
        if rec.name not in args.steps:
            rec.status, rec.error = "skipped", "not selected (--steps)"
            save()
            continue
        nominal, minimum = BUDGETS[rec.name]
        timeout_s = plan_timeout(nominal, minimum, clock.remaining())
        if timeout_s is None:
            rec.status = "skipped"
            rec.error = (
                f"no time left: needs {minimum} s, {clock.remaining():.0f} s of the budget remain"
            )
            print(f"[gpu_check] {rec.name}: skipped ({rec.error})", flush=True)
            save()
            continue
        run_step(ctx, rec, timeout_s, save)
    bad = [r.name for r in records if r.status in ("failed", "error")]
    meta["exit_status"] = 1 if bad else 0
    meta["out_problems"] = out_files_problems(out)
    save()
    print("\n" + format_table(records), flush=True)
    for p in meta["out_problems"]:
        print(f"gpu_check: warning: {p}", flush=True)
    print(
        f"\ngpu_check: wrote {summary_path} ({clock.elapsed():.0f} s)"
        + (f"; not ok: {', '.join(bad)}" if bad else ""),
        flush=True,
    )
    return meta["exit_status"]


if __name__ == "__main__":
    sys.exit(main())
