"""Byte-level BPE training: exact, parallel pre-tokenization and an incremental merge loop.

The algorithm (Sennrich et al. 2016, byte-level as in GPT-2):

1. Split the text on the special tokens (they are never counted or merged), then split each
   piece with the GPT-2 pattern into pre-tokens and count them: `{b" the": 51234, ...}`.
2. Start from 256 single-byte tokens. Repeatedly merge the most frequent adjacent pair inside
   the pre-tokens (each pre-token weighted by its count); ties go to the lexicographically
   greater pair of byte strings, i.e. `max` over `(bytes, bytes)` tuples.
3. The vocabulary is the special tokens (ids 0..k-1), the 256 bytes, then one id per merge.

Worked example (whitespace pre-tokenization, Sennrich et al.):

>>> words = {b"low": 5, b"lower": 2, b"widest": 3, b"newest": 6}
>>> [a.decode() + " " + b.decode() for a, b in bpe_merges(words, 6)]
['s t', 'e st', 'o w', 'l ow', 'w est', 'n e']

Pre-tokenization, which dominates the run time, is spread over worker processes, each streaming
its own byte range of the file in blocks. Every cut (between chunks, and between the blocks a
worker decodes) is placed where it provably cannot change the result (see `chunking.Cutter`), so the
counts equal those of tokenizing the whole file at once.

Each chunk's counts travel back as three flat arrays and are folded into one total as soon as
the chunk is done, so the parent never holds every worker's counts at once.

The merge loop works on flat numpy arrays of the distinct pre-tokens (memory proportional to
their bytes, not to the corpus): each merge finds its occurrences through a per-token slot index,
rewrites them and counts the pairs it destroys and creates with whole-array operations, and finds
the best pair with a heap with lazy invalidation, producing exactly the naive algorithm's merges.
"""

from __future__ import annotations

import ctypes
import errno
import heapq
import itertools
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import regex

from tinystories_cli.errors import UserError
from tinystories_cli.fileio import atomic_write_text, fsync_dir, remove_stale_temps, sha256_file, temp_prefix
from tinystories_cli.tokenizer.chunking import Cutter, WorkerPool, chunk_boundaries, mp_context
from tinystories_cli.tokenizer.files import FORMAT_VERSION, write_vocab_merges
from tinystories_cli.tokenizer.pretokenize import GPT2_PATTERN, GPT2_SPLIT_PATTERN, special_pattern

# progress(phase, done, total): phase "pretokenize" counts bytes, phase "merge" counts merges.
ProgressFn = Callable[[str, int, int], None]

BLOCK_SIZE = 1 << 20  # bytes a worker decodes and splits at once (bounds its memory)
CHUNK_BYTES = 256 << 20  # most bytes one pre-token counting task reads
ERRORS = ("strict", "replace")


# ----------------------------------------------------------------------------------------------
# argument checks (shared with the CLI, so both report the same one-line errors)


def check_special_tokens(special_tokens: Iterable[str]) -> list[str]:
    """Return the special tokens as a list; empty or duplicate tokens are a `UserError`."""
    if isinstance(special_tokens, (str, bytes)):
        raise UserError("special_tokens must be a list of strings, not a single string", f"pass [{special_tokens!r}]")
    tokens = list(special_tokens)
    seen: set[str] = set()
    for t in tokens:
        if not isinstance(t, str):
            raise UserError(f"special token {t!r} is not a string")
        if t == "":
            raise UserError("empty special token", "remove the empty `special_tokens`")
        if t in seen:
            raise UserError(f"duplicate special token {t!r}", "give each special token once")
        seen.add(t)
    return tokens


