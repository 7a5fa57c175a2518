"""Where each command reads and writes by default, so `download -> bpe -> encode -> train ->
generate` chains with no flags. One place for these conventions:

    data/<dataset>/train.txt, valid.txt          text (tslm download)
    data/<dataset>/tokenizer/                    vocab.json, merges.txt, tokenizer_config.json (tslm bpe)
    data/<dataset>/train.npy, valid.npy          token ids (tslm encode), each with a .json sidecar
    runs/<name>/                                 one training run (tslm train); runs/latest -> newest

>>> tokens_path("tinystories", "valid").as_posix()
'data/tinystories/valid.npy'
>>> sidecar_path(tokens_path("tinystories", "valid")).as_posix()
'data/tinystories/valid.json'
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_ROOT = Path(os.environ.get("TSLM_DATA", "data"))
RUNS_ROOT = Path(os.environ.get("TSLM_RUNS", "runs"))
# data/gpt2-tokenizer/: GPT-2's vocab.json + merges.txt (`tslm download gpt2-tokenizer`)
GPT2_TOKENIZER = "gpt2-tokenizer"
DEFAULT_DATASET = "tinystories"
SPLITS = ("train", "valid")


def dataset_dir(dataset: str, root: Path | None = None) -> Path:
    return (root or DATA_ROOT) / dataset


def text_path(dataset: str, split: str, root: Path | None = None) -> Path:
    return dataset_dir(dataset, root) / f"{split}.txt"


def tokenizer_dir(dataset: str, root: Path | None = None) -> Path:
    return dataset_dir(dataset, root) / "tokenizer"


def tokens_path(dataset: str, split: str, root: Path | None = None) -> Path:
    return dataset_dir(dataset, root) / f"{split}.npy"


def sidecar_path(tokens_file: str | os.PathLike) -> Path:
    """The JSON metadata written beside a token file."""
    return Path(tokens_file).with_suffix(".json")


def dataset_of(path: str | os.PathLike) -> str | None:
    """The dataset name when `path` lies directly under `data/<dataset>/`, else None.

    >>> dataset_of("data/tinystories/train.txt"), dataset_of("notes.txt")
    ('tinystories', None)
    """
    p = Path(path)
    if p.parent.parent.name == DATA_ROOT.name and p.parent.name:
        return p.parent.name
    return None
