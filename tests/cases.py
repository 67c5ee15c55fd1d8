"""Named sparse matrices for the kernel tests, odd shapes and edge cases first."""

import numpy as np
import pytest
import scipy.sparse as sp

from sparsecore import CSR, cli
from sparsecore.layers import mlp
from sparsecore.train import TrainConfig


def _from_mask(mask, rng, index_dtype=np.int32):
    m, n = mask.shape
    rows, cols = np.nonzero(mask)
    indptr = np.zeros(m + 1, dtype=index_dtype)
    np.cumsum(np.bincount(rows, minlength=m), out=indptr[1:])
    data = rng.standard_normal(rows.shape[0]).astype(np.float32)
    return CSR(indptr, cols.astype(index_dtype), data, (m, n), index_dtype=index_dtype)


def make(name, rng):
    """Return a CSR for a named case."""
    if name == "empty_0x0":  # no rows, no columns
        return _from_mask(np.zeros((0, 0), bool), rng)
    if name == "empty_0x5":  # no rows: Y is 0 × B
        return _from_mask(np.zeros((0, 5), bool), rng)
    if name == "empty_4x0":  # no columns: every row empty, Y = 0
        return _from_mask(np.zeros((4, 0), bool), rng)
    if name == "nnz0_3x4":
        # . . . .
        # . . . .
        # . . . .
        return _from_mask(np.zeros((3, 4), bool), rng)
    if name == "empty_rows":
        # x . x . .      rows 1 and 3 are empty, row 4 is full
        # . . . . .
        # . x . . x
        # . . . . .
        # x x x x x
        mask = np.zeros((5, 5), bool)
        mask[0, [0, 2]] = mask[2, [1, 4]] = mask[4, :] = True
        return _from_mask(mask, rng)
    if name == "row_1xN":  # x . x x . . . x ... (one row, 67 columns)
        return _from_mask(rng.random((1, 67)) < 0.4, rng)
    if name == "col_Nx1":  # one column, 61 rows, about half present
        return _from_mask(rng.random((61, 1)) < 0.5, rng)
    if name == "full_7x5":  # density 1
        return _from_mask(np.ones((7, 5), bool), rng)
    if name == "odd_37x53":
        return _from_mask(rng.random((37, 53)) < 0.15, rng)
    if name == "odd_int64":  # the same kernels on int64 indices
        return _from_mask(rng.random((29, 41)) < 0.2, rng, np.int64)
    if name == "skewed_rows":  # one long row among short ones: load balance by nonzeros
        mask = rng.random((64, 300)) < 0.01
        mask[17, :] = True
        return _from_mask(mask, rng)
    if name == "wide_3x5000":
        return _from_mask(rng.random((3, 5000)) < 0.01, rng)
    raise KeyError(name)


NAMES = [
    "empty_0x0",
    "empty_0x5",
    "empty_4x0",
    "nnz0_3x4",
    "empty_rows",
    "row_1xN",
    "col_Nx1",
    "full_7x5",
    "odd_37x53",
    "odd_int64",
    "skewed_rows",
    "wide_3x5000",
]


def forms(W):
    """The same matrix in every accepted input form."""
    return {
        "csr": W,
        "tuple": (W.indptr.copy(), W.indices.copy(), W.data.copy(), W.shape),
        "scipy_csr": sp.csr_array((W.data, W.indices, W.indptr), shape=W.shape),
        "scipy_csc64": sp.csc_matrix(W.to_scipy().tocsc()).astype(np.float64),
        "scipy_coo": W.to_scipy().tocoo(),
    }


def poisoned(shape):
    return np.full(shape, np.nan, dtype=np.float32)


def tol(absprod):
    """Tolerance of a float32 sum against its float64 reference, from the sum of |terms|."""
    return 1e-5 * absprod + 1e-30


# ---------------------------------------------------------------------------- backends
# One test body, many backends: a test takes the ``backend`` fixture (tests/conftest.py) and
# moves its operands with it. Three sides:
# - "cpu": NumPy arrays and the Numba kernels;
# - "cuda-emulated": the CUDA side over NumPy arrays (a DeviceCSR of NumPy arrays), with the
#   public kernels.* calls routed to kernels.backend.cuda_backend(numpy) and every CUDA kernel
#   launch run by its NumPy model (tests/test_cuda_emulated.py). The operations' one body, the
#   CUDA launchers' host code and the device checks run as on a GPU; the .cu code does not;
# - "cuda": CuPy on a real device (skips cleanly without CuPy or a device).


class Backend:
    def __init__(self, name):
        self.name = name
        self.emulated = name == "cuda-emulated"
        self.gpu = name == "cuda"  # CuPy arrays
        self.device = name != "cpu"  # the CUDA launchers (real or emulated)

    def W(self, W):
        """A CSR on this backend (a DeviceCSR on the CUDA side)."""
        if self.emulated:
            from kernels.formats import DeviceCSR

            return DeviceCSR(W.indptr.copy(), W.indices.copy(), W.data.copy(), W.shape)
        return W.to_device() if self.gpu else W

    def a(self, x):
        """An array on this backend (None passes through)."""
        if x is None or not self.gpu:
            return x
        import cupy

        return cupy.asarray(x)

    def np(self, x):
        """A NumPy view/copy of a result."""
        if self.gpu and not isinstance(x, np.ndarray):
            import cupy

            return cupy.asnumpy(x)
        return x

    def poisoned(self, shape):
        return self.a(poisoned(shape))

    def launchers(self, op):
        """The launcher module of an operation on this backend (kernels/cpu or kernels/cuda)."""
        import importlib

        return importlib.import_module(f"kernels.{'cuda' if self.device else 'cpu'}.{op}")

    def __repr__(self):
        return self.name


