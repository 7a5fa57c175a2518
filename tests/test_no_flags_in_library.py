"""The library names parameters, only the CLI names flags (issue 25).

Library code (everything outside `cli/`) raises errors that name a *parameter* in backticks (`time_budget`);
`cli/common.to_flags`, applied in the CLI's one error handler, shows each as the running command's flag
(--time-budget). These tests walk the AST of every library module: no message names a --flag, and every
backticked parameter name in a message is one the translator knows, so no backtick ever reaches the user.
"""

from __future__ import annotations

import ast
import doctest
import re
from pathlib import Path

import pytest

from tinystories_cli import cli
from tinystories_cli.cli import common

PACKAGE = Path(__file__).resolve().parents[1] / "tinystories_cli"
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
# Other programs' flags that a message may name (a pip command to run).
THIRD_PARTY_FLAGS = {"--force-reinstall"}
# Where a message text is built: a variable with one of these names, or a function with one in its name.
MESSAGE_NAMES = re.compile(r"(fix|hint|msg|message|what|why|reason|advice|note)", re.IGNORECASE)
ERROR_CALLS = re.compile(r"(Error|Exception|Warning|^warn$|^warning$|^fail$)")


def library_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[0] != "cli")


def _name(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ""


def message_strings(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, text) of each string constant (f-string parts included) that can end up in an error or warning:
    inside a `raise`, an `...Error(...)`/`warn(...)` call, an assignment to a message-like name, or a `return`
    of a function whose name says it builds a message."""
    roots: list[ast.AST] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise):
            roots.append(node)
        elif isinstance(node, ast.Call) and ERROR_CALLS.search(_name(node.func)):
            roots.append(node)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if node.value is not None and any(MESSAGE_NAMES.search(_name(t)) for t in targets):
                roots.append(node.value)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and MESSAGE_NAMES.search(node.name):
            roots += [r.value for r in ast.walk(node) if isinstance(r, ast.Return) and r.value is not None]
    seen: dict[int, tuple[int, str]] = {}
    for root in roots:
        for c in ast.walk(root):
            if isinstance(c, ast.Constant) and isinstance(c.value, str):
                seen[id(c)] = (c.lineno, c.value)
    return sorted(seen.values())


def flags_named(text: str) -> list[str]:
    """The --flags a message names (other programs' flags excepted).

    >>> flags_named("pass --force, or `tslm train --preset debug` (pip install --force-reinstall tslm)")
    ['--force', '--preset']
    >>> flags_named("pass `force`; a-- b; 2--3; --")
    []
    """
    return [f for f in FLAG.findall(text) if f not in THIRD_PARTY_FLAGS]


def library_messages() -> list[tuple[str, int, str]]:
    out = []
    for path in library_files():
        rel = path.relative_to(PACKAGE)
        out += [(str(rel), line, text) for line, text in message_strings(ast.parse(path.read_text()))]
    return out


def test_no_library_message_names_a_flag():
    named = [f"tinystories_cli/{f}:{line}: {flags_named(text)} in {text!r}"
             for f, line, text in library_messages() if flags_named(text)]
    assert not named, ("library messages name --flags; name the parameter in backticks instead "
                       "(`force`, `tslm encode x.txt out=y.npy`):\n" + "\n".join(named))


def test_the_scan_finds_flags_where_messages_are_built():
    src = '''
def check(x):
    fix = "pass --force"
    if x:
        raise UserError(f"--out {x} exists", fix)
    warnings.warn("use --seed")
    raise ValueError("fine: `force`")

def reencode_hint(p):
    return f"run `tslm encode {p} --out y`"
'''
    found = [(line, flags_named(text)) for line, text in message_strings(ast.parse(src)) if flags_named(text)]
    assert found == [(3, ["--force"]), (5, ["--out"]), (6, ["--seed"]), (10, ["--out"])]


# --- every backticked parameter name has a flag -----------------------------------------------------------

def all_flags() -> dict[str, set[str]]:
    """{command: its long options} of every subcommand."""
    out = {}
    for name in cli.COMMANDS:
        opts = {o for p in cli.load_command(name).params for o in getattr(p, "opts", ()) if o.startswith("--")}
        out[name] = {o.split("/")[0] for o in opts} | {"--help"}
    return out


def known_parameters() -> dict[str, str]:
    """The translator's table over every command: what a library message may put in backticks."""
    table: dict[str, str] = {}
    for name in cli.COMMANDS:
        table.update(common.flag_table(name))
    return table


def backticked_parameters(text: str) -> list[tuple[str | None, str]]:
    """(command or None, name) for each backticked identifier and each `name=` in a backticked `tslm CMD` line.

    >>> backticked_parameters("pass `force`, or `tslm encode a.txt out=b.npy force=True` (`config.json`)")
    [('encode', 'out'), ('encode', 'force'), (None, 'force')]
    """
    found = []
    for m in common.COMMAND.finditer(text):
        for arg in common.ARGUMENT.findall(m[2]):
            if kv := common.ASSIGNED.fullmatch(arg):
                found.append((m[1], kv[1]))
    return found + [(None, n) for n in common.PARAMETER.findall(text)]


def test_every_backticked_parameter_in_a_library_message_has_a_flag():
    table = known_parameters()
    unknown = []
    for f, line, text in library_messages():
        for command, name in backticked_parameters(text):
            if command is not None and command not in cli.COMMANDS:
                unknown.append(f"tinystories_cli/{f}:{line}: no command `tslm {command}`")
            elif command is not None and common.command_line_flag(name) != common.flag_table(command).get(name):
                unknown.append(f"tinystories_cli/{f}:{line}: {name}= is not {common.command_line_flag(name)} "
                               f"of tslm {command}")
            elif command is None and name not in table:
                unknown.append(f"tinystories_cli/{f}:{line}: `{name}`")
    assert not unknown, ("backticked names the CLI cannot show as a flag (add the rename to cli/common.FLAG_RENAMES "
                         "or the command's FLAG_RENAMES):\n" + "\n".join(unknown))


def test_every_rename_is_a_real_flag():
    flags = all_flags()
    everywhere = set().union(*flags.values())
    stale = [f"{k} -> {v}" for k, v in {**common.FLAG_RENAMES, **common.setting_flags()}.items() if v not in everywhere]
    for name in cli.COMMANDS:
        own = getattr(cli.command_module(name), "FLAG_RENAMES", {})
        stale += [f"tslm {name}: {k} -> {v}" for k, v in own.items() if v not in flags[name]]
    assert not stale, "renames to flags no command has: " + "; ".join(stale)


def test_an_error_naming_a_command_imports_no_other_command(tmp_path):
    """`tslm download`'s no-network error suggests `tslm quickstart ...`: showing it must not import quickstart."""
    import subprocess
    import sys

    code = ("import sys; from tinystories_cli.cli import common; "
            "print(common.to_flags('see `tslm quickstart --text FILE`, `tslm encode a.txt out=b.npy force=True`')); "
            "print(sorted(m for m in sys.modules if m.startswith('tinystories_cli.cli.') "
            "and m != 'tinystories_cli.cli.common'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out == "see `tslm quickstart --text FILE`, `tslm encode a.txt --out b.npy --force`\n[]\n"


def test_a_commands_own_names_win():
    assert common.flag_table("generate")["max_new_tokens"] == "--max-tokens"
    assert common.flag_table("generate")["temperature"] == "--temp"
    # download's FLAG_RENAMES win over its own options' names: the library's `root` (the data root) is the
    # command's --dir, and `out_dir` (hf-model's directory, download_hf_model(out_dir=)) is the command's --out
    assert common.flag_table("download")["root"] == "--dir"
    assert common.flag_table("download")["out_dir"] == "--out"
    assert common.flag_table("bpe")["out_dir"] == "--out"          # the library's name for bpe's --out
    assert common.flag_table("train")["context_length"] == "--ctx"  # a setting with its own flag
    assert common.flag_table("export")["fmt"] == "--format"


# --- the CLI shows flags ------------------------------------------------------------------------------------

@pytest.mark.parametrize("module", ["tinystories_cli.cli.common", "tinystories_cli.runs", "tinystories_cli.tokens"])
def test_doctests(module):
    import importlib

    assert doctest.testmod(importlib.import_module(module)).failed == 0


def test_doctests_here():
    import sys

    assert doctest.testmod(sys.modules[__name__]).failed == 0


def test_the_cli_shows_flags_not_parameters(run_cli, tmp_path, monkeypatch):
    from tinystories_cli import paths

    monkeypatch.setattr(paths, "RUNS_ROOT", tmp_path / "runs")
    code, _, err = run_cli("eval")
    assert code == 2 and "train one with `tslm train --preset debug`, or pass a run name" in err
    text = tmp_path / "t.txt"
    text.write_text("one story\n")
    code, _, err = run_cli("stats", str(text), "--separator", "")
    assert code == 2 and "--separator must not be empty (e.g. --separator '<|endoftext|>'" in err
    code, _, err = run_cli("generate", "hi", "--max-tokens", "0")
    assert code == 2 and "--max-tokens must be at least 1, got 0" in err
    code, _, err = run_cli("train", "--run-name", "../x", "--preset", "debug", "--print-config")
    assert code == 2 and "(pass a plain name, or a directory with --run-dir)" in err
    assert "`" not in err.replace("`tslm", "")


def test_a_plain_valueerror_is_translated_too(run_cli, monkeypatch):
    """Not only UserError: a library ValueError that reaches the handler shows flags as well."""
    from tinystories_cli import stats

    def boom(*a, **k):
        raise ValueError("`unit` must be one of words, chars")

    monkeypatch.setattr(stats, "parse_separator", boom)
    code, _, err = run_cli("stats", __file__)
    assert code == 2 and "--unit must be one of words, chars (rerun with --debug" in err
