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

Seeds: runs whose settings differ only by `seed` are one group (`group_runs`), shown as one row
with the mean ± sample standard deviation of each quality column over the seeds. A group's mean is
marked `~` (within seed noise) when it differs from the first group's (the reference: the baseline
of an ablation) by less than two standard errors of the difference,

    |m1 - m2| < 2 sqrt(s1^2 / n1 + s2^2 / n2)

which needs at least two seeds on both sides (a single-seed group gets no mark either way):

    >>> within_noise(Stat(1.3233, 0.0040, 3), Stat(1.3347, 0.0030, 3))  # 2 SE = 0.0058
    False
    >>> within_noise(Stat(1.3233, 0.0100, 3), Stat(1.3347, 0.0060, 3))  # 2 SE = 0.0135
    True
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tinystories_cli import runs
from tinystories_cli.account import parameter_counts
from tinystories_cli.config import ModelConfig, TrainConfig, results_neutral
from tinystories_cli.console import human_count
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
    nonfinite: list[str] = field(default_factory=list)  # quality columns whose value is NaN/inf (`mark_dropped`)
    duplicate_of: str | None = None  # an earlier run of its group with the same seed (`mark_dropped`)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "run_dir": str(self.run_dir), "settings": self.settings,
            "parameters": self.parameters, "steps": self.steps, "max_steps": self.max_steps, "tokens": self.tokens,
            "elapsed_s": self.elapsed_s, "best_val_loss": self.best_val_loss, "best_val_step": self.best_val_step,
            "final_val_loss": self.final_val_loss, "final_val_step": self.final_val_step, "eval": self.eval,
            "nonfinite": self.nonfinite, "duplicate_seed_of": self.duplicate_of,
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
    # Metrics are logged every few steps: the newest checkpoint may be further on (a stopped run).
    ckpts = runs.step_checkpoints(run_dir)
    if ckpts and (s.steps is None or ckpts[-1][0] > s.steps):
        if s.tokens and s.steps:
            s.tokens = round(s.tokens / s.steps * ckpts[-1][0])
        s.steps = ckpts[-1][0]
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
        # As displayed: 0.0006 and 0.0006000000000000001 (an lr times a ratio) are the same setting.
        values = [_fmt_setting(v) if (v := s.settings.get(k, missing)) is not missing else missing for s in summaries]
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
    return "-" if v is None else human_count(v)


# best/final val: the loss logged during training on fixed validation windows (metrics.jsonl);
# eval loss, ppl (perplexity), bpb (bits per byte): `tslm eval` over the whole validation file.
NUMERIC_COLUMNS = {"params", "steps", "tokens", "best val", "final val", "eval loss", "ppl", "bpb", "seeds"}


def compare_table(summaries: list[RunSummary], group: bool = True) -> tuple[list[str], list[list[str]]]:
    """(column names, rows of formatted cells): run, the differing settings, then progress and quality.
    When some runs differ only by seed (and `group`), one row per group: see `grouped_table`."""
    if group and has_seed_groups(summaries):
        return grouped_table(summaries)
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


# ---------------------------------------------------------------- runs that differ only by seed

SEED_KEY = "seed"
# quality columns: summarized as mean ± std over a group's seeds and marked when within noise
QUALITY_COLUMNS = ("best val", "final val", "eval loss", "ppl", "bpb")
NOISE_MARK = "~"
_SEED_SUFFIX = re.compile(r"[-_.]?(?:s|seed)\d+$")


@dataclass(frozen=True)
class Stat:
    """Mean, sample standard deviation (ddof 1; None for a single value) and count of some values."""

    mean: float
    std: float | None
    n: int


def stat(values: list[float | None]) -> Stat | None:
    """The Stat of the finite values among `values` (None when there are none).

    >>> stat([1.0, 2.0, 3.0])
    Stat(mean=2.0, std=1.0, n=3)
    >>> stat([2.5, None, float("nan")])
    Stat(mean=2.5, std=None, n=1)
    """
    xs = [float(v) for v in values if runs.finite(v) is not None]
    if not xs:
        return None
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None
    return Stat(mean, std, len(xs))


def within_noise(ref: Stat | None, other: Stat | None) -> bool | None:
    """Whether two groups' means differ by less than two standard errors of the difference; None
    when it cannot be told (a side missing or with a single seed)."""
    if ref is None or other is None or ref.std is None or other.std is None:
        return None
    se = math.sqrt(ref.std ** 2 / ref.n + other.std ** 2 / other.n)
    return abs(ref.mean - other.mean) < 2 * se


@dataclass
class RunGroup:
    """Runs whose settings are equal but for the seed (a single run is a group of one)."""

    label: str
    runs: list[RunSummary]

    @property
    def seeds(self) -> list[Any]:
        return [r.settings.get(SEED_KEY) for r in self.runs]


def _group_key(s: RunSummary) -> str:
    return repr(sorted((k, repr(v)) for k, v in s.settings.items()
                       if k != SEED_KEY and k.split(".")[-1] not in BOOKKEEPING))