def gpu_skip_reason():
    try:
        import cupy  # noqa: F401
    except ImportError:
        return "CuPy is not installed"
    from kernels.validation import gpu_unavailable_reason

    return gpu_unavailable_reason()


BACKENDS = ["cpu", "cuda-emulated", "cuda"]


def make_backend(name, monkeypatch=None, rng=None):
    """The backend of a parametrised test (the ``backend`` fixture of tests/conftest.py).

    "cuda" skips without CuPy or a device; "cuda-emulated" needs ``monkeypatch`` and ``rng``:
    it installs the NumPy models of the CUDA kernels and routes every public kernels.* call to
    the CUDA backend over NumPy for the rest of the test.
    """
    if name == "cuda":
        reason = gpu_skip_reason()
        if reason is not None:
            pytest.skip(f"CUDA backend unavailable: {reason}")
    if name == "cuda-emulated":
        from kernels import backend as kb
        from tests.test_cuda_emulated import install

        install(monkeypatch, rng)
        emu = kb.cuda_backend(np)
        monkeypatch.setattr(kb, "side_of", lambda op, **operands: emu)
    return Backend(name)


def blobs_npz(path, seed=0):
    """An .npz of three well-separated Gaussian blobs in 20 features (600 train, 200 test rows),
    the dataset file a user would pass to `sparsecore train --dataset`; returns its path."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((3, 20)) * 3
    ytr, yte = rng.integers(0, 3, 600), rng.integers(0, 3, 200)
    np.savez(
        path,
        x_train=centers[ytr] + rng.standard_normal((600, 20)),
        y_train=ytr,
        x_test=centers[yte] + rng.standard_normal((200, 20)),
        y_test=yte,
    )
    return path


def mnist_subset(n_train=1024, n_test=256, features=784):
    """The first rows (and features) of the bundled MNIST's training and test sets, with its
    validation split, as a Dataset."""
    from sparsecore import data as D

    full = D.load("mnist")
    return D.Dataset(
        "mnist-subset",
        full.x_train[:n_train, :features],
        full.y_train[:n_train],
        full.x_val,
        full.y_val,
        full.x_test[:n_test, :features],
        full.y_test[:n_test],
        10,
    )


# ---------------------------------------------------------------- engine tests
# A dense float64 reference of the MLP, small models and a small MNIST run's config, shared
# by the engine's test files (test_layers, test_rigl, test_optim, test_train, test_plan...).


def ref_forward_backward(Ws, bs, masks, x, y):
    """Masked-dense MLP with ReLU in float64: returns (loss, grads of W (masked), grads of b)."""
    acts, h = [x], x
    for l, (W, b) in enumerate(zip(Ws, bs, strict=True)):
        z = (W * masks[l]) @ h + b[:, None]
        h = np.maximum(z, 0) if l < len(Ws) - 1 else z
        acts.append(h)
    z = h - h.max(axis=0, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=0, keepdims=True)
    B = x.shape[1]
    loss = -np.mean(np.log(p[y, np.arange(B)]))
    d = p.copy()
    d[y, np.arange(B)] -= 1
    d /= B
    gW, gb = [None] * len(Ws), [None] * len(Ws)
    for l in range(len(Ws) - 1, -1, -1):
        gW[l] = (d @ acts[l].T) * masks[l]
        gb[l] = d.sum(axis=1)
        if l:
            d = ((Ws[l] * masks[l]).T @ d) * (acts[l] > 0)
    return loss, gW, gb


def small_model(rng, sizes=(13, 11, 7, 5), density=0.5):
    """An MLP of sparse layers of one density, seeded from the test's rng."""
    return mlp(list(sizes), [density] * (len(sizes) - 1), seed=int(rng.integers(1 << 30)))


def mnist_cfg(tmp_path, **kw):
    """A TrainConfig of a small RigL run on MNIST (784-64-10, sparsity 0.9, 2 epochs), its
    outputs in ``tmp_path``; ``kw`` overrides any setting."""
    base = dict(
        arch=[784, 64, 10],
        sparsity=0.9,
        method="rigl",
        delta_t=10,
        epochs=2,
        batch_size=64,
        lr=0.05,
        progress=False,
        out=str(tmp_path),
    )
    base.update(kw)
    return TrainConfig(**base)


def cli_error(capsys, *argv):
    """Run the CLI; it must fail with exit 2 and one 'sparsecore CMD: error:' line, the last
    (details such as a memory plan may stand before it). Returns that line."""
    rc = cli.main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert err and err[-1].startswith(f"sparsecore {argv[0]}: error: "), err
    assert sum("error:" in line for line in err) == 1, err
    return err[-1]
