"""The `tslm` command: a Typer app whose subcommands live one per module in this package.

Each `cli/<name>.py` is thin: it parses and validates flags, calls the library module of the
same name, and renders the result. Errors a user can cause are `UserError`s (or click usage
errors); `main` prints them as one red line and exits 2, with the parameter names the library puts in
backticks shown as this command's flags (`common.to_flags`, the one translator). `--debug` (or
TSLM_DEBUG=1) shows tracebacks instead.
"""

from __future__ import annotations

import importlib
import os
import sys

import typer
from typer.core import TyperCommand, TyperGroup

try:  # recent Typer vendors its own copy of click; older versions use click itself.
    from typer._click.exceptions import ClickException, UsageError
except ImportError:  # pragma: no cover - depends on the installed Typer
    from click.exceptions import ClickException, UsageError
try:
    from typer.exceptions import Abort, Exit
except ImportError:  # pragma: no cover
    from click.exceptions import Abort, Exit

from tinystories_cli import __version__
from tinystories_cli import console as terminal
from tinystories_cli.console import print_error
from tinystories_cli.errors import UserError
from tinystories_cli.fileio import DISK_FULL

# Registered subcommands in --help order, with their one-line summary. A command is listed only once
# it really works. Modules are imported only when their command runs, so `tslm bpe` or `tslm --help`
# never pay for importing torch.
COMMANDS: dict[str, str] = {
    "quickstart": "From nothing to a generated story in one command (download, bpe, encode, train, generate).",
    "download": "Fetch a dataset or any URL: resumable, verified, atomic.",
    "bpe": "Train a byte-level BPE tokenizer (GPT-2 pre-tokenization, special tokens).",
    "encode": "Encode text files into token files (.npy + JSON sidecar), in parallel.",
    "train": "Train a Transformer LM from a preset or config, with checkpoints and exact resume.",
    "eval": "Loss, perplexity and bits-per-byte of a run or checkpoint on a token file.",
    "generate": "Sample text with a KV cache: temperature, top-k, top-p, streaming.",
    "account": "Parameters, FLOPs, AdamW training memory and training time for a model preset.",
    "plot": "Plot runs' metrics (loss, grad norm, lr) on one figure, PNG or ASCII.",
    "compare": "Compare runs in one table: differing settings, val loss, perplexity, bits-per-byte.",
    "stats": "Documents, bytes, tokens and a document-length histogram of a text file.",
    "export": "Export a run to Hugging Face format (LlamaForCausalLM + tokenizer) or plain safetensors.",
    "import": "Import a Hugging Face Llama or GPT-2 directory as a run (eval, generate, export, fine-tune it).",
}
# Commands whose module name differs from the command (`import` is a Python keyword).
MODULES: dict[str, str] = {"import": "import_"}


# The subcommand this process runs, once its module is loaded: the error handler shows its flags.
RUNNING: dict[str, str] = {}


def command_module(name: str):
    """The module of subcommand `name` (imported now if it was not)."""
    return importlib.import_module(f"tinystories_cli.cli.{MODULES.get(name, name)}")


def load_command(name: str) -> TyperCommand:
    """Build the click command for `name` by importing its module (only now)."""
    module = command_module(name)
    sub = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    sub.command(name, **getattr(module, "COMMAND_KWARGS", {}))(module.command)
    command = typer.main.get_command(sub)
    command.name = name
    return _plain_labels(command)


def _plain_labels(command):
    """`_plain_type_label` on every parameter of `command`, its --help included."""
    for param in command.params:
        _plain_type_label(param)
    help_option = command.get_help_option

    def plain_help_option(ctx):
        opt = help_option(ctx)
        if opt is not None and not getattr(opt, "_tslm_plain", False):
            _plain_type_label(opt)
            opt._tslm_plain = True
        return opt

    command.get_help_option = plain_help_option
    return command


_PLAIN_TYPES = {"bool": None, "str": "TEXT", "int": "INTEGER", "float": "FLOAT", "path": "PATH", "file": "FILE",
                "directory": "DIR", "list[str]": "TEXT..."}


