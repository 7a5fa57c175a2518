"""Where text may be cut without changing the result, and how files are split among workers.

This is the one home of every "safe cut" rule the tokenizer package relies on:

- `SAFE_CUT` (in-memory text, any tokenizer): a cut between the two characters it matches never
  changes the GPT-2 pre-tokens, so encoding the halves separately equals encoding the whole
  (used by `Tokenizer`'s streaming encoders).
- `Cutter` / `chunk_boundaries` (files, for counting pre-tokens in `tslm bpe`): byte offsets at a
  special token or before a newline followed by printable ASCII; correct for any special tokens.
- `ENCODE_CUT` / `split_points` (files, for `tslm encode`): byte offsets between a printable
  non-space ASCII character and a space or newline; correct when no special token holds a space
  or newline (`encode_cuts_safe`).
- `find_chunk_boundaries`: the rough, CS336-style cutter (at a split token or after a newline)
  that `chunk_boundaries` refines.

and of the worker processes: `mp_context` (the one multiprocessing context), `WorkerPool` (workers that
never outlive the call) and `signals_raise` (SIGINT/SIGTERM become `Interrupted`, so cleanup runs).

>>> SAFE_CUT.search("ab cd").start() + 1   # the last safe cut: between "b" and " "
2
>>> Cutter(["<|endoftext|>"]).is_safe(b"ab\\ncd" + b"." * 20, 2)
True
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import re
import signal
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import regex

__all__ = [
    "SAFE_CUT", "ENCODE_CUT", "Cutter", "mp_context", "find_chunk_boundaries", "chunk_boundaries",
    "next_safe_cut", "split_points", "encode_cuts_safe", "byte_ranges", "Interrupted", "signals_raise",
    "WorkerPool",
]

# ------------------------------------------------------------------------------ in-memory text

# Where a text can be cut so that encoding the two halves separately gives the same ids as encoding
# the whole. Searched backwards (?r) for the last such place. The cut goes between the two
# characters matched:
#   non-space | space:   no pre-token crosses a space preceded by a non-space (" ?" only prefixes
#                        a pre-token, and whitespace runs start after the non-space); and every
#                        decision about the pre-tokens before the cut is the same whether a space
#                        or the end of the text follows.
#   letter | non-letter, non-space: the letter run ends there either way, and a contraction such
#                        as 'll cannot be completed by a non-letter.
# Special tokens are the caller's business (`Tokenizer._safe_cut` keeps cuts out of them).
SAFE_CUT = regex.compile(r"(?r)\S\s|\p{L}[^\s\p{L}]")

# ------------------------------------------------------------------------------ files: encoding

# A safe place to cut a file for parallel encoding: after a printable, non-space ASCII character
# and before a space or newline. Encoding-wise this is the "non-space | space" cut of `SAFE_CUT`;
# byte-wise both sides are ASCII, so it never splits a UTF-8 character; and as long as no special
# token contains a space or newline (`encode_cuts_safe`), no special token spans it.
ENCODE_CUT = re.compile(rb"[\x21-\x7e][ \n]")


def encode_cuts_safe(special_tokens: Sequence[str]) -> bool:
    """Whether `split_points` cuts are safe with these special tokens (none holds a space or newline)."""
    return not any(" " in s or "\n" in s for s in special_tokens)


def split_points(path: str | os.PathLike, num_chunks: int, probe: int = 1 << 16) -> list[int]:
    """Byte offsets [0, ..., size] cutting the file into at most `num_chunks` chunks at `ENCODE_CUT`s.

    Each inner cut starts at an even guess and moves forward to the next match; guesses that find
    none (or land on the same place) are dropped, so there may be fewer chunks.
    """
    path = Path(path)
    size = path.stat().st_size
    points = [0]
    with open(path, "rb") as f:
        for k in range(1, max(1, num_chunks)):
            pos = max(size * k // num_chunks, points[-1])
            f.seek(pos)
            last = b""
            while True:
                block = f.read(probe)
                if not block:
                    pos = size
                    break
                buf = last + block
                m = ENCODE_CUT.search(buf)
                if m is not None:
                    pos = pos - len(last) + m.start() + 1
                    break
                last = buf[-1:]
                pos += len(block)
            if points[-1] < pos < size:
                points.append(pos)
    points.append(size)
    return points


def byte_ranges(points: Sequence[int]) -> list[tuple[int, int]]:
    """[(start, end), ...] of consecutive cut points, empty ranges dropped.

    >>> byte_ranges([0, 5, 5, 9])
    [(0, 5), (5, 9)]
    """
    return [(a, b) for a, b in zip(points[:-1], points[1:]) if b > a]


# ------------------------------------------------------------------------------ files: BPE counting


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


class Cutter:
    """Finds byte offsets where the text may be cut without changing its pre-tokens.

    A cut at offset p is safe when no occurrence of a special token spans p, and either
      (S) a special token starts at p: the text is split there anyway; or
      (N) p is a newline followed by a printable ASCII character that does not start a special
          token. A newline is never part of a letter/number/punctuation pre-token, and the GPT-2
          pattern ends a whitespace run just before its last character when a non-space follows,
          so the pre-tokens are `... | <run minus last> | "\\n" | next ...` whether or not the
          text is cut at p.
    (Cutting *after* a newline is not safe: in "a\\n \\nb" the whole text gives "\\n " + "\\n".)
    Both rules look at most max(len(special) + 1, 2) bytes ahead of p.
    """

    def __init__(self, special_tokens: Sequence[str]):
        self.specials = [t.encode("utf-8") for t in special_tokens]
        self.lookahead = max([2] + [len(t) + 1 for t in self.specials])

    def _spanned(self, buf: bytes, p: int) -> bool:
        """Does an occurrence of a special token start before p and end after it?"""
        for t in self.specials:
            n = len(t)
            if n > 1:
                i = buf.find(t, max(0, p - n + 1), p + n - 1)
                if 0 <= i < p:
                    return True
        return False

    def is_safe(self, buf: bytes, p: int) -> bool:
        if p <= 0 or p + self.lookahead > len(buf) or self._spanned(buf, p):
            return False
        if any(buf.startswith(t, p) for t in self.specials):
            return True
        # (N); the character after the newline must also not start a special token, or the
        # whitespace run would end its piece and stay whole ("  \\n<|endoftext|>").
        return (buf[p] == 0x0A and 0x21 <= buf[p + 1] <= 0x7E
                and not any(buf.startswith(t, p + 1) for t in self.specials))

    def _hi(self, buf: bytes) -> int:
        return len(buf) - self.lookahead  # largest p with full look-ahead

    def last_cut(self, buf: bytes, lo: int = 0) -> int:
        """The largest safe cut p with lo < p <= len(buf) - lookahead, or 0 if there is none."""
        hi = self._hi(buf)
        while hi > lo:
            cands = [buf.rfind(b"\n", lo + 1, hi + 1)]
            cands += [buf.rfind(t, lo + 1, hi + len(t)) for t in self.specials]
            p = max(cands)
            if p <= lo:
                return 0
            if self.is_safe(buf, p):
                return p
            hi = p - 1
        return 0

    def first_cut(self, buf: bytes, lo: int) -> int:
        """The smallest safe cut p >= lo with full look-ahead, or -1 if there is none."""
        hi = self._hi(buf)
        while lo <= hi:
            cands = [buf.find(b"\n", lo, hi + 1)]
            cands += [buf.find(t, lo, hi + len(t)) for t in self.specials]
            cands = [c for c in cands if c >= 0]
            if not cands:
                return -1
            p = min(cands)
            if self.is_safe(buf, p):
                return p
            lo = p + 1
        return -1


def chunk_boundaries(path: str | os.PathLike, num_chunks: int, special_tokens: Sequence[str]) -> list[int]:
    """Byte offsets [0, ..., size] splitting the file into at most `num_chunks` chunks at `Cutter` cuts.

    The rough positions come from `find_chunk_boundaries` (right before the first special token,
    or at a newline when the file has none); each is then moved forward to the next safe cut.
    """
    cutter = Cutter(special_tokens)
    with open(path, "rb") as f:
        split = special_tokens[0].encode("utf-8") if special_tokens else None
        rough = find_chunk_boundaries(f, num_chunks, split)
        if split is not None and len(rough) - 1 < num_chunks:
            # Too few special tokens to cut at; newlines also make safe cuts.
            newline = find_chunk_boundaries(f, num_chunks, None)
            if len(newline) > len(rough):
                rough = newline
        size = rough[-1]
        bounds = [0]
        for b in rough[1:-1]:
            b = max(b, bounds[-1] + 1)
            if b >= size:
                break
            cut = next_safe_cut(f, b, size, cutter)
            if cut >= size:
                break
            if cut > bounds[-1]:
                bounds.append(cut)
        bounds.append(size)
    return bounds if size > 0 else [0]


def next_safe_cut(f: BinaryIO, pos: int, size: int, cutter: Cutter, window: int = 1 << 16) -> int:
    """The first `cutter` cut at or after `pos` in the open file `f` (reading a growing window), or `size`."""
    start = max(0, pos - cutter.lookahead)  # bytes before pos, to see a special token spanning it
    while True:
        f.seek(start)
        buf = f.read(pos - start + window)
        p = cutter.first_cut(buf, pos - start)
        if p >= 0:
            return start + p
        if start + len(buf) >= size:
            return size
        window *= 2


# ------------------------------------------------------------------------------ worker processes


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived inside `signals_raise`; `exit_code` is 128 + the signal number.

    A BaseException, so `except Exception` does not swallow it while the cleanup (`finally`,
    `atomic_write`'s removal of its temporary file, `WorkerPool.__exit__`) runs on the way out.
    """

    def __init__(self, signum: int):
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT raise `Interrupted` in the main thread.

    An inherited SIG_IGN for SIGINT is respected (background jobs are started that way on purpose).
    Outside the main thread signals cannot be handled, and this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {}

    def handle(signum, frame):
        raise Interrupted(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        if sig == signal.SIGINT and signal.getsignal(sig) is signal.SIG_IGN:
            continue
        old[sig] = signal.signal(sig, handle)
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _pool_init(initializer, initargs) -> None:
    # A worker leaves stopping to its parent: SIGINT (a Ctrl-C reaches the whole process group) is
    # ignored, SIGTERM (what `WorkerPool` sends) ends it at once, silently. The parent created the
    # worker with both blocked, so none could arrive before this point.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    if initializer is not None:
        initializer(*initargs)


class WorkerPool:
    """A `multiprocessing.Pool` of `processes` workers from `mp_context`, for the package's parallel work.

    Used as a context manager: leaving the block normally closes and joins the pool; leaving it by
    an exception (including `Interrupted`) terminates the workers at once and waits for them, so no
    worker outlives the call and the caller's cleanup can remove the files workers were writing.
    """

    def __init__(self, processes: int, initializer=None, initargs: tuple = ()):
        ctx = mp_context()
        blocked = hasattr(signal, "pthread_sigmask") and threading.current_thread() is threading.main_thread()
        if blocked:
            previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            self.pool = ctx.Pool(processes, initializer=_pool_init, initargs=(initializer, initargs))
        finally:
            if blocked:
                signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    def __enter__(self):
        return self.pool

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.pool.close()
        else:
            self.pool.terminate()
        self.pool.join()


def mp_context():
    """The multiprocessing context for the package's worker pools.

    fork where the platform has it: workers start in milliseconds and share the parent's imported
    modules and already-built tokenizer at no cost. Elsewhere (Windows; macOS's default) the
    platform's default, spawn, which sends the worker's arguments once per worker.
    """
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else None)
