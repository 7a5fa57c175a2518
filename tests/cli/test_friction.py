"""The small surprises of a first session (issue 28's friction points 5, 9 and 10): each one checked."""

from __future__ import annotations

import re
from pathlib import Path

from tinystories_cli import compare
from tinystories_cli.generate import TextStream
from tinystories_cli.train import autosize

from train_fixtures import write_run

# ---- 5: an incomplete UTF-8 character at the end of a stream is held back, not printed as U+FFFD

def test_a_stream_that_ends_inside_a_character_prints_no_replacement_char():
    data = "a cat é".encode()[:-1]                 # the last character's second byte never comes
    for token_bytes in (lambda i: bytes([i]), None):  # incremental-decoder path and whole-decode path
        s = TextStream(lambda ids: bytes(ids).decode("utf-8", "replace"), token_bytes=token_bytes)
        out = "".join(s.push(b) for b in data) + s.close()
        assert out == "a cat " and s.text == "a cat " and "\ufffd" not in out
    s = TextStream(lambda ids: bytes(ids).decode("utf-8", "replace"), token_bytes=lambda i: bytes([i]))
    assert "".join(s.push(b) for b in "é!".encode()) + s.close() == "é!"   # complete characters are kept


# ---- 9: compare fits 120 columns, compares settings as displayed, shows the checkpoint's step

def test_compare_lists_a_setting_only_when_it_differs_as_displayed(tmp_path: Path):
    a = write_run(tmp_path, "a", train={"lr": 6e-3, "min_lr": 6e-4}, metrics=[])
    b = write_run(tmp_path, "b", train={"lr": 3e-3, "min_lr": 6e-3 * 0.1}, metrics=[])   # 0.0006000000000000001
    assert 6e-3 * 0.1 != 6e-4
    assert compare.differing_settings([compare.summarize_run(a), compare.summarize_run(b)]) == ["lr"]


def test_compare_shows_the_newest_checkpoints_step(tmp_path: Path):
    d = write_run(tmp_path, "a", train={"max_steps": 1000},
                  metrics=[{"step": 150, "tokens": 150 * 64, "val_loss": 2.0}])
    (d / "checkpoints").mkdir()
    from tinystories_cli import runs
    (d / "checkpoints" / runs.step_checkpoint_name(159)).write_bytes(b"")
    s = compare.summarize_run(d)
    assert s.steps == 159 and s.tokens == 159 * 64
    cols, rows = compare.compare_table([s])
    assert rows[0][cols.index("steps")] == "159/1000"


def test_compare_fits_a_120_column_terminal(tmp_path: Path, run_cli, monkeypatch):
    many = {"lr": 1e-3, "min_lr": 1e-4, "weight_decay": 0.1, "beta2": 0.95, "warmup_steps": 2, "batch_size": 8,
            "grad_clip": 1.0, "seed": 1}
    a = write_run(tmp_path, "baseline-run-with-a-long-name", model={"pos_emb": "rope", "norm": "rmsnorm"},
                  train=many, metrics=[{"step": 10, "tokens": 640, "val_loss": 2.5}])
    b = write_run(tmp_path, "ablation-run-with-a-long-name", model={"pos_emb": "nope", "norm": "layernorm"},
                  train={**many, "lr": 3e-3, "min_lr": 3e-4, "weight_decay": 0.0, "beta2": 0.99, "warmup_steps": 3,
                         "batch_size": 16, "grad_clip": 0.5, "seed": 2},
                  metrics=[{"step": 10, "tokens": 1280, "val_loss": 2.4}])
    from tinystories_cli.console import console
    monkeypatch.setattr(console, "width", 120, raising=False)
    monkeypatch.setattr(type(console), "width", property(lambda self: 120), raising=False)
    code, out, err = run_cli("compare", str(a), str(b))
    assert code == 0, err
    assert max(len(line) for line in out.splitlines()) <= 120, out
    assert "baseline-run-with-a-long-name" in out and "2.4000" in out and "nope" in out


# ---- 10: --help without <bool>/<str>; the auto size's message names no "0M" bound

def test_help_has_no_annotation_labels(run_cli):
    for cmd in ([], ["quickstart"], ["train"], ["generate"], ["eval"], ["download"], ["export"], ["compare"]):
        code, out, err = run_cli(*cmd, "--help")
        assert code == 0
        assert not re.search(r"<(bool|str|int|float)>", out), (cmd, out)


def test_auto_size_message_has_no_zero_bound():
    low = autosize.choose(0.05e6, "13 steps = ")
    assert "0M" not in low.why.replace("0.05M", "") and "below the" in low.why
    top = autosize.choose(1e9)
    assert "at least the" in top.why and "0M where" not in top.why
