"""Loss curves from runs' `metrics.jsonl`: read, select, smooth, and draw (PNG or terminal).

A run logs one JSON object per line, e.g.

    {"step": 100, "tokens": 819200, "elapsed_s": 41.2, "train_loss": 3.91, "lr": 0.002, "grad_norm": 0.8}
    {"step": 200, "tokens": 1638400, "elapsed_s": 80.7, "train_loss": 3.10, "val_loss": 3.05}

`load_series` turns one run into (x, y) arrays for a metric, dropping points whose value is
missing, null, NaN or infinite (a diverged run still plots up to where it diverged). The PNG goes
through matplotlib (an optional extra, imported only when drawing one); `render_ascii` needs
nothing beyond the standard library.

>>> s = Series("a", [0, 1, 2, 3], [4.0, 2.0, 2.0, 0.0])
>>> smooth(s.y, 2)
[4.0, 3.0, 2.0, 1.0]
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from tinystories_cli import runs
from tinystories_cli.errors import UserError

# --x choices -> the metrics.jsonl key holding that axis.
X_KEYS = {"step": "step", "tokens": "tokens", "time": "elapsed_s"}
COMMON_METRICS = ("val_loss", "train_loss", "grad_norm", "lr")
# Terminal markers, one per run, chosen to stay distinguishable without colour.
MARKERS = "*o+x#@%&=~"


@dataclass
class Series:
    """One run's curve: `x` and `y` have the same length and hold only finite values."""

    name: str
    x: list[float]
    y: list[float]
    dropped: int = 0  # points present in the log but not finite (NaN/inf/null), or without an x value
    missing_x: int = 0  # of those, the ones without a finite x (e.g. no elapsed_s for --x time)
    keys: set[str] = field(default_factory=set)  # every key seen in the run's log (for error hints)


def metrics_path(run: str | os.PathLike) -> Path:
    """Where the metrics of RUN live: RUN may be a metrics file, a run directory, or a run name under runs/."""
    p = Path(run)
    if p.is_file():
        return p
    if p.is_dir():
        return p / runs.METRICS_FILE
    named = runs.runs_root() / str(run)
    if named.is_dir():
        return named / runs.METRICS_FILE
    raise UserError(f"run not found: {run}",
                    f"pass a run directory, a run name under {runs.runs_root()}/, or a metrics.jsonl")


def run_name(run: str | os.PathLike) -> str:
    """Legend label: the run directory's name (`latest` resolved to the run it points at), or the
    file's stem for a metrics file not named metrics.jsonl."""
    p = Path(run)
    if p.is_file():
        return p.resolve().parent.name if p.name == runs.METRICS_FILE else p.stem
    if not p.exists() and (runs.runs_root() / str(run)).is_dir():
        p = runs.runs_root() / str(run)
    return p.resolve().name if p.exists() else str(run)






def load_series(run: str | os.PathLike, metric: str, x: str = "step", name: str | None = None) -> Series:
    """Read RUN's metrics and pick (x, metric) pairs; see the module docstring."""
    if x not in X_KEYS:
        raise UserError(f"unknown `x` {x!r}", f"choose one of: {', '.join(X_KEYS)}")
    records = runs.read_metrics(metrics_path(run))
    xkey = X_KEYS[x]
    s = Series(name or run_name(run), [], [])
    for rec in records:
        s.keys.update(rec)
        if metric not in rec:
            continue
        xv, yv = runs.finite(rec.get(xkey)), runs.finite(rec[metric])
        if xv is None or yv is None:
            s.dropped += 1
            s.missing_x += xv is None
            continue
        s.x.append(xv)
        s.y.append(yv)
    return s


def smooth(y: list[float], k: int) -> list[float]:
    """Trailing moving average over the last `k` points (the first points average what exists).

    Trailing, not centred, so the curve never borrows from the future: the last point is the mean
    of the last k logged values.
    """
    if k <= 1 or not y:
        return list(y)
    out, acc = [], 0.0
    for i, v in enumerate(y):
        acc += v
        if i >= k:
            acc -= y[i - k]
        out.append(acc / min(i + 1, k))
    return out


def prepare(series: list[Series], metric: str, smooth_k: int = 1, log_y: bool = False) -> list[Series]:
    """Check there is something to draw, smooth, and (for a log axis) drop non-positive values."""
    if smooth_k < 1:
        raise UserError(f"`smooth_k` must be >= 1, got {smooth_k}")
    if not any(s.y for s in series):
        no_x = sum(s.missing_x for s in series)
        if no_x:
            raise UserError(f"{no_x} {metric!r} value(s) have no x value for this `x`", "try `x` step")
        seen = sorted(set().union(*(s.keys for s in series)) - set(X_KEYS.values()))
        raise UserError(f"no finite {metric!r} values in the given run(s)",
                        f"metrics logged: {', '.join(seen) or 'none'}")
    out = []
    for s in series:
        x, y = s.x, smooth(s.y, smooth_k)
        if log_y:
            keep = [i for i, v in enumerate(y) if v > 0]
            x, y = [x[i] for i in keep], [y[i] for i in keep]
        out.append(Series(s.name, x, y, s.dropped, s.missing_x, s.keys))
    return out


