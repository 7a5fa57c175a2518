"""The `tslm` command: a Typer app whose subcommands live one per module in this package.

Each `cli/<name>.py` is thin: it parses and validates flags, calls the library module of the
same name, and renders the result. Errors a user can cause are `UserError`s (or click usage
errors); `main` prints them as one red line and exits 2. `--debug` (or TSLM_DEBUG=1) shows
tracebacks instead.
"""

from __future__ import annotations

import importlib
import os
import sys

import typer

try:  # recent Typer vendors its own copy of click; older versions use click itself.
    from typer._click.exceptions import ClickException, UsageError
except ImportError:  # pragma: no cover - depends on the installed Typer
    from click.exceptions import ClickException, UsageError
try:
    from typer.exceptions import Abort, Exit
except ImportError:  # pragma: no cover
    from click.exceptions import Abort, Exit

from tinystories_cli import __version__
from tinystories_cli.console import print_error
from tinystories_cli.errors import UserError

# Registered subcommands, in --help order. A module is listed only once its command really works.
COMMANDS = [
    "download",
    "bpe",
    "encode",
    "train",
    "eval",
    "generate",
    "account",
    "plot",
    "stats",
    "export",
    "quickstart",
]

app = typer.Typer(
    name="tslm",
    help="Train small Transformer language models from scratch: download, bpe, encode, train, eval, generate, account.",
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
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
) -> None:
    """tslm: the small-LM pipeline in one command."""
    if debug:
        os.environ["TSLM_DEBUG"] = "1"


for _name in COMMANDS:
    _module = importlib.import_module(f"tinystories_cli.cli.{_name}")
    app.command(_name, **getattr(_module, "COMMAND_KWARGS", {}))(_module.command)


def _debug_enabled(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("TSLM_DEBUG", "") not in ("", "0")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_enabled(argv)
    if debug and "--debug" in argv and argv.index("--debug") > 0:
        argv.remove("--debug")  # accept --debug anywhere, not only before the subcommand
        argv.insert(0, "--debug")
    command = typer.main.get_command(app)
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
        print_error(str(e))
        return 2
    except (Abort, KeyboardInterrupt):
        print_error("interrupted")
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # a bug, not a user error: say so and how to see more
        if debug:
            raise
        print_error(f"internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback and report it)")
        return 1
