"""The GPT-2 tokenizer file format: `vocab.json` and `merges.txt`, read and written.

GPT-2 stores byte strings as printable unicode: each of the 256 bytes maps to one character
(printable bytes map to themselves, the rest to U+0100 onwards). `vocab.json` maps that string to
an id; `merges.txt` holds one merge per line as two such strings separated by a space, in rank
order, after an optional `#version` header.

>>> BYTE_TO_UNICODE[ord(" ")], BYTE_TO_UNICODE[ord("a")]
('Ġ', 'a')
>>> decode_token_string("Ġthe")
b' the'
"""

from __future__ import annotations

import json
from pathlib import Path

from tinystories_cli.errors import UserError
from tinystories_cli.fileio import atomic_write_text, read_json

FORMAT_VERSION = 1
MAX_ID = 2**24  # the largest vocabulary a model may have (config.ModelConfig.vocab_size)


def _bytes_to_unicode() -> dict[int, str]:
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    mapping = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + n)
            n += 1
    return mapping


BYTE_TO_UNICODE: dict[int, str] = _bytes_to_unicode()
UNICODE_TO_BYTE: dict[str, int] = {c: b for b, c in BYTE_TO_UNICODE.items()}


def encode_token_bytes(token: bytes) -> str:
    return "".join(BYTE_TO_UNICODE[b] for b in token)


def decode_token_string(s: str) -> bytes:
    try:
        return bytes(UNICODE_TO_BYTE[c] for c in s)
    except KeyError as e:
        raise ValueError(f"character {e.args[0]!r} is not in the GPT-2 byte alphabet") from None


def write_vocab_merges(out_dir: str | Path, vocab: dict[int, bytes], merges: list[tuple[bytes, bytes]]) -> None:
    """Write `vocab.json` and `merges.txt` into `out_dir` atomically (each file temp + rename).

    Special tokens are stored as their UTF-8 text mapped through the byte alphabet, like every
    other token, so the files round-trip byte-exactly.
    """
    out_dir = Path(out_dir)
    vocab_json = {encode_token_bytes(tok): i for i, tok in sorted(vocab.items())}
    lines = ["#version: 0.2"] + [f"{encode_token_bytes(a)} {encode_token_bytes(b)}" for a, b in merges]
    atomic_write_text(out_dir / "vocab.json", json.dumps(vocab_json, ensure_ascii=False, indent=0) + "\n")
    atomic_write_text(out_dir / "merges.txt", "\n".join(lines) + "\n")


def read_vocab_merges(vocab_path: str | Path,
                      merges_path: str | Path) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    """Read GPT-2 format files; every problem is a `UserError` naming the file and the line."""
    vocab_path, merges_path = Path(vocab_path), Path(merges_path)
    for p in (vocab_path, merges_path):
        if not p.is_file():
            raise UserError(f"tokenizer file not found: {p}",
                            "run `tslm bpe` to train a tokenizer, or pass `tokenizer` DIR")
    raw = read_json(vocab_path, "vocab file", "re-create it with `tslm bpe`")
    if not isinstance(raw, dict):
        raise UserError(f"malformed vocab file {vocab_path}: expected a JSON object of token -> id")
    vocab: dict[int, bytes] = {}
    for s, i in raw.items():
        if not isinstance(i, int) or isinstance(i, bool) or i < 0:
            raise UserError(f"malformed vocab file {vocab_path}: id of {s!r} is not a non-negative integer")
        if i in vocab:
            raise UserError(f"malformed vocab file {vocab_path}: id {i} appears twice")
        try:
            vocab[i] = decode_token_string(s)
        except ValueError as e:
            raise UserError(f"malformed vocab file {vocab_path}: token {s!r}: {e}") from None
    if vocab and max(vocab) >= MAX_ID:
        raise UserError(f"malformed vocab file {vocab_path}: id {max(vocab)} exceeds the largest id tslm supports "
                        f"({MAX_ID - 1})")
    if vocab and max(vocab) >= len(vocab) + 1_000_000:
        raise UserError(f"malformed vocab file {vocab_path}: ids are implausibly sparse (max id {max(vocab)})")
    known = set(vocab.values())
    merges: list[tuple[bytes, bytes]] = []
    try:
        lines = merges_path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise UserError(f"malformed merges file {merges_path}: {e}") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip() or (lineno == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise UserError(f"malformed merges file {merges_path} line {lineno}: "
                            "expected two tokens separated by one space")
        try:
            a, b = decode_token_string(parts[0]), decode_token_string(parts[1])
        except ValueError as e:
            raise UserError(f"malformed merges file {merges_path} line {lineno}: {e}") from None
        if a not in known or b not in known or a + b not in known:
            raise UserError(
                f"inconsistent tokenizer: merge on line {lineno} of {merges_path} ({parts[0]} {parts[1]}) "
                f"uses a token that is not in {vocab_path.name}",
                "use a vocab.json and merges.txt written together",
            )
        merges.append((a, b))
    return vocab, merges
