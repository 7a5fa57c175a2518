"""Tokenizer: exact parity with tiktoken on GPT-2's files, special tokens, round trips, streaming.

The reference is tiktoken's BPE built offline from the same gpt2_vocab.json / gpt2_merges.txt
(ranks = GPT-2 ids), so no network is needed. Core tests use a small tokenizer trained here.
"""

from __future__ import annotations

import collections
import json
import sys
import tracemalloc
from collections import Counter

import pytest
import regex
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tinystories_cli.errors import UserError
from tinystories_cli.tokenizer import Tokenizer
from tinystories_cli.tokenizer import tokenizer as tokmod
from tinystories_cli.tokenizer.files import write_vocab_merges
from tinystories_cli.tokenizer.pretokenize import GPT2_PATTERN

from train_fixtures import SHARED_DATA, TEXT, TRICKY

EOT = "<|endoftext|>"

# --------------------------------------------------------------------------- a small tokenizer


def train_toy(
    text: str, num_merges: int, special_tokens: list[str]
) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    """Naive reference BPE training (most frequent pair, ties by larger pair), enough for fixtures."""
    words: Counter[bytes] = Counter()
    for seg in regex.split("|".join(map(regex.escape, special_tokens)), text) if special_tokens else [text]:
        words.update(m.group().encode() for m in GPT2_PATTERN.finditer(seg))
    seqs = {w: [bytes([b]) for b in w] for w in words}
    vocab = {i: bytes([i]) for i in range(256)}
    merges: list[tuple[bytes, bytes]] = []
    for _ in range(num_merges):
        counts: Counter[tuple[bytes, bytes]] = Counter()
        for w, c in words.items():
            s = seqs[w]
            for pair in zip(s, s[1:]):
                counts[pair] += c
        if not counts:
            break
        a, b = max(counts, key=lambda p: (counts[p], p))
        merges.append((a, b))
        if a + b not in vocab.values():
            vocab[len(vocab)] = a + b
        for w, s in seqs.items():
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and s[i] == a and s[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[w] = out
    return vocab, merges


@pytest.fixture(scope="module")
def toy() -> Tokenizer:
    vocab, merges = train_toy(TEXT * 3, 120, [EOT])
    return Tokenizer(vocab, merges, [EOT])


# --------------------------------------------------------------------------- GPT-2 + tiktoken


# the gpt2, gpt2_files and tiktoken_gpt2 fixtures: tests/tokenizer/conftest.py


def _ref(enc, text: str) -> list[int]:
    return enc.encode(text, allowed_special="all")


@pytest.mark.shared_data
@pytest.mark.parametrize(
    "name,limit", [("corpus.en", None), ("tinystories_valid.txt", None), ("tinystories_train.txt", 1_000_000)]
)
def test_parity_with_tiktoken_on_files(gpt2, tiktoken_gpt2, name, limit):
    text = (SHARED_DATA / name).read_text(encoding="utf-8")
    if limit is not None:
        text = text[:limit]
    ids = gpt2.encode(text)
    assert ids == _ref(tiktoken_gpt2, text)
    assert gpt2.decode(ids) == text
    assert len(ids) > len(text) / 10  # sanity: a real encoding happened


@pytest.mark.shared_data
@pytest.mark.parametrize("text", TRICKY + [TEXT, " " * 5000, "\n" * 3000 + "x", "7" * 4000], ids=range(len(TRICKY) + 4))
def test_parity_with_tiktoken_edge_cases(gpt2, tiktoken_gpt2, text):
    assert gpt2.encode(text) == _ref(tiktoken_gpt2, text)
    assert gpt2.decode(gpt2.encode(text)) == text


@pytest.mark.shared_data
def test_parity_with_tiktoken_lone_surrogates(gpt2, tiktoken_gpt2):
    text = "a\ud800b \udfff"  # not valid text: both encode the surrogates as U+FFFD
    assert gpt2.encode(text) == _ref(tiktoken_gpt2, text) == gpt2.encode("a\ufffdb \ufffd")


@pytest.mark.shared_data
def test_gpt2_known_ids_and_properties(gpt2):
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.encode(EOT) == [50256]
    assert gpt2.encode("") == []
    assert gpt2.vocab_size == 50257 and gpt2.eot_id == 50256  # the special already in the vocab: not appended
    assert len(gpt2.fingerprint) == 64
    assert Tokenizer(gpt2.vocab, gpt2.merges).eot_id is None


@pytest.mark.shared_data
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.one_of(st.text(max_size=30), st.sampled_from([EOT, " ", "\n", "'s", "  ", "<|", "|>"])), max_size=8
    ).map("".join)
)
def test_gpt2_hypothesis_parity(gpt2, tiktoken_gpt2, text):
    ids = gpt2.encode(text)
    assert ids == _ref(tiktoken_gpt2, text)
    assert gpt2.decode(ids) == text


