"""sparsecore: a true-sparse training engine (weights, gradients and optimizer state nnz-sized)."""

from kernels._threads import configure_threads, threading_info

configure_threads()  # before NumPy/Numba start their thread pools; see kernels/_threads.py

from kernels.formats import CSR, as_csr  # noqa: E402

__version__ = "0.1.0"
__all__ = ["CSR", "as_csr", "threading_info", "__version__"]
