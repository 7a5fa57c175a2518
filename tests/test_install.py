"""The `dev` extra installs every module the test suite imports.

A test that imports a package which `pip install -e ".[dev]"` does not bring passes on a machine where someone
installed that package by hand and fails on a fresh one. This test reads every import in `tests/` and checks that
each one is the standard library, this project, a test helper, or provided by a distribution that
`pyproject.toml` declares (a core dependency or the `dev` extra), whatever else happens to be installed here.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"


def _norm(name: str) -> str:
    """PEP 503 normalized distribution name: `Typing_Extensions` -> `typing-extensions`."""
    return re.sub(r"[-_.]+", "-", name).lower()


def declared_distributions(pyproject: Path = REPO / "pyproject.toml", extra: str = "dev") -> set[str]:
    """Normalized names of the core dependencies plus the named extra's."""
    project = tomllib.loads(pyproject.read_text())["project"]
    reqs = [*project["dependencies"], *project["optional-dependencies"][extra]]
    return {_norm(re.match(r"[A-Za-z0-9_.\-]+", r.strip()).group(0)) for r in reqs}


def imported_top_level_modules(root: Path = TESTS) -> dict[str, set[str]]:
    """{top-level module: {files importing it}} over every .py file below `root` (absolute imports only)."""
    found: dict[str, set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(root)))
    return found


def local_modules(root: Path = TESTS) -> set[str]:
    """Modules the tests import from their own folders (helpers such as `train_fixtures`)."""
    return {p.stem for p in root.rglob("*.py")} | {p.name for p in root.rglob("*") if p.is_dir()}


def test_every_module_the_tests_import_is_installed_by_the_dev_extra():
    declared = declared_distributions()
    providers = md.packages_distributions()  # module -> distributions that ship it
    own = {"tinystories_cli", "__future__"} | local_modules()
    missing = []
    for module, files in sorted(imported_top_level_modules().items()):
        if module in own or module in sys.stdlib_module_names:
            continue
        dists = {_norm(d) for d in providers.get(module, [])}
        if not dists:
            missing.append(f"{module} (not installed; imported by {', '.join(sorted(files))})")
        elif not dists & declared:
            missing.append(f"{module} (from {', '.join(sorted(dists))}, not declared in the dev extra; "
                           f"imported by {', '.join(sorted(files))})")
    assert not missing, "add to [project.optional-dependencies] dev in pyproject.toml: " + "; ".join(missing)


def test_the_check_sees_an_undeclared_import(tmp_path):
    """The check itself can fail: a test file importing an undeclared package is reported."""
    (tmp_path / "test_x.py").write_text("import numpy\nfrom matplotlib import pyplot\nimport helper_mod\n")
    (tmp_path / "helper_mod.py").write_text("")
    found = imported_top_level_modules(tmp_path)
    assert found.keys() == {"numpy", "matplotlib", "helper_mod"}
    assert "helper_mod" in local_modules(tmp_path)
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\ndependencies = ["numpy>=1"]\n[project.optional-dependencies]\ndev = ["pytest"]\n')
    assert declared_distributions(pyproject) == {"numpy", "pytest"}
    assert "matplotlib" not in declared_distributions(pyproject)
