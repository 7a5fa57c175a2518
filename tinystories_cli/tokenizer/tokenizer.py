"""Byte-level BPE encoding and decoding, exactly compatible with GPT-2 (and tiktoken's `gpt2`).

Encoding a text takes three steps:

1. Split on special tokens (longest match first), which are always kept whole.
2. Split each plain segment into pre-tokens with the GPT-2 pattern; merges never cross pre-tokens.
3. Within each pre-token, start from its UTF-8 bytes and apply merges in rank order (the order of
   `merges`), lowest rank first, until none applies.

Step 3 is memoized: a bounded cache maps a pre-token to its ids, and on natural text nearly every
pre-token is a hit, so most of the time goes to the pre-tokenizing regex. Pure-ASCII segments (most
of TinyStories) use an ASCII-only version of the GPT-2 pattern with the faster stdlib `re`; on ASCII
the two patterns match exactly the same pieces.

>>> vocab = {i: bytes([i]) for i in range(256)}
>>> vocab[256], vocab[257] = b"ab", b"abc"
>>> tok = Tokenizer(vocab, [(b"a", b"b"), (b"ab", b"c")], special_tokens=["<|endoftext|>"])
>>> tok.encode("abc ab<|endoftext|>")
[257, 32, 256, 258]
>>> tok.decode([257, 32, 256, 258])
'abc ab<|endoftext|>'
"""

from __future__ import annotations

import hashlib
import heapq
import json
import re
import struct
from itertools import chain, repeat
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np
import regex

from tinystories_cli.errors import UserError
from tinystories_cli.tokenizer.files import read_vocab_merges
from tinystories_cli.tokenizer.pretokenize import GPT2_PATTERN

EOT = "<|endoftext|>"
T = TypeVar("T")

# The GPT-2 pattern restricted to ASCII text, for the stdlib `re` (about 2.5x faster than `regex`).
# On ASCII input \p{L} is [A-Za-z], \p{N} is [0-9], and \s (re.ASCII) is [ \t\n\r\f\v], the same
# set `regex` and tiktoken use (neither counts \x1c-\x1f as whitespace).
ASCII_PATTERN = re.compile(r"""'(?:[sdmt]|ll|ve|re)| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+""", re.ASCII)

# Where a text can be cut so that encoding the two halves separately gives the same ids as encoding
# the whole (used by `encode_iterable`). Searched backwards (?r) for the last such place. The cut
# goes between the two characters matched:
#   non-space | space:   no pre-token crosses a space preceded by a non-space (" ?" only prefixes
#                        a pre-token, and whitespace runs start after the non-space); and every
#                        decision about the pre-tokens before the cut is the same whether a space
#                        or the end of the text follows.
#   letter | non-letter, non-space: the letter run ends there either way, and a contraction such
#                        as 'll cannot be completed by a non-letter.
_SAFE_CUT = regex.compile(r"(?r)\S\s|\p{L}[^\s\p{L}]")

# Pre-tokens longer than this are merged with a heap (O(n log n)) instead of rescanning all pairs
# after every merge (O(n^2)), so a megabyte-long run of spaces or digits cannot stall encoding.
_LONG_PIECE = 128
_NO_MERGE = (float("inf"), -1, -1, -1)


