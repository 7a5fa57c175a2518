"""`--auto-size`: the rule table (pure functions) and how a run is prepared from it (explicit settings win)."""

from __future__ import annotations

import json
import math

import pytest

from tinystories_cli import train as T
from tinystories_cli.errors import UserError
from tinystories_cli.train import autosize as A

# the tiny_workspace fixture (tests/conftest.py) with a larger validation split
pytestmark = pytest.mark.tiny_data(n_valid=120)


def test_rule_table_grows_with_the_budget():
    thresholds = [r.min_ref_tokens for r in A.RULES]
    assert thresholds[0] == 0 and thresholds == sorted(thresholds) and len(set(thresholds)) == len(thresholds)
    widths = [r.d_model for r in A.RULES]
    assert widths == sorted(widths)
    # every budget maps to exactly the row whose range holds it
    for i, r in enumerate(A.RULES):
        assert A.rule_for(r.min_ref_tokens) == r
        if i + 1 < len(A.RULES):
            assert A.rule_for(A.RULES[i + 1].min_ref_tokens * 0.999) == r
    with pytest.raises(ValueError):
        A.rule_for(float("nan"))


def test_a_faster_machine_gets_a_bigger_model_for_the_same_minutes():
    slow = A.choose_for_seconds(240, 1_000)
    fast = A.choose_for_seconds(240, 1_000_000)
    assert slow.shape.d_model < fast.shape.d_model
    assert fast.ref_tokens == pytest.approx(240e6)
    assert "reference tokens" in slow.why
    with pytest.raises(UserError):
        A.choose_for_seconds(0, 1_000)


def test_a_token_budget_counts_the_chosen_models_own_tokens():
    for r in A.RULES:
        c = A.choose_for_tokens(max(r.min_ref_tokens, 1e4) * r.speed * 1.01)
        assert c.shape.d_model >= r.d_model
    c = A.choose_for_tokens(123_456)
    assert c.tokens == 123_456
    assert c.train_overrides(30)["warmup_steps"] == 3          # at most a tenth of the steps
    assert c.train_overrides()["min_lr"] == pytest.approx(c.lr * A.MIN_LR_RATIO)


