"""Corpus statistics: documents, bytes, characters, words, (with a tokenizer) tokens and the
compression ratio, and the distribution of document lengths.

The file is streamed in 1 MiB blocks and split on a separator (`<|endoftext|>` by default, as in
TinyStories), so memory stays flat however big the file is: only the current document and one
int per document (its lengths, for the histogram) are kept. A document longer than
`MAX_PIECE_BYTES` (a file with no separator at all, say) is handed on in pieces cut before a
space or after a newline (`_cut_point`); its byte, character and word counts stay exact, its
token count may rarely differ by a token per cut (only for runs of whitespace at the cut).

>>> import io
>>> s = corpus_stats(io.BytesIO(b"Once upon a time.\\n<|endoftext|>\\nThe end.\\n<|endoftext|>\\n"))
>>> s.documents, s.characters, s.separators, s.doc_chars
(2, 29, 2, [18, 10])
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

from tinystories_cli.errors import UserError

DEFAULT_SEPARATOR = "<|endoftext|>"
BLOCK_BYTES = 1 << 20
MAX_PIECE_BYTES = 8 << 20
UNITS = ("tokens", "words", "chars", "bytes")


class Encoder(Protocol):
    def encode(self, text: str) -> list[int]: ...


@dataclass
class CorpusStats:
    """Totals over the whole file and per-document lengths (documents = non-blank pieces between separators)."""

    file_bytes: int = 0
    documents: int = 0
    separators: int = 0
    blank: int = 0  # whitespace-only pieces between separators (not counted as documents)
    bytes: int = 0  # UTF-8 bytes of the documents (separators excluded)
    characters: int = 0
    words: int = 0
    tokens: int | None = None  # tokens of the whole file, separators included (what `tslm encode` would produce)
    doc_bytes: list[int] = field(default_factory=list)
    doc_chars: list[int] = field(default_factory=list)
    doc_words: list[int] = field(default_factory=list)
    doc_tokens: list[int] | None = None

    @property
    def bytes_per_token(self) -> float | None:
        """Compression ratio over the whole file (separators included on both sides)."""
        return self.file_bytes / self.tokens if self.tokens else None

    def lengths(self, unit: str) -> list[int]:
        if unit == "tokens":
            if self.doc_tokens is None:
                raise UserError("document lengths in tokens need a tokenizer", "pass `tokenizer` DIR, or `unit` chars")
            return self.doc_tokens
        return {"words": self.doc_words, "chars": self.doc_chars, "bytes": self.doc_bytes}[unit]

    def summary(self) -> dict:
        """Plain-JSON view (per-document lengths summarized, not listed)."""
        out = {
            "file_bytes": self.file_bytes, "documents": self.documents, "separators": self.separators,
            "blank_pieces": self.blank, "bytes": self.bytes, "characters": self.characters, "words": self.words,
        }
        if self.tokens is not None:
            out["tokens"] = self.tokens
            out["bytes_per_token"] = self.bytes_per_token
            out["chars_per_token"] = self.characters / self.tokens if self.tokens else None
        for unit in UNITS:
            if unit == "tokens" and self.doc_tokens is None:
                continue
            out[f"doc_{unit}"] = describe(self.lengths(unit))
        return out


def iter_documents(f: BinaryIO, separator: bytes, block: int = BLOCK_BYTES,
                   max_piece: int = MAX_PIECE_BYTES) -> Iterator[tuple[bytes, bool, bool]]:
    """Yield (piece, ends_document, ended_by_separator) in file order.

    Usually a piece is a whole document. A document longer than `max_piece` comes as several
    pieces (cut by `_cut_point`), and only the last has `ends_document` set.

    >>> import io
    >>> list(iter_documents(io.BytesIO(b"ab|c"), b"|"))
    [(b'ab', True, True), (b'c', True, False)]
    """
    if not separator:
        raise ValueError("empty separator")
    buf = b""
    while True:
        chunk = f.read(block)
        buf += chunk
        start = 0
        while (at := buf.find(separator, start)) != -1:
            yield buf[start:at], True, True
            start = at + len(separator)
        buf = buf[start:]
        # Keep a tail that might be the start of a separator split across blocks; cut long documents.
        while len(buf) > max_piece:
            cut = _cut_point(buf, max_piece - len(separator))
            yield buf[:cut], False, False
            buf = buf[cut:]
        if not chunk:
            break
    if buf:
        yield buf, True, False


def _cut_point(buf: bytes, limit: int) -> int:
    """An offset in (0, limit] to cut `buf` at, chosen so counts stay exact where possible.

    Best is just before a space that follows a non-space: the GPT-2 pattern attaches a space to the
    word after it, so "... all| no" pre-tokenizes exactly as the uncut text. Next best is just after
    a newline, then any UTF-8 character boundary (never inside a character).
    """
    sp = buf.rfind(b" ", 1, limit)
    while sp > 0 and buf[sp - 1:sp].isspace():
        sp = buf.rfind(b" ", 1, sp)
    if sp > 0:
        return sp
    nl = buf.rfind(b"\n", 0, limit)
    if nl > 0:
        return nl + 1
    cut = max(1, limit)
    while cut > 1 and (buf[cut] & 0xC0) == 0x80:
        cut -= 1
    return cut


def corpus_stats(f: BinaryIO, separator: str = DEFAULT_SEPARATOR, tokenizer: Encoder | None = None,
                 progress: Callable[[int], None] | None = None, block: int = BLOCK_BYTES,
                 max_piece: int = MAX_PIECE_BYTES) -> CorpusStats:
    """Stream `f` (binary) once and count; see the module docstring. `progress(n)` gets bytes read so far."""
    sep = separator.encode("utf-8")
    s = CorpusStats()
    if tokenizer is not None:
        s.tokens, s.doc_tokens = 0, []
        # A separator the tokenizer knows as special is one token; otherwise whatever it encodes to.
        sep_tokens = len(tokenizer.encode(separator))
    nbytes = nchars = nwords = ntokens = 0  # of the current document
    done = 0
    for piece, ends, by_sep in iter_documents(f, sep, block, max_piece):
        text = piece.decode("utf-8", errors="replace")
        nbytes += len(piece)
        nchars += len(text)
        nwords += len(text.split())
        if tokenizer is not None:
            ntokens += len(tokenizer.encode(text)) if text else 0
        done += len(piece) + (len(sep) if by_sep else 0)
        if by_sep:
            s.separators += 1
            if tokenizer is not None:
                s.tokens += sep_tokens
        if not ends:
            continue
        s.bytes += nbytes
        s.characters += nchars
        s.words += nwords
        if tokenizer is not None:
            s.tokens += ntokens
        if nwords:  # a blank piece (e.g. the newline after the last separator) is not a document
            s.documents += 1
            s.doc_bytes.append(nbytes)
            s.doc_chars.append(nchars)
            s.doc_words.append(nwords)
            if s.doc_tokens is not None:
                s.doc_tokens.append(ntokens)
        else:
            s.blank += 1
        nbytes = nchars = nwords = ntokens = 0
        if progress is not None:
            progress(done)
    s.file_bytes = done
    return s


def file_stats(path: str | os.PathLike, separator: str = DEFAULT_SEPARATOR, tokenizer: Encoder | None = None,
               progress: Callable[[int], None] | None = None) -> CorpusStats:
    with open(path, "rb") as f:
        return corpus_stats(f, separator, tokenizer, progress)


def parse_separator(text: str) -> str:
    r"""Turn the escapes a shell makes awkward into characters: '\n' -> newline, '\t' -> tab.

    >>> parse_separator(r"\n\n"), parse_separator("<|endoftext|>")
    ('\n\n', '<|endoftext|>')
    """
    out = text.replace("\\n", "\n").replace("\\t", "\t").replace("\\r", "\r")
    if not out:
        raise UserError("`separator` must not be empty", "e.g. `separator` '<|endoftext|>' or `separator` '\\n'")
    return out


def describe(values: list[int]) -> dict:
    """Count, mean, min, percentiles and max of a list of lengths (None fields when empty).

    >>> describe([1, 2, 3, 4])["p50"], describe([])["mean"]
    (2, None)
    """
    if not values:
        return {"count": 0, "mean": None, "min": None, "p10": None, "p50": None, "p90": None, "p99": None, "max": None}
    v = sorted(values)
    out = {"count": len(v), "mean": sum(v) / len(v), "min": v[0]}
    for p in (10, 50, 90, 99):
        out[f"p{p}"] = percentile(v, p)
    out["max"] = v[-1]
    return out


def percentile(sorted_values: list[int], p: float) -> int:
    """Nearest-rank percentile of an already sorted list."""
    k = max(0, math.ceil(p / 100 * len(sorted_values)) - 1)
    return sorted_values[k]


# ---------------------------------------------------------------- histogram


def histogram(values: list[int], bins: int = 20, clip_percentile: float = 99.0) -> tuple[list[int], list[int], int]:
    """(edges, counts, overflow): at most `bins` integer-width bins from the shortest document to the
    `clip_percentile`-th length; bin i holds lengths in [edges[i], edges[i+1]).

    Lengths have long tails; clipping keeps the body readable, and the clipped documents are
    counted in `overflow` (drawn as one last '>' bar) instead of stretching the axis.

    >>> histogram([3, 4, 5, 6, 7, 8, 100], bins=3, clip_percentile=80)
    ([3, 5, 7, 9], [2, 2, 2], 1)
    """
    if not values:
        return [0, 1], [0], 0
    lo = min(values)
    hi = percentile(sorted(values), clip_percentile) if clip_percentile < 100 else max(values)
    width = max(1, math.ceil((hi - lo + 1) / bins))
    n = math.ceil((hi - lo + 1) / width)
    counts = [0] * n
    overflow = 0
    end = lo + n * width  # the last bin may reach past `hi`: fill it rather than call those overflow
    for v in values:
        if v >= end:
            overflow += 1
        else:
            counts[(v - lo) // width] += 1
    return [lo + i * width for i in range(n + 1)], counts, overflow


def render_histogram_ascii(values: list[int], unit: str, bins: int = 20, width: int = 50) -> str:
    """Horizontal bars, one line per bin (inclusive length ranges).

    >>> print(render_histogram_ascii([1, 2, 2, 3, 10], "words", bins=2, width=10))
    document length (words), 5 documents
       1-5  ########## 4
      6-10  ## 1
    """
    edges, counts, overflow = histogram(values, bins)
    rows = [(f"{edges[i]}-{edges[i + 1] - 1}" if edges[i + 1] - 1 > edges[i] else f"{edges[i]}", c)
            for i, c in enumerate(counts)]
    if overflow:
        rows.append((f">{edges[-1] - 1}", overflow))
    top = max(c for _, c in rows) or 1
    lw = max(len(label) for label, _ in rows)
    lines = [f"document length ({unit}), {len(values):,} documents"]
    for label, c in rows:
        bar = "#" * max(1 if c else 0, round(c / top * width))
        lines.append(f"  {label:>{lw}}  {bar} {c:,}")
    return "\n".join(lines)


def render_histogram_png(values: list[int], unit: str, title: str | None = None, bins: int = 50) -> bytes:
    """The histogram as PNG bytes (matplotlib, optional extra)."""
    from tinystories_cli.plot import figure_png, pyplot

    plt = pyplot()
    edges, counts, overflow = histogram(values, bins)
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    try:
        ax.bar(edges[:-1], counts, width=edges[1] - edges[0], align="edge", edgecolor="white", linewidth=0.3)
        ax.set_xlabel(f"document length ({unit})")
        ax.set_ylabel("documents")
        note = f"; {overflow:,} longer than {edges[-1] - 1:,} not shown" if overflow else ""
        ax.set_title(title or f"Document lengths ({len(values):,} documents{note})", fontsize="medium")
        if values:
            d = describe(values)
            ax.axvline(d["p50"], color="black", linestyle="--", linewidth=1, label=f"median {d['p50']:,}")
            ax.axvline(d["mean"], color="tab:red", linestyle=":", linewidth=1, label=f"mean {d['mean']:,.1f}")
            ax.legend(loc="best", fontsize="small")
        ax.grid(True, axis="y", alpha=0.3)
        return figure_png(fig)
    finally:
        plt.close(fig)


def load_tokenizer(directory: str | os.PathLike) -> Encoder:
    """The project's tokenizer from a directory written by `tslm bpe` (or a run's tokenizer/)."""
    from tinystories_cli.runs import (
        load_tokenizer as load,  # here: runs brings torch, which `tslm stats` needs only now
    )

    return load(Path(directory))