# --------------------------------------------------------------------------- special tokens


def test_special_tokens_appended_and_longest_match_wins():
    vocab = {i: bytes([i]) for i in range(256)}
    double = EOT + EOT
    tok = Tokenizer(vocab, [], [EOT, double])
    assert tok.vocab[256] == EOT.encode() and tok.vocab[257] == double.encode()
    assert tok.vocab_size == 258
    assert tok.encode(EOT) == [256]
    assert tok.encode(double) == [257]
    assert tok.encode(EOT * 3) == [257, 256]
    assert tok.encode("a" + double + "b" + EOT) == [97, 257, 98, 256]
    assert tok.decode(tok.encode("x" + EOT * 3)) == "x" + EOT * 3
    # the order given sets the ids, not the matching: the longest match still wins
    assert Tokenizer(vocab, [], [double, EOT]).encode(EOT * 3) == [256, 257]


def test_special_token_already_in_vocab_keeps_its_id():
    vocab = {i: bytes([i]) for i in range(256)}
    vocab[256] = b"<s>"
    tok = Tokenizer(vocab, [], ["<s>", "<pad>"])
    assert tok.encode("<s>a<pad>") == [256, 97, 257]
    assert tok.vocab_size == 258


def test_without_special_tokens_the_text_is_plain(toy):
    vocab, merges = toy.vocab, toy.merges
    plain = Tokenizer({i: b for i, b in vocab.items() if b != EOT.encode()}, merges)
    ids = plain.encode(EOT)
    assert len(ids) > 1 and plain.decode(ids) == EOT
    assert plain.eot_id is None


def test_bpe_applies_merges_in_rank_order():
    vocab = {i: bytes([i]) for i in range(256)}
    vocab.update({256: b"bc", 257: b"ab", 258: b"abc"})
    # (b, c) ranks before (a, b): "abc" -> a + bc; no merge (a, bc) exists, so it stays two tokens
    tok = Tokenizer(vocab, [(b"b", b"c"), (b"a", b"b"), (b"ab", b"c")])
    assert tok.encode("abc") == [97, 256]
    assert tok.encode("ab") == [257]
    tok2 = Tokenizer(vocab, [(b"a", b"b"), (b"b", b"c"), (b"ab", b"c")])
    assert tok2.encode("abc") == [258]
    # every occurrence of the best pair merges left to right, non-overlapping
    vocab2 = {i: bytes([i]) for i in range(256)} | {256: b"aa"}
    assert Tokenizer(vocab2, [(b"a", b"a")]).encode("aaaaa") == [256, 256, 97]


def test_long_pieces_heap_path_equals_simple_loop(toy, monkeypatch):
    texts = ["x" * 700, " " * 1000, "9" * 513, "ab" * 400, ("Once upon a time" * 40).replace(" ", ""), "é" * 300]
    fast = [toy._bpe(t) for t in texts]
    monkeypatch.setattr(tokmod, "_LONG_PIECE", 10**9)
    slow = [Tokenizer(toy.vocab, toy.merges, [EOT])._bpe(t) for t in texts]
    assert fast == slow
    assert toy._heap_ok


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.sampled_from(list("Once upon a time, Lily's 2 cats played.\n é") + ["  ", "aa", "ee", "once"]), max_size=40
    ).map("".join)
)
def test_ordered_bpe_equals_gpt2_merge_all_loop(toy, piece):
    ids = list(piece.encode("utf-8"))
    assert toy._bpe_ordered(list(ids)) == tuple(toy._bpe_merge_all(list(ids)))


def test_out_of_order_merges_disable_the_heap():
    vocab = {i: bytes([i]) for i in range(256)} | {256: b"bc", 257: b"abc"}
    tok = Tokenizer(vocab, [(b"a", b"bc"), (b"b", b"c")])  # uses "bc" before making it
    assert not tok._heap_ok
    assert tok.encode("abc" * 100) == [257] * 100


# --------------------------------------------------------------------------- decode and errors


def test_decode_invalid_bytes_become_replacement_char():
    tok = Tokenizer({i: bytes([i]) for i in range(256)}, [])
    assert tok.decode([0xE6, 0x97]) == "\ufffd"
    assert tok.decode([104, 0xFF, 105]) == "h\ufffdi"
    assert tok.decode([]) == ""


@pytest.mark.parametrize("offset", [0, 1, 10**12, -10**12])
def test_decode_unknown_id_names_it(toy, offset):
    bad = toy.vocab_size + offset if offset >= 0 else -1
    with pytest.raises(UserError, match=f"token id {bad}") as e:
        toy.decode([72, bad])
    assert not isinstance(e.value, KeyError)


