"""Moved to kernels/validation.py: the kernel library (the leaf layer) owns it. This name stays an
alias of that module (the same module object, so patching either patches both)."""

import sys

from kernels import validation as _moved

sys.modules[__name__] = _moved
