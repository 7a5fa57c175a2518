"""The shared rich consoles and the one-line error style used by every command."""

from __future__ import annotations

from collections.abc import Callable

from rich.console import Console
from rich.markup import escape

# Results go to stdout (so they can be piped); progress, notes and errors go to stderr.
console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def _as_is(text: str) -> str:
    return text


# How the training display shows a library note's backticked parameter names (`fit_memory`): as they are, unless
# the CLI installs its translator (cli/__init__.main: the running command's flags, --fit-memory).
show_parameters: Callable[[str], str] = _as_is


def print_error(message: str) -> None:
    """One red line: what is wrong and how to fix it."""
    err_console.print(f"[bold red]error:[/bold red] {escape(message)}", markup=True, highlight=False, soft_wrap=True)


def print_note(message: str) -> None:
    err_console.print(f"[dim]{escape(message)}[/dim]", soft_wrap=True)


def human_count(n: float) -> str:
    """Compact count with an SI suffix.

    >>> human_count(190460160), human_count(1536), human_count(768)
    ('190.460M', '1.536K', '768')
    """
    for div, suffix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.3f}{suffix}"
    return f"{n:g}" if isinstance(n, float) else str(n)


def human_bytes(n: float) -> str:
    """Bytes in binary units.

    >>> human_bytes(8_508_230_400)
    '7.92 GiB'
    """
    for div, suffix in ((1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if abs(n) >= div:
            return f"{n / div:.2f} {suffix}"
    return f"{int(n)} B"
