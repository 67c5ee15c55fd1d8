"""The house rules that a reader of the imports can check.

- kernels/ is the leaf: importing it loads nothing of sparsecore (the static contract is
  import-linter's, pyproject.toml [tool.importlinter], run by .ci/run as `lint-imports`).
- No project module is imported inside a function unless ALLOWED below says why: lazy imports
  of optional or slow parts are fine; an import inside a function that only dodges a cycle is
  debt, recorded here with the step of the house redesign that removes it. An entry that is no
  longer needed fails too, so the list only shrinks.
"""

import ast
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ("kernels", "sparsecore")

LAZY_BENCH = "lazy: the benchmark suite and its baselines load only for `sparsecore bench`"

# (file, imported module) -> why it is imported inside a function
ALLOWED = {
    ("sparsecore/benchmarks/step.py", "sparsecore"): LAZY_BENCH,
    ("sparsecore/benchmarks/step.py", "sparsecore.cost"): LAZY_BENCH,
    ("sparsecore/benchmarks/step.py", "sparsecore.data"): LAZY_BENCH,
    ("sparsecore/benchmarks/step.py", "sparsecore.rigl.distributions"): LAZY_BENCH,
    ("sparsecore/benchmarks/step.py", "sparsecore.train"): LAZY_BENCH,
    ("sparsecore/benchmarks/suite.py", "sparsecore.benchmarks.step"): LAZY_BENCH,
    ("sparsecore/benchmarks/suite.py", "sparsecore.benchmarks.torch_step"): LAZY_BENCH,
    ("sparsecore/benchmarks/torch_step.py", "sparsecore.torch"): (
        "lazy: the optional [torch] extra, so the torch level's table rebuilds without torch"
    ),
    ("sparsecore/cli.py", "sparsecore.benchmarks.suite"): LAZY_BENCH,
}


def in_function_imports() -> Counter:
    """(file, module) -> count of imports of project modules placed inside functions."""
    found = Counter()
    for root in PROJECT:
        for path in sorted((ROOT / root).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()

            def visit(node, inside, rel=rel):
                for child in ast.iter_child_nodes(node):
                    if inside and isinstance(child, (ast.Import, ast.ImportFrom)):
                        names = (
                            [a.name for a in child.names]
                            if isinstance(child, ast.Import)
                            else [child.module or ""]
                        )
                        for name in names:
                            if child.__class__ is ast.ImportFrom and child.level:
                                name = "relative"  # the project uses absolute imports only
                            if name.split(".")[0] in PROJECT or name == "relative":
                                found[(rel, name)] += 1
                    visit(
                        child, inside or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
                    )

            visit(ast.parse(path.read_text()), False)
    return found


def test_no_unexplained_import_inside_a_function():
    found = in_function_imports()
    unexplained = sorted(set(found) - set(ALLOWED))
    assert not unexplained, (
        "imports of project modules inside functions, not in tests/test_architecture.py's "
        f"ALLOWED (move them to the top, or add the reason): {unexplained}"
    )
    stale = sorted(set(ALLOWED) - set(found))
    assert not stale, f"ALLOWED entries no longer needed (remove them): {stale}"


def test_importing_kernels_loads_nothing_of_sparsecore():
    code = "import sys, kernels; print(sorted(m for m in sys.modules if m.split('.')[0] == 'sparsecore'))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_the_old_import_paths_still_resolve():
    """The modules that moved into kernels/ keep their sparsecore names (the same objects)."""
    import kernels._threads
    import kernels.formats
    import kernels.validation
    import sparsecore._threads
    import sparsecore.formats
    import sparsecore.validation

    assert sparsecore.validation is kernels.validation
    assert sparsecore.formats is kernels.formats and sparsecore.formats.CSR is kernels.CSR
    assert sparsecore._threads is kernels._threads
    from sparsecore.validation import GPUUnavailableError, check_csr_arrays  # noqa: F401
