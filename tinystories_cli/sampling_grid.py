"""The seeds' sampling comparison as one reproducible table: a grid of sampling settings, the same
prompt and the same seeds in every cell, and text-diversity figures per cell.

    >>> parse_grid("temp=0.5,1.0,1.2 top_p=0.3,0.9,1.0")
    {'temperature': [0.5, 1.0, 1.2], 'top_p': [0.3, 0.9, 1.0]}

A grid names one to three of `temp` (or `temperature`), `top_p` and `top_k`, each with a comma-separated
list of values; the cells are every combination, in the order given (the first axis varies slowest).
Settings not in the grid keep one value for every cell.

The figures are computed on the completions (the prompt excluded), split into whitespace-separated
words so that runs with different tokenizers compare:

- distinct-n (Li et al., 2016): distinct n-grams / all n-grams, pooled over the cell's samples
  (n-grams never cross from one sample into the next). 1.0 means no n-gram occurs twice; samples
  that tell the same story (low top-p) share n-grams and lower it.
- repetition rate: the share of a sample's 4-grams that repeat an earlier 4-gram of the same sample
  (the degenerate loops of low temperature), averaged over the cell's samples.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

from tinystories_cli.generate import Sample, check_sampling_args, generate_samples

# grid key -> sampling parameter
GRID_KEYS = {"temp": "temperature", "temperature": "temperature", "top_p": "top_p", "top-p": "top_p",
             "top_k": "top_k", "top-k": "top_k"}
# column label of each sampling parameter (the CLI's spelling)
LABELS = {"temperature": "temp", "top_p": "top_p", "top_k": "top_k"}
MAX_CELLS = 64
REPETITION_N = 4


# ---------------------------------------------------------------------------------------------
# Text figures: pure functions of token (or word) sequences
# ---------------------------------------------------------------------------------------------


def ngrams(tokens: Sequence[Hashable], n: int) -> list[tuple]:
    """The n-grams of a sequence, in order.

    >>> ngrams("a b c".split(), 2)
    [('a', 'b'), ('b', 'c')]
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(tokens: Sequence[Hashable], n: int) -> float:
    """Distinct n-grams / all n-grams of one sequence (0.0 when it is shorter than n).

    >>> distinct_n("the cat saw the cat".split(), 2)  # the cat, cat saw, saw the, the cat
    0.75
    >>> distinct_n([1, 2, 3], 1), distinct_n([7, 7, 7, 7], 1), distinct_n([1], 2)
    (1.0, 0.25, 0.0)
    """
    grams = ngrams(tokens, n)
    return len(set(grams)) / len(grams) if grams else 0.0


