"""Runs one case in the worker process and describes what happened (a picklable dict).

Outcomes: ``ok``; ``raised`` (the library raised: the exception's type, MRO, message and
frames, judged in the parent); ``accepted_invalid`` (a call without a defined result returned
one); ``wrong`` (a result differs from the reference, or a loaded state is corrupt);
``cli`` (return code and stderr of ``sparsecore.cli.main``); ``setup_error`` (the case could not
be built: not the library's fault, counted apart); ``harness_error`` (a bug of the fuzzer).
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import shutil
import sys
import traceback
import warnings
from pathlib import Path

import numpy as np

from tests.fuzz import artifacts as A
from tests.fuzz import codec as C


def exc_info(e: BaseException, phase="call") -> dict:
    import numba

    numba_dir = os.path.dirname(numba.__file__)
    tb = traceback.extract_tb(e.__traceback__)
    frames = [[f.filename, f.lineno, f.name] for f in tb]
    mro = [f"{c.__module__}.{c.__qualname__}" for c in type(e).__mro__]
    return {
        "type": mro[0],
        "mro": mro,
        "msg": str(e)[:2000],
        "frames": frames[-15:],
        "numba": mro[0].startswith("numba") or any(f[0].startswith(numba_dir) for f in frames),
        "phase": phase,
    }


class Ctx:
    def __init__(self, work):
        self.work = Path(work)
        self.tmp = self.work / "case"

    def fresh_tmp(self) -> Path:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        return self.tmp


def run_case(case: dict, ctx: Ctx) -> dict:
    try:
        return RUNNERS[case["cat"]](case, ctx)
    except Exception:
        return {"status": "harness_error", "detail": traceback.format_exc()[-3000:]}
    finally:
        _reset_process_state()


def _reset_process_state():
    """Undo what a case may leave behind: FTZ/DAZ (training), thread counts (bench --threads)."""
    try:
        from kernels.cpu import fpmode

        if fpmode.flushing():
            fpmode.set_flush(False)
        import numba

        if numba.get_num_threads() != numba.config.NUMBA_NUM_THREADS:
            numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    except Exception:
        pass


# ------------------------------------------------------------------------- kernels


def _snapshot(obj):
    """Copies of every array reachable from an argument (to catch a call modifying it)."""
    import scipy.sparse as sp

    from sparsecore import CSR

    if isinstance(obj, np.ndarray):
        return ("nd", obj.copy())
    if isinstance(obj, CSR):
        return ("csr", [_snapshot(getattr(obj, a, None)) for a in ("indptr", "indices", "data")])
    if sp.issparse(obj):
        return ("sp", [_snapshot(getattr(obj, a, None)) for a in ("indptr", "indices", "data", "row", "col")])
    if isinstance(obj, (tuple, list)):
        return ("seq", [_snapshot(x) for x in obj])
    try:
        return ("val", copy.deepcopy(obj))
    except Exception:
        return ("val", None)


def _same(a, b) -> bool:
    if a[0] != b[0]:
        return False
    if a[0] == "nd":
        x, y = a[1], b[1]
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        if x.dtype.kind in "fc":
            return bool(np.array_equal(x, y, equal_nan=True))
        if x.dtype.hasobject:
            return True  # not compared
        return bool(np.array_equal(x, y))
    if a[0] in ("csr", "sp", "seq"):
        return len(a[1]) == len(b[1]) and all(_same(p, q) for p, q in zip(a[1], b[1], strict=False))
    return True


def _judge_mutation_refusals(env):
    """A refused mutation of a CSR is the library's decision: kept for the judge."""
    return env.get("_mutation_errors", [])


