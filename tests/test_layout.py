"""The package's dependency rule: imports point one way, down the floors, and never in a cycle.

    cli -> pipelines -> train -> core -> base

Every module of `tinystories_cli` is placed on a floor below (a new module must be placed too). An import
(at the top of a module or inside a function) may only reach the same floor or a lower one, the modules
import each other in no cycle, and no module imports another module's private (`_name`) definitions.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tinystories_cli"

FLOORS = {
    "base": ["tinystories_cli", "tinystories_cli.errors", "tinystories_cli.fileio",
             "tinystories_cli.paths", "tinystories_cli.console", "tinystories_cli.config"],
    "core": ["tinystories_cli.model", "tinystories_cli.optim", "tinystories_cli.data", "tinystories_cli.tokens",
             "tinystories_cli.checkpoint", "tinystories_cli.runs", "tinystories_cli.evaluate",
             "tinystories_cli.device", "tinystories_cli.account", "tinystories_cli.generate",
             "tinystories_cli.download*", "tinystories_cli.sample", "tinystories_cli.run_readme",
             "tinystories_cli.sampling_grid", "tinystories_cli.tokenizer*", "tinystories_cli.interop*",
             "tinystories_cli.fastpath*"],
    "train": ["tinystories_cli.train*"],
    "pipelines": ["tinystories_cli.quickstart*", "tinystories_cli.compare", "tinystories_cli.export",
                  "tinystories_cli.stats", "tinystories_cli.plot"],
    "cli": ["tinystories_cli.cli*", "tinystories_cli.__main__"],
}
ORDER = list(FLOORS)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def floor_of(module: str) -> str | None:
    for floor, patterns in FLOORS.items():
        for p in patterns:
            if module == p or (p.endswith("*") and (module == p[:-1] or module.startswith(p[:-1] + "."))):
                return floor
    return None


def package_imports() -> dict[str, set[tuple[str, str | None, int]]]:
    """{module: {(imported module, imported name or None, line)}} for imports of tinystories_cli modules."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    out: dict[str, set] = {m: set() for m in modules}
    for mod, path in modules.items():
        pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("tinystories_cli"):
                        out[mod].add((a.name, None, node.lineno))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(pkg.split(".")[:len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
                if not base.startswith("tinystories_cli"):
                    continue
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    out[mod].add((sub, None, node.lineno) if sub in modules else (base, a.name, node.lineno))
    return out


def test_every_module_has_a_floor():
    unplaced = [m for m in package_imports() if floor_of(m) is None]
    assert not unplaced, f"place these modules on a floor in tests/test_layout.py: {unplaced}"


def test_imports_point_down():
    upward = []
    for mod, imports in package_imports().items():
        for target, _, line in imports:
            if ORDER.index(floor_of(target)) > ORDER.index(floor_of(mod)):
                upward.append(f"{mod}:{line} imports {target} ({floor_of(mod)} -> {floor_of(target)})")
    assert not upward, "imports that run back up: " + "; ".join(sorted(upward))


def test_no_private_names_cross_modules():
    crossing = [f"{mod}:{line} imports {target}.{name}" for mod, imports in package_imports().items()
                for target, name, line in imports
                if name and name.startswith("_") and not name.startswith("__") and target != mod]
    assert not crossing, "private names imported from another module: " + "; ".join(sorted(crossing))


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle in a directed graph as [a, b, ..., a], or None.

    >>> find_cycle({"a": {"b"}, "b": {"a"}})
    ['a', 'b', 'a']
    >>> find_cycle({"a": {"b"}, "b": set()}) is None
    True
    """
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_no_import_cycle():
    imports = package_imports()
    # A package's __init__ re-exporting its own submodules is not a cycle of ideas: leave those edges out.
    graph = {m: {t for t, _, _ in imps if t != m and not t.startswith(m + ".")} for m, imps in imports.items()}
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_the_checks_can_fail():
    assert find_cycle({"x": {"y"}, "y": {"z"}, "z": {"x"}}) == ["x", "y", "z", "x"]
    assert floor_of("tinystories_cli.cli.train") == "cli" and floor_of("tinystories_cli.train.loop") == "train"
    assert floor_of("tinystories_cli.nowhere") is None
