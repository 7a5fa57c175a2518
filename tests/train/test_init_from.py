"""`tslm train --init-from`: fine-tuning from a run, a checkpoint or a Hugging Face directory.

The model config, weights and tokenizer come from the source; optimizer and schedule start fresh; the
new run records the source (path, sha256 of the weights) in config.json and its README.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tinystories_cli import runs
from tinystories_cli import train as T
from tinystories_cli.checkpoint import read_checkpoint
from tinystories_cli.evaluate import evaluate_tokens
from tinystories_cli.fileio import sha256_file
from tinystories_cli.train.loop import build_state

from train_fixtures import make_dataset, refused, train_tiny, write_token_file

# A text unlike the fixture's random word salad: one story told again and again.
DISTINCT = ("Pip the penguin found a shiny blue stone by the icy sea. He carried it home to his sister, "
            "who laughed and hid it under her wing. ") * 60


@pytest.fixture
def finetune_workspace(tiny_workspace):
    """tiny_workspace plus a trained run `base` and my.npy / my_valid.npy (a text unlike the run's) to fine-tune on;
    returns (root, tokenizer, the base run's directory)."""
    tmp_path, tok = tiny_workspace
    base = train_tiny("base")
    ids = tok.encode(DISTINCT)
    cut = len(ids) * 3 // 4
    for name, part in (("my", ids[:cut]), ("my_valid", ids[cut:])):
        write_token_file(tmp_path / f"{name}.npy", part, tok, len(DISTINCT))
    return tmp_path, tok, base.run_dir


def _loss(run_or_ckpt, tokens_file) -> float:
    model, _, cfg = runs.load_trained_model(run_or_ckpt)
    return evaluate_tokens(model, np.load(tokens_file), cfg.context_length, batch_size=8)["loss"]


def test_fine_tuning_lowers_loss_on_the_new_text_and_records_its_source(finetune_workspace, run_cli):
    tmp, tok, base_dir = finetune_workspace
    before = _loss(base_dir, tmp / "my_valid.npy")
    code, out, err = run_cli("train", "--init-from", "base", "--train-data", str(tmp / "my.npy"),
                             "--valid-data", str(tmp / "my_valid.npy"), "--lr", "3e-3", "--max-steps", "40",
                             "--eval-every", "20", "--run-name", "ft", "--quiet", "--peak-tflops", "1")
    assert code == 0, err
    ft = tmp / "runs" / "ft"
    after = _loss(ft, tmp / "my_valid.npy")
    print(f"loss on the new text: base {before:.3f}, fine-tuned {after:.3f}")
    assert after < before - 0.5, (before, after)

    conf = json.loads((ft / "config.json").read_text())
    best = base_dir / "checkpoints" / "best.safetensors"
    assert conf["init_from"]["kind"] == "run" and conf["init_from"]["path"] == str(base_dir.resolve())
    assert conf["init_from"]["weights"] == [{"file": str(best.resolve()), "sha256": sha256_file(best)}]
    base_conf = json.loads((base_dir / "config.json").read_text())
    assert conf["model"] == base_conf["model"] and conf["preset"] == "debug"
    # fresh schedule sized for the short run: warmup at most a tenth, the source's lr/min_lr ratio kept
    assert conf["train"]["warmup_steps"] == min(base_conf["train"]["warmup_steps"], 4)
    ratio = base_conf["train"]["min_lr"] / base_conf["train"]["lr"]
    assert conf["train"]["min_lr"] == pytest.approx(3e-3 * ratio)
    assert runs.load_tokenizer(ft / "tokenizer").fingerprint == tok.fingerprint
    readme = (ft / "README.md").read_text()
    assert "fine-tuned with `tslm train --init-from`" in readme and sha256_file(best)[:16] in readme


def test_the_run_starts_from_the_source_weights_with_a_fresh_optimizer(finetune_workspace):
    tmp, _, base_dir = finetune_workspace
    ckpt = runs.latest_checkpoint(base_dir)  # a step checkpoint: it also holds optimizer state
    run = T.prepare_run(None, None, {"dropout": 0.1}, {"max_steps": 10, "lr": 1e-3},
                        T.TrainOptions(run_name="ft2", init_from=str(ckpt), display="quiet",
                                       train_file=tmp / "my.npy", valid_file=tmp / "my_valid.npy"))
    assert run.model_cfg.dropout == 0.1 and run.init_from.kind == "checkpoint"
    state = build_state(run)
    src = read_checkpoint(ckpt).model_state_dict()
    got = state.raw_model.state_dict()
    assert src.keys() == got.keys() and all(torch.equal(src[k], got[k]) for k in src)
    assert state.start_step == 0 and not state.optimizer.state  # no moments carried over
    assert run.train_cfg.max_steps == 10 and run.end_step == 10


def test_contradictions_are_refused_in_one_line(finetune_workspace, run_cli):
    tmp, _, base_dir = finetune_workspace
    data = ["--train-data", str(tmp / "my.npy"), "--valid-data", str(tmp / "my_valid.npy"), "--max-steps", "5"]

    def refused_train(*args) -> str:
        return refused(run_cli, "train", *args, *data)

    err = refused_train("--init-from", "base", "--d-model", "64", "--num-layers", "3")
    assert "d_model=64 (source: 32)" in err and "num_layers=3 (source: 1)" in err
    tokenizer = str(tmp / "data/tiny/tokenizer")
    assert "--tokenizer cannot be combined" in refused_train("--init-from", "base", "--tokenizer", tokenizer)
    assert "context length 32 exceeds the 16" in refused_train("--init-from", "base", "--ctx", "32")
    assert "no run or checkpoint named 'nope'" in refused_train("--init-from", "nope")
    (tmp / "empty").mkdir()
    assert "neither a tslm run" in refused_train("--init-from", str(tmp / "empty"))
    # token files must carry the source tokenizer's fingerprint (as for any run)
    other = make_dataset(tmp / "other", vocab_size=280)
    write_token_file(tmp / "foreign.npy", [1, 2, 3] * 50, other, 300)
    code, _, err = run_cli("train", "--init-from", "base", "--train-data", str(tmp / "foreign.npy"),
                           "--valid-data", str(tmp / "my_valid.npy"), "--max-steps", "5")
    assert code == 2 and "different tokenizer" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp / "runs" / "ft").exists()


def test_init_from_a_hugging_face_directory(finetune_workspace, run_cli):
    transformers = pytest.importorskip("transformers", reason="SKIPPED LOUDLY: transformers (dev dependency) is needed")
    from tinystories_cli.tokenizer.files import write_vocab_merges

    tmp, tok, _ = finetune_workspace
    hf_cfg = transformers.GPT2Config(vocab_size=tok.vocab_size, n_embd=32, n_layer=1, n_head=2, n_positions=32)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    src = tmp / "hf-gpt2"
    hf.save_pretrained(src)
    write_vocab_merges(src, tok.vocab, tok.merges)
    code, out, err = run_cli("train", "--init-from", str(src), "--ctx", "16", "--train-data", str(tmp / "my.npy"),
                             "--valid-data", str(tmp / "my_valid.npy"), "--max-steps", "2", "--batch-size", "2",
                             "--run-name", "from-hf", "--quiet", "--peak-tflops", "1")
    assert code == 0, err
    run_dir = tmp / "runs" / "from-hf"
    conf = json.loads((run_dir / "config.json").read_text())
    assert conf["init_from"]["kind"] == "huggingface" and conf["preset"] == "imported"
    assert conf["model"]["ffn"] == "gelu_tanh" and conf["model"]["context_length"] == 16
    assert conf["init_from"]["weights"][0]["sha256"] == sha256_file(src / "model.safetensors")
    assert runs.load_tokenizer(run_dir / "tokenizer").fingerprint == tok.fingerprint  # written in our format
