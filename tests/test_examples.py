"""The recipes in examples/: syntax, --help, bad options, and `ablations.sh --budget tiny` end to end.

The end-to-end tests run the scripts as a user would (bash, the real `tslm` commands in subprocesses)
on a small text the test writes, in a temporary work directory.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
SCRIPTS = sorted(EXAMPLES.glob("*.sh"))
RECIPES = ["ablations.sh", "lr_sweep.sh", "batch_size_sweep.sh"]
ABLATIONS = ["baseline", "post-norm", "nope", "silu", "no-rmsnorm", "no-rmsnorm-lr3e-4", "sinusoidal", "learned",
             "tied"]


def _env() -> dict:
    # The tslm of this interpreter, whatever is on PATH.
    return {**os.environ, "TSLM": f"{sys.executable} -m tinystories_cli", "PYTHONPATH": str(REPO)}


def _run(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *args], capture_output=True, text=True, env=_env(), timeout=timeout)


def _stories(n: int, seed: int = 0) -> str:
    """One short story per line, each ending with <|endoftext|> (the TinyStories layout)."""
    rng = random.Random(seed)
    names, things = ["Lily", "Tom", "Mia", "Ben", "Sue"], ["a red ball", "a cat", "a kite", "a boat", "a box"]
    lines = []
    for _ in range(n):
        a, b = rng.sample(names, 2)
        lines.append(f"Once upon a time, {a} found {rng.choice(things)}. {a} and {b} played all day. "
                     f"Then {b} went home and was very happy. The end.<|endoftext|>")
    return "\n".join(lines) + "\n"


def test_scripts_parse():
    assert {p.name for p in SCRIPTS} >= {"quickstart.sh", "_common.sh", *RECIPES}
    for script in SCRIPTS:
        r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert r.returncode == 0, f"{script.name}: {r.stderr}"


@pytest.mark.parametrize("recipe", RECIPES)
def test_help_and_bad_options(recipe, tmp_path):
    r = _run([str(EXAMPLES / recipe), "--help"])
    assert r.returncode == 0, r.stderr
    assert "--budget tiny|small|full" in r.stdout and "--text FILE" in r.stdout
    r = _run([str(EXAMPLES / recipe), "--budget", "huge", "--workdir", str(tmp_path)])
    assert r.returncode == 2 and "--budget must be tiny, small or full" in r.stderr
    r = _run([str(EXAMPLES / recipe), "--no-such-flag", "--text", str(tmp_path / "missing.txt")])
    assert r.returncode == 2 and "not found" in r.stderr
    r = _run([str(EXAMPLES / recipe), "--jobs", "0"])
    assert r.returncode == 2 and "--jobs must be a positive integer" in r.stderr
    assert "--seeds N" in _run([str(EXAMPLES / recipe), "--help"]).stdout
    for bad in ("0", "x", "-1"):
        r = _run([str(EXAMPLES / recipe), "--seeds", bad, "--dry-run"])
        assert r.returncode == 2 and f"--seeds must be a positive integer, got '{bad}'" in r.stderr
    text = tmp_path / "t.txt"
    text.write_text("one line\ntwo lines\n")
    r = _run([str(EXAMPLES / recipe), "--no-such-flag", "--text", str(text), "--workdir", str(tmp_path / "w")])
    assert r.returncode == 2 and "unknown option '--no-such-flag'" in r.stderr


def _dry_run(args: list[str], workdir: Path) -> list[list[str]]:
    """The `tslm train` argument lists a recipe prints with --dry-run (and nothing written)."""
    r = _run([*args, "--dry-run", "--workdir", str(workdir)])
    assert r.returncode == 0, r.stderr
    assert not workdir.exists()  # no data, no runs, no results
    lines = r.stdout.splitlines()
    train = [line.split()[2:] for line in lines if line.startswith("tslm train ")]
    assert lines[-1] == f"== dry run: {len(train)} runs; nothing was trained"
    return train


def _flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def test_ablations_seeds_dry_run_queues_every_variant_with_every_seed(tmp_path):
    script = str(EXAMPLES / "ablations.sh")
    one = _dry_run([script], tmp_path / "w")
    assert [_flag(a, "--run-name") for a in one] == [f"abl-tiny-{n}" for n in ABLATIONS]
    assert all("--seed" not in a for a in one)
    three = _dry_run([script, "--seeds", "3", "--budget", "small"], tmp_path / "w")
    assert [_flag(a, "--run-name") for a in three] == [f"abl-small-{n}-s{k}" for n in ABLATIONS for k in range(3)]
    assert [_flag(a, "--seed") for a in three] == ["0", "1", "2"] * len(ABLATIONS)
    # the seeds of a variant differ by --seed (and the run name) only
    by_variant = {}
    for a in three:
        name = _flag(a, "--run-name")
        rest = [
            x for i, x in enumerate(a) if x != name and not (x.isdigit() and a[i - 1] == "--seed") and x != "--seed"
        ]
        by_variant.setdefault(name.rsplit("-s", 1)[0], set()).add(tuple(rest))
    assert all(len(v) == 1 for v in by_variant.values())
    assert "--norm-position" in next(iter(by_variant["abl-small-post-norm"]))
    subset = _dry_run([script, "--seeds", "2", "--only", "tied"], tmp_path / "w")
    assert [_flag(a, "--run-name") for a in subset] == ["abl-tiny-tied-s0", "abl-tiny-tied-s1"]
    # the sweeps take --seeds too
    lrs = _dry_run([str(EXAMPLES / "lr_sweep.sh"), "--seeds", "2", "--lrs", "1e-3"], tmp_path / "w")
    assert [(_flag(a, "--run-name"), _flag(a, "--seed")) for a in lrs] == [("lr-tiny-1e-3-s0", "0"),
                                                                           ("lr-tiny-1e-3-s1", "1")]


@pytest.mark.slow
def test_ablations_seeds_tiny_end_to_end(tmp_path):
    """--seeds 2 on two variants: the table has one row per variant with mean ± std over its seeds
    (~40 s on a shared 2-core machine: `-m slow`; the grouping itself is tested in test_compare.py)."""
    text = tmp_path / "stories.txt"
    text.write_text(_stories(300, seed=2), encoding="utf-8")
    work = tmp_path / "work"
    r = _run([str(EXAMPLES / "ablations.sh"), "--budget", "tiny", "--seeds", "2", "--only", "baseline,nope",
              "--text", str(text), "--workdir", str(work), "--device", "cpu"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for name in ("baseline", "nope"):
        for k in range(2):
            cfg = json.loads((work / "runs" / f"abl-tiny-{name}-s{k}" / "config.json").read_text())
            assert cfg["train"]["seed"] == k
    results = (work / "results" / "ablations-tiny" / "results.md").read_text(encoding="utf-8")
    assert "with --seeds 2 (every setting trained with --seed 0..1)" in results
    rows = [line for line in results.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| run | pos_emb | seeds |") and rows[0].endswith("| eval loss | ppl | bpb |")
    body = [[c.strip() for c in row.split("|")[1:-1]] for row in rows[1:]]
    assert [b[:3] for b in body] == [["abl-tiny-baseline", "rope", "0,1"], ["abl-tiny-nope", "nope", "0,1"]]
    for b in body:
        assert re.fullmatch(r"\d+\.\d{4} ± \d+\.\d{4}( ~)?", b[-1]), b  # bpb: mean ± std over 2 seeds
    assert "~: within seed noise" in results


def _check_results(out: Path, runs: list[str], columns: list[str]) -> list[str]:
    """results.md has a Markdown table with exactly one row per run (all evaluated); a plot exists."""
    text = (out / "results.md").read_text(encoding="utf-8")
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    header, body = rows[0], rows[1:]
    for c in columns:
        assert f"| {c} |" in header, header
    assert [r.split("|")[1].strip() for r in body] == runs
    for r in body:
        bpb = r.rstrip(" |").rsplit("|", 1)[1].strip()
        assert re.fullmatch(r"\d+\.\d{4}", bpb), r  # every run evaluated: a bits-per-byte value
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "val_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (out / "train_loss.png").is_file()
    else:  # without matplotlib the recipes fall back to terminal plots
        assert (out / "val_loss.txt").read_text(encoding="utf-8").strip()
    return body


def test_ablations_tiny_end_to_end(tmp_path):
    text = tmp_path / "stories.txt"
    text.write_text(_stories(400), encoding="utf-8")
    work = tmp_path / "work"
    t0 = time.perf_counter()
    r = _run([str(EXAMPLES / "ablations.sh"), "--budget", "tiny", "--text", str(text), "--workdir", str(work),
              "--device", "cpu"])
    elapsed = time.perf_counter() - t0
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    runs = [f"abl-tiny-{n}" for n in ABLATIONS]
    columns = ["run", "norm", "norm_position", "pos_emb", "ffn", "tie_embeddings", "lr", "eval loss", "bpb"]
    body = _check_results(work / "results" / "ablations-tiny", runs, columns)
    cells = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:]] for r in body}
    assert cells["abl-tiny-tied"][5] == "yes" and cells["abl-tiny-baseline"][5] == "no"
    assert cells["abl-tiny-no-rmsnorm-lr3e-4"][6] == "0.0003"
    for name in runs:
        d = work / "runs" / name
        assert (d / "metrics.jsonl").is_file() and (d / "checkpoints" / "best.safetensors").is_file()
    # the data were built from --text with tslm bpe + encode
    assert (work / "data" / "text-tiny" / "valid.npy").is_file()
    print(f"ablations.sh --budget tiny: {elapsed:.1f} s")


@pytest.mark.slow
def test_sweeps_tiny_end_to_end(tmp_path):
    text = tmp_path / "stories.txt"
    text.write_text(_stories(300, seed=1), encoding="utf-8")
    work = tmp_path / "work"
    common = ["--budget", "tiny", "--text", str(text), "--workdir", str(work), "--device", "cpu"]
    r = _run([str(EXAMPLES / "lr_sweep.sh"), *common, "--lrs", "1e-3 1e-2"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    _check_results(work / "results" / "lr_sweep-tiny", ["lr-tiny-1e-3", "lr-tiny-1e-2"], ["lr", "min_lr"])
    r = _run([str(EXAMPLES / "batch_size_sweep.sh"), *common, "--batch-sizes", "8 16", "--tokens", "8192"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    body = _check_results(work / "results" / "batch_size_sweep-tiny", ["bs-tiny-8", "bs-tiny-16"],
                          ["batch_size", "max_steps"])
    # the same token budget: 8192 / (8 x 64) = 16 steps, / (16 x 64) = 8 steps
    assert [r.split("|")[2:4] for r in body] == [[" 8 ", " 16 "], [" 16 ", " 8 "]]