def corpus_distinct_n(samples: Sequence[Sequence[Hashable]], n: int) -> float:
    """distinct-n pooled over several sequences: distinct n-grams of all of them / all their n-grams
    (n-grams do not span two sequences; 0.0 when none has n tokens).

    >>> corpus_distinct_n([[1, 2, 3], [1, 2, 3]], 2)  # (1, 2) and (2, 3), each twice
    0.5
    >>> corpus_distinct_n([[1, 2, 3], [3, 2, 1]], 2)
    1.0
    """
    grams = [g for s in samples for g in ngrams(s, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(tokens: Sequence[Hashable], n: int = REPETITION_N) -> float:
    """The share of n-grams that repeat an n-gram seen earlier in the same sequence (0.0 when it is
    shorter than n). A text stuck in a loop tends to 1.

    >>> repetition_rate("a b c d a b c d a b".split())  # 7 4-grams; the last 3 repeat the first 3
    0.42857142857142855
    >>> repetition_rate("one two three four five".split()), repetition_rate([5] * 10, 1)
    (0.0, 0.9)
    """
    grams = ngrams(tokens, n)
    seen: set[tuple] = set()
    repeats = 0
    for g in grams:
        repeats += g in seen
        seen.add(g)
    return repeats / len(grams) if grams else 0.0


def words(text: str) -> list[str]:
    """The whitespace-separated words the figures are computed on.

    >>> words(" Once upon\\na  time. ")
    ['Once', 'upon', 'a', 'time.']
    """
    return text.split()


# ---------------------------------------------------------------------------------------------
# The grid: parse, run, render
# ---------------------------------------------------------------------------------------------


def _number(key: str, text: str) -> float | int:
    param = GRID_KEYS[key]
    try:
        value = int(text) if param == "top_k" else float(text)
    except ValueError:
        kind = "a whole number" if param == "top_k" else "a number"
        raise ValueError(f"{key} value {text!r} is not {kind}") from None
    if not math.isfinite(value):
        raise ValueError(f"{key} value {text!r} is not a finite number")
    return value


def parse_grid(spec: str) -> dict[str, list[float | int]]:
    """Parse `"temp=0.5,1.0 top_p=0.3,0.9"` into {sampling parameter: values}; ValueError, in one
    line, on anything else (unknown or repeated key, empty or bad value, out of range, too many cells).

    >>> parse_grid("top_k=0,40 temperature=0.7")
    {'top_k': [0, 40], 'temperature': [0.7]}
    >>> parse_grid("temp=0.5 top_p=1.5")
    Traceback (most recent call last):
    ValueError: grid value top_p=1.5: top_p must be in (0, 1], got 1.5
    """
    items = spec.replace(";", " ").split()
    if not items:
        raise ValueError("the grid is empty; name at least one of temp, top_p, top_k with values")
    grid: dict[str, list[float | int]] = {}
    for item in items:
        key, eq, values = item.partition("=")
        if not eq:
            raise ValueError(f"{item!r} is not KEY=VALUES (e.g. temp=0.5,1.0)")
        if key not in GRID_KEYS:
            raise ValueError(f"unknown grid key {key!r}; use temp, top_p or top_k")
        param = GRID_KEYS[key]
        if param in grid:
            raise ValueError(f"{key} is given twice")
        texts = values.split(",")
        if not values or any(not t for t in texts):
            raise ValueError(f"{key} has an empty value (write {key}=V1,V2,...)")
        nums = [_number(key, t) for t in texts]
        for t, v in zip(texts, nums):
            try:
                check_sampling_args(1, **{"temperature": 1.0, "top_p": 1.0, "top_k": 0, param: v})
            except ValueError as e:
                # in a grid the parameters are spelled as grid keys, not as flags: drop the backticks
                raise ValueError(f"grid value {key}={t}: {str(e).replace('`', '')}") from None
        if len(set(nums)) != len(nums):
            raise ValueError(f"{key} repeats a value: {values}")
        grid[param] = nums
    cells = math.prod(len(v) for v in grid.values())
    if cells > MAX_CELLS:
        raise ValueError(f"the grid has {cells} cells; at most {MAX_CELLS}")
    return grid


def grid_cells(grid: dict[str, list[float | int]], base: dict[str, float | int]) -> list[dict[str, float | int]]:
    """Every combination of the grid's values (first axis slowest), completed with `base`.

    >>> grid_cells({"temperature": [0.5, 1.0], "top_p": [0.9]}, {"temperature": 1.0, "top_p": 1.0, "top_k": 0})
    [{'temperature': 0.5, 'top_p': 0.9, 'top_k': 0}, {'temperature': 1.0, 'top_p': 0.9, 'top_k': 0}]
    """
    keys = list(grid)
    return [{**base, **dict(zip(keys, combo))} for combo in itertools.product(*(grid[k] for k in keys))]


@dataclass
class GridCell:
    """One cell: its sampling settings, its samples and their figures."""

    settings: dict[str, float | int]
    samples: list[Sample] = field(default_factory=list)

    def _words(self) -> list[list[str]]:
        return [words(s.text) for s in self.samples]

    def _pooled_distinct(self, n: int) -> float | None:
        ws = self._words()
        return corpus_distinct_n(ws, n) if any(len(w) >= n for w in ws) else None

    @property
    def distinct_2(self) -> float | None:
        """Pooled distinct-2 of the samples' words (None when no sample has 2 words)."""
        return self._pooled_distinct(2)

    @property
    def distinct_3(self) -> float | None:
        """Pooled distinct-3 of the samples' words (None when no sample has 3 words)."""
        return self._pooled_distinct(3)

    @property
    def repetition(self) -> float | None:
        """Mean repetition rate over the samples long enough to have a 4-gram (None when none is)."""
        rates = [repetition_rate(w) for w in self._words() if len(w) >= REPETITION_N]
        return sum(rates) / len(rates) if rates else None

    @property
    def mean_new_tokens(self) -> float:
        return sum(s.new_tokens for s in self.samples) / max(1, len(self.samples))

    def to_json(self) -> dict:
        return {**self.settings, "distinct_2": self.distinct_2, "distinct_3": self.distinct_3,
                "repetition": self.repetition, "mean_new_tokens": self.mean_new_tokens,
                "samples": [s.to_json() for s in self.samples]}


def run_grid(model, tokenizer, prompt: str, grid: dict[str, list[float | int]], *, seed: int, num_samples: int = 4,
             max_new_tokens: int = 256, base: dict[str, float | int] | None = None, stop_at_eot: bool = True,
             stop_strings: Sequence[str] = (), use_cache: bool = True,
             on_cell: Callable[[int, int, dict], None] | None = None, precision: str = "fp32",
             engine: str = "auto") -> list[GridCell]:
    """Sample `num_samples` completions of `prompt` in every cell, with seeds seed, seed + 1, ... in
    every cell (so a cell differs from another only by its settings). `on_cell(i, n, settings)` is
    called before each cell."""
    if num_samples < 1:
        raise ValueError(f"`num_samples` must be at least 1, got {num_samples}")
    base = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, **(base or {})}
    cells = [GridCell(settings) for settings in grid_cells(grid, base)]
    for i, cell in enumerate(cells):
        if on_cell is not None:
            on_cell(i, len(cells), cell.settings)
        cell.samples = generate_samples(model, tokenizer, [prompt], num_samples=num_samples,
                                        max_new_tokens=max_new_tokens, seed=seed, stop_at_eot=stop_at_eot,
                                        stop_strings=stop_strings, use_cache=use_cache, precision=precision,
                                        engine=engine, **cell.settings)
    return cells


def _setting(v: float | int) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _figure(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _fence(text: str) -> str:
    """A code fence longer than any run of backticks in `text`.

    >>> _fence("no ticks"), _fence("a ```` b")
    ('```', '`````')
    """
    return "`" * max(3, max((len(r) for r in re.findall(r"`+", text)), default=0) + 1)


def grid_markdown(cells: list[GridCell], grid: dict[str, list[float | int]], *, prompt: str, seed: int,
                  num_samples: int, max_new_tokens: int, source: str) -> str:
    """The comparison as Markdown: what was held fixed, one table row per cell, then every sample."""
    axes = list(grid)
    fixed = {k: v for k, v in cells[0].settings.items() if k not in axes} if cells else {}
    seeds = f"seed {seed}" if num_samples == 1 else f"seeds {seed}-{seed + num_samples - 1}"
    fixed_text = ", ".join(f"{LABELS[k]}={_setting(v)}" for k, v in fixed.items())
    lines = [
        "# Sampling grid", "",
        f"Model `{source}`; prompt `{prompt.replace('`', chr(39))}`; {seeds} in every cell; at most "
        f"{max_new_tokens} new tokens" + (f"; {fixed_text}" if fixed_text else "") + ".",
        "Figures over the completions' whitespace-separated words: distinct-n = distinct n-grams / all "
        "n-grams, pooled over the cell's samples (higher: more varied); repetition = share of a sample's "
        f"{REPETITION_N}-grams that repeat an earlier one, averaged over the samples (higher: more looping); "
        "- where the completions are too short to have such n-grams.",
        "",
    ]
    cols = [LABELS[a] for a in axes] + ["distinct-2", "distinct-3", "repetition", "new tokens"]
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "|".join("---:" for _ in cols) + "|")
    for c in cells:
        row = [_setting(c.settings[a]) for a in axes]
        row += [_figure(c.distinct_2), _figure(c.distinct_3), _figure(c.repetition), f"{c.mean_new_tokens:.1f}"]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "## Samples"]
    for c in cells:
        lines += ["", "### " + " ".join(f"{LABELS[a]}={_setting(c.settings[a])}" for a in axes)]
        for s in c.samples:
            text = s.prompt + s.text
            fence = _fence(text)
            label = "greedy" if s.seed is None else f"seed {s.seed}"
            lines += ["", f"{label} ({s.new_tokens} new tokens, stopped: {s.stop_reason.replace('_', ' ')}):", "",
                      fence + "text", text, fence]
    return "\n".join(lines) + "\n"
