"""Encoding backends for whole files: the from-scratch encoder, or tiktoken when it gives the same ids.

`Tokenizer` (tokenizer.py) is the reference and the CS336 contract; it is what the `python` backend
runs. The `tiktoken` backend hands the same vocabulary to tiktoken's Rust BPE, which merges by
token rank. That gives identical ids exactly when the tokenizer *qualifies* (`tiktoken_unfit`
returns None):

- pre-tokenization is the GPT-2 pattern (always so for `Tokenizer`);
- the merges are in training order and the id of each merged token grows with its merge rank, so
  rank order (tiktoken) is merge order (ours);
- the ordinary vocabulary is exactly the 256 bytes plus one token per merge, with no two ids sharing
  bytes (tiktoken would also use a token no merge makes);
- every special token has its own id (not an ordinary token's) and none is a prefix of another
  (tiktoken tries special tokens in no fixed order; we take the longest).

`auto` picks tiktoken when it is installed and the tokenizer qualifies, else the from-scratch
encoder. tiktoken is optional (`pip install "tslm[fast]"`). Tests prove the two give the same ids
(tests/tokenizer/test_encode_backends.py).
"""

from __future__ import annotations

import importlib.util
import weakref
from collections.abc import Iterable, Iterator

import numpy as np

from tinystories_cli.tokenizer.pretokenize import GPT2_SPLIT_PATTERN
from tinystories_cli.tokenizer.tokenizer import Tokenizer

BACKENDS = ("auto", "python", "tiktoken")
TIKTOKEN_CHARS = 1 << 20  # text handed to tiktoken per call (cut where cutting cannot change the ids)


def tiktoken_installed() -> bool:
    return importlib.util.find_spec("tiktoken") is not None


_UNFIT: weakref.WeakKeyDictionary[Tokenizer, tuple[str, str | None]] = weakref.WeakKeyDictionary()


def tiktoken_unfit(tokenizer: Tokenizer, quick: bool = False) -> str | None:
    """Why tiktoken would not give this tokenizer's ids, or None when it qualifies (see the module doc).

    Remembered per tokenizer. `quick` skips the one costly condition (every merged token encoding to
    itself: about 0.3 s for GPT-2's 50K merges) unless its answer is already known; `encode_file`
    uses that to start encoding while the full check runs beside it (`PackedEncoder.verify`).
    """
    key = tokenizer.fingerprint
    known = _UNFIT.get(tokenizer)
    if known is not None and known[0] == key:
        return known[1]
    reason = _unfit(tokenizer, quick)
    if not quick or reason is not None:
        _UNFIT[tokenizer] = (key, reason)
    return reason


def _unfit(tokenizer: Tokenizer, quick: bool = False) -> str | None:
    if not tokenizer.merges_in_training_order:
        return "its merges are not in training order"
    specials = tokenizer.special_token_ids
    special_ids = set(specials.values())
    made_bytes = {a + b for a, b in tokenizer.merges}
    for s, i in specials.items():
        if len(tokenizer.vocab[i]) == 1 or tokenizer.vocab[i] in made_bytes:
            return f"special token {s!r} is also an ordinary token"
    token_id: dict[bytes, int] = {}
    for i, b in tokenizer.vocab.items():
        if i in special_ids:
            continue
        if b in token_id:
            return f"ids {token_id[b]} and {i} share the bytes {b!r}"
        token_id[b] = i
    for s, i in specials.items():
        if tokenizer.vocab[i] in token_id:
            return f"special token {s!r} is also an ordinary token"
    if any(bytes([c]) not in token_id for c in range(256)):
        return "its vocab lacks some single bytes"
    made = [token_id.get(a + b, -1) for a, b in tokenizer.merges]
    if any(x >= y for x, y in zip(made, made[1:])) or (made and made[0] < 0):
        return "the ids of merged tokens do not grow with merge rank"
    if len(token_id) != 256 + len(made):
        return "its vocab holds tokens that no merge makes"
    if quick:
        return None
    # Every merged token must encode to itself. Otherwise some state [x, y] with x + y = T and (x, y) not
    # T's merge is reachable, and tiktoken (which merges any pair whose bytes are a token) would take it.
    # Conversely, with the conditions above, a state where the two differ would leave such an [x, y]
    # aligned on T's bytes, and merging T's bytes alone (in the same rank order) would stop at it.
    bpe = tokenizer.bpe_bytes
    for (a, b), t in zip(tokenizer.merges, made):
        if bpe(a + b) != (t,):
            return f"merged token {a + b!r} does not encode to itself"
    ordered = sorted(specials)
    for a, b in zip(ordered, ordered[1:]):  # a prefix sorts right before the strings it starts
        if b.startswith(a):
            return f"special token {a!r} is a prefix of {b!r}"
    return None


