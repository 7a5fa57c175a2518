"""The test suite's shared helpers, written once (pytest fixtures are in the conftest.py files).

Texts (random stories, template stories, tokenizer edge cases), a tiny tokenizer and token files, the tiny
model's settings and in-process training (`train_tiny`), run directories written by hand (`write_run`,
`make_run`), and pointing tslm's data/ and runs/ defaults at a folder (`workspace_at`). Everything is written
under the folder a test gives; nothing depends on ../shared/data (SHARED_DATA only says where it is).
The HTTP server of the download tests is in download_server.py, the terminal emulator in cli/terminal_screen.py.
"""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import Iterator
from pathlib import Path

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


NAMES = ["Lily", "Tom", "Mia", "Ben", "Sue", "Max", "Anna", "Sam"]
THINGS = ["a red ball", "a big box", "a little cat", "a shiny stone", "a blue kite", "a small boat"]
PLACES = ["the park", "the garden", "the beach", "the forest", "the house", "the river"]
FEELINGS = ["happy", "sad", "excited", "scared", "proud", "tired"]


def tiny_stories(n: int, seed: int = 0) -> str:
    """`n` template stories separated by <|endoftext|>, like the TinyStories files (for quickstart-style runs)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.sample(NAMES, 2)
        out.append(
            f"Once upon a time, {a} went to {rng.choice(PLACES)}. {a} found {rng.choice(THINGS)}. "
            f"{a} was very {rng.choice(FEELINGS)}. {b} came to play. They played with it all day. "
            f"At the end of the day, {a} and {b} went home. The end.\n"
        )
    return "<|endoftext|>\n".join(out) + "<|endoftext|>\n"


# Text that stresses a tokenizer: mixed scripts, numbers, spaces and tabs, and strings at the edges of
# pre-tokenization, special tokens and chunk boundaries (`EOT` is the end-of-text special).
EOT = "<|endoftext|>"

TEXT = (
    "Once upon a time, there was a little girl named Lily. She liked to play outside in the sun.\n"
    "One day, she saw a big, red ball. \"Can I play?\" she asked. Her mom said, \"Yes, you can!\"\n"
    "They're happy; it's 2026 and we'll see 1,234,567 stars... I've   got  spaces\t\tand tabs\r\n"
    "Ünïcödé: café, naïve, 日本語のテキスト, emoji 🙂👍🏽, Ελληνικά, русский текст, ١٢٣ ½ ²\n"
)

# Strings that stress pre-tokenization, specials and chunk boundaries.
TRICKY = [
    "",
    " ",
    "\n",
    EOT,
    EOT + EOT,
    "a" + EOT + "b",
    "<|endoftext",
    "<|endoftext|",
    "x<|endoftext|>y<|endoftext|><|endoftext|>z",
    "Hello, world! It's 2026.",
    "they'll we've I'm you'd she's it'S 'll 'LL",
    "don't'll'" + "s",
    "   leading and trailing   ",
    "a  b   c    d\n\n\ne",
    "line1\r\nline2\r\n\r\n",
    "tab\t\tx \t y\u00a0z\u2028w\u3000v",
    "12345678901234567890 3.14159 1,000,000",
    "émojis 🙂👍🏽🇫🇷 and CJK 日本語 and ḁ̸̈ combining",
    "\x00\x01\x1c\x1d\x1e\x1f\x7f control",
    "!!!???...,,,;;;" + " " * 40 + "end",
    "x" * 300 + " " + "9" * 300 + " " * 300 + "y",
]


def write_token_file(path: Path, ids, tokenizer, source_bytes: int, **sidecar) -> None:
    """A hand-made token file in `tslm encode`'s format (uint16 .npy + JSON sidecar); `sidecar` overrides keys."""
    from tinystories_cli.tokenizer.encode import FORMAT_VERSION

    arr = np.asarray(ids, dtype=np.uint16)
    np.save(path, arr)
    meta = {"format_version": FORMAT_VERSION, "dtype": "uint16", "num_tokens": int(len(arr)),
            "max_id": int(arr.max()) if len(arr) else 0, "vocab_size": tokenizer.vocab_size,
            "fingerprint": tokenizer.fingerprint, "source_bytes": int(source_bytes), **sidecar}
    path.with_suffix(".json").write_text(json.dumps(meta))


