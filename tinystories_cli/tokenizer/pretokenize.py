"""Pre-tokenization shared by the BPE trainer and the tokenizer.

Text is first split on special tokens (longest match first, so `<|endoftext|><|endoftext|>` wins
over `<|endoftext|>`), then each plain segment is split with the GPT-2 pattern. Merges never cross
the pieces produced here.

>>> [m.group() for m in GPT2_PATTERN.finditer("Hello, world! It's 2026.")]
['Hello', ',', ' world', '!', ' It', "'s", ' 2026', '.']
>>> list(split_special("a<|endoftext|>b", ["<|endoftext|>"]))
[('a', False), ('<|endoftext|>', True), ('b', False)]
"""

from __future__ import annotations

import os
from typing import BinaryIO, Iterator, Sequence

import regex

GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_PATTERN = regex.compile(GPT2_SPLIT_PATTERN)


def special_pattern(special_tokens: Sequence[str]) -> "regex.Pattern[str] | None":
    """A regex matching any special token, longest first (so overlapping tokens resolve to the longest)."""
    if not special_tokens:
        return None
    ordered = sorted(set(special_tokens), key=len, reverse=True)
    return regex.compile("|".join(regex.escape(t) for t in ordered))


def split_special(text: str, special_tokens: Sequence[str]) -> Iterator[tuple[str, bool]]:
    """Yield (piece, is_special) in order; empty plain pieces are skipped."""
    pattern = special_pattern(special_tokens)
    if pattern is None:
        if text:
            yield text, False
        return
    pos = 0
    for m in pattern.finditer(text):
        if m.start() > pos:
            yield text[pos:m.start()], False
        yield m.group(), True
        pos = m.end()
    if pos < len(text):
        yield text[pos:], False


def iter_pretokens(text: str) -> Iterator[str]:
    """GPT-2 pre-tokens of a text that holds no special tokens."""
    for m in GPT2_PATTERN.finditer(text):
        yield m.group()


def find_chunk_boundaries(f: BinaryIO, num_chunks: int, split_token: bytes | None, probe: int = 1 << 16) -> list[int]:
    """Byte offsets [0, ..., size] cutting a file into at most `num_chunks` pieces.

    Each inner boundary is moved forward to the start of the next `split_token` (or, without one,
    to just after the next newline), so no pre-token or special token is ever cut in two. Duplicate
    boundaries (small files) are dropped, so there may be fewer chunks than asked for.
    """
    f.seek(0, os.SEEK_END)
    size = f.tell()
    if size == 0:
        return [0]
    num_chunks = max(1, num_chunks)
    guesses = [size * i // num_chunks for i in range(num_chunks + 1)]
    needle = split_token if split_token else b"\n"
    for i in range(1, len(guesses) - 1):
        pos = guesses[i]
        f.seek(pos)
        carry = b""
        while True:
            block = f.read(probe)
            if not block:
                guesses[i] = size
                break
            buf = carry + block
            at = buf.find(needle)
            if at != -1:
                start = pos - len(carry) + at
                guesses[i] = start if split_token else start + 1
                break
            carry = buf[-(len(needle) - 1):] if len(needle) > 1 else b""
            pos += len(block)
    return sorted(set(guesses))