def test_inconsistent_merges_rejected():
    vocab = {i: bytes([i]) for i in range(256)}
    with pytest.raises(UserError, match="inconsistent"):
        Tokenizer(vocab, [(b"a", b"b")])  # "ab" is not in the vocab


def test_from_files_errors(tmp_path, toy):
    write_vocab_merges(tmp_path, toy.vocab, toy.merges)
    ok = Tokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt", [EOT])
    assert ok.encode(TEXT) == toy.encode(TEXT) and ok.fingerprint == toy.fingerprint
    with pytest.raises(UserError, match="not found"):
        Tokenizer.from_files(tmp_path / "nope.json", tmp_path / "merges.txt")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="malformed"):
        Tokenizer.from_files(tmp_path / "bad.json", tmp_path / "merges.txt")
    (tmp_path / "m2.txt").write_text("#version: 0.2\nq z\n")
    small = {i: b for i, b in toy.vocab.items() if i < 256}
    write_vocab_merges(tmp_path / "small", small, [])
    with pytest.raises(UserError, match="inconsistent"):
        Tokenizer.from_files(tmp_path / "small" / "vocab.json", tmp_path / "m2.txt")


def test_from_dir_reads_config_special_tokens(tmp_path, toy):
    write_vocab_merges(tmp_path, toy.vocab, toy.merges)
    assert Tokenizer.from_dir(tmp_path).special_tokens == [EOT]  # no config: EOT because it is in the vocab
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"special_tokens": ["<|x|>"]}))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.special_tokens == ["<|x|>"] and tok.encode("<|x|>") == [tok.vocab_size - 1]
    (tmp_path / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(UserError, match="malformed tokenizer config"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(UserError, match="tslm bpe"):
        Tokenizer.from_dir(tmp_path / "missing")


def test_fingerprint_changes_with_vocab_merges_and_specials(toy):
    base = toy.fingerprint
    assert Tokenizer(toy.vocab, toy.merges, [EOT]).fingerprint == base
    assert Tokenizer(toy.vocab, toy.merges[:-1], [EOT]).fingerprint != base
    assert Tokenizer(toy.vocab, toy.merges, [EOT, "<|pad|>"]).fingerprint != base
    v = dict(toy.vocab)
    v[len(v)] = b"zzz-new"
    assert Tokenizer(v, toy.merges, [EOT]).fingerprint != base


@pytest.mark.parametrize("size", [0, 5, 50])
def test_caches_are_bounded(toy, size):
    tok = Tokenizer(toy.vocab, toy.merges, [EOT], cache_size=size)
    text = (TEXT + EOT) * 3
    assert tok.encode(text) == toy.encode(text)
    assert tok.encode_packed(text) == toy.encode_packed(text)
    biggest = max(len(set(GPT2_PATTERN.findall(TEXT))), len(set(TEXT.split(" "))))
    for table in (tok._cache, tok._word_cache, tok._end_cache):
        assert len(table) <= size + biggest


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(["a", "b", "é", " ", "  ", "\n", "\t", "'", "'s", "1", ".", "\u00a0", "\u3000", "x y",
                                 "\x1c", "\x85"]), max_size=25).map("".join))
def test_word_fast_path_equals_pretoken_path(toy, text):
    spaces = _whitespace_tokenizer()
    for tok in (Tokenizer(toy.vocab, toy.merges, [EOT]), spaces):
        assert tok.encode_packed(text) == tok._encode_pieces(text)  # the text holds no special token


def test_isspace_covers_every_regex_whitespace():
    # The word path decides "this word ends in whitespace, so a space may not follow it" with
    # str.isspace; that is safe only if isspace is true wherever the GPT-2 pattern's \s matches.
    ws = regex.compile(r"\s")
    assert [c for c in range(sys.maxunicode + 1) if ws.match(chr(c)) and not chr(c).isspace()] == []


def _whitespace_tokenizer() -> Tokenizer:
    """Merges whitespace runs, so that wrongly cutting inside a run changes the ids."""
    vocab = {i: bytes([i]) for i in range(256)} | {256: b"  ", 257: b"\n ", 258: b"   ", 259: b" b", 260: b"\n\n"}
    return Tokenizer(vocab, [(b" ", b" "), (b"\n", b" "), (b"  ", b" "), (b" ", b"b"), (b"\n", b"\n")])