def run_kernels(case, ctx):
    from tests.fuzz import oracle as O

    op = case["op"]
    env: dict = {}
    args = {}
    try:
        for k, spec in case["args"].items():
            args[k] = C.materialize(spec, env)
            env[k] = args[k]
    except Exception as e:
        return {"status": "setup_error", "detail": f"{type(e).__name__}: {e}"[:500]}
    for err in env.get("_mutation_errors", []):
        info = exc_info(err, phase="mutate")
        if not _mutation_refusal_ok(info):
            return {"status": "raised", "exc": info, "invalid": "mutating a validated CSR"}
    try:
        check = O.EXPECT[op](args)
        invalid = None
    except O.Invalid as e:
        check, invalid = None, str(e)
    except Exception:
        return {"status": "harness_error", "detail": "oracle: " + traceback.format_exc()[-3000:]}
    snaps = {k: _snapshot(v) for k, v in args.items() if k != "out"}
    fn = O.function(op)
    pos = [args[k] for k in O.POSITIONAL[op] if k in args]
    kw = {k: v for k, v in args.items() if k not in O.POSITIONAL[op]}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = fn(*pos, **kw)
    except Exception as e:
        return {"status": "raised", "exc": exc_info(e), "invalid": invalid}
    if invalid is not None:
        return {"status": "accepted_invalid", "detail": invalid}
    try:
        check(res)
    except O.Wrong as e:
        return {"status": "wrong", "detail": str(e)[:1000]}
    except Exception:
        return {"status": "harness_error", "detail": "check: " + traceback.format_exc()[-3000:]}
    for k, before in snaps.items():
        if not _same(before, _snapshot(args[k])):
            return {"status": "wrong", "detail": f"the call modified its input {k}"}
    return {"status": "ok"}


def _mutation_refusal_ok(info) -> bool:
    """Refusing ``W.attr = value`` (or an in-place write to a read-only array) with a
    ValueError/TypeError/AttributeError carrying a message is what we want."""
    good = {"builtins.ValueError", "builtins.TypeError", "builtins.AttributeError"}
    first = (info["msg"].splitlines() or [""])[0].strip()
    return bool(good & set(info["mro"])) and first != "" and not info["numba"]


# ------------------------------------------------------------------------- checkpoints


def check_loaded(tr) -> list[str]:
    """What is wrong with a trainer's state after load_checkpoint (empty: consistent)."""
    from sparsecore.layers import SparseLinear
    from tests.fuzz import oracle as O

    bad = []
    for l, layer in enumerate(tr.model.weighted()):
        if isinstance(layer, SparseLinear):
            try:
                M = O.interp_W(layer.W, finite=True, what=f"layer {l} W")
                if (M.m, M.n) != tuple(layer.full_shape):
                    bad.append(f"layer {l} W has shape {(M.m, M.n)}, expected {layer.full_shape}")
                if layer.W.data.dtype != np.float32:
                    bad.append(f"layer {l} W.data has dtype {layer.W.data.dtype}")
            except O.Invalid as e:
                bad.append(f"loaded a broken W: {e}")
    for p in tr.model.params():
        v = np.asarray(p.value)
        if v.dtype != np.float32 or not np.isfinite(v).all():
            bad.append(f"parameter {p.name} is {v.dtype} / not finite")
        for key, arr in tr.opt.state.get(p.name, {}).items():
            arr = np.asarray(arr)
            if arr.shape != v.shape:
                bad.append(f"optimizer state {p.name}/{key} has shape {arr.shape} vs {v.shape}")
            elif not np.isfinite(arr).all():
                bad.append(f"optimizer state {p.name}/{key} is not finite")
    t = tr.opt.t
    if not isinstance(t, (int, np.integer)) or t < 0:
        bad.append(f"optimizer step count t = {t!r}")
    for name in ("step", "epoch"):
        v = getattr(tr, name)
        if not isinstance(v, (int, np.integer)) or v < 0:
            bad.append(f"{name} = {v!r} after loading")
    if tr.step > 2**53:
        bad.append(f"step = {tr.step} (beyond 2**53: not a step count)")
    if not isinstance(tr.history, list) or not all(isinstance(h, dict) for h in tr.history):
        bad.append(f"history is a {type(tr.history).__name__}, not a list of dicts")
    return bad


