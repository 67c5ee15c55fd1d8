"""DeviceCSR moved to kernels/formats.py, beside its host twin CSR; this name stays."""

from kernels.formats import DeviceCSR

__all__ = ["DeviceCSR"]
