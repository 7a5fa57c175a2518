"""Byte-level BPE encoding and decoding, exactly compatible with GPT-2 (and tiktoken's `gpt2`).

Encoding a text takes three steps:

1. Split on special tokens (longest match first), which are always kept whole.
2. Split each plain segment into pre-tokens with the GPT-2 pattern; merges never cross pre-tokens.
3. Within each pre-token, start from its UTF-8 bytes and apply merges in rank order (the order of
   `merges`), lowest rank first, until none applies.

Step 3 is memoized: a bounded cache maps a pre-token to its ids. Step 2 is mostly skipped: where
every space follows a non-space (almost all prose), cutting before each space cannot change the
result, so the text is split with `str.split(" ")` and each " word" is looked up in a second cache
(`_words_value`); only new words go through the regex. Pure-ASCII text uses an ASCII-only version
of the GPT-2 pattern with the faster stdlib `re`; on ASCII both patterns match the same pieces.

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
import re
import struct
from collections.abc import Callable, Iterable, Iterator
from itertools import accumulate, chain, compress, islice, repeat
from pathlib import Path
from typing import TypeVar

import numpy as np
import regex

from tinystories_cli.errors import UserError
from tinystories_cli.fileio import read_json, sha256_file
from tinystories_cli.tokenizer.chunking import SAFE_CUT
from tinystories_cli.tokenizer.files import read_vocab_merges
from tinystories_cli.tokenizer.pretokenize import GPT2_PATTERN

EOT = "<|endoftext|>"
T = TypeVar("T")

# The GPT-2 pattern restricted to ASCII text, for the stdlib `re` (about 2.5x faster than `regex`).
# On ASCII input \p{L} is [A-Za-z], \p{N} is [0-9], and \s (re.ASCII) is [ \t\n\r\f\v], the same
# set `regex` and tiktoken use (neither counts \x1c-\x1f as whitespace).
# Possessive runs (++, Python 3.11+) never backtrack; nothing follows them inside their alternative,
# so they match exactly what greedy runs match, about 10% faster.
ASCII_PATTERN = re.compile(r"""'(?:[sdmt]|ll|ve|re)| ?[A-Za-z]++| ?[0-9]++"""
                           r"""| ?[^\sA-Za-z0-9]++|\s+(?!\S)|\s+""", re.ASCII)

# On a word-cache miss, the new words of up to this much text are cached in one batch (`_encode_packed`).
_BATCH_CHARS = 1 << 18

# A whitespace character followed by a space: a word ending in whitespace cannot stand before a space.
_WS_SPACE = regex.compile(r"\s ")

# Pre-tokens longer than this are merged with a heap (O(n log n)) instead of rescanning all pairs
# after every merge (O(n^2)), so a megabyte-long run of spaces or digits cannot stall encoding.
_LONG_PIECE = 128
_NO_MERGE = (float("inf"), -1, -1, -1)
_NO_RANK = 1 << 62