def run_checkpoint(case, ctx):
    tmp = ctx.fresh_tmp()
    try:
        base = A.base_checkpoint(ctx.work, case["base"])
        path = A.corrupt_npz(base, tmp / "ck.npz", case["muts"])
    except Exception as e:
        return {"status": "setup_error", "detail": f"{type(e).__name__}: {e}"[:500]}
    if case["via"] == "cli":
        argv = A.cli_train_args(ctx.work, case["base"]) + [
            "--max-steps", "6", "--resume", path, "--out", str(tmp / "out"),
        ]  # fmt: skip
        return run_cli_argv(argv)
    from sparsecore.train import Trainer

    try:
        tr = Trainer(A.base_config(ctx.work, case["base"]))
    except Exception as e:
        return {"status": "setup_error", "detail": f"{type(e).__name__}: {e}"[:500]}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tr.load_checkpoint(path)
    except Exception as e:
        return {"status": "raised", "exc": exc_info(e), "invalid": None}
    bad = check_loaded(tr)
    if bad:
        return {"status": "wrong", "detail": "load_checkpoint accepted a corrupt file: " + "; ".join(bad[:3])}
    return {"status": "ok"}


# ------------------------------------------------------------------------- datasets


def _write_dataset(case, tmp):
    layout = case["layout"]
    members = {}
    for k, v in case["members"].items():
        members[k] = C.materialize(v)
    if layout == "missing":
        return str(tmp / "nope.npz"), members
    if layout in ("npz", "npz_compressed"):
        path = tmp / "data.npz"
        arrays = {k: v for k, v in members.items() if isinstance(v, np.ndarray)}
        (np.savez_compressed if layout == "npz_compressed" else np.savez)(path, **arrays)
        raws = {k: v for k, v in members.items() if isinstance(v, bytes)}
        if raws:
            import zipfile

            with zipfile.ZipFile(path, "a") as zf:
                for k, raw in raws.items():
                    zf.writestr(k + ".npy", raw)
        for op in case.get("file_ops", []):
            blob = bytearray(path.read_bytes())
            if op["op"] == "truncate":
                blob = blob[: int(len(blob) * op["frac"])]
            elif op["op"] == "flip" and blob:
                blob[int(op["frac"] * (len(blob) - 1))] = op["byte"]
            path.write_bytes(bytes(blob))
        return str(path), members
    if layout in ("dir", "emptydir"):
        path = tmp / "data"
        path.mkdir()
        for k, v in members.items():
            if isinstance(v, bytes):
                (path / f"{k}.npy").write_bytes(v)
            else:
                np.save(path / f"{k}.npy", v, allow_pickle=True)
        return str(path), members
    if layout == "npy":
        path = tmp / "data.npy"
        np.save(path, members.get("x_train", np.zeros((2, 2))), allow_pickle=True)
        return str(path), members
    if layout == "raw":
        path = tmp / case.get("name", "data.npz")
        path.write_bytes(members.get("raw", b""))
        return str(path), members
    raise ValueError(layout)


def expect_dataset(case, members):
    """None if the files define a dataset (then the expected (features, labels)), else why not."""
    from tests.fuzz import oracle as O

    if case["layout"] in ("missing", "raw", "npy", "emptydir"):
        raise O.Invalid(f"layout {case['layout']}: no dataset")
    if case.get("file_ops") and case["layout"].startswith("npz"):
        return None  # a damaged file may still hold a (different) valid dataset: anything goes
    keys = ("x_train", "y_train", "x_test", "y_test")
    for k in keys:
        if k not in members:
            raise O.Invalid(f"{k} is missing")
        v = members[k]
        if not isinstance(v, np.ndarray):
            raise O.Invalid(f"{k} is raw bytes")
        if v.dtype.hasobject:
            raise O.Invalid(f"{k} holds objects")
    xs = {}
    for k in ("x_train", "x_test"):
        x = members[k]
        if x.ndim < 2 or x.dtype.kind not in "biuf":
            raise O.Invalid(f"{k} has shape {x.shape} dtype {x.dtype}")
        if x.size and not O.finite32(x.astype(np.float64)).all():
            raise O.Invalid(f"{k} is not finite")
        xs[k] = x.reshape(x.shape[0], int(np.prod(x.shape[1:], dtype=np.int64)))
    ys = {}
    for k in ("y_train", "y_test"):
        y = members[k]
        if y.ndim != 1:
            raise O.Invalid(f"{k} has shape {y.shape}")
        if y.size and y.dtype.kind not in "biuf":
            raise O.Invalid(f"{k} has dtype {y.dtype}")
        if y.size:
            yf = y.astype(np.float64)
            if y.dtype.kind == "f" and not (np.isfinite(yf).all() and np.all(yf == np.round(yf))):
                raise O.Invalid(f"{k} holds non-integer labels")
            if y.dtype.kind == "u" and int(y.max()) >= 2**62 or yf.min() < 0 or yf.max() >= 2**62:
                raise O.Invalid(f"{k} holds labels outside [0, 2**62)")
        ys[k] = y
    if xs["x_train"].shape[0] != ys["y_train"].shape[0] or xs["x_test"].shape[0] != ys["y_test"].shape[0]:
        raise O.Invalid("rows and labels differ in number")
    if xs["x_train"].shape[1] != xs["x_test"].shape[1]:
        raise O.Invalid("feature counts differ")
    if xs["x_train"].shape[0] == 0:
        raise O.Invalid("x_train is empty")
    return xs, ys


