"""CUDA kernels (CuPy RawModule) and their launchers: one module per operation, with the same
arguments in the same order as its twin in kernels/cpu. Nothing here imports CuPy at import
time; the public, validating entry points are in kernels/__init__.py."""
