"""`tslm quickstart`: the whole pipeline end to end on a small text the test writes, and its pieces.

The end-to-end test uses `--preset debug` and `--minutes 0.1`, so it runs the real stages
(split, BPE, encode, probe + bounded training, a story) in seconds even on 2 busy cores.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from tinystories_cli import quickstart as qs
from tinystories_cli.errors import UserError


def test_quickstart_end_to_end_then_rerun_skips(tmp_path: Path, story_text: Path, run_cli):
    work = tmp_path / "work"
    t0 = time.perf_counter()
    code, out, err = run_cli("quickstart", "--text", str(story_text), "--minutes", "0.1", "--dir", str(work),
                             "--vocab-size", "300", "--preset", "debug", "--device", "cpu", "--plain",
                             "--max-tokens", "40")
    first = time.perf_counter() - t0
    assert code == 0, err
    data, run = work / "data" / "quickstart", work / "runs" / "quickstart"
    for f in ("train.txt", "valid.txt", "train.npy", "valid.npy", "tokenizer/vocab.json", "tokenizer/merges.txt",
              "tokenizer/tokenizer_config.json"):
        assert (data / f).is_file(), f
    # split: the last 5% of the 400 documents (20) are held out, and nothing is lost
    valid = (data / "valid.txt").read_text(encoding="utf-8")
    train = (data / "train.txt").read_text(encoding="utf-8")
    assert train + valid == story_text.read_text(encoding="utf-8")
    assert valid.count("<|endoftext|>") == 20
    assert json.loads((data / "tokenizer/tokenizer_config.json").read_text())["vocab_size"] == 300
    tokens = np.load(data / "train.npy", mmap_mode="r")
    assert len(tokens) > 1000 and int(tokens.max()) < 300
    # the run: config, checkpoints, a non-empty story
    config = json.loads((run / "config.json").read_text())
    assert config["preset"] == "debug" and config["train"]["dataset"] == "quickstart"
    # --minutes is a deadline the loop keeps (its schedule shortens if the machine slows down)
    assert config["time_budget"]["budget_s"] == pytest.approx(6.0) and config["time_budget"]["actual_s"] > 0
    # ... and a WSD schedule may grow into unused time, up to MAX_EPOCHS passes over the training tokens
    cap = config["time_budget"]["max_steps_cap"]
    assert config["max_steps"] <= cap == max(int(qs.MAX_EPOCHS * len(np.load(data / "train.npy", mmap_mode="r"))
                                                 // config["tokens_per_step"]), config["time_budget"]["planned_steps"])
    assert list((run / "checkpoints").glob("step_*.safetensors"))
    story = (run / "story.txt").read_text(encoding="utf-8")
    assert story.startswith("Once upon a time") and len(story.strip()) > len("Once upon a time")
    assert "Once upon a time" in out and str(run) in out.replace("\n", "")
    assert "tslm generate" in out and "tslm eval" in out
    print(f"first quickstart run: {first:.1f} s")  # ~10 s on an idle 2-core machine (most of it importing torch)

    # A rerun skips every finished stage (no retraining) and tells another story from the same run.
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    mtime = (data / "train.npy").stat().st_mtime_ns
    code, out, err = run_cli("quickstart", "--text", str(story_text), "--dir", str(work), "--vocab-size", "300",
                             "--preset", "debug", "--device", "cpu", "--plain", "--max-tokens", "20")
    assert code == 0, err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ckpts
    assert (data / "train.npy").stat().st_mtime_ns == mtime
    assert "already there" in out

    # A run stopped before its last step (here: its newest checkpoint removed) is resumed, not restarted.
    newest = sorted((run / "checkpoints").glob("step_*.safetensors"))[-1]
    newest.unlink()
    code, out, err = run_cli("quickstart", "--text", str(story_text), "--dir", str(work), "--vocab-size", "300",
                             "--preset", "debug", "--device", "cpu", "--plain", "--max-tokens", "20")
    assert code == 0, err
    assert "resuming" in out and newest.is_file()

    # Another vocabulary size does not silently mix tokenizers: an error naming --force.
    code, out, err = run_cli("quickstart", "--text", str(story_text), "--dir", str(work), "--vocab-size", "320",
                             "--preset", "debug", "--device", "cpu")
    assert code == 2 and "--force" in err


def test_split_point_holds_out_last_documents():
    data = "".join(f"story {i}\n<|endoftext|>\n" for i in range(100)).encode()
    cut = qs.split_point(data)
    assert data[cut:].startswith(b"\nstory 95\n") and data[:cut].endswith(b"<|endoftext|>")
    # no <|endoftext|>: blank lines separate documents
    data = b"\n\n".join(b"doc %d" % i for i in range(20))
    assert data[qs.split_point(data):] == b"doc 19"
    with pytest.raises(UserError, match="at least 2"):
        qs.split_point(b"just one story<|endoftext|>\n")


def test_read_text_prefix_cuts_at_document_boundary(tmp_path: Path):
    p = tmp_path / "t.txt"
    p.write_bytes(b"aaaa<|endoftext|>bbbb<|endoftext|>cccc<|endoftext|>")
    data, truncated = qs.read_text_prefix(p, 40)
    assert truncated and data == b"aaaa<|endoftext|>bbbb<|endoftext|>"
    assert qs.read_text_prefix(p, 1000) == (p.read_bytes(), False)


def test_plan_steps_time_data_and_minimum():
    # 10K tokens/s, 8192 tokens/step: (0.9 * 600 - 2) s -> 656 steps without evaluation
    plan = qs.plan_steps(600, 10_000, 8192, 10**9, 0)
    assert plan.steps == 656 and plan.limited_by == "time" and plan.seconds <= 600
    assert 1 <= plan.warmup_steps <= plan.steps and plan.eval_every * qs.NUM_EVALS >= plan.steps
    # evaluation time is budgeted too
    assert qs.plan_steps(600, 10_000, 8192, 10**9, 400_000).steps < plan.steps
    # a small text caps the run at MAX_EPOCHS passes
    plan = qs.plan_steps(600, 10**6, 8192, 100_000, 0)
    assert plan.limited_by == "data" and plan.steps == int(qs.MAX_EPOCHS * 100_000 // 8192)
    assert qs.plan_steps(1, 10, 8192, 10**9, 0).steps == qs.MIN_STEPS


def test_fit_context():
    assert qs.fit_context(256, 10_000) == 256
    assert qs.fit_context(256, 257) == 256
    assert qs.fit_context(256, 200) == 128
    with pytest.raises(UserError, match="longer `text`"):
        qs.fit_context(256, 5)


def test_bad_inputs_are_one_line_errors(tmp_path: Path, run_cli):
    code, _, err = run_cli("quickstart", "--text", str(tmp_path / "missing.txt"), "--dir", str(tmp_path))
    assert code == 2 and "not found" in err
    (tmp_path / "one.txt").write_text("a single story without any separator")
    code, _, err = run_cli("quickstart", "--text", str(tmp_path / "one.txt"), "--dir", str(tmp_path))
    assert code == 2 and "at least 2" in err
    code, _, err = run_cli("quickstart", "--text", str(tmp_path / "one.txt"), "--minutes", "0")
    assert code == 2 and "--minutes" in err
    (tmp_path / "bin.txt").write_bytes(b"ok<|endoftext|>\xff\xfe<|endoftext|>")
    code, _, err = run_cli("quickstart", "--text", str(tmp_path / "bin.txt"), "--dir", str(tmp_path))
    assert code == 2 and "UTF-8" in err


def test_quickstart_auto_size_is_the_default_on_a_cpu(tmp_path: Path, story_text: Path, run_cli):
    from tinystories_cli.train import autosize

    work = tmp_path / "work"
    code, out, err = run_cli("quickstart", "--text", str(story_text), "--minutes", "0.1", "--dir", str(work),
                             "--vocab-size", "300", "--device", "cpu", "--plain", "--max-tokens", "20")
    assert code == 0, err
    cfg = json.loads((work / "runs" / "quickstart" / "config.json").read_text(encoding="utf-8"))
    auto = cfg["auto_size"]
    # a 6-second budget is far below the first threshold: the smallest row of the rule
    assert auto["d_model"] == autosize.RULES[0].d_model == cfg["model"]["d_model"]
    assert cfg["train"]["lr"] == autosize.RULES[0].lr and cfg["train"]["batch_size"] == autosize.BATCH_SIZE
    assert "auto size: d_model" in out and "model: auto size" in out
    assert f"--d-model {auto['d_model']}" in out               # the "longer run" command rebuilds the same model
    # the story's sampling settings were picked from the grid, said, and repeated in "another story"
    line = next(x for x in out.splitlines() if x.startswith("story temperature"))
    temp, top_p = line.split()[2].rstrip(","), line.split()[4].rstrip(":")
    assert float(temp) in qs.STORY_GRID["temperature"] and float(top_p) in qs.STORY_GRID["top_p"]
    assert f"--temp {temp} --top-p {top_p}" in out


def test_quickstart_auto_size_with_another_batch_replans_without_a_second_probe(tmp_path: Path, story_text: Path,
                                                                                run_cli, monkeypatch):
    """A row of the rule with the reference width but another batch (and decay) is planned from the
    reference probe at the row's measured speed; the run trains with that batch and decay."""
    from tinystories_cli.train import autosize

    row = autosize.Rule(0.0, autosize.REFERENCE_WIDTH, 4e-3, 1.5, batch_size=4, warmup_steps=3, decay_fraction=0.4)
    monkeypatch.setattr(autosize, "RULES", (row,))
    probes = []
    real_probe = qs.tl.measure_throughput

    def probe(run, seconds, max_steps=None):
        tps, spent = real_probe(run, seconds) if max_steps is None else real_probe(run, seconds, max_steps)
        probes.append((run.model_cfg.d_model, run.train_cfg.batch_size, tps))
        return tps, spent

    monkeypatch.setattr(qs.tl, "measure_throughput", probe)
    work = tmp_path / "work"
    code, out, err = run_cli("quickstart", "--text", str(story_text), "--minutes", "0.1", "--dir", str(work),
                             "--vocab-size", "300", "--device", "cpu", "--plain", "--max-tokens", "10")
    assert code == 0, err
    assert [p[:2] for p in probes] == [(autosize.REFERENCE_WIDTH, autosize.BATCH_SIZE)]  # the reference model only
    cfg = json.loads((work / "runs" / "quickstart" / "config.json").read_text(encoding="utf-8"))
    assert (cfg["train"]["batch_size"], cfg["train"]["decay_fraction"], cfg["train"]["lr"]) == (4, 0.4, 4e-3)
    assert cfg["train"]["warmup_steps"] == min(3, max(1, cfg["time_budget"]["planned_steps"] // 10))
    assert (cfg["auto_size"]["batch_size"], cfg["auto_size"]["decay_fraction"]) == (4, 0.4)
    assert cfg["time_budget"]["probe_tokens_per_s"] == pytest.approx(probes[0][2] * 1.5, abs=0.1)  # at the row's speed
    assert "--batch-size 4 --schedule wsd --decay-fraction 0.4" in out          # the "longer run" command


def test_pick_sampling_takes_the_coolest_cell_that_reads_like_text():
    from types import SimpleNamespace as Cell

    def cell(t, p, rep, d2):
        return Cell(settings={"temperature": t, "top_p": p}, repetition=rep, distinct_2=d2)

    looping, ok_cool, ok_hot = cell(0.5, 0.9, 0.25, 0.5), cell(0.7, 1.0, 0.0, 0.9), cell(1.0, 1.0, 0.0, 0.97)
    assert qs.pick_sampling([ok_hot, looping, ok_cool])[0] == ok_cool.settings      # order of the grid is irrelevant
    assert qs.pick_sampling([ok_hot, looping])[0] == ok_hot.settings
    # too few distinct bigrams fails as well as looping
    dull = cell(0.5, 0.9, 0.0, qs.MIN_DISTINCT_2 - 0.01)
    assert qs.pick_sampling([dull, ok_hot])[0] == ok_hot.settings
    # nothing passes: the least repetitive, ties broken by distinct-2; samples too short to count lose
    a, b, short = cell(0.5, 0.9, 0.2, 0.5), cell(0.7, 0.9, 0.1, 0.4), cell(0.9, 0.9, None, None)
    settings, why = qs.pick_sampling([a, b, short])
    assert settings == b.settings and "no setting" in why