def _exact_copies(vocab: dict[int, bytes], merges) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    """Own copies of a vocab and merges with exact types (int ids, bytes tokens, 2-tuples of bytes).

    The type checks run in C, so the usual case (already exact) costs one copy.

    >>> _exact_copies({1: bytearray(b"a")}, [[b"a", b"b"]])
    ({1: b'a'}, [(b'a', b'b')])
    """
    if set(map(type, vocab)) <= {int} and set(map(type, vocab.values())) <= {bytes}:
        vocab = dict(vocab)
    else:
        vocab = {int(i): bytes(b) for i, b in vocab.items()}
    merges = list(merges)
    exact = (set(map(type, merges)) <= {tuple} and set(map(len, merges)) <= {2}
             and set(map(type, chain.from_iterable(merges))) <= {bytes})
    return vocab, merges if exact else [(bytes(a), bytes(b)) for a, b in merges]


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
        self.vocab, self.merges = _exact_copies(vocab, merges)
        self.special_tokens: list[str] = list(dict.fromkeys(special_tokens or []))  # dedupe, keep order
        # bytes -> id; on duplicate bytes the lowest id wins (assigned last)
        self._token_id: dict[bytes, int] = {b: i for i, b in sorted(self.vocab.items(), reverse=True)}
        self._add_special_tokens()
        self._index_merges()
        self._vocab_size = max(self.vocab, default=-1) + 1
        self._dtype = token_dtype(self._vocab_size)
        # Bounded memo tables, values packed as little-endian `dtype` bytes (what a token file holds):
        # pre-token -> ids, and word -> ids of " " + word (see `_words_value`). Packed values let a
        # whole text be one `bytes.join` and one `numpy.frombuffer`, with no Python int per token
        # until `encode` makes its list.
        self._cache = _Cache(cache_size)
        self._word_cache = _Cache(cache_size)
        self._end_cache = _Cache(cache_size)
        self._special_packed = {s: np.array([i], dtype=self.dtype).tobytes() for s, i in self._special_id.items()}
        self._fingerprint: str | None = None

    def _add_special_tokens(self) -> None:
        """Give each special token an id (its bytes' id if the vocab has them, else the next free one) and
        build the pattern that splits text on them."""
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

    def _index_merges(self) -> None:
        """The initial id of every byte, and the merges keyed on id pairs:
        (left, right) -> (rank, merged id, left, right)."""
        self._byte_id: list[int | None] = [self._token_id.get(bytes([b])) for b in range(256)]
        get = self._token_id.get
        left = list(map(get, [a for a, _ in self.merges]))
        right = list(map(get, [b for _, b in self.merges]))
        made = list(map(get, [a + b for a, b in self.merges]))
        if None in left or None in right or None in made:
            rank = next(r for r in range(len(self.merges)) if None in (left[r], right[r], made[r]))
            a, b = self.merges[rank]
            raise UserError(
                f"inconsistent tokenizer: merge {rank} ({a!r} + {b!r}) uses or makes a token that is not in the vocab",
                "use a vocab and merges written together",
            )
        ranks = range(len(self.merges))
        # Built from the last merge to the first, so a repeated pair keeps its first (lowest) rank.
        self._merge: dict[tuple[int, int], tuple[int, int, int, int]] = dict(
            zip(
                zip(reversed(left), reversed(right)),
                zip(reversed(ranks), reversed(made), reversed(left), reversed(right)),
            )
        )
        self._rank: dict[tuple[int, int], int] = dict(zip(zip(reversed(left), reversed(right)), reversed(ranks)))
        self._made: list[int] = made
        self._heap_ok = _merges_ordered(left, right, made, max(self.vocab, default=0) + 1)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_files(cls, vocab_path: str | Path, merges_path: str | Path,
                   special_tokens: list[str] | None = None) -> Tokenizer:
        """Read GPT-2 format `vocab.json` + `merges.txt` (as written by `tslm bpe` or GPT-2 itself)."""
        vocab, merges = read_vocab_merges(vocab_path, merges_path)
        return cls(vocab, merges, special_tokens)

    @classmethod
    def from_dir(cls, directory: str | Path, special_tokens: list[str] | None = None) -> Tokenizer:
        """Load a tokenizer directory written by `tslm bpe`: vocab.json, merges.txt, tokenizer_config.json.

        Special tokens come from `special_tokens` if given, else the config's "special_tokens" list,
        else `<|endoftext|>` when the vocab has it.
        """
        d = Path(directory)
        if not d.is_dir():
            raise UserError(f"tokenizer directory not found: {d}",
                            "run `tslm bpe` to train one, or pass `tokenizer` DIR")
        check_recorded_hashes(d)
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
            lines = ["tslm-bpe-v1"]
            lines += [f"v {i} {self.vocab[i].hex()}" for i in sorted(self.vocab)]
            lines += [f"m {a.hex()} {b.hex()}" for a, b in self.merges]
            lines += [f"s {s.encode().hex()}" for s in sorted(self.special_tokens)]
            self._fingerprint = hashlib.sha256("\n".join(lines).encode("ascii")).hexdigest()
        return self._fingerprint

    @property
    def special_token_ids(self) -> dict[str, int]:
        """{special token: its id}, in the order the special tokens were given."""
        return dict(self._special_id)

    @property
    def merges_in_training_order(self) -> bool:
        """Whether every merge that makes a token ranks before every merge that uses it (as `tslm bpe`
        and GPT-2 write them); then merge ranks order merges exactly as training did."""
        return self._heap_ok

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, "
                f"special_tokens={self.special_tokens})")

    # ------------------------------------------------------------------ encoding

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`.

        >>> Tokenizer({i: bytes([i]) for i in range(256)}, [], ["<|a|>"]).encode("hi<|a|>")
        [104, 105, 256]
        """
        return np.frombuffer(self.encode_packed(text), dtype=self._dtype).tolist()

    def encode_packed(self, text: str) -> bytes:
        """The ids of `text` as raw little-endian `self.dtype` bytes (what a .npy token file holds).

        >>> import numpy as np
        >>> tok = Tokenizer({i: bytes([i]) for i in range(256)}, [])
        >>> np.frombuffer(tok.encode_packed("hi"), dtype=tok.dtype).tolist()
        [104, 105]
        """
        try:
            return self._encode_packed(text)
        except UnicodeEncodeError:
            # Lone surrogates are not text and have no UTF-8; like tiktoken, encode them as U+FFFD.
            return self._encode_packed(text.encode("utf-16", "surrogatepass").decode("utf-16", "replace"))

    def _encode_packed(self, text: str) -> bytes:
        segments = list(self._segments(text))
        out: list[bytes] = []
        split_ahead: dict[int, list[str]] = {}  # word lists of later segments, made for a batch
        for k, (part, special) in enumerate(segments):
            if special:
                out.append(self._special_packed[part])
                continue
            words = split_ahead.pop(k, None) or part.split(" ")
            if len(words) == 1:
                out += self._piece_values(part)
                continue
            try:
                value = self._words_value(words)  # the usual case: every word cached
            except KeyError:
                # Cache the new words of this segment and of the plain segments after it (up to
                # _BATCH_CHARS), so that they go through the regex and BPE in one batch.
                batch, size = [words], len(part)
                for j in range(k + 1, len(segments)):
                    later, later_special = segments[j]
                    if size >= _BATCH_CHARS:
                        break
                    if not later_special:
                        batch.append(split_ahead.setdefault(j, later.split(" ")))
                        size += len(later)
                self._add_words([w for w in batch if len(w) > 1])
                del batch
                value = self._words_value(words)
            if value is None:  # a cut at a space is not safe here: the pre-token path
                out += self._piece_values(part)
            else:
                out.append(value)
        return b"".join(out)

    def _words_value(self, words: list[str]) -> bytes | None:
        """Packed ids of `" ".join(words)` from the word caches; KeyError when a word is not cached
        yet, None when the cuts at the spaces are not safe.

        If every space follows a non-space, cutting before each space is safe (see `SAFE_CUT`):
        the text is `head + " " + w1 + ... + " " + last`, and its ids are those of head, " " + w1,
        ..., " " + last. The middle words are looked up in `_word_cache`, where a word that ends in
        whitespace (or is empty, from "  ") is cached as None: it cannot come before a space. The
        last word is looked up in `_end_cache`, which holds any word. `str.split` and dict lookups
        run in C, so cached words skip the pre-tokenizing regex entirely.
        """
        head = words[0]
        if head[-1:].isspace():  # isspace is true for everything \s matches (and a few more)
            return None
        try:
            middle = b"".join(map(self._word_cache.d.__getitem__, islice(words, 1, len(words) - 1)))
        except TypeError:  # a None: not safe
            return None
        end = self._end_cache.d[words[-1]]
        return b"".join(self._piece_values(head)) + middle + end if head else middle + end

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
        return map(encode, self.safe_pieces(iterable, buffer_chars))

    def safe_pieces(self, iterable: Iterable[str], buffer_chars: int | None = None) -> Iterator[str]:
        """The text of `iterable` re-cut into pieces of about `buffer_chars` characters (or more, when no
        cut is found) at places where cutting cannot change the ids (see `_safe_cut`): encoding each
        piece and concatenating the ids equals encoding the whole text."""
        buffer_chars = buffer_chars or self.stream_chars
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
                yield buf[:cut]
                buf = buf[cut:]
            pending, size = [buf], len(buf)
        buf = "".join(pending)
        if buf:
            yield buf

    def _safe_cut(self, buf: str) -> int:
        """The largest i found (0 if none) such that, for every continuation `rest`,
        encode(buf[:i] + rest) == encode(buf[:i]) + encode(rest).

        Special tokens: a match starting at least `max_special_len` characters before the end is
        final (no continuation can change it), so the end of the last such match is a cut; a
        plain-text cut (see `SAFE_CUT`) must lie before any match that is not yet final.
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
        m = SAFE_CUT.search(buf, cut, limit)
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

    def _add_words(self, lists: list[list[str]]) -> None:
        """Cache the new words of `lists` (see `_words_value`): middle words in one regex pass.

        In " w1 w2 ..." where every w ends in a non-space, the cut before each space is safe, and
        each " " + w starts with the only pre-token of its own that begins with a space: that mark
        splits the pre-tokens back into words.
        """
        ends = self._end_cache
        new_ends = list(ends.missing(words[-1] for words in lists))
        if new_ends:  # each on its own (a word ending in whitespace is not safe before a space)
            spans = list(map(_pretokens, [" " + w for w in new_ends]))
            values = self._piece_values(list(chain.from_iterable(spans)))
            stops = list(accumulate(map(len, spans)))
            ends.add({w: b"".join(values[b - len(p):b]) for w, p, b in zip(new_ends, spans, stops)})
        table = self._word_cache
        new = table.missing(chain.from_iterable(islice(words, 1, len(words) - 1) for words in lists))
        fresh = list(new)
        joined = " ".join(fresh) + " "
        if "" in new or _WS_SPACE.search(joined):  # rare: some word ends in whitespace (or is empty)
            fresh = [w for w in fresh if w and not w[-1].isspace()]
            table.add(dict.fromkeys(new.difference(fresh)))  # not safe before a space: remember that
        if joined.isascii():
            groups = [fresh]
        else:  # ASCII words apart, so that they go through the faster ASCII pattern
            groups = [[w for w in fresh if w.isascii()], [w for w in fresh if not w.isascii()]]
        for group in groups:
            if group:
                table.add(self._words_values(group))

    def _words_values(self, words: list[str]) -> dict[str, bytes]:
        """{w: packed ids of " " + w} for words that end in a non-space, with one regex pass."""
        pieces = _pretokens(" " + " ".join(words))
        values = self._piece_values(pieces)
        starts = list(compress(range(len(pieces)), map(str.startswith, pieces, repeat(" "))))
        if len(starts) != len(words):  # pragma: no cover - cannot happen; stay correct regardless
            return {w: b"".join(self._piece_values(" " + w)) for w in words}
        stops = starts[1:] + [len(pieces)]
        # most words are one pre-token (" the"): reuse its value instead of joining a slice
        return {w: values[a] if b - a == 1 else b"".join(values[a:b]) for w, a, b in zip(words, starts, stops)}

    def _piece_values(self, text_or_pieces: str | list[str]) -> list[bytes]:
        """The cached packed ids of every pre-token, merging new ones once."""
        pieces = _pretokens(text_or_pieces) if isinstance(text_or_pieces, str) else text_or_pieces
        table = self._cache
        cache = table.d
        try:
            return list(map(cache.__getitem__, pieces))  # all in C when every pre-token is cached
        except KeyError:
            pass
        fmt = "<%d" + self._dtype.char  # "H" (uint16) or "I" (uint32)
        bpe = self._bpe
        table.add({p: struct.pack(fmt % len(ids), *ids) for p in table.missing(pieces) for ids in (bpe(p),)})
        return list(map(cache.__getitem__, pieces))

    def _encode_pieces(self, text: str) -> bytes:
        """Packed ids of a text holding no special tokens, pre-token by pre-token (no word cache)."""
        return b"".join(self._piece_values(text))

    def bpe_bytes(self, data: bytes) -> tuple[int, ...]:
        """Ids of `data` taken as one pre-token: its bytes merged in rank order (no pattern, no specials).

        >>> Tokenizer({i: bytes([i]) for i in range(256)} | {256: b"ab"}, [(b"a", b"b")]).bpe_bytes(b"abc")
        (256, 99)
        """
        ids = list(map(self._byte_id.__getitem__, data))
        if None in ids:
            missing = next(b for b in data if self._byte_id[b] is None)
            raise UserError(f"cannot encode byte 0x{missing:02x}: the vocab has no token for it",
                            "use a byte-level vocab (all 256 bytes)")
        if not self._heap_ok:
            return tuple(self._bpe_merge_all(ids))
        return tuple(self._bpe_heap(ids)) if len(ids) > _LONG_PIECE else self._bpe_ordered(ids)

    def _bpe(self, piece: str) -> tuple[int, ...]:
        """Apply merges in rank order to the bytes of one pre-token."""
        return self.bpe_bytes(piece.encode("utf-8"))

    def _bpe_merge_all(self, ids: list[int]) -> list[int]:
        """GPT-2's loop, the reference: find the lowest-rank pair present, merge every occurrence
        of it left to right, repeat until no pair has a merge."""
        merge_get = self._merge.get
        while len(ids) > 1:
            # values are (rank, new id, left, right), so min() finds the lowest rank
            rank, new_id, a, b = min(map(merge_get, zip(ids, ids[1:]), repeat(_NO_MERGE)))
            if new_id < 0:
                break
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
        return ids

    def _bpe_ordered(self, ids: list[int]) -> tuple[int, ...]:
        """Same result as `_bpe_merge_all` when merges are in training order (`_merges_ordered`),
        about 1.5x faster on short pieces: keep the rank of every adjacent pair, merge the leftmost
        lowest-rank pair, and update only the two ranks beside it.

        A merge can only create pairs of higher rank than its own (they use the new token, which
        exists only from its rank on), so the remaining occurrences of the same pair are merged
        next, left to right: GPT-2's merge-every-occurrence order.
        """
        rank_get, made = self._rank.get, self._made
        ranks = list(map(rank_get, zip(ids, ids[1:]), repeat(_NO_RANK)))
        while ranks:
            r = min(ranks)
            if r == _NO_RANK:
                break
            i = ranks.index(r)
            new_id = made[r]
            ids[i : i + 2] = (new_id,)
            del ranks[i]
            if i:
                ranks[i - 1] = rank_get((ids[i - 1], new_id), _NO_RANK)
            if i < len(ranks):
                ranks[i] = rank_get((new_id, ids[i + 1]), _NO_RANK)
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
            raise UserError(f"cannot decode token id {bad!r}: "
                            f"not in the vocab (ids are 0..{self.vocab_size - 1})") from None

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; byte sequences that are not valid UTF-8 become U+FFFD.

        >>> Tokenizer({i: bytes([i]) for i in range(256)}, []).decode([104, 105, 0xff])
        'hi\\ufffd'
        """
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


class _Cache:
    """A memo table bounded in entries and in key characters: when an insertion would exceed either
    bound it starts over empty (cheap, and the common keys come back at once). `d` is a plain dict
    (set.difference and map over an exact dict run in C)."""

    def __init__(self, max_items: int, max_chars: int = 1 << 24):
        self.d: dict = {}
        self.max_items, self.max_chars, self.chars = max(0, int(max_items)), max_chars, 0

    def __len__(self) -> int:
        return len(self.d)

    def missing(self, keys) -> set:
        """The keys to compute and `add`: those not cached, or all of them after starting over
        (when adding the missing ones would break a bound)."""
        keys = set(keys)
        new = keys.difference(self.d)
        chars = sum(map(len, new))
        if len(self.d) + len(new) > self.max_items or self.chars + chars > self.max_chars:
            self.d.clear()
            self.chars = 0
            return keys
        return new

    def add(self, items: dict) -> None:
        self.d.update(items)  # may exceed the bounds by this one batch, which the caller holds anyway
        self.chars += sum(map(len, items))


def _pretokens(text: str) -> list[str]:
    """GPT-2 pre-tokens of `text` (the ASCII pattern when it applies)."""
    return (ASCII_PATTERN if text.isascii() else GPT2_PATTERN).findall(text)


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32; always little-endian.

    >>> token_dtype(50257), token_dtype(100_000)
    (dtype('uint16'), dtype('uint32'))
    """
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def _merges_ordered(left: list[int], right: list[int], made: list[int], size: int) -> bool:
    """True when every merge that makes a token ranks before every merge that uses it (training order).

    Then merging can never create a pair of lower rank than the merge just applied, which makes the
    heap order in `_bpe_heap` identical to GPT-2's rescan-after-every-merge order.
    """
    n = len(made)
    if n == 0:
        return True
    ranks = np.arange(n)
    first_use = np.full(size, n, dtype=np.int64)  # lowest rank of a merge using each id as a part
    np.minimum.at(first_use, np.asarray(left), ranks)
    np.minimum.at(first_use, np.asarray(right), ranks)
    return bool(np.all(ranks < first_use[np.asarray(made)]))


def _hashable_int(x) -> bool:
    try:
        hash(x)
    except TypeError:
        return False
    return True


def check_recorded_hashes(directory: Path) -> None:
    """A tokenizer_config.json that records the sha256 of vocab.json and merges.txt (as `tslm bpe` writes
    it) must match them: otherwise the files come from different tokenizers or one is damaged. A
    directory without a config (GPT-2's downloaded files) has nothing recorded to check."""
    path = directory / "tokenizer_config.json"
    if not path.is_file():
        return
    cfg = read_json(path, "tokenizer config", "re-create the tokenizer with `tslm bpe`")
    files = cfg.get("files") if isinstance(cfg, dict) else None
    if files is None:
        return
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise UserError(f"malformed tokenizer config {path}: \"files\" must map file names to sha256 strings")
    for name in ("vocab.json", "merges.txt"):
        want = files.get(name)
        if want is not None and (directory / name).is_file() and sha256_file(directory / name) != want:
            raise UserError(f"tokenizer directory {directory} is inconsistent: {name} is not the file its "
                            "tokenizer_config.json was written with (mixed or damaged files)",
                            "re-create the tokenizer with `tslm bpe`, or copy the whole directory again")


def _config_special_tokens(path: Path) -> list[str] | None:
    """The "special_tokens" list of a tokenizer_config.json, or None when the file is absent."""
    if not path.is_file():
        return None
    cfg = read_json(path, "tokenizer config", "re-create it with `tslm bpe`")
    specials = cfg.get("special_tokens") if isinstance(cfg, dict) else None
    if specials is None:
        return None
    if not isinstance(specials, list) or not all(isinstance(s, str) and s for s in specials):
        raise UserError(f"malformed tokenizer config {path}: \"special_tokens\" must be a list of non-empty strings")
    return specials