def test_each_row_brings_its_batch_and_decay():
    for r in A.RULES:
        c = A.choose(max(r.min_ref_tokens, 1e4) * 1.01)
        assert (c.shape.d_model, c.batch_size, c.warmup_steps, c.decay_fraction, c.speed) == \
            (r.d_model, r.batch_size, r.warmup_steps, r.decay_fraction, r.speed)
        over, rec = c.train_overrides(), c.record()
        keys = ("batch_size", "warmup_steps", "decay_fraction")
        assert [over[k] for k in keys] == [rec[k] for k in keys] == [r.batch_size, r.warmup_steps, r.decay_fraction]
        assert c.train_overrides(r.warmup_steps * 5)["warmup_steps"] == max(1, r.warmup_steps // 2)  # a tenth at most


def test_a_step_budget_counts_steps_of_each_rows_own_batch(monkeypatch):
    for r in A.RULES:
        steps = math.ceil(max(r.min_ref_tokens, 1e4) * r.speed / (r.batch_size * A.CONTEXT_LENGTH)) + 1
        c = A.choose_for_steps(steps)
        assert c.shape.d_model == r.d_model and c.tokens == steps * r.batch_size * A.CONTEXT_LENGTH
    # a smaller batch needs proportionally more steps to reach the same threshold
    row = A.Rule(0.0, 64, 1e-3, 1.0, batch_size=4)
    big = A.Rule(1e6, 128, 1e-3, 1.0, batch_size=8)
    monkeypatch.setattr(A, "RULES", (row, big))
    assert A.choose_for_steps(488).shape.d_model == 64 and A.choose_for_steps(489).shape.d_model == 128  # 1M tokens
    with pytest.raises(ValueError):
        A.choose_for_steps(0)


def test_shapes_are_valid_models():
    from tinystories_cli.config import ModelConfig

    for r in A.RULES:
        ModelConfig(vocab_size=2048, **A.shape_for(r.d_model).model_overrides())


def test_rule_table_rows_for_the_readme():
    rows = A.rule_table()
    assert len(rows) == len(A.RULES) and rows[-1][0].startswith(">=")


SMALL = {"context_length": 16, "d_model": 32, "num_layers": 1}  # given explicitly: they must win


def test_prepare_auto_run_from_a_token_budget_and_explicit_settings_win(tiny_workspace):
    run = A.prepare_auto_run(None, None, SMALL, {"dataset": "tiny", "train_tokens": 20_000, "lr": 1e-3},
                             T.TrainOptions(run_name="auto", display="quiet"))
    c = A.choose_for_tokens(20_000)
    assert (run.model_cfg.d_model, run.model_cfg.num_layers, run.model_cfg.context_length) == (32, 1, 16)
    assert run.model_cfg.num_heads == 1 and run.model_cfg.d_ff == 128    # derived from the given width
    assert run.train_cfg.lr == 1e-3 and run.train_cfg.batch_size == A.BATCH_SIZE
    assert run.preset == A.BASE_PRESET
    rec = run.auto_size
    assert rec["d_model"] == 32 and rec["lr"] == 1e-3 and rec["why"] == c.why
    assert set(rec["explicit"]) >= {"d_model", "num_layers", "context_length", "lr"}
    assert any(n.startswith("`auto_size`: d_model 32") for n in run.notes)  # the CLI shows --auto-size


def test_prepare_auto_run_from_a_time_budget_probes_the_reference_model(tiny_workspace, monkeypatch):
    probed = []

    def fake_probe(run, seconds, max_steps=10):
        probed.append((run.model_cfg.d_model, run.model_cfg.num_layers))
        return 5_000.0, 1.5

    monkeypatch.setattr(A, "measure_throughput", fake_probe)
    run = A.prepare_auto_run(None, None, {"context_length": 16}, {"dataset": "tiny"},
                             T.TrainOptions(run_name="auto", display="quiet", time_budget=60.0))
    want = A.choose_for_seconds(58.5, 5_000.0)
    assert probed == [(A.REFERENCE_WIDTH, 4)]
    assert run.model_cfg.d_model == want.shape.d_model and run.train_cfg.lr == want.lr
    assert run.options.time_budget == pytest.approx(58.5)           # the probe's time counts against the budget
    assert run.auto_size["reference_tokens"] == round(58.5 * 5_000)


def test_auto_size_needs_a_budget_and_a_fresh_run(tiny_workspace):
    with pytest.raises(UserError, match="budget"):
        A.prepare_auto_run(None, None, SMALL, {"dataset": "tiny"}, T.TrainOptions(run_name="a"))
    with pytest.raises(UserError, match="from scratch"):
        A.prepare_auto_run(None, None, SMALL, {"dataset": "tiny", "max_steps": 5},
                           T.TrainOptions(run_name="a", resume="auto"))


def test_cli_auto_size_trains_and_records_the_choice(tiny_workspace, run_cli):
    code, out, err = run_cli("train", "--auto-size", "--dataset", "tiny", "--ctx", "16", "--d-model", "32",
                             "--num-layers", "1", "--max-steps", "6", "--eval-every", "3", "--device", "cpu",
                             "--plain", "--peak-tflops", "1", "--run-name", "auto")
    assert code == 0, err
    assert "--auto-size: d_model 32" in out
    run_dir = tiny_workspace[0] / "runs" / "auto"
    cfg = json.loads((run_dir / "config.json").read_text())
    c = A.choose_for_tokens(6 * A.BATCH_SIZE * 16)
    assert cfg["auto_size"]["lr"] == c.lr == cfg["train"]["lr"]
    assert cfg["train"]["max_steps"] == 6 and cfg["train"]["batch_size"] == A.BATCH_SIZE
    assert "Sized by `--auto-size`" in (run_dir / "README.md").read_text()


def test_cli_auto_size_without_a_budget_is_a_one_line_error(tiny_workspace, run_cli):
    code, out, err = run_cli("train", "--auto-size", "--dataset", "tiny")
    assert code == 2 and "needs a budget" in err and "Traceback" not in err


def test_size_sweep_example_end_to_end(tmp_path):
    """examples/size_sweep.py at a toy budget: data, probes, one run per width, one JSON line each, rerun skips."""
    import subprocess
    import sys
    from pathlib import Path

    from train_fixtures import story_text

    text = tmp_path / "stories.txt"
    text.write_text("<|endoftext|>".join(story_text(1, s) for s in range(300)), encoding="utf-8")
    script = Path(__file__).resolve().parents[2] / "examples" / "size_sweep.py"
    cmd = [sys.executable, str(script), "--text", str(text), "--workdir", str(tmp_path / "w"), "--vocab-size", "300",
           "--budgets", "2e4", "--widths", "64", "--lrs", "3e-3", "--probe-seconds", "0.1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [json.loads(x) for x in (tmp_path / "w" / "sweep.jsonl").read_text().splitlines()]
    assert [x["name"] for x in lines] == ["b20000-d64-lr0.003-cosine"]
    speeds = json.loads((tmp_path / "w" / "speeds.json").read_text())
    assert set(speeds) == {"64", "128"}
    # The width's share of the budget comes from the measured probe speeds (which vary with the machine).
    expected = max(A.WARMUP_STEPS + 1, int(2e4 * speeds["64"] / speeds["128"]) // A.TOKENS_PER_STEP)
    assert lines[0]["steps"] == expected and 0 < lines[0]["val_loss"] < 10
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and len((tmp_path / "w" / "sweep.jsonl").read_text().splitlines()) == 1
    # Depth, batch size and warmup: each shape/batch probed on its own, named in the run.
    r = subprocess.run(cmd + ["--layers", "3", "--batch-sizes", "8", "--warmups", "5"], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    last = json.loads((tmp_path / "w" / "sweep.jsonl").read_text().splitlines()[-1])
    speeds = json.loads((tmp_path / "w" / "speeds.json").read_text())
    assert set(speeds) == {"64", "128", "64x3b8"}
    assert last["name"] == "b20000-d64-L3-B8-wu5-lr0.003-cosine"
    assert (last["num_layers"], last["batch_size"], last["warmup_steps"]) == (3, 8, 5)
    assert last["steps"] == max(6, int(2e4 * speeds["64x3b8"] / speeds["128"]) // (8 * A.CONTEXT_LENGTH))
    # Any other training setting with --set: in the run's config, its name and its record.
    r = subprocess.run(cmd + ["--set", "beta2=0.95", "--set", "min_lr_ratio=0"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    last = json.loads((tmp_path / "w" / "sweep.jsonl").read_text().splitlines()[-1])
    assert last["name"] == "b20000-d64-beta20.95-min_lr_ratio0-lr0.003-cosine"
    assert last["settings"] == {"beta2": 0.95, "min_lr_ratio": 0}
    train = json.loads((tmp_path / "w" / "runs" / last["name"] / "config.json").read_text())["train"]
    assert (train["beta2"], train["min_lr"]) == (0.95, 0.0)
    r = subprocess.run(cmd + ["--set", "beta2"], capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "NAME=VALUE" in r.stderr