def run_dataset(case, ctx):
    from tests.fuzz import oracle as O

    tmp = ctx.fresh_tmp()
    try:
        path, members = _write_dataset(case, tmp)
    except Exception as e:
        return {"status": "setup_error", "detail": f"{type(e).__name__}: {e}"[:500]}
    if case["via"] == "cli":
        argv = ["train", "--dataset", path, "--arch", case["arch"], "--max-steps", "2",
                "--batch-size", "4", "--epochs", "1", "--delta-t", "1", "--no-progress",
                "--out", str(tmp / "out")]  # fmt: skip
        return run_cli_argv(argv)
    try:
        want = expect_dataset(case, members)
        invalid = None
    except O.Invalid as e:
        want, invalid = None, str(e)
    from sparsecore import data as D

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = D.load(path)
            xtr = np.asarray(ds.x_train)
            xte = np.asarray(ds.x_test)
    except Exception as e:
        return {"status": "raised", "exc": exc_info(e), "invalid": invalid}
    if invalid is not None:
        return {"status": "accepted_invalid", "detail": invalid}
    if want is None:
        return {"status": "ok"}
    xs, ys = want
    problems = []
    for nm, got, x in (("x_train", xtr, xs["x_train"]), ("x_test", xte, xs["x_test"])):
        if got.shape != x.shape or got.dtype != np.float32 or not np.isfinite(got).all():
            problems.append(f"{nm}: shape {got.shape} dtype {got.dtype} (expected {x.shape} float32, finite)")
    for nm, got in (("y_train", ds.y_train), ("y_test", ds.y_test)):
        y = ys[nm]
        g = np.asarray(got)  # the training rows come in a seeded order: compare as multisets
        if g.shape != y.shape or not np.array_equal(np.sort(g.astype(np.float64)), np.sort(y.astype(np.float64))):
            problems.append(f"{nm} differs from the file's labels")
    labels = np.concatenate([ys["y_train"].astype(np.float64), ys["y_test"].astype(np.float64)])
    if labels.size and ds.n_classes != int(labels.max()) + 1:
        problems.append(f"n_classes = {ds.n_classes}, labels go up to {int(labels.max())}")
    if problems:
        return {"status": "wrong", "detail": "; ".join(problems)}
    return {"status": "ok"}


# ------------------------------------------------------------------------- CLI