@pytest.mark.parametrize("text", ["a   b", "a\n  b", "a\n\n b", "a \n  b c", "b    b", "x\u3000  b"])
def test_word_fast_path_keeps_whitespace_runs_whole(text):
    tok = _whitespace_tokenizer()
    want = [i for p in GPT2_PATTERN.findall(text) for i in tok._bpe(p)]
    assert tok.encode(text) == want
    assert tok.encode_packed(text) == tok._encode_pieces(text)


# --------------------------------------------------------------------------- round trips


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.one_of(st.text(), st.sampled_from([EOT, EOT + EOT, "<|endoftext", "|>", " ", "\r\n"])), max_size=10
    ).map("".join)
)
def test_roundtrip_hypothesis(toy, text):
    double = Tokenizer(toy.vocab, toy.merges, [EOT, EOT + EOT])
    for tok in (toy, double):
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert all(0 <= i < tok.vocab_size for i in ids)


def test_lone_surrogates_become_replacement_char(toy):
    assert toy.encode("a\ud800b") == toy.encode("a\ufffdb")


def test_roundtrip_fixture_text(toy):
    ids = toy.encode(TEXT)
    assert toy.decode(ids) == TEXT
    assert len(ids) < len(TEXT.encode())  # merges really happened


# --------------------------------------------------------------------------- streaming


def _batches(tok: Tokenizer, chunks, buffer_chars: int) -> list[int]:
    return [i for batch in tok.encode_batches(chunks, buffer_chars=buffer_chars) for i in batch]


@pytest.mark.parametrize("text", TRICKY[1:] + [TEXT], ids=range(len(TRICKY)))
def test_encode_iterable_every_split_position(toy, text):
    """Two chunks split at every position, with a tiny buffer so every possible cut is exercised."""
    tok = Tokenizer(toy.vocab, toy.merges, [EOT, EOT + EOT])
    want = tok.encode(text)
    step = max(1, len(text) // 150)
    for i in range(0, len(text) + 1, step):
        chunks = [text[:i], text[i:]]
        assert _batches(tok, chunks, 1) == want, (text, i)
        assert list(tok.encode_iterable(iter(chunks))) == want


@pytest.mark.parametrize("text", ["a" + EOT + "b c", "don't'll  x\n\ny", "x<|endoftext|><|endoftext|>y z", "é 🙂b'c d"])
def test_encode_iterable_every_pair_of_splits(toy, text):
    tok = Tokenizer(toy.vocab, toy.merges, [EOT, EOT + EOT])
    want = tok.encode(text)
    n = len(text)
    for i in range(n + 1):
        for j in range(i, n + 1):
            assert _batches(tok, [text[:i], text[i:j], text[j:]], 1) == want, (i, j)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    text=st.lists(
        st.one_of(st.text(max_size=20), st.sampled_from([EOT, "'ll", " ", "  ", "\n", "a"])), max_size=12
    ).map("".join),
    cuts=st.lists(st.integers(0, 200), max_size=6),
    buffer_chars=st.sampled_from([1, 2, 7, 64]),
)
def test_encode_iterable_hypothesis(toy, text, cuts, buffer_chars):
    cuts = sorted(c for c in cuts if c <= len(text))
    chunks = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
    assert _batches(toy, chunks, buffer_chars) == toy.encode(text)


@pytest.mark.shared_data
def test_encode_iterable_gpt2_file_lines(gpt2, tiktoken_gpt2):
    path = SHARED_DATA / "tinystories_valid.txt"
    with open(path, encoding="utf-8", newline="") as f:
        ids = list(gpt2.encode_iterable(f))
    assert ids == _ref(tiktoken_gpt2, path.read_text(encoding="utf-8"))


def test_encode_iterable_is_lazy_and_memory_bounded(toy, tmp_path):
    line = "Once upon a time, Lily's 2 cats played. " + EOT + " They're happy!\n"
    reps = 800_000 // len(line)
    path = tmp_path / "big.txt"
    path.write_text(line * reps, encoding="utf-8")
    size = path.stat().st_size
    tok = Tokenizer(toy.vocab, toy.merges, [EOT])
    tok.stream_chars = 1 << 12
    assert size > 100 * tok.stream_chars  # far larger than the streaming buffer
    want = tok.encode(line)
    with open(path, encoding="utf-8") as f:
        gen = tok.encode_iterable(f)
        assert [next(gen) for _ in range(5)] == want[:5]  # lazy: ids come before the file is read through
        tracemalloc.start()
        try:
            last = collections.deque(gen, maxlen=1)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert list(last) == want[-1:]
    assert peak < size / 10, f"peak {peak} bytes while streaming a {size}-byte file"


def test_tokenizer_module_doctests():
    import doctest

    from tinystories_cli.tokenizer import tokenizer as module

    assert doctest.testmod(module).failed == 0
