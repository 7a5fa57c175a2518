"""Token files: a standard `.npy` of ids plus a `<name>.json` sidecar, as `tslm encode` writes them and
training and evaluation read them.

    {"format_version": 1, "dtype": "uint16", "num_tokens": 1257839, "max_id": 4095, "vocab_size": 4096,
     "fingerprint": "...", "source_bytes": 5150533, ...}

Everything read from a sidecar is validated (`TokenSidecar`) and checked against the `.npy` header
before the ids are memory-mapped; the ids themselves are scanned for out-of-range values before
training uses them (`check_tokens`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from tinystories_cli import paths
from tinystories_cli.errors import UserError
from tinystories_cli.fileio import read_json
from tinystories_cli.paths import sidecar_path

FORMAT_VERSION = 1


class TokenSidecar(BaseModel):
    """The fields of a token file's sidecar that reading it relies on (others are informative)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    format_version: Literal[1]
    dtype: Literal["uint16", "uint32"]
    num_tokens: StrictInt = Field(ge=0, lt=2**48)
    max_id: StrictInt = Field(ge=0, lt=2**32)
    vocab_size: StrictInt = Field(gt=0, le=2**32)
    fingerprint: StrictStr = Field(min_length=1, max_length=256)
    source_bytes: StrictInt | None = Field(None, gt=0, lt=2**63)


def _text_guess(path: Path) -> str:
    """The text file a token file was probably made from (for fix hints)."""
    return str(path.with_suffix(".txt"))


def load_token_file(path: str | os.PathLike) -> tuple[np.ndarray, dict]:
    """Memory-map a token file and read its sidecar, checking that the two agree.

    Returns (ids, sidecar) where `ids` is a read-only 1-D memmap. Ids are not scanned here; the
    sidecar's `max_id` (checked by `check_token_file`) covers them.
    """
    path = Path(path)
    fix = f"re-create it with `tslm encode` (e.g. `tslm encode {_text_guess(path)} out={path} force=True`)"
    if not path.is_file():
        raise UserError(f"token file not found: {path}",
                        f"create it with `tslm encode` (e.g. `tslm encode {_text_guess(path)}`)")
    side = sidecar_path(path)
    if not side.is_file():
        raise UserError(f"token file {path} has no sidecar {side}", fix)
    meta = read_json(side, "token sidecar", fix)
    if not isinstance(meta, dict):
        raise UserError(f"malformed token sidecar {side}: expected a JSON object", fix)
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(f"token sidecar {side} has format version {meta.get('format_version')!r}, "
                        f"expected {FORMAT_VERSION}", fix)
    try:
        TokenSidecar.model_validate(meta)
    except ValidationError as e:
        err = e.errors()[0]
        raise UserError(f"malformed token sidecar {side}: {'.'.join(map(str, err['loc']))}: {err['msg']}",
                        fix) from None
    try:
        ids = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise UserError(f"malformed token file {path}: {e}", fix) from None
    if not isinstance(ids, np.ndarray):  # an .npz archive (or anything np.load opens as several arrays)
        getattr(ids, "close", lambda: None)()
        raise UserError(f"token file {path} is not a single .npy array (an .npz archive renamed?)", fix)
    if ids.ndim != 1 or ids.dtype != np.dtype(meta["dtype"]) or len(ids) != meta["num_tokens"]:
        raise UserError(
            f"token file {path} ({ids.dtype}, shape {ids.shape}) does not match its sidecar "
            f"({meta['dtype']}, {meta['num_tokens']} tokens)", fix)
    if meta["num_tokens"] and not 0 <= meta["max_id"] < meta["vocab_size"]:
        raise UserError(f"malformed token sidecar {side}: "
                        f"max_id {meta['max_id']} outside the vocab of {meta['vocab_size']}", fix)
    return ids, meta


def check_token_file(path: str | os.PathLike, tokenizer_fingerprint: str | None, vocab_size: int,
                     tokenizer_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, dict]:
    """`load_token_file`, then refuse a file from another tokenizer or with ids >= `vocab_size`.

    Pass `tokenizer_fingerprint=None` to skip the tokenizer check (e.g. a run without a tokenizer).
    `tokenizer_dir` (where the expected tokenizer is) makes the fix hint a command that runs as printed.
    """
    ids, meta = load_token_file(path)
    if tokenizer_fingerprint is not None and meta["fingerprint"] != tokenizer_fingerprint:
        raise UserError(
            f"token file {path} was made by a different tokenizer (fingerprint {meta['fingerprint'][:12]} "
            f"!= {tokenizer_fingerprint[:12]})",
            reencode_hint(Path(path), tokenizer_dir),
        )
    if meta["num_tokens"] and meta["max_id"] >= vocab_size:
        raise UserError(
            f"token file {path} holds id {meta['max_id']}, but the model's vocab has only {vocab_size} ids",
            f"use `vocab_size` {meta['vocab_size']} (the tokenizer's), or re-encode with a smaller tokenizer",
        )
    return ids, meta


def reencode_hint(path: Path, tokenizer_dir: str | os.PathLike | None) -> str:
    """How to get `path`'s text encoded by another tokenizer: into a NEW file beside it (the existing token
    file may be the user's and stays as it is).

    >>> reencode_hint(Path("data/ts/valid.npy"), Path("runs/gpt2/tokenizer"))
    'encode the text with the right tokenizer into a new file and pass that one: `tslm encode data/ts/valid.txt tokenizer=runs/gpt2/tokenizer out=data/ts/valid.gpt2.npy`'
    """  # noqa: E501 (a doctest's expected one-line output)
    if tokenizer_dir is None:
        return f"encode {_text_guess(path)} with the model's tokenizer (tslm encode `tokenizer`) into a new file"
    tag = Path(tokenizer_dir).parent.name or "other"
    new = path.with_name(f"{path.stem}.{tag}.npy")
    return (f"encode the text with the right tokenizer into a new file and pass that one: "
            f"`tslm encode {_text_guess(path)} tokenizer={tokenizer_dir} out={new}`")


def open_tokens(path: Path, what: str, dataset: str, split: str) -> tuple[np.ndarray, dict]:
    """Memmap a token file and its sidecar; a missing file names the `tslm encode` command that makes it."""
    if not Path(path).is_file():
        raise UserError(f"{what} token file not found: {path}",
                        f"make it with `tslm encode {paths.text_path(dataset, split)}` "
                        f"(after `tslm bpe {paths.text_path(dataset, 'train')}`), or pass its path")
    return load_token_file(path)


def check_tokens(path: Path, tokenizer_fingerprint: str | None, vocab_size: int, chunk: int = 1 << 24,
                 tokenizer_dir: str | os.PathLike | None = None) -> None:
    """Token file made by this tokenizer and every id < vocab_size. The sidecar's max_id is checked
    first (cheap); then the ids themselves are scanned in chunks, since a damaged or hand-made file
    could disagree with its sidecar and an out-of-range id would crash the embedding lookup."""
    ids, _ = check_token_file(path, tokenizer_fingerprint, vocab_size, tokenizer_dir)
    for i in range(0, len(ids), chunk):
        top = int(ids[i:i + chunk].max())
        if top >= vocab_size:
            raise UserError(f"token file {path} holds id {top} (at or after position {i}), but the model's vocab "
                            f"has only {vocab_size} ids; its sidecar says otherwise, so the file is damaged",
                            f"re-create it with `tslm encode {Path(path).with_suffix('.txt')} out={path} force=True`")