class Tokenizer:
    """Byte-level BPE tokenizer: `encode`, `decode`, `encode_iterable`.

    `vocab` maps id -> token bytes; `merges` lists (left, right) byte pairs in rank order; each
    special token is appended to the vocab (next free id) unless its UTF-8 bytes already have an id.
    """

    stream_chars = 1 << 16  # text buffered by the streaming encoders before looking for a cut

    def __init__(
        self,
        vocab: dict[int, bytes],
        merges: list[tuple[bytes, bytes]],
        special_tokens: list[str] | None = None,
        cache_size: int = 1 << 18,
    ):
        self.vocab: dict[int, bytes] = {int(i): bytes(b) for i, b in vocab.items()}
        self.merges: list[tuple[bytes, bytes]] = [(bytes(a), bytes(b)) for a, b in merges]
        self.special_tokens: list[str] = list(dict.fromkeys(special_tokens or []))  # dedupe, keep order
        # bytes -> id; on duplicate bytes the lowest id wins (ids are only decoded, never produced twice)
        self._token_id: dict[bytes, int] = {}
        for i in sorted(self.vocab):
            self._token_id.setdefault(self.vocab[i], i)
        next_id = max(self.vocab, default=-1) + 1
        self._special_id: dict[str, int] = {}
        for s in self.special_tokens:
            if not s:
                raise UserError("special tokens must be non-empty strings")
            b = s.encode("utf-8")
            if b not in self._token_id:
                self.vocab[next_id] = b
                self._token_id[b] = next_id
                next_id += 1
            self._special_id[s] = self._token_id[b]
        # Longest first, so `<|endoftext|><|endoftext|>` wins over `<|endoftext|>`; the capturing
        # group makes re.split return [plain, special, plain, special, ..., plain].
        ordered = sorted(self._special_id, key=len, reverse=True)
        self._special_split = regex.compile("(" + "|".join(regex.escape(s) for s in ordered) + ")") if ordered else None
        self._max_special_len = max((len(s) for s in ordered), default=0)

        # The initial id of every byte, and merges keyed on id pairs: (left, right) -> (rank, merged id, left, right).
        self._byte_id: list[int | None] = [self._token_id.get(bytes([b])) for b in range(256)]
        self._merge: dict[tuple[int, int], tuple[int, int, int, int]] = {}
        for rank, (a, b) in enumerate(self.merges):
            ia, ib, iab = self._token_id.get(a), self._token_id.get(b), self._token_id.get(a + b)
            if ia is None or ib is None or iab is None:
                raise UserError(
                    f"inconsistent tokenizer: merge {rank} ({a!r} + {b!r}) uses or makes a token that is not in the vocab",
                    "use a vocab and merges written together",
                )
            self._merge.setdefault((ia, ib), (rank, iab, ia, ib))
        self._heap_ok = _merges_ordered(self._merge)
        self._vocab_size = max(self.vocab, default=-1) + 1
        self._dtype = token_dtype(self._vocab_size)
        self._cache: dict[str, tuple[int, ...]] = {}
        self._packed_cache: dict[str, bytes] = {}
        self._special_packed = {s: np.array([i], dtype=self.dtype).tobytes() for s, i in self._special_id.items()}
        self._cache_size = max(0, int(cache_size))
        self._fingerprint: str | None = None

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_files(cls, vocab_path: str | Path, merges_path: str | Path, special_tokens: list[str] | None = None) -> "Tokenizer":
        """Read GPT-2 format `vocab.json` + `merges.txt` (as written by `tslm bpe` or GPT-2 itself)."""
        vocab, merges = read_vocab_merges(vocab_path, merges_path)
        return cls(vocab, merges, special_tokens)

    @classmethod
    def from_dir(cls, directory: str | Path, special_tokens: list[str] | None = None) -> "Tokenizer":
        """Load a tokenizer directory written by `tslm bpe`: vocab.json, merges.txt, tokenizer_config.json.

        Special tokens come from `special_tokens` if given, else the config's "special_tokens" list,
        else `<|endoftext|>` when the vocab has it.
        """
        d = Path(directory)
        if not d.is_dir():
            raise UserError(f"tokenizer directory not found: {d}", "run `tslm bpe` to train one, or pass --tokenizer DIR")
        vocab, merges = read_vocab_merges(d / "vocab.json", d / "merges.txt")
        if special_tokens is None:
            special_tokens = _config_special_tokens(d / "tokenizer_config.json")
        if special_tokens is None:
            special_tokens = [EOT] if EOT.encode() in set(vocab.values()) else []
        return cls(vocab, merges, special_tokens)

    # ------------------------------------------------------------------ properties

    @property
    def vocab_size(self) -> int:
        """One more than the largest id (the embedding rows a model needs)."""
        return self._vocab_size

    @property
    def eot_id(self) -> int | None:
        """The id of `<|endoftext|>` when it is a special token, else None."""
        return self._special_id.get(EOT)

    @property
    def fingerprint(self) -> str:
        """sha256 (hex) of a canonical serialization of vocab, merges and special tokens.

        Two tokenizers with the same fingerprint encode every text identically, so a token file
        records it and training refuses a file made by a different tokenizer.
        """
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(b"tslm-bpe-v1\n")
            for i in sorted(self.vocab):
                h.update(f"v {i} {self.vocab[i].hex()}\n".encode())
            for a, b in self.merges:
                h.update(f"m {a.hex()} {b.hex()}\n".encode())
            for s in sorted(self.special_tokens):
                h.update(f"s {s.encode().hex()}\n".encode())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, special_tokens={self.special_tokens})"

    # ------------------------------------------------------------------ encoding

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`.

        >>> Tokenizer({i: bytes([i]) for i in range(256)}, [], ["<|a|>"]).encode("hi<|a|>")
        [104, 105, 256]
        """
        ids: list[int] = []
        for part, special in self._segments(text):
            if special:
                ids.append(self._special_id[part])
            else:
                ids += self._encode_plain(part)
        return ids

    def encode_packed(self, text: str) -> bytes:
        """The ids of `text` as raw little-endian `self.dtype` bytes (what a .npy token file holds).

        Faster than `encode` for writing files: cached pre-tokens are stored packed, so a whole
        text is one `bytes.join`, with no Python int per token.

        >>> import numpy as np
        >>> tok = Tokenizer({i: bytes([i]) for i in range(256)}, [])
        >>> np.frombuffer(tok.encode_packed("hi"), dtype=tok.dtype).tolist()
        [104, 105]
        """
        out: list[bytes] = []
        for part, special in self._segments(text):
            out.append(self._special_packed[part] if special else self._encode_plain_packed(part))
        return b"".join(out)

    @property
    def dtype(self) -> np.dtype:
        """The smallest unsigned dtype holding every id: uint16 when vocab_size <= 65536, else uint32."""
        return self._dtype

    def encode_iterable(self, iterable: Iterable[str]) -> Iterator[int]:
        """Lazily encode a stream of strings (e.g. an open text file); equals `encode("".join(iterable))`.

        Memory stays bounded by the buffer size (plus the longest pre-token): text is buffered only
        up to the last place where cutting cannot change the result (see `_safe_cut`).
        """
        return chain.from_iterable(self.encode_batches(iterable))

    def encode_batches(self, iterable: Iterable[str], buffer_chars: int | None = None) -> Iterator[list[int]]:
        """Like `encode_iterable`, but yields a list of ids per buffered stretch of text (faster)."""
        return self._stream(iterable, self.encode, buffer_chars or self.stream_chars)

    def encode_packed_batches(self, iterable: Iterable[str], buffer_chars: int | None = None) -> Iterator[bytes]:
        """Like `encode_batches`, but each batch is packed `self.dtype` bytes (see `encode_packed`)."""
        return self._stream(iterable, self.encode_packed, buffer_chars or self.stream_chars)

    def _stream(self, iterable: Iterable[str], encode: Callable[[str], T], buffer_chars: int) -> Iterator[T]:
        pending: list[str] = []
        size = 0
        for chunk in iterable:
            if not chunk:
                continue
            pending.append(chunk)
            size += len(chunk)
            if size < buffer_chars:
                continue
            buf = "".join(pending)
            cut = self._safe_cut(buf)
            if cut > 0:
                yield encode(buf[:cut])
                buf = buf[cut:]
            pending, size = [buf], len(buf)
        buf = "".join(pending)
        if buf:
            yield encode(buf)

    def _safe_cut(self, buf: str) -> int:
        """The largest i found (0 if none) such that, for every continuation `rest`,
        encode(buf[:i] + rest) == encode(buf[:i]) + encode(rest).

        Special tokens: a match starting at least `max_special_len` characters before the end is
        final (no continuation can change it), so the end of the last such match is a cut; a
        plain-text cut (see `_SAFE_CUT`) must lie before any match that is not yet final.
        """
        n = len(buf)
        limit = n
        cut = 0
        if self._special_split is not None:
            limit = n - self._max_special_len + 1
            if limit <= 0:
                return 0
            for m in self._special_split.finditer(buf):
                if m.start() >= limit:
                    break
                cut = m.end()
        m = _SAFE_CUT.search(buf, cut, limit)
        if m is not None:
            cut = max(cut, m.start() + 1)
        return cut

    def _segments(self, text: str) -> Iterator[tuple[str, bool]]:
        """(piece, is_special) in order, plain pieces non-empty; like `pretokenize.split_special`,
        but with a str.split fast path for the usual single special token."""
        if self._special_split is None:
            if text:
                yield text, False
        elif len(self._special_id) == 1:
            (special,) = self._special_id
            for i, part in enumerate(text.split(special)):
                if i:
                    yield special, True
                if part:
                    yield part, False
        else:
            for i, part in enumerate(self._special_split.split(text)):
                if i & 1:
                    yield part, True
                elif part:
                    yield part, False

    def _encode_plain(self, text: str) -> list[int]:
        """Ids of a text holding no special tokens."""
        pieces = (ASCII_PATTERN if text.isascii() else GPT2_PATTERN).findall(text)
        cache = self._cache
        try:
            # Fast path, all in C: every pre-token is cached (the usual case on natural text).
            return list(chain.from_iterable(map(cache.__getitem__, pieces)))
        except KeyError:
            pass
        # Some pre-tokens are new: merge each distinct one once, then take the fast path again.
        if len(cache) > self._cache_size:
            cache.clear()  # bounded: start over (cheap, the common pre-tokens come back at once)
        for p in set(pieces).difference(cache):
            cache[p] = self._bpe(p)
        return list(chain.from_iterable(map(cache.__getitem__, pieces)))

    def _encode_plain_packed(self, text: str) -> bytes:
        """`_encode_plain` as packed bytes, with its own cache of packed pre-tokens."""
        pieces = (ASCII_PATTERN if text.isascii() else GPT2_PATTERN).findall(text)
        cache = self._packed_cache
        try:
            return b"".join(map(cache.__getitem__, pieces))
        except KeyError:
            pass
        if len(cache) > self._cache_size:
            cache.clear()
        code = self._dtype.char  # "H" (uint16) or "I" (uint32)
        for p in set(pieces).difference(cache):
            ids = self._bpe(p)
            cache[p] = struct.pack(f"<{len(ids)}{code}", *ids)
        return b"".join(map(cache.__getitem__, pieces))

    def _bpe(self, piece: str) -> tuple[int, ...]:
        """Apply merges in rank order to the bytes of one pre-token."""
        data = piece.encode("utf-8")
        ids = list(map(self._byte_id.__getitem__, data))
        if None in ids:
            missing = next(b for b in data if self._byte_id[b] is None)
            raise UserError(f"cannot encode byte 0x{missing:02x}: the vocab has no token for it", "use a byte-level vocab (all 256 bytes)")
        if len(ids) > _LONG_PIECE and self._heap_ok:
            return tuple(self._bpe_heap(ids))
        merge_get = self._merge.get
        while len(ids) > 1:
            # The lowest-rank pair present (values are (rank, new id, left, right), so min() finds it);
            # merge every occurrence of it, left to right, as GPT-2 does.
            rank, new_id, a, b = min(map(merge_get, zip(ids, ids[1:]), repeat(_NO_MERGE)))
            if new_id < 0:
                break
            if ids.count(a) == 1:  # the usual case: a single occurrence, merge it in place
                i = ids.index(a)
                ids[i : i + 2] = (new_id,)
                continue
            out = []
            i, n = 0, len(ids)
            while i < n:
                if ids[i] == a and i + 1 < n and ids[i + 1] == b:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(ids[i])
                    i += 1
            ids = out
        return tuple(ids)

    def _bpe_heap(self, ids: list[int]) -> list[int]:
        """Same result as the loop in `_bpe`, in O(n log n): a heap of (rank, position) over a linked list.

        Equal ranks pop left to right, which is GPT-2's merge-all-occurrences order; a merge can only
        create pairs of higher rank when merges are listed in training order, which `_merges_ordered`
        checks (otherwise `_bpe` never calls this).
        """
        merge = self._merge
        n = len(ids)
        nxt = list(range(1, n + 1))
        prv = list(range(-1, n - 1))
        alive = [True] * n
        heap = []
        for i in range(n - 1):
            m = merge.get((ids[i], ids[i + 1]))
            if m is not None:
                heap.append((m[0], i, ids[i], ids[i + 1], m[1]))
        heapq.heapify(heap)
        while heap:
            rank, i, a, b, new_id = heapq.heappop(heap)
            j = nxt[i]
            if not alive[i] or j >= n or ids[i] != a or ids[j] != b:
                continue  # stale entry: one side was merged away since it was pushed
            ids[i] = new_id
            alive[j] = False
            k = nxt[j]
            nxt[i] = k
            if k < n:
                prv[k] = i
            p = prv[i]
            if p >= 0:
                m = merge.get((ids[p], new_id))
                if m is not None:
                    heapq.heappush(heap, (m[0], p, ids[p], new_id, m[1]))
            if k < n:
                m = merge.get((new_id, ids[k]))
                if m is not None:
                    heapq.heappush(heap, (m[0], i, new_id, ids[k], m[1]))
        return [t for t, ok in zip(ids, alive) if ok]

    # ------------------------------------------------------------------ decoding

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The raw bytes of `ids`; an unknown id raises UserError naming it."""
        vocab = self.vocab
        ids = list(ids)
        try:
            return b"".join(map(vocab.__getitem__, ids))
        except (KeyError, TypeError):
            bad = next(i for i in ids if not _hashable_int(i) or i not in vocab)
            raise UserError(f"cannot decode token id {bad!r}: not in the vocab (ids are 0..{self.vocab_size - 1})") from None

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; byte sequences that are not valid UTF-8 become U+FFFD.

        >>> Tokenizer({i: bytes([i]) for i in range(256)}, []).decode([104, 105, 0xff])
        'hi\\ufffd'
        """
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32; always little-endian.

    >>> token_dtype(50257), token_dtype(100_000)
    (dtype('uint16'), dtype('uint32'))
    """
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def _merges_ordered(merge: dict[tuple[int, int], tuple[int, int, int, int]]) -> bool:
    """True when every merge that makes a token ranks before every merge that uses it (training order).

    Then merging can never create a pair of lower rank than the merge just applied, which makes the
    heap order in `_bpe_heap` identical to GPT-2's rescan-after-every-merge order.
    """
    first_use: dict[int, int] = {}
    for (a, b), (rank, *_) in merge.items():
        for t in (a, b):
            if rank < first_use.get(t, rank + 1):
                first_use[t] = rank
    return all(rank < first_use.get(new_id, rank + 1) for rank, new_id, _, _ in merge.values())


def _hashable_int(x) -> bool:
    try:
        hash(x)
    except TypeError:
        return False
    return True


def _config_special_tokens(path: Path) -> list[str] | None:
    """The "special_tokens" list of a tokenizer_config.json, or None when the file is absent."""
    if not path.is_file():
        return None
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"malformed tokenizer config {path}: {e}", "re-create it with `tslm bpe`") from None
    specials = cfg.get("special_tokens") if isinstance(cfg, dict) else None
    if specials is None:
        return None
    if not isinstance(specials, list) or not all(isinstance(s, str) and s for s in specials):
        raise UserError(f"malformed tokenizer config {path}: \"special_tokens\" must be a list of non-empty strings")
    return specials
