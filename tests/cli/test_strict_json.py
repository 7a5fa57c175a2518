"""Issue 31: output that says what it dropped. Every --json output is strict JSON (null for a non-finite
value), compare marks non-finite runs and duplicate seeds, durations parse strictly, and flags that size
an allocation or an output are checked before any work."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tinystories_cli.train import parse_duration

from train_fixtures import trained_runs, workspace_at


def strict_loads(text: str):
    """A parser that, like most outside Python, refuses NaN and Infinity."""
    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("strict")
    trained_runs(root, {"a-s0": ["--seed", "0"], "a-s1": ["--seed", "1"], "a-dup": ["--seed", "1"],
                        "a-nan": ["--seed", "2"]})
    # a run whose losses went NaN (as a diverged run logs them: Python's json writes bare NaN)
    metrics = root / "runs" / "a-nan" / "metrics.jsonl"
    lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    for rec in lines:
        for k in ("loss", "val_loss"):
            if k in rec:
                rec[k] = float("nan")
    metrics.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return root


@pytest.fixture
def in_ws(ws):
    with workspace_at(ws):
        yield ws


def test_compare_json_is_strict_and_marks_what_it_dropped(in_ws, run_cli):
    code, out, err = run_cli("compare", "a-s0", "a-s1", "a-dup", "a-nan", "--json")
    assert code == 0, err
    rows = {r["name"]: r for r in strict_loads(out)}
    assert rows["a-nan"]["final_val_loss"] is None and "final val" in rows["a-nan"]["nonfinite"]
    assert rows["a-dup"]["duplicate_seed_of"] == "a-s1" and rows["a-s1"]["duplicate_seed_of"] is None
    assert "a-nan: non-finite" in err and "a-dup has the same seed (1)" in err


def test_compare_table_marks_nonfinite_and_duplicate_seeds(in_ws, run_cli):
    code, out, err = run_cli("compare", "a-s0", "a-s1", "a-dup", "a-nan")
    assert code == 0, err
    assert "1 (dup)" in out and "non-finite" in out
    # the mean is over the distinct seeds with finite values: 0 and 1 (a-dup and a-nan left out, and said so)
    from tinystories_cli.compare import compare_runs, grouped_table

    summaries = compare_runs(["a-s0", "a-s1", "a-dup", "a-nan"])
    cols, rows = grouped_table(summaries)
    (row,) = rows
    finals = [s.final_val_loss for s in summaries[:2]]
    mean = sum(finals) / 2
    assert row[cols.index("final val")].startswith(f"{mean:.4f} ± ") and row[cols.index("final val")].endswith(
        "(1 non-finite)")


def test_eval_json_of_a_nan_model_is_strict(in_ws, run_cli):
    src = in_ws / "runs" / "a-s0" / "checkpoints" / "best.safetensors"
    nan_run = in_ws / "runs" / "nan-weights"
    import shutil

    shutil.copytree(in_ws / "runs" / "a-s0", nan_run)
    with safe_open(src, framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in tensors.items()}
    save_file(tensors, nan_run / "checkpoints" / "best.safetensors", metadata=meta)
    code, out, err = run_cli("eval", "nan-weights", "--json", "--device", "cpu")
    assert code == 0, err
    res = strict_loads(out)
    assert res["loss"] is None and res["perplexity"] is None
    saved = strict_loads((nan_run / "eval_valid.json").read_text())
    assert saved["loss"] is None


@pytest.mark.parametrize("text", ["1.5.5h", "1h30", "5m5m", "30s1m", ".5h", "h", "", "1e3", "inf", "nan", "-5m",
                                  "1h-30m", "5 m 5"])
def test_bad_durations_are_refused(text):
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


@pytest.mark.parametrize("text,seconds", [("90m", 5400), ("1.5h", 5400), ("1h30m", 5400), ("1h 30m", 5400),
                                          ("45s", 45), ("5400", 5400), ("2H", 7200), ("1h0m30s", 3630)])
def test_good_durations(text, seconds):
    assert parse_duration(text) == seconds


def test_time_budget_flag_refuses_in_one_line(in_ws, run_cli):
    # (a dataset with no tokenizer: old readers that accepted "1h30" stop there instead of training for 90 min)
    code, _, err = run_cli("train", "--preset", "debug", "--dataset", "none-here", "--time-budget", "1h30")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "cannot read duration '1h30'" in err


def test_grid_out_is_checked_before_sampling(in_ws, run_cli):
    (in_ws / "adir").mkdir(exist_ok=True)
    (in_ws / "afile").write_text("x")
    for out in (in_ws / "adir", in_ws / "afile" / "grid.md"):
        code, _, err = run_cli("generate", "Once", "--run", "a-s0", "--grid", "temp=0.5,1.0", "--out", str(out),
                               "--force", "--max-tokens", "4")
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "cell" not in err and "internal error" not in err


def test_sizes_are_bounded(in_ws, run_cli):
    code, _, err = run_cli("generate", "Once", "--run", "a-s0", "-n", str(10**9), "--max-tokens", "4")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "rows need" in err, err  # bounded by memory
    for flag, value in (("--width", 10**9), ("--height", 10**9)):
        code, _, err = run_cli("plot", "a-s0", "--ascii", flag, str(value))
        assert code == 2 and len(err.strip().splitlines()) == 1 and "--width must be" in err, err
