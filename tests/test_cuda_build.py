"""The CUDA sources without a device: they compile, and the launchers call what they define.

- nvcc (when on PATH) compiles every kernels/cuda/*.cu to PTX for sm_80 and sm_90 with warnings
  as errors; every launch plan the launchers build (both index dtypes, both flat dtypes, with
  and without optional buffers) names an entry of that PTX with the same number of parameters,
  each of the size (and float/int kind) the C signature declares, pointers where it takes
  pointers (read from the preprocessed source): a launcher/kernel mismatch fails here.
- NVRTC through CuPy (when CuPy and its NVRTC library are installed, no device needed) compiles
  every source with the options the launchers use.
- Without CuPy or a device, every public kernel given a CuPy-looking operand raises the one
  install message.
"""

import glob
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import kernels
from kernels import validation as V
from kernels.cuda import _module
from kernels.cuda import elementwise as cu_ew
from kernels.cuda import grow as cu_grow
from kernels.cuda import sddmm as cu_sddmm
from kernels.cuda import spmm as cu_spmm
from kernels.cuda import spmm_t as cu_spmm_t
from sparsecore import CSR

SOURCES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(_module.HERE, "*.cu")))
NVCC = shutil.which("nvcc")
PTX_BYTES = {"u64": 8, "s64": 8, "b64": 8, "f64": 8, "u32": 4, "s32": 4, "b32": 4, "f32": 4}


def _plans():
    """Every distinct launch the launchers make, built from NumPy stand-ins."""
    out = []
    for idx in (np.int32, np.int64):
        indptr = np.array([0, 2, 3], idx)
        indices = np.array([0, 1, 1], idx)
        data = np.ones(3, np.float32)
        x = np.ones((2, 5), np.float32)
        y = np.empty((2, 5), np.float32)
        out.append(cu_spmm.plan(indptr, indices, data, x, y))
        out.append(cu_spmm.plan(indptr, indices, data, x, y, bias=np.ones(2, np.float32)))
        out.append(cu_spmm.plan(indptr, indices, data, x, y, relu=True))
        x8, y8 = np.ones((2, 8), np.float32), np.empty((2, 8), np.float32)
        assert cu_spmm.plan(indptr, indices, data, x8, y8).kernel.startswith("sparsecore_spmm4")
        out.append(cu_spmm.plan(indptr, indices, data, x8, y8, bias=data, relu=True, gate=y8))
        out.append(cu_spmm_t.plan(indptr, indices, indices, data, x, y))
        out.append(cu_spmm_t.plan(indptr, indices, indices, data, x, y, gate=x))
        out.append(cu_sddmm.plan(indptr, indices, x, x, np.empty(3, np.float32)))
        out.append(cu_sddmm.plan(indptr, indices, x, x, data, bias_grad=np.ones(2, np.float32)))
        g = np.empty((2, 2), np.float32)
        out.append(cu_grow.mask_plan(indptr, indices, None, g, 0, 0))
        out.append(cu_grow.mask_plan(indptr, indices, np.ones(3, np.bool_), g, 0, 0))
    for flat in (np.int32, np.int64):
        bs, bf = np.empty(4, np.int32), np.empty(4, flat)  # score keys, flat indices
        u = cu_grow.Union(np.empty((2, 2), np.float32), 4, 2, 2, 0, bs, bf, 4)
        bins = np.empty(cu_grow.N_BINS, np.uint64)
        counter = np.zeros(1, np.uint64)
        below = cu_grow.BELOW_ALL
        out.append(cu_grow.hist_plan(u, below, 0, 0, 0, 0, 0, 16, bins))
        out.append(cu_grow.hist_plan(u, below, 0xFFFFFFFF, 7, 0xFFFF, 3, 1, 0, bins))
        out.append(cu_grow.select_plan(u, below, 0, 0, 0, bs, bf, counter, 4))
        out.append(cu_grow.select_plan(u, 5, 1, 9, cu_grow.ALL_FLATS, bs, bf, counter, 4))
    a = np.ones((2, 3), np.float32)
    out.append(cu_ew.relu_plan(a, a))
    out.append(cu_ew.relu_backward_plan(a, a, a))
    out.append(cu_ew.sgd_plan(a, a, 0.1, 0.0))
    out.append(cu_ew.sgd_momentum_plan(a, a, a, 0.1, 0.9, 1e-4, True))
    out.append(cu_ew.adam_plan(a, a, a, a, 0.9, 0.1, 0.999, 1e-3, 1e-3, 0.5, 1e-8, 0, 1, 1e-5))
    return out


