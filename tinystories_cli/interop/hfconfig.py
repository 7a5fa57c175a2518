"""Reading a Hugging Face `config.json`: typed, bounded values and one-line refusals.

Every value is checked before anything is allocated from it: integers are integers inside a plausible
range, floats are finite and positive, and a setting this project cannot compute is refused by name.

    >>> hf = {"hidden_size": 64, "rms_norm_eps": 1e-6}
    >>> hf_int(hf, "hidden_size"), hf_float(hf, "rms_norm_eps")
    (64, 1e-06)
    >>> hf_int({"hidden_size": 64.5}, "hidden_size")
    Traceback (most recent call last):
    tinystories_cli.interop.hfconfig.Unsupported: config.json: hidden_size must be an integer, got 64.5
"""

from __future__ import annotations

import math
from typing import Any

from tinystories_cli.errors import UserError

# Far above any model this project can train, far below sizes that would exhaust memory by themselves.
MAX_DIM = 1 << 20
MAX_VOCAB = 1 << 22
MAX_LAYERS = 4096
MAX_CONTEXT = 1 << 22
_MISSING = object()


class Unsupported(UserError):
    """A Hugging Face model or tokenizer that this project cannot import (the message names why)."""


def hf_int(hf: dict, key: str, default: Any = _MISSING, lo: int = 1, hi: int = MAX_DIM) -> int:
    value = hf.get(key, default)
    if value is _MISSING or value is None:
        if default is _MISSING:
            raise Unsupported(f"config.json: {key} is missing",
                              "the directory must hold a complete Hugging Face config")
        value = default
    if isinstance(value, bool) or not isinstance(value, int):
        raise Unsupported(f"config.json: {key} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise Unsupported(f"config.json: {key} = {value} is outside {lo}..{hi}")
    return value


def hf_float(hf: dict, key: str, default: Any = _MISSING) -> float:
    value = hf.get(key, default)
    if value is _MISSING or value is None:
        if default is _MISSING:
            raise Unsupported(f"config.json: {key} is missing",
                              "the directory must hold a complete Hugging Face config")
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise Unsupported(f"config.json: {key} must be a positive number, got {value!r}")
    return float(value)


def hf_bool(hf: dict, key: str, default: bool) -> bool:
    value = hf.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise Unsupported(f"config.json: {key} must be true or false, got {value!r}")
    return value


def check_architecture(hf: dict, model_type: str, architecture: str) -> None:
    """Refuse another model type or head by name."""
    got = hf.get("model_type")
    if got != model_type:
        raise Unsupported(f"model_type {got!r} is not supported here (expected {model_type!r})")
    archs = hf.get("architectures")
    if archs is not None and (not isinstance(archs, list) or architecture not in archs):
        raise Unsupported(f"architectures {archs!r} are not supported (tslm imports {architecture})")


def refuse_if(condition: bool, what: str) -> None:
    """Refuse a feature by name: `what` says which setting and value."""
    if condition:
        raise Unsupported(f"{what} is not supported by tslm's model",
                          "tslm imports plain LlamaForCausalLM and GPT2LMHeadModel models")
