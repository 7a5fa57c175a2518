"""Side-by-side summary of training runs: the settings that differ, how far each got, and how good it is.

For each run, `summarize_run` reads what the run directory already holds:

    config.json        preset, resolved model + train config, parameter count
    metrics.jsonl      last step and token count, best and final logged validation loss
    eval_*.json        `tslm eval` results (loss, perplexity, bits per byte), if any

`compare_table` keeps only the settings whose values differ between the runs (an ablation shows its
one switch, a learning-rate sweep its `lr`), then the progress and quality columns. `to_markdown`
renders the table for a results file:

    >>> cols = ["run", "lr", "best val"]
    >>> print(to_markdown(cols, [["a", "3e-4", "2.5000"], ["b", "8e-4", "2.4000"]], numeric={"best val"}))
    | run | lr | best val |
    |---|---|---:|
    | a | 3e-4 | 2.5000 |
    | b | 8e-4 | 2.4000 |

With a token file (`tslm compare ... --data valid.npy`) every run is evaluated afresh with
`evaluate.evaluate_run`, exactly as `tslm eval` does, so runs with different tokenizers still
compare on bits per byte.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tinystories_cli import runs
from tinystories_cli.account import parameter_counts
from tinystories_cli.config import ModelConfig, TrainConfig, results_neutral
from tinystories_cli.errors import UserError
from tinystories_cli.evaluate import evaluate_run

# Settings that do not change what a run computes (cadence, hardware, kernels): never a "difference".
BOOKKEEPING = results_neutral(ModelConfig, TrainConfig)


@dataclass
class RunSummary:
    """What one run directory says about itself (None where it does not say)."""

    name: str
    run_dir: Path
    settings: dict[str, Any]  # "preset" then the model and train config keys, flattened
    parameters: int | None = None
    steps: int | None = None
    max_steps: int | None = None
    tokens: int | None = None
    elapsed_s: float | None = None
    best_val_loss: float | None = None
    best_val_step: int | None = None
    final_val_loss: float | None = None
    final_val_step: int | None = None
    eval: dict | None = None  # loss, perplexity, bits_per_byte, data, step
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "run_dir": str(self.run_dir), "settings": self.settings,
            "parameters": self.parameters, "steps": self.steps, "max_steps": self.max_steps, "tokens": self.tokens,
            "elapsed_s": self.elapsed_s, "best_val_loss": self.best_val_loss, "best_val_step": self.best_val_step,
            "final_val_loss": self.final_val_loss, "final_val_step": self.final_val_step, "eval": self.eval,
        }


def flatten_settings(config: dict) -> dict[str, Any]:
    """preset + model + train keys in one flat dict (a train key that collides with a model key is
    prefixed `train.`).

    >>> flatten_settings({"preset": "debug", "model": {"d_model": 64}, "train": {"lr": 0.003}})
    {'preset': 'debug', 'd_model': 64, 'lr': 0.003}
    """
    out: dict[str, Any] = {"preset": config.get("preset")}
    for section in ("model", "train"):
        for k, v in (config.get(section) or {}).items():
            out[f"{section}.{k}" if k in out else k] = v
    return out








def summarize_run(run: str | os.PathLike) -> RunSummary:
    """Read a run (name under runs/, run directory, or runs/latest) into a RunSummary."""
    path = runs.resolve_run(run)
    run_dir = runs.run_dir_of(path)
    config = runs.read_run_config(run_dir)
    s = RunSummary(name=run_dir.name, run_dir=run_dir, settings=flatten_settings(config))
    s.parameters = config.get("parameters")
    if s.parameters is None:
        try:
            s.parameters = parameter_counts(ModelConfig.model_validate(config["model"]))["total"]
        except Exception:  # a damaged config: leave the column empty rather than fail the table
            s.parameters = None
    s.max_steps = config.get("max_steps") or (config.get("train") or {}).get("max_steps")
    for k, v in runs.summarize_run_metrics(run_dir).items():
        setattr(s, k, v)
    if not (run_dir / runs.METRICS_FILE).is_file():
        s.notes.append(f"{run_dir.name}: no {runs.METRICS_FILE} yet")
    s.eval = runs.read_eval_result(run_dir)
    return s




def differing_settings(summaries: list[RunSummary]) -> list[str]:
    """Setting keys whose values are not the same in every run (in config order; bookkeeping excluded).
    For a single run: none."""
    keys: list[str] = []
    for s in summaries:
        keys += [k for k in s.settings if k not in keys]
    missing = object()
    out = []
    for k in keys:
        if k.split(".")[-1] in BOOKKEEPING:
            continue
        values = [s.settings.get(k, missing) for s in summaries]
        if any(v != values[0] for v in values[1:]):
            out.append(k)
    return out


def _fmt_setting(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _fmt_float(v: Any, digits: int) -> str:
    if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
        return "-"
    if not math.isfinite(v):
        return "nan" if math.isnan(v) else "inf"
    return f"{v:.{digits}f}"


def _fmt_count(v: Any) -> str:
    from tinystories_cli.console import human_count

    return "-" if v is None else human_count(v)


# best/final val: the loss logged during training on fixed validation windows (metrics.jsonl);
# eval loss, ppl (perplexity), bpb (bits per byte): `tslm eval` over the whole validation file.
NUMERIC_COLUMNS = {"params", "steps", "tokens", "best val", "final val", "eval loss", "ppl", "bpb"}


def compare_table(summaries: list[RunSummary]) -> tuple[list[str], list[list[str]]]:
    """(column names, rows of formatted cells): run, the differing settings, then progress and quality."""
    diff = differing_settings(summaries)
    show_eval = any(s.eval for s in summaries)
    cols = ["run", *diff, "params", "steps", "tokens", "best val", "final val"]
    if show_eval:
        cols += ["eval loss", "ppl", "bpb"]
    rows = []
    for s in summaries:
        steps = "-" if s.steps is None else (f"{s.steps}/{s.max_steps}" if s.max_steps and s.steps < s.max_steps
                                             else str(s.steps))
        row = [s.name, *(_fmt_setting(s.settings.get(k)) for k in diff), _fmt_count(s.parameters), steps,
               _fmt_count(s.tokens), _fmt_float(s.best_val_loss, 4), _fmt_float(s.final_val_loss, 4)]
        if show_eval:
            e = s.eval or {}
            row += [_fmt_float(e.get("loss"), 4), _fmt_float(e.get("perplexity"), 2),
                    _fmt_float(e.get("bits_per_byte"), 4)]
        rows.append(row)
    return cols, rows


def to_markdown(columns: list[str], rows: list[list[str]], numeric: set[str] = NUMERIC_COLUMNS) -> str:
    """A GitHub Markdown table (numeric columns right-aligned; `|` in cells escaped)."""
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in columns) + " |",
             "|" + "|".join("---:" if c in numeric else "---" for c in columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def unique_names(summaries: list[RunSummary], given: list[str]) -> None:
    """Two runs with the same directory name (from different parents) are labelled by the path given."""
    names = [s.name for s in summaries]
    for s, g in zip(summaries, given):
        if names.count(s.name) > 1:
            s.name = str(g)


def compare_runs(run_args: list[str], data: str | os.PathLike | None = None, batch_size: int = 16,
                 device: str = "auto", on_run=None) -> list[RunSummary]:
    """Summaries of the given runs; with `data`, each also evaluated on that token file (replacing any
    saved eval). `on_run(i, n, name)` is called before each evaluation (progress display)."""
    if not run_args:
        raise UserError("no runs given", "pass one or more run names or run directories")
    summaries = [summarize_run(r) for r in run_args]
    unique_names(summaries, run_args)
    if data is not None:
        if not Path(data).is_file():
            raise UserError(f"token file not found: {data}", "pass a .npy file made by `tslm encode`")
        for i, s in enumerate(summaries):
            if on_run is not None:
                on_run(i, len(summaries), s.name)
            r = evaluate_run(s.run_dir, data, batch_size=batch_size, device=device)
            s.eval = {k: r[k] for k in ("loss", "perplexity", "bits_per_byte", "data", "step")} | {"file": None}
    return summaries
