"""Token files (`.npy` of ids + a `.json` sidecar) as training and evaluation read them.

`tslm encode` writes them (see `tokenizer/encode.py`); this module opens them for reading and checks
that they fit a model: made by the expected tokenizer, every id inside the vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tinystories_cli import paths
from tinystories_cli.errors import UserError
from tinystories_cli.tokenizer.encode import check_token_file, load_token_file


def open_tokens(path: Path, what: str, dataset: str, split: str) -> tuple[np.ndarray, dict]:
    """Memmap a token file and its sidecar; a missing file names the `tslm encode` command that makes it."""
    if not Path(path).is_file():
        raise UserError(f"{what} token file not found: {path}",
                        f"make it with `tslm encode {paths.text_path(dataset, split)}` "
                        f"(after `tslm bpe {paths.text_path(dataset, 'train')}`), or pass its path")
    return load_token_file(path)


def check_tokens(path: Path, tokenizer_fingerprint: str | None, vocab_size: int, chunk: int = 1 << 24) -> None:
    """Token file made by this tokenizer and every id < vocab_size. The sidecar's max_id is checked
    first (cheap); then the ids themselves are scanned in chunks, since a damaged or hand-made file
    could disagree with its sidecar and an out-of-range id would crash the embedding lookup."""
    ids, _ = check_token_file(path, tokenizer_fingerprint, vocab_size)
    for i in range(0, len(ids), chunk):
        top = int(ids[i:i + chunk].max())
        if top >= vocab_size:
            raise UserError(f"token file {path} holds id {top} (at or after position {i}), but the model's vocab "
                            f"has only {vocab_size} ids; its sidecar says otherwise, so the file is damaged",
                            f"re-create it with `tslm encode {Path(path).with_suffix('.txt')} --out {path} --force`")