def refused(reason: str) -> ValueError:
    """The error for backend "tiktoken" on a tokenizer it would not reproduce."""
    return ValueError(f"tiktoken would not reproduce this tokenizer's ids: {reason} (use backend auto/python)")


def resolve_backend(tokenizer: Tokenizer, backend: str = "auto", quick: bool = False) -> str:
    """"python" or "tiktoken" for `backend` ("auto", "python" or "tiktoken"); ValueError when
    tiktoken is asked for but is not installed or would not give the same ids. With `quick`, the
    answer may be "tiktoken" before the costly condition is checked (see `tiktoken_unfit`): the
    caller then runs `PackedEncoder.verify` before trusting the ids."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if backend == "python":
        return "python"
    if not tiktoken_installed():
        if backend == "tiktoken":
            raise ValueError('the tiktoken backend needs tiktoken: pip install "tslm[fast]" '
                             '(or use backend auto/python)')
        return "python"
    reason = tiktoken_unfit(tokenizer, quick=quick)
    if reason is None:
        return "tiktoken"
    if backend == "tiktoken":
        raise refused(reason)
    return "python"


def build_tiktoken(tokenizer: Tokenizer):
    """A `tiktoken.Encoding` with the tokenizer's vocabulary (ranks = ids), for a qualifying tokenizer."""
    import tiktoken

    specials = tokenizer.special_token_ids
    special_ids = set(specials.values())
    ranks = {b: i for i, b in tokenizer.vocab.items() if i not in special_ids}
    return tiktoken.Encoding(name="tslm", pat_str=GPT2_SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=specials)


class PackedEncoder:
    """Encodes streams of text into packed ids (`tokenizer.dtype` bytes) with one backend.

    Picklable, and builds tiktoken's encoding lazily, so each worker process builds its own.
    """

    def __init__(self, tokenizer: Tokenizer, backend: str = "auto", defer_check: bool = False):
        self.tokenizer = tokenizer
        self.backend = resolve_backend(tokenizer, backend, quick=defer_check)
        self._tiktoken = None

    def verify(self) -> str | None:
        """Why the chosen backend would not give the reference ids, or None (the full check, owed
        after `defer_check`; instant when already known)."""
        return None if self.backend == "python" else tiktoken_unfit(self.tokenizer)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tiktoken": None}

    def prepare(self) -> None:
        """Build what encoding needs (tiktoken's tables) now rather than on first use."""
        if self.backend == "tiktoken" and self._tiktoken is None:
            self._tiktoken = build_tiktoken(self.tokenizer)

    def packed_batches(self, texts: Iterable[str]) -> Iterator[bytes]:
        """Packed ids of the concatenated `texts`, one bytes object per stretch of text."""
        tok = self.tokenizer
        if self.backend == "python":
            yield from tok.encode_packed_batches(texts)
            return
        self.prepare()
        enc, dtype = self._tiktoken, tok.dtype
        if tok.special_tokens:
            allowed = enc.special_tokens_set
            encode = (
                (lambda t: enc.encode_to_numpy(t, allowed_special=allowed, disallowed_special=()))
                if hasattr(enc, "encode_to_numpy")
                else (lambda t: enc.encode(t, allowed_special=allowed, disallowed_special=()))
            )
        else:
            encode = (lambda t: enc.encode_to_numpy(t, disallowed_special=())) \
                if hasattr(enc, "encode_to_numpy") else enc.encode_ordinary
        for piece in tok.safe_pieces(texts, TIKTOKEN_CHARS):
            try:
                ids = encode(piece)
            except UnicodeEncodeError:  # lone surrogates: U+FFFD, as `Tokenizer.encode_packed` does
                ids = encode(piece.encode("utf-16", "surrogatepass").decode("utf-16", "replace"))
            yield np.asarray(ids).astype(dtype, copy=False).tobytes()

    def encode(self, text: str) -> list[int]:
        """Ids of one text (for tests and small inputs)."""
        return np.frombuffer(b"".join(self.packed_batches([text])), dtype=self.tokenizer.dtype).tolist()
