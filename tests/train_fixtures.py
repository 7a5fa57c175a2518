"""Shared helpers for the train/eval/checkpoint tests: a tiny tokenizer, token files and configs.

Everything is written under tmp_path; nothing depends on ../shared/data.
"""

from __future__ import annotations

import contextlib
import json
import random
from pathlib import Path
from typing import Iterator

import numpy as np

REPO = Path(__file__).resolve().parents[1]  # the checkout: tests/ is one level below it
SHARED_DATA = REPO.parent / "shared" / "data"  # ../shared/data beside the checkout (CI provides it)

WORDS = ("the cat dog bird sat ran saw a big small red blue happy sad little girl boy tree house "
         "played with ball and then went home to mom dad said hello").split()

# A model small enough that a step takes milliseconds on one CPU core.
TINY_MODEL = {"context_length": 16, "d_model": 32, "num_layers": 1, "num_heads": 2, "d_ff": 64}
TINY_TRAIN = {"batch_size": 4, "max_steps": 8, "warmup_steps": 2, "lr": 3e-3, "min_lr": 3e-4, "log_every": 1,
              "eval_every": 4, "eval_batches": 2, "save_every": 4, "device": "cpu"}


def story_text(n_stories: int, seed: int) -> str:
    rng = random.Random(seed)
    stories = []
    for _ in range(n_stories):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))).capitalize() + "."
                     for _ in range(rng.randint(2, 4))]
        stories.append(" ".join(sentences))
    return "<|endoftext|>".join(stories) + "<|endoftext|>"


def write_token_file(path: Path, ids, tokenizer, source_bytes: int, **sidecar) -> None:
    """A hand-made token file in `tslm encode`'s format (uint16 .npy + JSON sidecar); `sidecar` overrides keys."""
    from tinystories_cli.tokenizer.encode import FORMAT_VERSION

    arr = np.asarray(ids, dtype=np.uint16)
    np.save(path, arr)
    meta = {"format_version": FORMAT_VERSION, "dtype": "uint16", "num_tokens": int(len(arr)),
            "max_id": int(arr.max()) if len(arr) else 0, "vocab_size": tokenizer.vocab_size,
            "fingerprint": tokenizer.fingerprint, "source_bytes": int(source_bytes), **sidecar}
    path.with_suffix(".json").write_text(json.dumps(meta))


def make_dataset(root: Path, vocab_size: int = 300, n_train: int = 400, n_valid: int = 60):
    """data/tiny/{tokenizer/, train.npy, valid.npy} under `root`; returns the Tokenizer."""
    from tinystories_cli.tokenizer.bpe import save_tokenizer, train_bpe, training_fingerprint
    from tinystories_cli.tokenizer.encode import encode_file
    from tinystories_cli.tokenizer.tokenizer import Tokenizer

    d = root / "data" / "tiny"
    d.mkdir(parents=True, exist_ok=True)
    texts = {"train": story_text(n_train, 1), "valid": story_text(n_valid, 2)}
    for split, text in texts.items():
        (d / f"{split}.txt").write_text(text, encoding="utf-8")
    specials = ["<|endoftext|>"]
    vocab, merges = train_bpe(d / "train.txt", vocab_size, specials, workers=1)
    save_tokenizer(d / "tokenizer", vocab, merges, training_fingerprint(vocab_size, specials, "test"))
    tok = Tokenizer.from_dir(d / "tokenizer")
    for split in texts:
        encode_file(d / f"{split}.txt", d / f"{split}.npy", tok)
    return tok


# `tslm train` flags of the tiny model (TINY_MODEL) on data/tiny, for CLI-level fixtures.
TINY_TRAIN_ARGS = ["--preset", "debug", "--dataset", "tiny", "--ctx", "16", "--d-model", "32", "--num-layers", "1",
                   "--num-heads", "2", "--max-steps", "4", "--warmup-steps", "1", "--eval-every", "2",
                   "--device", "cpu", "--quiet", "--peak-tflops", "1"]


@contextlib.contextmanager
def workspace_at(root: Path) -> Iterator[Path]:
    """tslm's default data/ and runs/ pointed under `root` for the duration (tests only)."""
    from tinystories_cli import paths

    old = paths.DATA_ROOT, paths.RUNS_ROOT
    paths.DATA_ROOT, paths.RUNS_ROOT = root / "data", root / "runs"
    try:
        yield root
    finally:
        paths.DATA_ROOT, paths.RUNS_ROOT = old


def trained_runs(root: Path, runs: dict[str, list[str]]) -> Path:
    """data/tiny under `root`, then `tslm train` once per named run (TINY_TRAIN_ARGS + its own flags, later
    flags win) into root/runs/NAME; returns `root`. For module-scoped fixtures: training is the slow part."""
    from tinystories_cli.cli import main

    make_dataset(root)
    with workspace_at(root):
        for name, flags in runs.items():
            code = main(["train", *TINY_TRAIN_ARGS, *flags, "--run-name", name])
            assert code == 0, f"training {name} failed"
    return root
