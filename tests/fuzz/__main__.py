"""``python -m tests.fuzz --minutes N [--category kernels|checkpoint|dataset|cli|all] [--seed S]``

A random hunt for N minutes: cases from a seeded generator (a fresh seed unless --seed), run in
worker processes; every distinct failure is shrunk to a small reproducer, printed, and saved to
tests/fuzz/corpus/ if its signature is new (the corpus holds at most 40 cases).
"""

from __future__ import annotations

import argparse
import secrets
import sys
import time


def main(argv=None) -> int:
    from tests.fuzz import engine as E
    from tests.fuzz import gen_files as GF

    ap = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--category", choices=[*E.CATEGORIES, "all"], default="all")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-save", action="store_true", help="do not write to the corpus")
    ap.add_argument("--no-shrink", action="store_true")
    ap.add_argument("--replay", action="store_true", help="replay the corpus first")
    args = ap.parse_args(argv)
    if args.minutes <= 0:
        ap.error("--minutes must be positive")
    seed = args.seed if args.seed is not None else secrets.randbits(32)
    cats = list(E.CATEGORIES) if args.category == "all" else [args.category]
    print(f"fuzz hunt: {args.minutes:g} min, categories {','.join(cats)}, seed {seed} "
          f"(replay with --seed {seed})", flush=True)
    t0 = time.monotonic()
    deadline = t0 + 60 * args.minutes
    camp = E.Campaign(n_workers=args.workers, timeout_scale=1.0)
    try:
        if args.replay:
            items = [(c, r, case) for c, r, case, _ in E.load_corpus(cats)]
            camp.run_items(items, origin="corpus")
        batch = 0
        grid_done = set()
        while time.monotonic() < deadline:
            items = []
            for cat in cats:
                n = {"kernels": 400, "checkpoint": 25, "dataset": 25, "cli": 25}[cat]
                if cat == "cli" and "cli" not in grid_done:  # the whole grid once, then random
                    grid_done.add("cli")
                    items += [("cli", c, c) for c in GF.cli_grid()]
                    continue
                items += E.generated_items(cat, n, seed * 1000 + batch)
            batch += 1
            camp.run_items(items, deadline=deadline)
            if batch % 5 and time.monotonic() < deadline:
                continue
            print(f"  {time.monotonic() - t0:6.0f} s  " + ", ".join(
                f"{c}={camp.report.counts[c]}" for c in cats) +
                f"  distinct failures so far: {len(camp.report.failures)}", flush=True)
        rep = camp.report
        fails = sorted(rep.failures.values(), key=lambda f: f.signature)
        if not args.no_shrink:
            for f in fails:
                if f.origin == "generated":
                    camp.shrink(f)
        if not args.no_save:
            for f in fails:
                if f.origin == "generated":
                    camp.save(f)
        rep.wall_s = time.monotonic() - t0
        rep.restarts = camp.pool.restarts()
        print()
        print(E.format_failures(fails))
        print()
        if rep.saved:
            print("saved to the corpus: " + ", ".join(p.name for p in rep.saved))
        print(rep.summary_line())
        return 1 if fails else 0
    finally:
        camp.close()


if __name__ == "__main__":
    sys.exit(main())