def group_label(names: list[str]) -> str:
    """One name for a group: the runs' common name without a seed suffix (-s1, _seed2, ...).

    >>> group_label(["abl-tiny-nope-s0", "abl-tiny-nope-s1"]), group_label(["a", "b"]), group_label(["x"])
    ('abl-tiny-nope', 'a (+1)', 'x')
    """
    if len(names) == 1:
        return names[0]
    stems = {_SEED_SUFFIX.sub("", n) for n in names}
    if len(stems) == 1 and stems != {""}:
        return stems.pop()
    return f"{names[0]} (+{len(names) - 1})"


def group_runs(summaries: list[RunSummary]) -> list[RunGroup]:
    """Runs grouped by every setting but the seed (and bookkeeping), in order of first appearance."""
    groups: dict[str, list[RunSummary]] = {}
    for s in summaries:
        groups.setdefault(_group_key(s), []).append(s)
    return [RunGroup(group_label([r.name for r in members]), members) for members in groups.values()]


def _quality(s: RunSummary) -> dict[str, float | None]:
    e = s.eval or {}
    return {"best val": s.best_val_loss, "final val": s.final_val_loss, "eval loss": e.get("loss"),
            "ppl": e.get("perplexity"), "bpb": e.get("bits_per_byte")}


def _fmt_stat(st: Stat | None, digits: int, mark: bool | None) -> str:
    if st is None:
        return "-"
    text = f"{st.mean:.{digits}f}" if st.std is None else f"{st.mean:.{digits}f} ± {st.std:.{digits}f}"
    return f"{text} {NOISE_MARK}" if mark else text


def _same_or_range(values: list[Any], fmt) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    lo, hi = min(vals), max(vals)
    return fmt(lo) if lo == hi else f"{fmt(lo)}-{fmt(hi)}"


def has_seed_groups(summaries: list[RunSummary]) -> bool:
    """Whether any runs differ only by seed (then `compare_table` shows one row per group)."""
    return any(len(g.runs) > 1 for g in group_runs(summaries))


def grouped_table(summaries: list[RunSummary]) -> tuple[list[str], list[list[str]]]:
    """One row per group of runs that differ only by seed: the differing settings, the seeds, and the
    quality columns as mean ± std over the seeds, marked `~` when within noise of the first group."""
    groups = group_runs(summaries)
    firsts = [g.runs[0] for g in groups]
    diff = [k for k in differing_settings(firsts) if k != SEED_KEY]
    show_eval = any(s.eval for s in summaries)
    quality = [c for c in QUALITY_COLUMNS if show_eval or c in ("best val", "final val")]
    cols = ["run", *diff, "seeds", "params", "steps", "tokens", *quality]
    digits = {"ppl": 2}
    # a run with a duplicate seed is shown but not counted again: it is not an independent sample
    stats = [{c: stat([_quality(r)[c] for r in g.runs if r.duplicate_of is None]) for c in quality} for g in groups]
    rows = []
    for i, (g, st) in enumerate(zip(groups, stats)):
        row = [g.label, *(_fmt_setting(g.runs[0].settings.get(k)) for k in diff),
               ",".join(_fmt_setting(r.settings.get(SEED_KEY)) + (" (dup)" if r.duplicate_of else "") for r in g.runs),
               _same_or_range([r.parameters for r in g.runs], _fmt_count),
               _same_or_range([r.steps for r in g.runs], str), _same_or_range([r.tokens for r in g.runs], _fmt_count)]
        for c in quality:
            mark = within_noise(stats[0][c], st[c]) if i > 0 else None
            bad = sum(c in r.nonfinite for r in g.runs)
            row.append(_fmt_stat(st[c], digits.get(c, 4), mark) + (f" ({bad} non-finite)" if bad else ""))
        rows.append(row)
    return cols, rows


def noise_legend(summaries: list[RunSummary]) -> str:
    """The footnote that explains a grouped table."""
    ref = group_runs(summaries)[0].label
    return (f"mean ± standard deviation over the seeds of each group (runs that differ only by seed). "
            f"{NOISE_MARK}: within seed noise, the mean differs from the first row's ({ref}) by less than two "
            f"standard errors of the difference, 2 sqrt(s1^2/n1 + s2^2/n2); a group with one seed gets no mark.")


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


def mark_dropped(summaries: list[RunSummary]) -> None:
    """Say what a grouped table leaves out, instead of dropping it silently: a quality value that is NaN or
    infinite (left out of its group's mean, counted in the cell) and a run whose seed repeats an earlier run
    of its group (shown as `(dup)`, not counted as another seed). Each gets a note."""
    for s in summaries:
        s.nonfinite = [c for c, v in _quality(s).items() if v is not None and runs.finite(v) is None]
        if s.nonfinite:
            s.notes.append(f"{s.name}: non-finite {', '.join(s.nonfinite)} (left out of means; see the cells' "
                           "'non-finite' count)")
    for g in group_runs(summaries):
        seen: dict[str, RunSummary] = {}
        for r in g.runs:
            key = repr(r.settings.get(SEED_KEY))
            if key in seen:
                r.duplicate_of = seen[key].name
                r.notes.append(f"{r.name} has the same seed ({r.settings.get(SEED_KEY)}) and settings as "
                               f"{seen[key].name}: counted once")
            else:
                seen[key] = r


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
    mark_dropped(summaries)
    return summaries
