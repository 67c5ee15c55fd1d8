"""The property, judged in the parent: an outcome passes or is a failure with a signature.

Pass: a correct result, or a clear error: a ValueError, TypeError, OverflowError or OSError
(subclasses included) with a non-empty first message line, not raised from inside Numba and not
one of the raw leaks below. The CLI: return code 0, or 2 with a last stderr line that starts
with "sparsecore" and contains "error", never a traceback. Never a signal, a hang, a wrong result.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = str(Path(__file__).resolve().parents[2])
OK_TYPES = {"builtins.ValueError", "builtins.TypeError", "builtins.OverflowError", "builtins.OSError"}
LEAKS = {
    "builtins.KeyError", "builtins.IndexError", "builtins.LookupError", "builtins.AttributeError",
    "zipfile.BadZipFile", "json.decoder.JSONDecodeError", "struct.error", "builtins.UnicodeError",
    "builtins.EOFError", "builtins.MemoryError", "pickle.UnpicklingError",
}  # fmt: skip


def _norm(s: str, n=70) -> str:
    """A message as a template: numbers, quoted values and paths blanked."""
    s = re.sub(r"/\S+", "<path>", s)
    s = re.sub(r"'[^']*'|\"[^\"]*\"", "<v>", s)
    s = re.sub(r"0x[0-9a-f]+|[-+]?\d+(\.\d+)?(e[-+]?\d+)?", "N", s)
    s = re.sub(r"\(N(, N)*\)", "(..)", s)
    return s.strip()[:n]


def _rel(f: str) -> str:
    return f[len(REPO) + 1 :] if f.startswith(REPO) else Path(f).name


def top_frame(frames) -> str:
    """The innermost frame in the library (sparsecore/ or kernels/), else the innermost."""
    lib = [f for f in frames if _rel(f[0]).startswith(("sparsecore/", "kernels/"))]
    f = (lib or frames or [["?", 0, "?"]])[-1]
    return f"{_rel(f[0])}:{f[2]}"


def innermost(frames) -> str:
    f = (frames or [["?", 0, "?"]])[-1]
    return f"{_rel(f[0])}:{f[1]} {f[2]}"


def exception_problem(exc: dict) -> str | None:
    """Why a raised exception is not a clear error (None: it is one)."""
    mro = set(exc["mro"])
    first = (exc["msg"].splitlines() or [""])[0].strip()
    if exc["numba"]:
        return "raised from inside Numba"
    leak = sorted(mro & LEAKS)
    if leak:
        return f"raw {leak[0].split('.')[-1]}"
    if not (mro & OK_TYPES):
        return f"{exc['type'].split('.')[-1]} is not a ValueError/TypeError/OverflowError/OSError"
    if not exc["msg"].strip():
        return "empty message"
    if not first:
        return "the message's first line is empty"
    return None


def _stack_frame(stack: str) -> str:
    """The innermost library frame of a faulthandler dump (the first 'File' line of a thread)."""
    lines = [ln.strip() for ln in stack.splitlines() if ln.strip().startswith("File ")]
    lib = [ln for ln in lines if "/sparsecore/" in ln or "/kernels/" in ln]
    pick = (lib or lines or ["?"])[0]
    m = re.match(r'File "([^"]+)", line (\d+) in (\S+)', pick)
    return f"{_rel(m.group(1))}:{m.group(3)}" if m else pick[:80]


def cli_problem(out: dict) -> str | None:
    rc, tail = out["rc"], out["stderr_tail"]
    last = tail[-1].strip() if tail else ""
    if out["traceback"]:
        return "traceback on stderr"
    if rc == 0:
        return None
    if rc != 2:
        return f"exit code {rc}"
    if not (last.startswith("sparsecore") and "error" in last):
        return "the last stderr line is not 'sparsecore ...: error: ...'"
    return None


def judge(case: dict, out: dict) -> dict | None:
    """None if the outcome satisfies the property, else a failure record."""
    st = out["status"]
    cat = case["cat"]
    what = case.get("op") or case.get("sub") or case.get("via") or ""
    if st == "ok" or st == "setup_error":
        return None
    if st == "raised":
        prob = exception_problem(out["exc"])
        if prob is None:
            return None
        exc = out["exc"]
        sig = f"{cat}/{what}: {prob}: {exc['type'].split('.')[-1]} at {top_frame(exc['frames'])}"
        detail = f"{exc['type']}: {exc['msg'][:300]}  [at {innermost(exc['frames'])}]"
        if out.get("invalid"):
            detail += f"  (input: {out['invalid']})"
        return {"signature": sig, "problem": prob, "detail": detail}
    if st == "accepted_invalid":
        return {
            "signature": f"{cat}/{what}: accepted invalid input: {_norm(out['detail'], 50)}",
            "problem": "returned a result for an input without one",
            "detail": out["detail"],
        }
    if st == "wrong":
        return {
            "signature": f"{cat}/{what}: wrong result: {_norm(out['detail'], 50)}",
            "problem": "silently wrong result",
            "detail": out["detail"],
        }
    if st == "crash":
        return {
            "signature": f"{cat}/{what}: crash ({out['signal']}) at {_stack_frame(out['stack'])}",
            "problem": f"the worker died: {out['signal']}",
            "detail": _stack_summary(out["stack"]),
        }
    if st == "timeout":
        return {
            "signature": f"{cat}/{what}: hang at {_stack_frame(out['stack'])}",
            "problem": f"no result after {out['timeout']} s",
            "detail": _stack_summary(out["stack"]),
        }
    if st == "cli":
        prob = cli_problem(out)
        if prob is None and out["rc"] == 0 and case.get("nan_opt"):
            prob = f"accepted NaN for {case['nan_opt']} (exit 0)"
        if prob is None:
            return None
        if out.get("exc"):
            exc = out["exc"]
            sig = f"{cat}/{what}: {exc['type'].split('.')[-1]} at {top_frame(exc['frames'])}"
            detail = f"{exc['type']}: {exc['msg'][:300]}  [at {innermost(exc['frames'])}]"
        else:
            last = out["stderr_tail"][-1] if out["stderr_tail"] else "(no stderr)"
            sig = f"{cat}/{what}: {prob}: {_norm(last, 60)}"
            detail = f"exit {out['rc']}; stderr ends: {last[:300]}"
        return {"signature": sig, "problem": prob, "detail": detail}
    if st == "harness_error":
        return {
            "signature": f"harness/{cat}/{what}: {_norm(out['detail'].strip().splitlines()[-1], 60)}",
            "problem": "fuzzer bug (not the library's)",
            "detail": out["detail"][-1500:],
        }
    return {"signature": f"{cat}: unknown outcome {st}", "problem": st, "detail": str(out)[:500]}


def _stack_summary(stack: str) -> str:
    lines = [ln.strip() for ln in stack.splitlines() if ln.strip().startswith("File ")]
    return " <- ".join(
        re.sub(r'File "([^"]+)", line (\d+) in (\S+)', lambda m: f"{_rel(m.group(1))}:{m.group(2)} {m.group(3)}", ln)
        for ln in lines[:5]
    ) or "(no stack captured)"