def bpe_tokenizer(folder: Path, text: str, vocab_size: int = 300, specials: tuple[str, ...] = (EOT,)):
    """A Tokenizer trained by `train_bpe` (one worker) on `text`, written to folder/train.txt first."""
    from tinystories_cli.tokenizer.bpe import train_bpe
    from tinystories_cli.tokenizer.tokenizer import Tokenizer

    (folder / "train.txt").write_text(text, encoding="utf-8")
    vocab, merges = train_bpe(folder / "train.txt", vocab_size, list(specials), workers=1)
    return Tokenizer(vocab, merges, list(specials))


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


def train_tiny(name: str | None, model: dict | None = None, train: dict | None = None, **options):
    """`train.prepare_run` + `train.train` of the tiny model on data/tiny in the current workspace, in-process.
    `model` / `train` override TINY_MODEL / TINY_TRAIN keys; `options` are `TrainOptions` fields (quiet display
    and a fixed peak, so no matmul measurement, unless given). Returns what `train.train` returns."""
    from tinystories_cli import train as T

    options.setdefault("display", "quiet")
    options.setdefault("peak_tflops", 1.0)
    run = T.prepare_run("debug", None, {**TINY_MODEL, **(model or {})},
                        {"dataset": "tiny", **TINY_TRAIN, **(train or {})}, T.TrainOptions(run_name=name, **options))
    return T.train(run)


def latest_weights(run_dir: Path) -> dict:
    """The model tensors of a run's latest checkpoint, by name."""
    from tinystories_cli import runs
    from tinystories_cli.checkpoint import read_checkpoint

    return read_checkpoint(runs.latest_checkpoint(run_dir)).model


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on now (for a torch.distributed rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_run(root: Path, name: str, model: dict | None = None, train: dict | None = None,
              metrics: list[dict] | None = None, eval_result: dict | None = None, preset: str = "debug") -> Path:
    """A run directory as `tslm train` leaves it (config.json, metrics.jsonl, optional eval_valid.json), written by
    hand: no weights."""
    from tinystories_cli.config import ModelConfig, TrainConfig

    d = root / name
    d.mkdir(parents=True)
    m = ModelConfig(**{"vocab_size": 256, "context_length": 32, "d_model": 32, "num_layers": 1, "num_heads": 2,
                       **(model or {})})
    t = TrainConfig(**{"max_steps": 10, "warmup_steps": 1, **(train or {})})
    cfg = {"preset": preset, "model": m.model_dump(), "train": t.model_dump(), "parameters": 1234,
           "max_steps": t.max_steps, "tokens_per_step": 64}
    (d / "config.json").write_text(json.dumps(cfg))
    if metrics is not None:
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    if eval_result is not None:
        (d / "eval_valid.json").write_text(json.dumps(eval_result))
    return d


def make_run(root, name, tokenizer_dir, tok, **model_kw) -> tuple:
    """A run directory in the trainer's format: config.json, tokenizer/, checkpoints/best.safetensors (a random
    model, seed 0, with non-trivial norm weights)."""
    import shutil

    import torch

    from tinystories_cli import runs
    from tinystories_cli.checkpoint import save_checkpoint
    from tinystories_cli.config import ModelConfig
    from tinystories_cli.model import TransformerLM

    cfg = ModelConfig(vocab_size=tok.vocab_size, context_length=32, d_model=64, num_layers=2, num_heads=4,
                      d_ff=96, rope_theta=500.0, **model_kw)
    torch.manual_seed(0)
    model = TransformerLM(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights, so a misplaced norm would show in the logits
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    run_dir = root / name
    (run_dir / runs.CHECKPOINT_DIR).mkdir(parents=True)
    (run_dir / runs.CONFIG_FILE).write_text(json.dumps({"preset": "test", "model": cfg.model_dump()}))
    shutil.copytree(tokenizer_dir, run_dir / runs.TOKENIZER_DIR)
    save_checkpoint(model, None, 10, run_dir / runs.CHECKPOINT_DIR / runs.BEST_CHECKPOINT,
                    metadata={"model_config": cfg.model_dump()})
    return run_dir, model, cfg


def one_error_line(err: str) -> str:
    """The one `error:` line of a refused command's stderr (progress lines drawn before it may precede it),
    with no traceback and no internal error."""
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err and "internal error" not in err, err
    return lines[0]


def refused(run_cli, *args: str) -> str:
    """`tslm ARGS` through the `run_cli` fixture, refused: exit 2 and one line, no traceback; returns stderr."""
    code, out, err = run_cli(*args)
    assert code == 2, (out, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and "internal error" not in err, err
    return err
