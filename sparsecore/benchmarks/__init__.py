"""The benchmark suite behind ``sparsecore bench``: kernels, training steps, width scaling.

``suite`` runs and reports, ``kernels`` the kernel level, ``step`` one training-step configuration
per process, ``common`` timing and the machine's description. ``bench/`` holds thin scripts and
the pytest-benchmark files over these.
"""
