"""Moved to the package sparsecore/mpi/ (one module per job). This name stays an alias of that
package (the same module object)."""

import sys

from sparsecore import mpi as _moved

sys.modules[__name__] = _moved
