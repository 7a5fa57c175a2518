"""`tslm train --log tensorboard,wandb`: the loggers get what metrics.jsonl gets, read back with each tool's
own reader; resume continues the same logs without duplicated or missing steps; a failing logger never
stops training; a missing package is one line naming the extra."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tinystories_cli import runs
from tinystories_cli.config import TrainConfig
from tinystories_cli.train import loggers

from train_fixtures import TINY_TRAIN_ARGS

ARGS = [*TINY_TRAIN_ARGS, "--max-steps", "8", "--log-every", "1", "--eval-every", "2", "--save-every", "2"]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / runs.METRICS_FILE).read_text().splitlines()]


def _event_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run_dir / loggers.TENSORBOARD_DIR), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}, acc


def test_tensorboard_scalars_equal_metrics_jsonl_across_a_resume(tiny_workspace, run_cli):
    root, _ = tiny_workspace
    code, _, err = run_cli("train", *ARGS, "--run-name", "tb", "--log", "tensorboard", "--stop-at", "6")
    assert code == 0, err
    run_dir = root / "runs" / "tb"
    assert json.loads((run_dir / "config.json").read_text())["train"]["log"] == "tensorboard"
    # A run killed after step 6 whose last checkpoint is step 4: TensorBoard already holds steps 5-6.
    (run_dir / "checkpoints" / runs.step_checkpoint_name(6)).unlink()
    before, _ = _event_scalars(run_dir)
    assert max(s for s, _ in before["train/loss"]) == 6
    code, _, err = run_cli("train", "--resume", "--run-name", "tb", "--quiet")  # --log comes from config.json
    assert code == 0, err

    records = _metrics(run_dir)
    assert [r["step"] for r in records if "train_loss" in r] == list(range(1, 9))
    scalars, acc = _event_scalars(run_dir)
    checked = 0
    for key, tag in loggers.SCALAR_NAMES.items():
        want = [(r["step"], r[key]) for r in records if key in r]
        if not want:
            continue
        got = scalars[tag]
        assert [s for s, _ in got] == [s for s, _ in want], tag  # each step once, none missing, in order
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6), tag
        checked += 1
    assert {"train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s", "perf/mfu", "val/loss",
            "val/bits_per_byte"} <= scalars.keys()
    assert checked >= 9
    for r in records:  # bits per byte: the validation loss over the text's bytes (the sidecar's counts)
        if "val_loss" in r:
            assert r["val_bpb"] == pytest.approx(r["val_loss"] * _tokens_per_byte(root) / math.log(2))
    config_text = acc.Tensors("config/text_summary")  # the resolved config, once
    assert len(config_text) == 1 and b'"max_steps": 8' in config_text[0].tensor_proto.string_val[0]


def _tokens_per_byte(root: Path) -> float:
    meta = json.loads((root / "data" / "tiny" / "valid.json").read_text())
    return meta["num_tokens"] / meta["source_bytes"]


def test_force_restart_clears_the_earlier_event_files(tiny_workspace, run_cli):
    root, _ = tiny_workspace
    assert run_cli("train", *ARGS, "--run-name", "f", "--log", "tensorboard", "--max-steps", "4")[0] == 0
    assert run_cli("train", *ARGS, "--run-name", "f", "--log", "tensorboard", "--max-steps", "3", "--force")[0] == 0
    scalars, _ = _event_scalars(root / "runs" / "f")
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3]


def wandb_records(path: Path):
    """The records of an offline run's .wandb file, decoded with W&B's own protobuf schema. The framing is
    W&B's append-only log: a 7-byte header (":W&B", magic 0xBEE1, version), then 32 KiB blocks of chunks,
    each with a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            yield record
            buf = b""