def _signatures(source):
    """{kernel: [is_pointer, ...]} from the preprocessed source (macros expanded)."""
    text = subprocess.run(
        [NVCC, "-E", "-x", "cu", _module.source_path(source)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    sigs = {}
    for name, params in re.findall(
        r'extern\s+"C"\s+(?:__global__|__attribute__\(\(global\)\))\s+void\s+'
        r"(sparsecore_\w+)\s*\(([^)]*)\)",
        text,
    ):
        sigs[name] = ["*" in p for p in params.split(",")]
    return sigs


def _ptx_entries(ptx):
    """{kernel: [ptx type, ...]} from PTX text."""
    entries = {}
    for name, params in re.findall(r"\.entry\s+(\w+)\s*\(([^)]*)\)", ptx):
        entries[name] = re.findall(r"\.param\s+\.(\w+)", params)
    return entries


# What cupy.RawModule really compiles with: our options, then CuPy's own (-ftz=true), which win.
CUPY_OPTIONS = (*_module.OPTIONS, *_module.CUPY_APPENDED_OPTIONS)


def _nvcc_ptx(arch, path, options=CUPY_OPTIONS):
    res = subprocess.run(
        [NVCC, f"-arch={arch}", "-ptx", *options, "-Werror", "all-warnings", "-o", "-", path],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, f"nvcc {arch} {path}:\n{res.stderr}"
    return res.stdout


@pytest.fixture(scope="module")
def ptx_text():
    if NVCC is None:
        pytest.skip("nvcc is not on PATH")
    return {
        (arch, src): _nvcc_ptx(arch, _module.source_path(src))
        for arch in ("sm_80", "sm_90")
        for src in SOURCES
    }


@pytest.fixture(scope="module")
def ptx(ptx_text):
    return {key: _ptx_entries(text) for key, text in ptx_text.items()}


def _float_instructions(ptx):
    """PTX instructions that compute on or compare floats (loads, stores and moves excluded:
    they copy bits, which flush-to-zero never changes)."""
    ops = re.findall(r"^\s*(?:@!?%p\d+\s+)?([a-z][\w.]*)", ptx, flags=re.M)
    return sorted(
        {
            o
            for o in ops
            if re.search(r"\.f(16|32|64)\b", o)
            and not o.startswith(("ld.", "st.", "mov.", "cvta", "atom.", "red."))
        }
    )


def test_grow_selects_with_integer_instructions_under_cupys_flush_to_zero(ptx_text):
    """CuPy compiles with -ftz=true: a float compare or fabsf in the grow would rank subnormal
    scores as 0. grow.cu has no float instruction at all, so its ranking is the bits'."""
    for arch in ("sm_80", "sm_90"):
        assert _float_instructions(ptx_text[(arch, "grow.cu")]) == []
        # the products do compute in float, and under CuPy's options they do flush
        assert any(".ftz" in op for op in _float_instructions(ptx_text[(arch, "spmm.cu")]))


def test_the_float_instruction_finder_sees_fabsf_and_compares(tmp_path):
    """A negative control: the check above would fail for the grow's former float scoring."""
    if NVCC is None:
        pytest.skip("nvcc is not on PATH")
    src = tmp_path / "old.cu"
    src.write_text(
        'extern "C" __global__ void f(const float* g, float thr, int* out)\n'
        "{ out[threadIdx.x] = fabsf(g[threadIdx.x]) > thr; }\n"
    )
    ops = _float_instructions(_nvcc_ptx("sm_90", str(src)))
    assert any(op.startswith("abs.ftz.f32") for op in ops), ops
    assert any(op.startswith("setp.") and ".ftz" in op for op in ops), ops


def test_kernels_that_run_in_place_declare_no_restrict():
    """relu(y, y) and relu_backward(dy, y, dy) alias an input with the output: a __restrict__
    on either would be undefined behaviour."""
    if NVCC is None:
        pytest.skip("nvcc is not on PATH")
    text = subprocess.run(
        [NVCC, "-E", "-x", "cu", _module.source_path("elementwise.cu")],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    for name in ("sparsecore_relu", "sparsecore_relu_backward"):
        params = re.search(rf"void\s+{name}\s*\(([^)]*)\)", text).group(1)
        assert "__restrict__" not in params, f"{name}({params})"
    sgd = re.search(r"void\s+sparsecore_sgd\s*\(([^)]*)\)", text).group(1)
    assert "__restrict__" in sgd  # the search itself reads the signatures


def test_every_source_compiles_and_is_prefixed(ptx):
    assert set(SOURCES) == {"spmm.cu", "sddmm.cu", "grow.cu", "elementwise.cu"}
    for (arch, src), entries in ptx.items():
        assert entries, f"{src} ({arch}) defines no kernel"
        assert all(name.startswith("sparsecore_") for name in entries)


def test_launch_plans_match_the_kernel_signatures(ptx):
    sigs = {}
    for src in SOURCES:
        sigs.update(_signatures(src))
    for plan in _plans():
        for arch in ("sm_80", "sm_90"):
            entries = ptx[(arch, plan.source)]
            assert plan.kernel in entries, f"{plan.kernel} is not defined in {plan.source}"
            types = entries[plan.kernel]
            assert len(plan.args) == len(types), (
                f"{plan.kernel}: launcher passes {len(plan.args)} arguments, "
                f"the kernel takes {len(types)}"
            )
        pointers = sigs[plan.kernel]
        for i, (a, t, is_ptr) in enumerate(zip(plan.args, types, pointers, strict=True)):
            where = f"{plan.kernel} argument {i}"
            if is_ptr:
                assert isinstance(a, np.ndarray), f"{where}: a pointer, got {type(a).__name__}"
                continue
            assert isinstance(a, np.generic), f"{where}: pass a NumPy scalar, got {a!r}"
            assert a.dtype.itemsize == PTX_BYTES[t], f"{where}: {a.dtype} for .{t}"
            assert (a.dtype.kind == "f") == t.startswith("f"), f"{where}: {a.dtype} for .{t}"


def test_launch_blocks_are_legal():
    for plan in _plans():
        assert 0 < np.prod(plan.block) <= 1024 and plan.block[0] % 32 == 0, plan.kernel
        assert plan.grid[1] <= 65535 and plan.grid[2] <= 65535


def _nvrtc():
    pytest.importorskip("cupy")
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
    except Exception as e:  # the NVRTC shared library is missing
        pytest.skip(f"NVRTC unavailable: {e}")
    return nvrtc


@pytest.mark.parametrize("arch", ["compute_80", "compute_90"])
@pytest.mark.parametrize("src", SOURCES)
def test_nvrtc_compiles_with_the_launcher_options(src, arch):
    """What cupy.RawModule does on a device, minus the device: NVRTC with _module.OPTIONS and
    the options CuPy appends."""
    nvrtc = _nvrtc()
    prog = nvrtc.createProgram(_module.read_source(src), src, [], [])
    try:
        try:
            nvrtc.compileProgram(prog, [*CUPY_OPTIONS, f"-arch={arch}"])
        except Exception as e:
            pytest.fail(f"NVRTC rejected {src}: {e}\n{nvrtc.getProgramLog(prog)}")
        ptx = nvrtc.getPTX(prog)
    finally:
        nvrtc.destroyProgram(prog)
    ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
    names = {p.kernel for p in _plans() if p.source == src}
    assert names <= set(_ptx_entries(ptx))


# ---------------------------------------------------------------------------- no CuPy


class _FakeCupy:
    """Looks like a CuPy array to the dispatcher."""

    shape = (5, 3)
    ndim = 2


_FakeCupy.__module__ = "cupy"


@pytest.fixture
def no_cupy(monkeypatch):
    """As if CuPy were not installed (whatever this machine has)."""
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError
    monkeypatch.setattr(V, "_gpu_state", {})
    yield
    V._gpu_state.clear()


def test_gpu_calls_without_cupy_say_how_to_install(no_cupy, rng):
    W = CSR.random((5, 5), 0.4, seed=1)
    F = _FakeCupy()
    npx = np.ones((5, 3), np.float32)
    calls = {
        "X": lambda: kernels.spmm(W, F),
        "W": lambda: kernels.spmm(F, npx),
        "dY": lambda: kernels.spmm_t(W, F),
        "out": lambda: kernels.sddmm(W, npx, npx, out=F),
        "keep": lambda: kernels.topk_grow(W, npx, npx, 1, keep=F),
        "W.data": lambda: kernels.magnitude_drop((W.indptr, W.indices, F, W.shape), 1),
        "grow_rows": lambda: kernels.merge(W, np.ones(W.nnz, bool), F, np.array([0])),
        "values": lambda: kernels.remap(np.array([0]), F),
        "W.to_device": lambda: W.to_device(),
    }
    for name, call in calls.items():
        with pytest.raises(kernels.GPUUnavailableError, match=re.escape(V.GPU_INSTALL)) as e:
            call()
        assert "CuPy is not installed" in str(e.value)
        if name != "W.to_device":
            assert str(e.value).startswith(f"{name} is a CuPy array")
    assert issubclass(kernels.GPUUnavailableError, RuntimeError)


def test_mixing_messages_name_the_argument():
    assert "X is a host (NumPy/scipy) object" in str(V.backend_mismatch("X", True))
    assert "cupy.asarray(X)" in str(V.backend_mismatch("X", True))
    assert "dY is a CuPy array" in str(V.backend_mismatch("dY", False))


def test_importing_never_imports_cupy():
    code = (
        "import sys, kernels, sparsecore, kernels.cuda.grow, kernels.cuda._csr; "
        "sys.exit('cupy' in sys.modules)"
    )
    assert (
        subprocess.run(
            [sys.executable, "-c", code], cwd=os.path.dirname(_module.HERE) + "/.."
        ).returncode
        == 0
    )