def x_label(x: str, scale: float = 1.0) -> str:
    if x == "time":
        return {1.0: "time (s)", 60.0: "time (min)", 3600.0: "time (h)"}[scale]
    return x


def time_scale(series: list[Series]) -> float:
    """Seconds per unit for a readable time axis (s, min or h)."""
    hi = max((max(s.x) for s in series if s.x), default=0.0)
    return 3600.0 if hi >= 3 * 3600 else 60.0 if hi >= 180 else 1.0


# ---------------------------------------------------------------- PNG (matplotlib, optional)


def pyplot():
    try:
        import matplotlib
    except ImportError:
        # No square brackets in the message: the error line is rendered as rich markup.
        raise UserError("matplotlib is not installed",
                        "pip install matplotlib (the tslm 'plot' extra), or use `ascii`") from None
    matplotlib.use("Agg")  # no display needed; must precede the pyplot import
    import matplotlib.pyplot as plt

    return plt


def render_png(series: list[Series], metric: str, x: str = "step", log_y: bool = False, title: str | None = None,
               dpi: int = 120) -> bytes:
    """The figure as PNG bytes (the caller writes them atomically)."""
    plt = pyplot()
    scale = time_scale(series) if x == "time" else 1.0
    fig, ax = plt.subplots(figsize=(8, 5), dpi=dpi)
    try:
        for s in series:
            xs = [v / scale for v in s.x]
            # A single point has no line to draw: give every curve a marker when it is that short.
            marker = "o" if len(xs) <= 20 else None
            label = f"{s.name} ({s.dropped} non-finite dropped)" if s.dropped else s.name
            ax.plot(xs, s.y, label=label, marker=marker, markersize=3, linewidth=1.5)
        if log_y:
            from matplotlib.ticker import FuncFormatter

            ax.set_yscale("log")
            # Loss ranges span well under a decade: plain numbers read better than 4x10^0.
            plain = FuncFormatter(lambda v, _: f"{v:g}")
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain)
        ax.set_xlabel(x_label(x, scale))
        ax.set_ylabel(metric)
        ax.set_title(title or f"{metric} vs {x_label(x, scale)}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="best", fontsize="small")
        return figure_png(fig)
    finally:
        plt.close(fig)


def figure_png(fig) -> bytes:
    """A matplotlib figure as PNG bytes (tight layout), for atomic writes by the caller."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# ---------------------------------------------------------------- terminal plot (no dependency)


def _span(lo: float, hi: float) -> tuple[float, float]:
    """Widen a degenerate range (one point, a flat curve) so the points land mid-axis."""
    if hi > lo:
        return lo, hi
    pad = abs(lo) * 0.05 or 1.0
    return lo - pad, hi + pad


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def render_ascii(series: list[Series], metric: str, x: str = "step", log_y: bool = False,
                 width: int = 72, height: int = 20) -> str:
    """A character-grid plot: one marker per run, y labels at the left, x range underneath, legend.

    >>> print(render_ascii([Series("a", [0, 1], [1.0, 0.0])], "loss",
    ...                    width=10, height=3))  # doctest: +NORMALIZE_WHITESPACE
    loss vs step
             1 |*
               |
             0 |         *
               +----------
                0        1
    * a (2 points)
    """
    scale = time_scale(series) if x == "time" else 1.0
    pts = [(i, v / scale, (math.log10(w) if log_y else w)) for i, s in enumerate(series) for v, w in zip(s.x, s.y)]
    x0, x1 = _span(min(p[1] for p in pts), max(p[1] for p in pts))
    y0, y1 = _span(min(p[2] for p in pts), max(p[2] for p in pts))
    xs, ys = x1 - x0, y1 - y0
    grid = [[" "] * width for _ in range(height)]
    for i, xv, yv in pts:
        col = round((xv - x0) / xs * (width - 1))
        row = height - 1 - round((yv - y0) / ys * (height - 1))
        cell = grid[row][col]
        # Where two runs share a cell, show that rather than hiding one of them.
        grid[row][col] = MARKERS[i % len(MARKERS)] if cell in (" ", MARKERS[i % len(MARKERS)]) else "?"

    def ylabel(v: float) -> str:
        return _fmt(10 ** v if log_y else v)

    lw = max(len(ylabel(y0)), len(ylabel(y1))) + 1
    lines = [f"{metric}{' (log scale)' if log_y else ''} vs {x_label(x, scale)}"]
    for r, row in enumerate(grid):
        label = ylabel(y1) if r == 0 else ylabel(y0) if r == height - 1 else \
            ylabel(y1 - r / (height - 1) * ys) if r == height // 2 and height >= 7 else ""
        lines.append(f"{label:>{lw}} |" + "".join(row).rstrip())
    lines.append(" " * lw + " +" + "-" * width)
    left, right = _fmt(x0), _fmt(x1)
    lines.append(" " * (lw + 2) + left + " " * max(1, width - len(left) - len(right)) + right)
    for i, s in enumerate(series):
        extra = f", {s.dropped} non-finite dropped" if s.dropped else ""
        lines.append(f"{MARKERS[i % len(MARKERS)]} {s.name} ({len(s.y)} point{'s' if len(s.y) != 1 else ''}{extra})")
    if any(cell == "?" for row in grid for cell in row):
        lines.append("? several runs in one cell")
    return "\n".join(lines)