def run_cli_argv(argv) -> dict:
    import tempfile

    from sparsecore import cli

    out, err = io.StringIO(), io.StringIO()
    exc = None
    old_argv = sys.argv
    sys.argv = ["sparsecore", *argv]
    # subprocesses (mpiexec ranks, benchmark workers) write to the file descriptors
    fd_err = tempfile.TemporaryFile()
    saved_fd = os.dup(2)
    os.dup2(fd_err.fileno(), 2)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            with warnings.catch_warnings():  # the interpreter's default filters, as in a shell
                try:
                    rc = cli.main(list(argv))
                except SystemExit as e:
                    code = e.code
                    if code is None:
                        rc = 0
                    elif isinstance(code, int):
                        rc = code
                    else:  # what Python does with SystemExit("message")
                        print(code, file=sys.stderr)
                        rc = 1
                except Exception as e:
                    exc = exc_info(e)
                    traceback.print_exc()
                    rc = 1
    finally:
        sys.argv = old_argv
        os.dup2(saved_fd, 2)
        os.close(saved_fd)
    fd_err.seek(0)
    sub_err = fd_err.read().decode(errors="replace")
    fd_err.close()
    # the subprocesses' output first: what the CLI prints in-process after them (a launcher's
    # closing error line) is the end of the run's stderr
    text = sub_err + err.getvalue()
    e_lines = [ln for ln in text.splitlines() if ln.strip()]
    return {
        "status": "cli",
        "rc": rc if isinstance(rc, int) else repr(rc),
        "stderr_tail": e_lines[-6:],
        "stdout_tail": out.getvalue().splitlines()[-3:],
        "traceback": "Traceback" in text,
        "exc": exc,
    }


def run_cli(case, ctx):
    tmp = ctx.fresh_tmp()
    for name, b64 in case.get("files", {}).items():
        (tmp / name).write_bytes(C.materialize({"$bytes": b64}))
    subs = {
        "{DATA}": A.base_dataset(ctx.work),
        "{OUT}": str(tmp / "out"),
        "{TMP}": str(tmp),
        "{CKPT}": A.base_checkpoint(ctx.work, "rigl"),
    }
    argv = []
    for a in case["argv"]:
        for k, v in subs.items():
            a = a.replace(k, v)
        argv.append(a)
    res = run_cli_argv(argv)
    res["argv"] = argv
    return res


def run_selftest(case, ctx):
    """The harness's own check: a case that kills or hangs its worker must come back as a
    failure of that case, and the next case must run."""
    import signal
    import time

    if case["action"] == "segv":
        os.kill(os.getpid(), signal.SIGSEGV)
    if case["action"] == "hang":
        time.sleep(3600)
    return {"status": "ok"}


RUNNERS = {
    "selftest": run_selftest,
    "kernels": run_kernels,
    "checkpoint": run_checkpoint,
    "dataset": run_dataset,
    "cli": run_cli,
}


def warm_up(ctx) -> None:
    """Compile (or load from cache) every kernel and build the base files, untimed."""
    import kernels
    from sparsecore import CSR

    steps = []
    for idx in (None, np.int64):
        W = CSR.random((6, 5), 0.5, seed=1, index_dtype=idx)
        X = np.ones((5, 3), np.float32)
        dY = np.ones((6, 3), np.float32)
        steps += [
            lambda W=W, X=X: kernels.spmm(W, X),
            lambda W=W, X=X: kernels.spmm(W, np.ascontiguousarray(X.T), layout="batch"),
            lambda W=W, dY=dY: kernels.spmm_t(W, dY),
            lambda W=W, X=X, dY=dY: kernels.sddmm(W, dY, X),
            # the batch-major kernels (from 8 rows: kernels/cpu/panels.py, about 7 s to compile)
            lambda W=W: kernels.spmm(W, np.ones((16, 5), np.float32), layout="batch"),
            lambda W=W: kernels.spmm_t(W, np.ones((16, 6), np.float32), layout="batch"),
            lambda W=W: kernels.sddmm(
                W, np.ones((16, 6), np.float32), np.ones((16, 5), np.float32), layout="batch"
            ),
            lambda W=W, X=X, dY=dY: kernels.topk_grow(W, dY, X, 2),
            lambda W=W: kernels.magnitude_drop(W, 2),
            lambda W=W: kernels.remap(*kernels.merge(W, np.zeros(W.nnz, bool), [0], [0])[1:], W.data),
        ]
    for name in A.BASES:
        steps.append(lambda name=name: A.base_checkpoint(ctx.work, name))
    for step in steps:
        try:
            step()
        except Exception:
            pass
