"""Command line: ``sparsecore info`` (more subcommands arrive with the training engine)."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="sparsecore", description="True-sparse training engine.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions and the threading setup in force")
    args = ap.parse_args(argv)
    if args.cmd == "info":
        import numba
        import numpy
        import scipy

        import sparsecore

        info = {
            "sparsecore": sparsecore.__version__,
            "numpy": numpy.__version__,
            "scipy": scipy.__version__,
            "numba": numba.__version__,
            "threads": sparsecore.threading_info(),
        }
        print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
