"""The package's dependency rule: imports point one way, down the layers, and never in a cycle.

    cli -> pipelines -> train -> inference -> model -> core -> base

Each top-level module of `tinystories_cli` is one node, and so is each folder (`tokenizer/`, `interop/`,
`fastpath/`, `train/`, `cli/`): a folder's modules may import each other, but the folder as a whole sits on
one layer. Every node is placed on a layer below (a new module must be placed too). An import (at the top of
a module or inside a function) may only reach the same layer or a lower one, the nodes import each other in
no cycle, and no module imports another module's private (`_name`) definitions.

The only way up is a lazy re-export that keeps a library-contract name importable where it was before it
moved up (`tinystories_cli.runs.load_trained_model`): a module-level `__getattr__` that imports the name's
new home on first access. Each such name is listed in CONTRACT_REEXPORTS, and the test checks that
importing the module does not import the home.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tinystories_cli"
ROOT = "tinystories_cli"

# Bottom to top. A node is a top-level module or folder of the package (the package's own __init__ is ROOT).
LAYERS: dict[str, list[str]] = {
    # no torch, no model: errors, atomic files, paths, the console, the config schema
    "base": [ROOT, "errors", "fileio", "paths", "console", "config"],
    # files on disk and the machine: token files, checkpoints, run directories, the tokenizer, batches, devices
    "core": ["tokens", "checkpoint", "runs", "tokenizer", "data", "device", "sample", "download"],
    # the network and what maps, counts or compiles it
    "model": ["model", "optim", "account", "fastpath", "interop"],
    # using a trained model: load it, evaluate it, sample from it, describe its run
    "inference": ["trained", "evaluate", "generate", "sampling_grid", "run_readme"],
    "train": ["train"],
    # commands composed of the layers below, one library module each
    "pipelines": ["quickstart", "compare", "export", "importer", "stats", "plot"],
    "cli": ["cli", "__main__"],
}
ORDER = list(LAYERS)

# Names that moved up and stay importable where the library contract names them: module -> {name: new home}.
# They are resolved by the module's `__getattr__` on first access (never at import); nothing else may point up.
CONTRACT_REEXPORTS: dict[str, dict[str, str]] = {
    "tinystories_cli.runs": {"load_trained_model": "tinystories_cli.trained",
                             "model_from_checkpoint": "tinystories_cli.trained"},
    "tinystories_cli.model": {name: "tinystories_cli.interop.llama" for name in (
        "permute_for_llama", "unpermute_from_llama", "to_llama_state_dict", "from_llama_state_dict",
        "llama_config_dict")},
}
# Where the package may call importlib.import_module: a module-level __getattr__ (lazy names), and the CLI
# importing the module of the subcommand that runs.
DYNAMIC_IMPORTS_ALLOWED = {"tinystories_cli.cli"}

Imports = dict[str, set[tuple[str, "str | None", int]]]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def node_of(module: str) -> str:
    """The node a module belongs to: its top-level module or folder.

    >>> node_of("tinystories_cli.train.loop"), node_of("tinystories_cli.runs"), node_of("tinystories_cli")
    ('train', 'runs', 'tinystories_cli')
    """
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ROOT


def layer_of(module: str, layers: dict[str, list[str]] = LAYERS) -> str | None:
    node = node_of(module)
    return next((layer for layer, nodes in layers.items() if node in nodes), None)


def imports_in_source(mod: str, is_package: bool, source: str, modules: set[str]) -> set[tuple[str, str | None, int]]:
    """{(imported module, imported name or None, line)}: every import of a package module in `source`, at the
    top or inside a function (`from pkg import mod` counts as importing `pkg.mod`)."""
    pkg = mod if is_package else mod.rpartition(".")[0]
    out: set[tuple[str, str | None, int]] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out |= {(a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] == ROOT}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            if base.split(".")[0] != ROOT:
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.add((sub, None, node.lineno) if sub in modules else (base, a.name, node.lineno))
    return out


def package_imports() -> Imports:
    """{module: {(imported module, imported name or None, line)}} for imports of tinystories_cli modules."""
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {mod: imports_in_source(mod, path.name == "__init__.py", path.read_text(), set(paths))
            for mod, path in paths.items()}


def node_graph(imports: Imports) -> dict[str, set[str]]:
    """The import graph between nodes (a folder's internal imports are not edges)."""
    graph: dict[str, set[str]] = {}
    for mod, imps in imports.items():
        graph.setdefault(node_of(mod), set()).update(node_of(t) for t, _, _ in imps if node_of(t) != node_of(mod))
    return graph


def upward_imports(imports: Imports, layers: dict[str, list[str]] = LAYERS) -> list[str]:
    """Each import that reaches a higher layer than its module's, or a node on no layer, as one line."""
    order = list(layers)
    bad = []
    for mod, imps in imports.items():
        for target, _, line in imps:
            here, there = layer_of(mod, layers), layer_of(target, layers)
            if here is None or there is None:
                unplaced = node_of(mod) if here is None else node_of(target)
                bad.append(f"{mod}:{line} imports {target} (not placed on a layer: {unplaced})")
            elif order.index(there) > order.index(here):
                bad.append(f"{mod}:{line} imports {target} ({here} -> {there})")
    return sorted(bad)


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


# --- the package ------------------------------------------------------------------------------------------

def test_every_node_is_on_one_layer():
    placed = [n for nodes in LAYERS.values() for n in nodes]
    assert len(placed) == len(set(placed)), "a node is placed on two layers"
    unplaced = sorted({node_of(m) for m in package_imports() if layer_of(m) is None})
    assert not unplaced, f"place these modules or folders on a layer in tests/test_layout.py: {unplaced}"
    assert ORDER[-1] == "cli" and len(ORDER) - 1 >= 3, "cli on top, at least three layers below it"


def test_imports_point_down():
    upward = upward_imports(package_imports())
    assert not upward, "imports that run back up: " + "; ".join(upward)


def test_no_import_cycle_between_nodes():
    graph = node_graph(package_imports())
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_no_private_names_cross_modules():
    crossing = [f"{mod}:{line} imports {target}.{name}" for mod, imports in package_imports().items()
                for target, name, line in imports
                if name and name.startswith("_") and not name.startswith("__") and target != mod]
    assert not crossing, "private names imported from another module: " + "; ".join(sorted(crossing))


def dynamic_imports() -> list[tuple[str, str, int]]:
    """(module, enclosing function or '<module>', line) of each importlib.import_module call in the package."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        parent = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            called = getattr(node, "func", None)
            if isinstance(node, ast.Call) and getattr(called, "attr", getattr(called, "id", None)) == "import_module":
                func = parent.get(node)
                while func is not None and not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    func = parent.get(func)
                found.append((module_name(path), func.name if func else "<module>", node.lineno))
    return found


def lazy_maps() -> dict[str, dict[str, str]]:
    """{module: {name: home}} read from each package module that resolves names in a module `__getattr__`."""
    out = {}
    for mod, func, _ in dynamic_imports():
        if func == "__getattr__":
            m = importlib.import_module(mod)
            out[mod] = dict(getattr(m, "LAZY_REEXPORTS", None) or m._LAZY)
    return out


def test_dynamic_imports_are_lazy_names_or_the_cli():
    stray = [f"{mod}:{line} in {func}" for mod, func, line in dynamic_imports()
             if func != "__getattr__" and mod not in DYNAMIC_IMPORTS_ALLOWED]
    assert not stray, "importlib.import_module outside a module __getattr__: " + "; ".join(stray)


def test_lazy_names_that_cross_nodes_are_exactly_the_listed_contract_reexports():
    crossing = {mod: {n: home for n, home in names.items() if node_of(home) != node_of(mod)}
                for mod, names in lazy_maps().items()}
    assert {m: names for m, names in crossing.items() if names} == CONTRACT_REEXPORTS
    for mod, names in CONTRACT_REEXPORTS.items():  # and the names are the home's own objects
        m = importlib.import_module(mod)
        for name, home in names.items():
            assert getattr(m, name) is getattr(importlib.import_module(home), name), f"{mod}.{name}"
            assert name in dir(m)


@pytest.mark.parametrize("mod", sorted(CONTRACT_REEXPORTS))
def test_contract_reexports_are_lazy(mod):
    """Importing the module (in a fresh interpreter) loads none of the homes; asking for a name loads it."""
    homes = sorted(set(CONTRACT_REEXPORTS[mod].values()))
    name = next(iter(CONTRACT_REEXPORTS[mod]))
    code = textwrap.dedent(f"""
        import importlib, sys
        m = importlib.import_module({mod!r})
        before = [h for h in {homes!r} if h in sys.modules]
        getattr(m, {name!r})
        print(before, [h for h in {homes!r} if h in sys.modules])
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == f"[] {homes!r}", out


def test_contract_names_import_where_the_library_contract_says():
    names: dict = {}
    exec("from tinystories_cli.model import *", names)  # every name in model.__all__, the lazy ones included
    from tinystories_cli import model
    assert set(model.__all__) <= set(names) and callable(names["to_llama_state_dict"])
    from tinystories_cli.runs import load_trained_model
    from tinystories_cli.trained import load_trained_model as home
    assert load_trained_model is home


# --- the checker itself fails where it should ----------------------------------------------------------------

def test_the_checker_catches_a_back_up_import():
    """A deliberately added back-up import (runs importing the model, top level or inside a function) fails."""
    modules = {"tinystories_cli.runs", "tinystories_cli.model", "tinystories_cli.errors", "tinystories_cli.train",
               "tinystories_cli.train.loop"}
    src = textwrap.dedent("""
        from tinystories_cli.errors import UserError
        def load():
            from tinystories_cli.model import TransformerLM
            from tinystories_cli import train
    """)
    imports = {"tinystories_cli.runs": imports_in_source("tinystories_cli.runs", False, src, modules)}
    assert upward_imports(imports) == ["tinystories_cli.runs:4 imports tinystories_cli.model (core -> model)",
                                       "tinystories_cli.runs:5 imports tinystories_cli.train (core -> train)"]
    down = {"tinystories_cli.train.loop": imports_in_source("tinystories_cli.train.loop", False, src, modules)}
    assert upward_imports(down) == []  # the same imports from the train layer point down
    # an unplaced node is refused, and a folder is one node whatever its module
    assert upward_imports({"tinystories_cli.newthing": {("tinystories_cli.errors", None, 1)}}) == [
        "tinystories_cli.newthing:1 imports tinystories_cli.errors (not placed on a layer: newthing)"]
    assert layer_of("tinystories_cli.interop.hf") == layer_of("tinystories_cli.interop") == "model"


def test_the_checker_catches_a_cycle_between_nodes():
    imports = {"tinystories_cli.interop.llama": {("tinystories_cli.checkpoint", None, 1)},
               "tinystories_cli.interop.hf": {("tinystories_cli.model", None, 1)},
               "tinystories_cli.model": {("tinystories_cli.interop.llama", None, 1)},
               "tinystories_cli.tokenizer.bpe": {("tinystories_cli.tokenizer.files", None, 1)}}
    graph = node_graph(imports)
    assert graph["tokenizer"] == set()  # inside a folder: no edge
    assert find_cycle(graph) == ["interop", "model", "interop"]
    assert find_cycle({"x": {"y"}, "y": {"z"}, "z": {"x"}}) == ["x", "y", "z", "x"]


def test_the_checker_counts_relative_imports():
    modules = {"tinystories_cli.interop.hf", "tinystories_cli.interop.llama", "tinystories_cli.train"}
    got = imports_in_source("tinystories_cli.interop.hf", False, "from . import llama\nfrom .. import train\n", modules)
    assert got == {("tinystories_cli.interop.llama", None, 1), ("tinystories_cli.train", None, 2)}
    assert upward_imports({"tinystories_cli.interop.hf": got}) == [
        "tinystories_cli.interop.hf:2 imports tinystories_cli.train (model -> train)"]
