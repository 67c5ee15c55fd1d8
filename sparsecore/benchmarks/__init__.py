"""The benchmarks' one home: the suite behind ``sparsecore bench`` and the pieces every benchmark
script uses.

- ``timing``  the one timer: warm-up, repetitions fitted to a budget, median; ``sync`` for devices
- ``memory``  the one peak-RSS helper (VmHWM: right in a subprocess), the device-pool peak
- ``ops``     each timed operation on a given backend (public or launcher way in), the dense
              baselines, the naive dense grow, the float64 checks
- ``report``  every table and plot: kernel level, the suite's report, RESULTS.md, the GPU table
- ``kernels`` the kernel level (product sweep, fused vs naive grow, threading experiment)
- ``step``    one training-step configuration per process
- ``suite``   ``sparsecore bench``: presets, workers, the CLI
- ``common``  the machine's description, optional torch, the break-even rule

``bench/`` holds thin scripts (and the pytest-benchmark files) over these.
"""
