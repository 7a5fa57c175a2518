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

from collections.abc import Iterator, Sequence

import regex

from tinystories_cli.tokenizer.chunking import find_chunk_boundaries  # noqa: F401  (re-exported: its old home)

GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_PATTERN = regex.compile(GPT2_SPLIT_PATTERN)


def special_pattern(special_tokens: Sequence[str]) -> regex.Pattern[str] | None:
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