def _plain_type_label(param) -> None:
    """--help's type column: nothing for a flag, plain words (TEXT, INTEGER, FLOAT, PATH) for a value, instead
    of typer's `<bool>` / `<str>` annotation labels. Set on this parameter only (the class stays as it is)."""
    original = param.display_type_rich

    def plain(ctx=None):
        label = original(ctx)
        if not isinstance(label, str) or not (label.startswith("<") and label.endswith(">")):
            return label
        inner = label[1:-1]
        return _PLAIN_TYPES.get(inner, inner.upper())

    param.display_type_rich = plain


class LazyGroup(TyperGroup):
    """A command group that imports a subcommand's module only when that subcommand is invoked."""

    def list_commands(self, ctx) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx, name: str):
        if name not in COMMANDS:
            return None
        if ctx.resilient_parsing or _listing_help(ctx):
            # The group's --help only needs each command's summary: skip the import.
            return TyperCommand(name=name, help=COMMANDS[name], short_help=COMMANDS[name], callback=None)
        RUNNING["command"] = name
        return load_command(name)


def _listing_help(ctx) -> bool:
    return ctx.meta.get("tslm.listing_help", False)


class _HelpAwareGroup(LazyGroup):
    def format_help(self, ctx, formatter):
        ctx.meta["tslm.listing_help"] = True
        try:
            return super().format_help(ctx, formatter)
        finally:
            ctx.meta["tslm.listing_help"] = False


app = typer.Typer(
    cls=_HelpAwareGroup,
    name="tslm",
    help="Train small Transformer language models from scratch. Start with `tslm quickstart`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"tslm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Show the version and exit."
    ),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
) -> None:
    """tslm: the small-LM pipeline in one command."""
    if debug:
        os.environ["TSLM_DEBUG"] = "1"


def _debug_enabled(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("TSLM_DEBUG", "") not in ("", "0")


def _flags(message: str) -> str:
    """A library message with its backticked parameter names shown as the running command's flags."""
    from tinystories_cli.cli.common import to_flags  # only on an error: `tslm --help` needs no pydantic

    return to_flags(message, RUNNING.get("command"))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_enabled(argv)
    if debug and "--debug" in argv and argv.index("--debug") > 0:
        argv.remove("--debug")  # accept --debug anywhere, not only before the subcommand
        argv.insert(0, "--debug")
    command = _plain_labels(typer.main.get_command(app))
    RUNNING.clear()
    shown, terminal.show_parameters = terminal.show_parameters, _flags  # the training display's notes name flags too
    try:
        rv = command.main(args=argv, prog_name="tslm", standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except Exit as e:
        return e.exit_code
    except ClickException as e:
        if type(e).__name__ == "NoArgsIsHelpError":
            return 0  # bare `tslm` or `tslm CMD` with no arguments: the help was printed
        if debug:
            raise
        hint = ""
        if isinstance(e, UsageError) and e.ctx is not None:
            hint = f" (see `{e.ctx.command_path} --help`)"
        print_error(f"{e.format_message()}{hint}")
        return 2
    except UserError as e:
        if debug:
            raise
        print_error(_flags(str(e)))
        return 2
    except ValueError as e:  # the library's plain-words errors: bad values it was given
        if debug:
            raise
        print_error(f"{_flags(str(e))} (rerun with --debug for the traceback)")
        return 2
    except (Abort, KeyboardInterrupt):
        print_error("interrupted")
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # a full disk, or a bug (not a user error): say so and how to see more
        if debug:
            raise
        if isinstance(e, OSError) and e.errno in DISK_FULL:
            where = f" to write {e.filename}" if e.filename else ""
            print_error(f"no space left{where} (disk full or over a size limit); files written before are kept "
                        "(free some disk space and run the command again)")
            return 2
        print_error(f"internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback and report it)")
        return 1
    finally:
        terminal.show_parameters = shown  # (in-process callers, tests: the library's own words again)
