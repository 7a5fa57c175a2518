"""Byte-level BPE: `train_bpe` (the trainer) and `Tokenizer` (encode/decode), GPT-2 compatible."""

from __future__ import annotations

import importlib

__all__ = ["train_bpe", "Tokenizer"]

_LAZY = {"train_bpe": "tinystories_cli.tokenizer.bpe", "Tokenizer": "tinystories_cli.tokenizer.tokenizer"}


def __getattr__(name: str):
    # Lazy so that importing one half (e.g. the trainer in a worker process) does not import the other.
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)