def test_wandb_offline_run_has_config_and_summary_on_disk_and_resumes_the_same_run(tiny_workspace, run_cli,
                                                                                    monkeypatch):
    root, _ = tiny_workspace
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(root / "wandb-default"))
    code, _, err = run_cli("train", *ARGS, "--run-name", "wb", "--log", "wandb", "--max-steps", "4", "--stop-at", "2")
    assert code == 0, err
    code, _, err = run_cli("train", "--resume", "--run-name", "wb", "--quiet")
    assert code == 0, err
    run_dir = root / "runs" / "wb"
    run_id = (run_dir / loggers.WANDB_ID_FILE).read_text().strip()
    files = sorted((run_dir / "wandb").glob("offline-run-*/*.wandb"))
    assert len(files) == 2 and all(f.name == f"run-{run_id}.wandb" for f in files)  # one W&B run, resumed
    history, summary, configs = {}, {}, []
    for f in files:
        for r in wandb_records(f):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                assert r.run.run_id == run_id and r.run.display_name == "wb" and r.run.project == "tslm"
                configs.append({u.key: json.loads(u.value_json) for u in r.run.config.update})
            elif kind == "history":
                step = r.history.step.num
                assert step not in history  # no duplicated step across the resume
                history[step] = {i.nested_key[0]: json.loads(i.value_json) for i in r.history.item}
            elif kind == "summary":
                summary.update({u.nested_key[0] if u.nested_key else u.key: json.loads(u.value_json)
                                for u in r.summary.update})
    assert configs and all(c["train"]["log"] == "wandb" and c["max_steps"] == 4 for c in configs)
    records = _metrics(run_dir)
    assert sorted(history) == [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        for key, value in loggers.scalars(r).items():
            assert history[r["step"]][key] == pytest.approx(value, rel=1e-12), (r["step"], key)
    assert summary["_step"] == 4 and summary["train/loss"] == pytest.approx(records[-1]["train_loss"])
    assert summary["val/loss"] == pytest.approx(records[-1]["val_loss"])


class Exploding:
    name = "tensorboard"

    def __init__(self):
        self.calls = 0

    def log_metrics(self, step, metrics):
        self.calls += 1
        raise OSError("disk full")

    def log_text(self, step, tag, text):
        raise OSError("disk full")

    def close(self):
        raise OSError("disk full")

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def test_a_failing_logger_does_not_stop_training(tiny_workspace, run_cli, monkeypatch):
    root, _ = tiny_workspace
    bomb = Exploding()
    monkeypatch.setitem(loggers.FACTORIES, "tensorboard", lambda run_dir, config, start: bomb)
    code, out, err = run_cli("train", *ARGS, "--run-name", "x", "--log", "tensorboard", "--max-steps", "4")
    assert code == 0
    warnings = [line for line in (out + err).splitlines() if "tensorboard logger failed" in line]
    assert len(warnings) == 1 and "disk full" in warnings[0] and "metrics.jsonl" in warnings[0]
    assert bomb.calls == 1  # switched off after its first failure
    assert [r["step"] for r in _metrics(root / "runs" / "x") if "train_loss" in r] == [1, 2, 3, 4]


def test_a_logger_that_cannot_start_leaves_training_going(tiny_workspace, run_cli, monkeypatch):
    root, _ = tiny_workspace

    def broken(run_dir, config, start):
        raise RuntimeError("no permission")
    monkeypatch.setitem(loggers.FACTORIES, "wandb", broken)
    code, out, err = run_cli("train", *ARGS, "--run-name", "y", "--log", "wandb", "--max-steps", "2")
    assert code == 0 and "wandb logger did not start (RuntimeError: no permission)" in out + err


def test_missing_package_is_one_line_naming_the_extra(tiny_workspace, run_cli, monkeypatch):
    root, _ = tiny_workspace
    real = loggers.importlib.util.find_spec
    monkeypatch.setattr(loggers.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    code, out, err = run_cli("train", *ARGS, "--run-name", "z", "--log", "tensorboard,wandb")
    text = (out + err).strip()
    assert code == 2 and "wandb" in text and '.[track]' in text and "Traceback" not in text
    assert not (root / "runs" / "z").exists()  # refused before anything was written


def test_log_setting_parses_and_rejects(tmp_path):
    assert TrainConfig(log="wandb,tensorboard").log == "tensorboard,wandb"
    assert TrainConfig(log=["wandb"]).log == "wandb" and TrainConfig().log == ""
    with pytest.raises(ValueError, match="unknown logger 'mlflow'"):
        TrainConfig(log="mlflow")
    from tinystories_cli.config import resolve_configs
    cfg = tmp_path / "c.toml"
    cfg.write_text('preset = "debug"\n[train]\nlog = "tensorboard"\n')
    assert resolve_configs(None, cfg)[2].log == "tensorboard"