def check_vocab_size(vocab_size: int, num_special: int) -> int:
    """The number of merges to learn; `vocab_size` must hold the bytes and the special tokens."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise UserError(f"vocab size must be an integer, got {vocab_size!r}")
    floor = 256 + num_special
    if vocab_size < floor:
        raise UserError(
            f"vocab size {vocab_size} is smaller than 256 bytes + {num_special} special token(s) = {floor}",
            f"pass `vocab_size` {floor} or more",
        )
    return vocab_size - floor


MIN_AUTO_CHUNK = 1 << 20  # with workers=None, a file this small per core is not worth a process


def resolve_workers(workers: int | None, size: int) -> int:
    """`workers` as given (>= 1), or for None the available cores, at most one per MiB of input."""
    if workers is None:
        return max(1, min(default_workers(), size // MIN_AUTO_CHUNK))
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise UserError(f"workers must be a positive integer, got {workers!r}")
    return workers


def default_workers() -> int:
    """Cores this process may use (respects CPU affinity, e.g. taskset or a container cpuset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


# ----------------------------------------------------------------------------------------------
# pre-token counting (runs in worker processes)


@dataclass
class _ChunkResult:
    counts: dict[str, int]
    bad_offset: int | None = None  # first invalid UTF-8 byte (absolute offset), if any
    bad_reason: str = ""


_progress_counter = None  # a shared mp.Value in workers (bytes read so far)


def _init_worker(counter) -> None:
    global _progress_counter
    _progress_counter = counter


def _splitter(special_tokens: Sequence[str]) -> Callable[[str], list[str]]:
    """text -> the pieces between special tokens (the tokens themselves are dropped)."""
    if not special_tokens:
        return lambda text: [text]
    if len(special_tokens) == 1:
        token = special_tokens[0]
        return lambda text: text.split(token)  # str.split is much faster than a regex
    return special_pattern(special_tokens).split  # longest token first, as split_special does


# Unicode White_Space: what \s matches in the `regex` module (every such character is below U+3001).
_WS = "".join(c for c in map(chr, range(0x3001)) if regex.match(r"\s", c))
_WS_SET = frozenset(_WS)
_ASCII_WS = "".join(c for c in _WS if c.isascii())  # \t \n \v \f \r and space
_SENTINEL = "\ue000"  # a private-use character standing in for a space that must not split


class PretokenCounter:
    """Counts the GPT-2 pre-tokens of texts (each starting and ending at a safe cut).

    Slow path: split on the special tokens, then `findall` with the GPT-2 pattern. Fast path
    (about 2x faster on English): `text.split(" ")` and count the pieces in C, then run the
    pattern once per *distinct* piece, as " " + piece. That is exact because every space starts a
    new pre-token (" the", " 42", " !", or a whitespace run), except a space that follows
    whitespace and precedes whitespace, the end, or a special token: in "a\\n  b" the pattern
    yields "\\n " + " b", the first space continuing a run. Those few spaces are swapped for a
    sentinel before splitting and swapped back before matching. (After whitespace and before a
    non-space, a space does start a pre-token: the run ends just before it.) Special tokens that
    contain a space disable the fast path.

    >>> c = PretokenCounter(["<|endoftext|>"])
    >>> c.add("the cat\\n  the dog<|endoftext|> the")
    >>> sorted(c.result().items())
    [('\\n ', 1), (' cat', 1), (' dog', 1), (' the', 2), ('the', 1)]
    """

    def __init__(self, special_tokens: Sequence[str] = (), max_pieces: int = 1 << 19):
        self.specials = list(special_tokens)
        self.split = _splitter(self.specials)
        self.fast = not any(" " in t or _SENTINEL in t for t in self.specials)
        self.counts: Counter[str] = Counter()
        self.pieces: Counter[str] = Counter()  # space-separated pieces not yet pre-tokenized
        self.max_pieces = max_pieces  # bounds memory: flush into `counts` beyond this many

    def _pretokens(self, text: str) -> list[str]:
        out: list[str] = []
        for piece in self.split(text):
            out += GPT2_PATTERN.findall(piece)
        return out

    def _joining_spaces(self, text: str) -> list[int]:
        """Positions of spaces with whitespace before and whitespace/end/special token after."""
        found = []
        n = len(text)
        for w in _ASCII_WS if text.isascii() else _WS:
            if w not in text:  # one fast single-character scan rules most of them out
                continue
            needle = w + " "
            i = text.find(needle)
            while i != -1:
                q = i + 1  # the space
                if q + 1 == n or text[q + 1] in _WS_SET or any(text.startswith(t, q + 1) for t in self.specials):
                    found.append(q)
                i = text.find(needle, i + 1)
        return sorted(found)

    def add(self, text: str) -> None:
        if not self.fast or _SENTINEL in text:
            self.counts.update(self._pretokens(text))
            return
        joins = self._joining_spaces(text)
        if joins:
            parts, prev = [], 0
            for q in joins:
                parts += (text[prev:q], _SENTINEL)
                prev = q + 1
            parts.append(text[prev:])
            text = "".join(parts)
        pieces = text.split(" ")
        self.counts.update(self._pretokens(pieces[0].replace(_SENTINEL, " ")))
        self.pieces.update(itertools.islice(pieces, 1, None))
        if len(self.pieces) > self.max_pieces:
            self._flush()

    def _flush(self) -> None:
        # Pieces with the same count are pre-tokenized together: " " + " ".join(group) splits
        # into the same pre-tokens as the pieces one by one, as long as no piece is empty or ends
        # with whitespace (then every space starts a pre-token, see the class docstring).
        counts = self.counts
        groups: dict[int, list[str]] = defaultdict(list)
        for piece, n in self.pieces.items():
            if piece and piece[-1] not in _WS_SET and _SENTINEL not in piece:
                groups[n].append(piece)
            else:
                for tok in self._pretokens(" " + piece.replace(_SENTINEL, " ")):
                    counts[tok] += n
        for n, group in groups.items():
            found = Counter(self._pretokens(" " + " ".join(group)))
            if n == 1:
                counts.update(found)
            else:
                for tok, k in found.items():
                    counts[tok] += k * n
        self.pieces.clear()

    def result(self) -> dict[str, int]:
        self._flush()
        self.counts.pop("", None)
        return dict(self.counts)


def count_chunk(path: str, start: int, end: int, special_tokens: Sequence[str], errors: str = "strict",
                block_size: int = BLOCK_SIZE, report: Callable[[int], None] | None = None) -> _ChunkResult:
    """Count the pre-tokens of bytes [start, end) of a file; `start` and `end` must be safe cuts.

    Reads `block_size` bytes at a time and decodes only up to the last safe cut of the buffer,
    so memory is bounded by the block size (plus the distinct pre-tokens), not the chunk size.
    """
    cutter = Cutter(special_tokens)
    counter = PretokenCounter(special_tokens)
    with open(path, "rb") as f:
        f.seek(start)
        pos = start  # file offset just after the bytes read so far
        buf, buf_off, lo = b"", start, 0  # undecoded bytes, their file offset, cuts <= lo already ruled out
        while pos < end:
            block = f.read(min(block_size, end - pos))
            if not block:
                break
            pos += len(block)
            buf += block
            if pos < end:
                cut = cutter.last_cut(buf, lo)
                if cut == 0:  # no safe cut yet: keep reading
                    lo = max(0, len(buf) - cutter.lookahead)
                    continue
                lo = max(0, len(buf) - cutter.lookahead - cut)
            else:
                cut = len(buf)
            try:
                text = buf[:cut].decode("utf-8", errors)
            except UnicodeDecodeError as e:
                return _ChunkResult({}, buf_off + e.start, e.reason)
            counter.add(text)
            buf, buf_off = buf[cut:], buf_off + cut
            if report is not None:
                report(len(block))
        if buf:  # the file shrank while we read it; count what is left
            try:
                text = buf.decode("utf-8", errors)
            except UnicodeDecodeError as e:
                return _ChunkResult({}, buf_off + e.start, e.reason)
            counter.add(text)
    return _ChunkResult(counter.result())


@dataclass
class _PackedCounts:
    """A chunk's counts as three flat arrays (about 20 bytes per distinct pre-token, against about 150
    for a dict entry): the UTF-8 pre-tokens end to end, their byte lengths, and their counts."""

    blob: bytes
    lengths: np.ndarray
    counts: np.ndarray
    bad_offset: int | None = None
    bad_reason: str = ""

    @classmethod
    def pack(cls, r: _ChunkResult) -> _PackedCounts:
        toks = [t.encode("utf-8") for t in r.counts]
        return cls(b"".join(toks), np.fromiter(map(len, toks), dtype=np.int64, count=len(toks)),
                   np.fromiter(r.counts.values(), dtype=np.int64, count=len(toks)), r.bad_offset, r.bad_reason)

    def fold_into(self, total: dict[bytes, int]) -> None:
        """Add these counts to `total`."""
        ends = np.cumsum(self.lengths)
        blob = self.blob
        toks = map(blob.__getitem__, map(slice, (ends - self.lengths).tolist(), ends.tolist()))
        if not total:
            total.update(zip(toks, self.counts.tolist()))
            return
        get = total.get
        for tok, c in zip(toks, self.counts.tolist()):
            total[tok] = get(tok, 0) + c


def _count_chunk_task(args) -> _PackedCounts:
    path, start, end, special_tokens, errors = args

    def report(n: int) -> None:
        with _progress_counter.get_lock():
            _progress_counter.value += n

    return _PackedCounts.pack(count_chunk(path, start, end, special_tokens, errors, report=report))


def count_pretokens(input_path: str | Path, special_tokens: Sequence[str] = (), *, workers: int | None = None,
                    errors: str = "strict", progress: ProgressFn | None = None) -> dict[bytes, int]:
    """Pre-token counts of a UTF-8 text file: `{pre-token bytes: count}`, special tokens excluded.

    With `workers` > 1 the file is cut into `workers` chunks counted in parallel processes
    (None: the available cores, but no more than one per MiB of input).
    Invalid UTF-8 raises a `UserError` naming the first bad byte offset, unless errors="replace".
    """
    special_tokens = check_special_tokens(special_tokens)
    if errors not in ERRORS:
        raise UserError(f"unknown errors mode {errors!r}", "use strict or replace")
    path = Path(input_path)
    size = path.stat().st_size
    workers = resolve_workers(workers, size)
    # chunks of at most CHUNK_BYTES (each worker's counts start afresh per chunk), at least one per worker
    n_chunks = max(workers, -(-size // CHUNK_BYTES)) if workers > 1 else 1
    bounds = chunk_boundaries(path, n_chunks, special_tokens) if n_chunks > 1 else [0, size]
    tasks = [(str(path), s, e, special_tokens, errors) for s, e in zip(bounds[:-1], bounds[1:]) if e > s]
    if progress is not None:
        progress("pretokenize", 0, size)
    total: dict[bytes, int] = {}
    bad: list[tuple[int, str]] = []

    def fold(r: _PackedCounts) -> None:
        if r.bad_offset is not None:
            bad.append((r.bad_offset, r.bad_reason))
        else:
            r.fold_into(total)

    if workers == 1 or len(tasks) <= 1:
        _count_serially(tasks, fold, size, progress)
    else:
        _count_in_workers(tasks, min(workers, len(tasks)), fold, size, progress)
    if progress is not None:
        progress("pretokenize", size, size)
    if bad:
        offset, reason = min(bad)
        raise UserError(
            f"{path} is not valid UTF-8: {reason} at byte offset {offset}",
            "fix the file, or pass `errors` replace to replace invalid bytes with U+FFFD",
        )
    return total


def _count_serially(tasks: list[tuple], fold: Callable[[_PackedCounts], None], size: int,
                    progress: ProgressFn | None) -> None:
    """Count the chunks one after another in this process, reporting bytes as they are read."""
    done = 0

    def report(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress("pretokenize", done, size)

    for t in tasks:
        fold(_PackedCounts.pack(count_chunk(*t, report=report)))


def _count_in_workers(tasks: list[tuple], workers: int, fold: Callable[[_PackedCounts], None], size: int,
                      progress: ProgressFn | None) -> None:
    """Count the chunks in `workers` processes. Each chunk's counts are folded into the total as soon as
    that chunk is done, then dropped: the parent never holds every worker's counts at once, only the
    total and compact arrays. The workers add the bytes they read to one shared counter (progress)."""
    counter = mp_context().Value("q", 0)
    with WorkerPool(workers, _init_worker, (counter,)) as pool:
        it = pool.imap_unordered(_count_chunk_task, tasks)
        left = len(tasks)
        while left:
            try:
                r = it.next(timeout=0.1)
            except mp.TimeoutError:
                pass
            else:
                fold(r)
                del r
                left -= 1
            if progress is not None:
                progress("pretokenize", counter.value, size)


# ----------------------------------------------------------------------------------------------
# the merge loop

_INVERT = bytes(range(255, -1, -1))


def _desc_key(token: bytes) -> str:
    """A string whose ascending order is the *descending* order of the byte strings.

    Each byte b becomes chr(255 - b) and a terminator chr(256) (larger than any of them) is
    appended, so a proper prefix (the smaller byte string) sorts after its extensions. Because
    the terminator appears only at the end, `key(a) + key(b)` orders pairs like `(a, b)` tuples.

    >>> sorted([b"a", b"ab", b"b"], key=_desc_key)
    [b'b', b'ab', b'a']
    """
    return token.translate(_INVERT).decode("latin-1") + "\u0100"


def bpe_merges(word_counts: Mapping[bytes, int], num_merges: int, *,
               progress: ProgressFn | None = None, consume: bool = False) -> list[tuple[bytes, bytes]]:
    """Learn up to `num_merges` merges from pre-token counts; the core of `train_bpe`.

    Any pre-tokenization works (the tests feed whitespace-split words). Stops early when no
    pair is left. Token ids here are internal: 0..255 are the bytes, 256.. the merges.
    `consume=True` empties the `word_counts` dict once it is copied into arrays (saves its memory).

    The loop is the naive algorithm's (`naive_bpe_merges`): take the most frequent pair (ties to the
    greater pair of byte strings), merge every occurrence, repeat. What makes it fast lives in two
    helpers: `MergeState` finds and rewrites the occurrences and reports how each merge changes the
    pair counts, and `PairCounts` keeps the exact counts with a lazily invalidated heap of the best.

    >>> bpe_merges({b"aaab": 2, b"ab": 1}, 2)  # (a, a) twice in each "aaab": 4 against (a, b)'s 3
    [(b'a', b'a'), (b'a', b'b')]
    """
    tokens: list[bytes] = [bytes([i]) for i in range(256)]  # id -> bytes
    keys: list[str] = [_desc_key(t) for t in tokens]  # id -> tie-break key
    words = [w for w, c in word_counts.items() if len(w) >= 2 and c > 0]  # one-byte pre-tokens hold no pair
    merges: list[tuple[bytes, bytes]] = []
    if progress is not None:
        progress("merge", 0, num_merges)
    if not words or num_merges <= 0:
        return merges
    counts = np.fromiter((word_counts[w] for w in words), dtype=np.int64, count=len(words))
    if consume and isinstance(word_counts, dict):
        word_counts.clear()
    state, initial = MergeState.build(words, counts)
    del words, counts
    pairs = PairCounts(initial, keys)

    while len(merges) < num_merges and (key := pairs.pop_best()) is not None:
        a, b = key >> 32, key & 0xFFFFFFFF
        new_id = len(tokens)
        tokens.append(tokens[a] + tokens[b])
        keys.append(_desc_key(tokens[new_id]))
        merges.append((tokens[a], tokens[b]))
        pairs.update(state.merge(a, b, new_id))
        if progress is not None and (len(merges) % 100 == 0 or len(merges) == num_merges):
            progress("merge", len(merges), num_merges)
    if progress is not None:
        progress("merge", len(merges), num_merges)
    return merges


def naive_bpe_merges(word_counts: Mapping[bytes, int], num_merges: int) -> list[tuple[bytes, bytes]]:
    """The readable reference `bpe_merges` must equal: recount every pair, merge the best, repeat.

    Quadratic, for tests and for reading. Ties go to the greater pair of byte strings.

    >>> naive_bpe_merges({b"low": 5, b"lower": 2, b"widest": 3, b"newest": 6}, 3)
    [(b's', b't'), (b'e', b'st'), (b'o', b'w')]
    """
    words = {tuple(bytes([c]) for c in w): n for w, n in word_counts.items() if n > 0}
    merges: list[tuple[bytes, bytes]] = []
    for _ in range(num_merges):
        pair_counts: Counter = Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:]):
                pair_counts[pair] += n
        if not pair_counts:
            break
        best = max(pair_counts, key=lambda pair: (pair_counts[pair], pair))
        merges.append(best)
        merged = best[0] + best[1]
        new_words: dict[tuple[bytes, ...], int] = {}
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new_words[tuple(out)] = new_words.get(tuple(out), 0) + n
        words = new_words
    return merges


class PairCounts:
    """Exact counts of adjacent token pairs, and a heap that finds the most frequent one.

    A pair is an int64 key `a << 32 | b`. Ties go to the greater pair of byte strings: the heap orders
    entries by (-count, tie-break key of a + tie-break key of b), with `keys[id]` from `_desc_key`. The
    heap is invalidated lazily: an entry whose count has changed is skipped, or pushed back with the
    lower count, when it reaches the top.

    >>> keys = [_desc_key(bytes([i])) for i in range(256)]
    >>> ab, ba = (97 << 32) | 98, (98 << 32) | 97
    >>> pc = PairCounts({ab: 3, ba: 3}, keys)
    >>> pc.pop_best() == ba  # a tie goes to the greater pair (b'b', b'a')
    True
    >>> pc.update({ab: -2}); pc.counts[ab]
    1
    """

    def __init__(self, counts: dict[int, int], keys: list[str]):
        self.counts = counts
        self.keys = keys  # shared with the caller, which appends each new token's key
        self.heap = [(-c, self._tie(k), k) for k, c in counts.items()]
        heapq.heapify(self.heap)

    def _tie(self, k: int) -> str:
        return self.keys[k >> 32] + self.keys[k & 0xFFFFFFFF]

    def pop_best(self) -> int | None:
        """Remove and return the most frequent pair (its occurrences are about to be merged), or None."""
        heap, counts = self.heap, self.counts
        while heap:
            neg, _, key = heapq.heappop(heap)
            current = counts.get(key, 0)
            if current == -neg:
                del counts[key]
                return key
            if 0 < current < -neg:  # stale: it fell since it was pushed
                heapq.heappush(heap, (-current, self._tie(key), key))
        return None

    def update(self, delta: dict[int, int]) -> None:
        """Add `delta[key]` to each pair's count; a pair that reaches 0 is forgotten."""
        counts, heap = self.counts, self.heap
        for k, d in delta.items():
            if d == 0:
                continue
            n = counts.get(k, 0) + d
            if n > 0:
                counts[k] = n
                if d > 0:  # a lower count is found lazily; a higher one needs a new entry
                    heapq.heappush(heap, (-n, self._tie(k), k))
            else:
                counts.pop(k, None)


class MergeState:
    """The distinct pre-tokens laid end to end in flat arrays, rewritten in place by each merge.

    One slot per byte plus a separator after each word (slot 0 is a separator too): `sym` (token id,
    -1 separator, -2 merged away), `nxt`/`prv` (a linked list over the live slots) and `weight` (the
    word's count in every slot of the word, int32 when counts allow). For each token id, `where[id]`
    holds the slots that (may) hold it. That is about 20 bytes per byte of the distinct pre-tokens,
    whatever the corpus size.

    >>> state, pairs = MergeState.build([b"abab"], np.array([2]))
    >>> sorted((k >> 32, k & 0xFFFFFFFF, n) for k, n in pairs.items())  # (a, b) x2, (b, a) x1, weighted
    [(97, 98, 4), (98, 97, 2)]
    >>> delta = state.merge(97, 98, 256)  # a b a b -> N N: (b, a) destroyed, (N, N) created
    >>> sorted((k >> 32, k & 0xFFFFFFFF, n) for k, n in delta.items() if n)
    [(98, 97, -2), (256, 256, 2)]
    """

    def __init__(self, words: list[bytes], counts: np.ndarray):
        lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
        slots = lengths + 1  # each word, then a separator
        total = int(slots.sum()) + 1
        sym = np.full(total, -1, dtype=np.int32)
        byte_slots = (np.arange(1, int(lengths.sum()) + 1, dtype=np.int64)
                      + np.repeat(np.arange(len(words), dtype=np.int64), lengths))
        sym[byte_slots] = np.frombuffer(b"".join(words), dtype=np.uint8)
        del byte_slots
        wtype = np.int32 if int(counts.max()) < 2**31 else np.int64  # half the memory when counts allow
        self.weight = np.concatenate([np.zeros(1, dtype=wtype), np.repeat(counts.astype(wtype), slots)])
        del lengths, slots
        self.sym = sym
        self.nxt = np.arange(1, total + 1, dtype=np.int32)
        self.nxt[-1] = total - 1  # the last slot is a separator; never followed
        self.prv = np.arange(-1, total - 1, dtype=np.int32)
        self.prv[0] = 0
        self.where: list[np.ndarray] = []

    @classmethod
    def build(cls, words: list[bytes], counts: np.ndarray) -> tuple[MergeState, dict[int, int]]:
        """The state for `words` (distinct, each of 2+ bytes) weighted by `counts`, and its pair counts.

        The pair counts are taken before the per-token index is built, so their temporaries are freed
        before the index's are allocated (peak memory)."""
        state = cls(words, counts)
        pairs = state._count_pairs()
        state._index_bytes()
        return state, pairs

    def _count_pairs(self) -> dict[int, int]:
        sym = self.sym
        left = np.flatnonzero((sym[:-1] >= 0) & (sym[1:] >= 0))
        pair_keys = (sym[left].astype(np.int64) << 32) | sym[left + 1]
        uniq, inv = np.unique(pair_keys, return_inverse=True)
        sums = np.bincount(inv, weights=self.weight[left]).astype(np.int64)
        return dict(zip(uniq.tolist(), sums.tolist()))

    def _index_bytes(self) -> None:
        sym = self.sym
        live = np.flatnonzero(sym >= 0)
        live = live[np.argsort(sym[live], kind="stable")].astype(np.int32)
        bounds = np.searchsorted(sym[live], np.arange(257))
        self.where = [live[bounds[i]:bounds[i + 1]] for i in range(256)]

    def occurrences(self, a: int, b: int) -> np.ndarray:
        """The left slots s with sym[s] == a and sym[nxt[s]] == b, in slot order, non-overlapping.

        Scans the shorter of `where[a]` and `where[b]` and prunes it of slots merged away since."""
        sym, nxt, prv, where = self.sym, self.nxt, self.prv, self.where
        wa, wb = where[a], where[b]
        if len(wa) <= len(wb):
            wa = wa[sym[wa] == a]
            where[a] = wa
            s = wa[sym[nxt[wa]] == b]
        else:
            wb = wb[sym[wb] == b]
            where[b] = wb
            s = prv[wb[sym[prv[wb]] == a]]
            s.sort()
        if a == b and len(s) > 1:
            s = _non_overlapping(s, nxt)
        return s

    def merge(self, a: int, b: int, new_id: int) -> dict[int, int]:
        """Rewrite every occurrence of (a, b) as `new_id`; return the change of each pair's count.

        The pair (a, b) itself is not in the result: all of its occurrences are gone."""
        sym, nxt, prv = self.sym, self.nxt, self.prv
        s = self.occurrences(a, b)
        r = nxt[s]
        before, rr, w = prv[s], nxt[r], self.weight[s]  # every slot of a word carries the word's count
        # In runs such as a b a b -> N N, the slot before an occurrence is the right half of the one
        # before it: its pair is destroyed (and N N created) once, not twice.
        lone = np.ones(len(s), dtype=bool)
        if len(s) > 1:
            lone[1:] = before[1:] != r[:-1]
        x, y = sym[before], sym[rr]
        # pairs destroyed: (x, a) before each occurrence, (b, y) after it; created: (x, N), (N, y)
        has_x, has_y = lone & (x >= 0), y >= 0
        sym[s] = new_id
        sym[r] = -2
        nxt[s] = rr
        prv[rr] = s
        x_new, y_new = sym[prv[s]], sym[rr]
        has_x_new = x_new >= 0
        has_y_new = y_new >= 0  # in a run, (N, N) is the next occurrence's (x_new, N): counted there
        has_y_new[:-1] &= lone[1:]
        # an (a, a) after a run's last occurrence ("a a a") is an occurrence of the merged pair, whose
        # count is already gone: it is not destroyed again (but (N, a) is still created)
        has_y_old = has_y & (y != a) if a == b else has_y
        old_keys = np.concatenate([(x[has_x].astype(np.int64) << 32) | a, (b << 32) | y[has_y_old].astype(np.int64)])
        new_keys = np.concatenate([(x_new[has_x_new].astype(np.int64) << 32) | new_id,
                                   (new_id << 32) | y_new[has_y_new].astype(np.int64)])
        self.where.append(s)
        return _sum_by_key(np.concatenate([old_keys, new_keys]),
                           np.concatenate([-w[has_x], -w[has_y_old], w[has_x_new], w[has_y_new]]))


def _sum_by_key(keys: np.ndarray, weights: np.ndarray) -> dict[int, int]:
    """{key: sum of its weights}: numpy for many entries, a dict loop (cheaper than sorting) for few.

    >>> _sum_by_key(np.array([5, 7, 5]), np.array([1, 2, -3]))
    {5: -2, 7: 2}
    """
    if len(keys) > _VECTOR_SUM:
        uk, inv = np.unique(keys, return_inverse=True)
        return dict(zip(uk.tolist(), np.bincount(inv, weights=weights).astype(np.int64).tolist()))
    delta: dict[int, int] = {}
    get = delta.get
    for k, d in zip(keys.tolist(), weights.tolist()):
        delta[k] = get(k, 0) + d
    return delta


_VECTOR_SUM = 2048  # above this many pair changes in one merge, sum them with numpy


def _non_overlapping(s: np.ndarray, nxt: np.ndarray) -> np.ndarray:
    """For a pair (a, a): of sorted occurrences where one starts right where the previous one ends
    (runs such as a a a), keep the leftmost and every other one, as merging left to right does."""
    follows = np.zeros(len(s), dtype=bool)
    follows[1:] = nxt[s[:-1]] == s[1:]  # s[i] is the right half of s[i-1]'s occurrence
    if not follows.any():
        return s
    keep = np.ones(len(s), dtype=bool)
    run = 0
    for i, f in enumerate(follows.tolist()):
        run = run + 1 if f else 0
        keep[i] = run % 2 == 0
    return s[keep]


def build_vocab(special_tokens: Sequence[str], merges: Sequence[tuple[bytes, bytes]]) -> dict[int, bytes]:
    """Special tokens (ids 0..k-1), the 256 bytes, then one id per merge in creation order."""
    vocab = {i: t.encode("utf-8") for i, t in enumerate(special_tokens)}
    k = len(vocab)
    vocab.update({k + b: bytes([b]) for b in range(256)})
    for i, (x, y) in enumerate(merges):
        vocab[k + 256 + i] = x + y
    return vocab


# ----------------------------------------------------------------------------------------------
# entry points


@dataclass
class TrainResult:
    vocab: dict[int, bytes]
    merges: list[tuple[bytes, bytes]]
    num_pretokens: int = 0  # pre-tokens in the text (with repeats)
    num_distinct: int = 0  # distinct pre-tokens
    workers: int = 1
    seconds: dict[str, float] = field(default_factory=dict)  # per phase


def train_bpe_file(input_path: str | Path, vocab_size: int, special_tokens: Sequence[str] = (), *,
                   workers: int | None = None, errors: str = "strict",
                   progress: ProgressFn | None = None) -> TrainResult:
    """`train_bpe` plus the options and figures the CLI needs (errors mode, progress, timings)."""
    special_tokens = check_special_tokens(special_tokens)
    num_merges = check_vocab_size(vocab_size, len(special_tokens))
    path = Path(input_path)
    if not path.is_file():
        raise UserError(f"input file not found: {path}" if not path.exists() else f"input is not a file: {path}")
    workers = resolve_workers(workers, path.stat().st_size)
    t0 = time.perf_counter()
    word_counts = count_pretokens(path, special_tokens, workers=workers, errors=errors, progress=progress)
    t1 = time.perf_counter()
    num_pretokens, num_distinct = sum(word_counts.values()), len(word_counts)
    merges = bpe_merges(word_counts, num_merges, progress=progress, consume=True)
    t2 = time.perf_counter()
    return TrainResult(
        vocab=build_vocab(special_tokens, merges), merges=merges,
        num_pretokens=num_pretokens, num_distinct=num_distinct, workers=workers,
        seconds={"pretokenize": t1 - t0, "merge": t2 - t1},
    )


def train_bpe(input_path: str | os.PathLike, vocab_size: int, special_tokens: Sequence[str] = (), *,
              workers: int | None = None) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    """Train a byte-level BPE tokenizer on a UTF-8 text file.

    Returns (vocab, merges): vocab maps id -> bytes (special tokens 0..k-1 in the order given,
    then the 256 bytes, then one token per merge); merges are (bytes, bytes) in creation order.
    `vocab_size` is the maximum final size; fewer merges are learned if pairs run out.
    `workers` processes count pre-tokens (default: the available cores, at most one per MiB).
    """
    r = train_bpe_file(input_path, vocab_size, special_tokens, workers=workers)
    return r.vocab, r.merges


# ----------------------------------------------------------------------------------------------
# saving: vocab.json + merges.txt (GPT-2 format) + tokenizer_config.json

CONFIG_NAME = "tokenizer_config.json"
TOKENIZER_FILES = ("vocab.json", "merges.txt", CONFIG_NAME)
CONFIG_FORMAT = "tslm-bpe"


def training_fingerprint(vocab_size: int, special_tokens: Sequence[str], source_sha256: str,
                         errors: str = "strict") -> dict:
    """Everything that determines the trained tokenizer: equal fingerprints, equal files."""
    return {
        "format_version": FORMAT_VERSION,
        "requested_vocab_size": vocab_size,
        "special_tokens": list(special_tokens),
        "pattern": GPT2_SPLIT_PATTERN,
        "errors": errors,
        "source_sha256": source_sha256,
    }


def _read_config(out_dir: Path) -> dict | None:
    try:
        cfg = json.loads((out_dir / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return cfg if isinstance(cfg, dict) else None


def check_output_dir(out_dir: str | Path, fingerprint: dict, force: bool = False) -> Path:
    """Refuse an output directory that holds a different (or an incomplete) tokenizer, unless `force`.

    A directory holding the same tokenizer (same fingerprint) is fine: retraining rewrites
    identical files. Call this before training, so a refusal costs nothing and writes nothing.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output path exists and is not a directory: {out}", "pass a directory with `out_dir`")
    if not out.is_dir():
        return out
    _check_only_tokenizer_files(out)
    if force:
        return out
    present = [n for n in TOKENIZER_FILES if (out / n).exists()]
    if not present:
        return out
    cfg = _read_config(out)
    if cfg is not None and {k: cfg.get(k) for k in fingerprint} == fingerprint:
        return out
    what = "a different tokenizer" if cfg is not None else f"tokenizer files ({', '.join(present)})"
    if cfg is not None:
        what += f" (vocab {cfg.get('requested_vocab_size')}, special tokens {cfg.get('special_tokens')}, " \
                f"source sha256 {str(cfg.get('source_sha256'))[:12]}...)"
    raise UserError(f"{out} already holds {what}", "pass `force` to replace it, or choose another `out_dir`")


def save_tokenizer(out_dir: str | Path, vocab: dict[int, bytes], merges: list[tuple[bytes, bytes]],
                   fingerprint: dict, extra: dict | None = None) -> Path:
    """Write vocab.json, merges.txt and tokenizer_config.json so that no half tokenizer is ever visible.

    The three files are written into a temporary directory beside `out_dir`, which then replaces
    `out_dir` in one step (renamed into place, or atomically exchanged with an existing directory,
    whose old files are then removed). So two runs writing the same directory at once leave one
    complete tokenizer, never vocab.json from one and merges.txt from the other. The config records
    the sha256 of the other two files. A directory holding anything besides tokenizer files is
    refused (`check_output_dir`): replacing it would delete files this command did not write.
    On any error (a full disk included) the temporary directory is removed.
    """
    out = Path(out_dir)
    _check_only_tokenizer_files(out)
    specials = fingerprint.get("special_tokens", [])
    inverse = {tok: i for i, tok in vocab.items()}
    longest = max(vocab.values(), key=len, default=b"")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out.parent)  # what a killed earlier save left beside it (dead owners only)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(out.name), suffix=".tmp", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the renamed dir should look like mkdir's
        write_vocab_merges(tmp, vocab, merges)
        cfg = {
            "format": CONFIG_FORMAT,
            **fingerprint,
            "vocab_size": len(vocab),
            "num_merges": len(merges),
            "special_token_ids": {t: inverse[t.encode("utf-8")] for t in specials},
            "longest_token_bytes": len(longest),
            "files": {n: sha256_file(tmp / n) for n in ("vocab.json", "merges.txt")},
            **(extra or {}),
        }
        atomic_write_text(tmp / CONFIG_NAME, json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
        fsync_dir(tmp)
        if not _rename_new(tmp, out):
            _check_only_tokenizer_files(out)
            if not exchange_dirs(tmp, out):  # no atomic exchange here: move the old one aside first
                old = Path(tempfile.mkdtemp(prefix=temp_prefix(out.name), suffix=".old", dir=out.parent))
                os.rename(out, old / out.name)
                try:
                    os.rename(tmp, out)
                except BaseException:
                    os.rename(old / out.name, out)  # put the old tokenizer back
                    old.rmdir()
                    raise
                tmp = old
        fsync_dir(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the temporary dir, or after an exchange the old tokenizer
    return out


def _rename_new(src: Path, dst: Path) -> bool:
    """Rename `src` to `dst` when `dst` does not exist; False when it does (a directory, perhaps just made)."""
    try:
        os.rename(src, dst)  # fails on an existing non-empty directory; replaces an empty one
        return True
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            return False
        raise


_RENAME_EXCHANGE = 2  # from linux/fs.h


def exchange_dirs(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # old kernel, or a file system without it
        return False
    raise OSError(err, os.strerror(err), str(b))




def _check_only_tokenizer_files(out: Path) -> None:
    if not out.is_dir():
        return
    others = sorted(p.name for p in out.iterdir() if p.name not in TOKENIZER_FILES)
    if others:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise UserError(
            f"{out} holds files that are not a tokenizer's ({shown}); tslm bpe replaces the whole directory",
            "choose another `out_dir`, or move those files",
        )
