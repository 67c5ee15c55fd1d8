"""sparsecore: a true-sparse training engine (weights, gradients and optimizer state nnz-sized)."""

from sparsecore._threads import configure_threads, threading_info

configure_threads()  # before NumPy/Numba start their thread pools; see sparsecore/_threads.py

from sparsecore.formats import CSR, as_csr  # noqa: E402

__version__ = "0.1.0"
__all__ = ["CSR", "as_csr", "threading_info", "__version__"]
