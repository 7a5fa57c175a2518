"""The BPE trainer: exact against a naive trainer, parallel = serial, files round-trip, CLI errors."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest
import regex
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tinystories_cli.errors import UserError
from tinystories_cli.tokenizer import bpe, train_bpe
from tinystories_cli.tokenizer.files import read_vocab_merges

PATTERN = regex.compile(r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
EOT = "<|endoftext|>"


# ---------------------------------------------------------------------------------------------
# a tiny naive trainer: recount every pair after every merge


def naive_pretokens(text: str, special_tokens: list[str]) -> Counter:
    pieces = [text]
    if special_tokens:
        alt = "|".join(regex.escape(t) for t in sorted(special_tokens, key=len, reverse=True))
        pieces = regex.split(alt, text)
    return Counter(m.encode("utf-8") for piece in pieces for m in PATTERN.findall(piece))


naive_merges = bpe.naive_bpe_merges  # the readable reference, kept in the package


def naive_train(text: str, vocab_size: int, special_tokens: list[str]):
    merges = naive_merges(naive_pretokens(text, special_tokens), vocab_size - 256 - len(special_tokens))
    vocab = [t.encode() for t in special_tokens] + [bytes([b]) for b in range(256)] + [a + b for a, b in merges]
    return dict(enumerate(vocab)), merges


# ---------------------------------------------------------------------------------------------
# the merge loop


def test_sennrich_worked_example():
    corpus = "low low low low low lower lower widest widest widest newest newest newest newest newest newest"
    counts = Counter(w.encode() for w in corpus.split())
    merges = bpe.bpe_merges(counts, 12)
    got = [f"{a.decode()} {b.decode()}" for a, b in merges]
    assert got == ["s t", "e st", "o w", "l ow", "w est", "n e", "ne west", "w i", "wi d", "wid est", "low e", "lowe r"]


def test_tie_break_prefers_greater_pair_including_prefixes():
    # (b"a", b"b") vs (b"a", b"bc")-like ties: one token a proper prefix of another.
    counts = {b"ab": 3, b"ba": 3, b"zz": 3}
    assert bpe.bpe_merges(counts, 3) == naive_merges(counts, 3) == [(b"z", b"z"), (b"b", b"a"), (b"a", b"b")]
    counts = {b"xab": 2, b"xa": 2, b"abab": 1}
    assert bpe.bpe_merges(counts, 10) == naive_merges(counts, 10)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.binary(min_size=1, max_size=10).map(lambda b: bytes(x % 4 + 97 for x in b)),
                       st.integers(1, 6), max_size=12),
       st.integers(0, 30))
def test_merge_loop_matches_naive_on_repetitive_words(counts, num_merges):
    # A 4-letter alphabet makes runs like "aaaa" and "abab" (overlapping pairs) common.
    assert bpe.bpe_merges(counts, num_merges) == naive_merges(counts, num_merges)


def test_merge_loop_memory_follows_distinct_pretokens_not_counts():
    """Scaling every count by 10**6 (a corpus a million times larger, same distinct pre-tokens)
    gives the same merges in the same memory."""
    import random
    import tracemalloc

    rng = random.Random(0)
    counts = {
        bytes(rng.choice(b"abcdefgh ") for _ in range(rng.randint(2, 12))): rng.randint(1, 50) for _ in range(3000)
    }

    def peak(c):
        tracemalloc.start()
        merges = bpe.bpe_merges(c, 300)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return merges, top

    small, p_small = peak(counts)
    big, p_big = peak({w: n * 10**6 for w, n in counts.items()})
    assert small == big == naive_merges(counts, 300)
    assert p_big < 1.2 * p_small


# ---------------------------------------------------------------------------------------------
# pre-tokenization: chunking and streaming never change the counts

SPECIAL_SETS = [[], [EOT], [EOT, "<|pad|>"], [EOT, EOT + EOT], ["ab", "xab"], ["\n\n", "b a"], ["a", "ab"]]
ALPHABET = "ab xé中1!\n\n\r\t'" + EOT
# Whitespace runs around spaces are where naive splitting goes wrong, so they are over-represented.
RUNS = ["  ", " \n", "\n ", "\xa0 ", "\u3000", " \t ", EOT + " ", " " + EOT, "  \nxab", "\n\n<|pad|>"]


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(list(ALPHABET) + RUNS + [EOT, " b a", "'s", "\r\n", "<|pad|>", "xab"]), max_size=80),
       st.sampled_from(SPECIAL_SETS), st.integers(1, 9), st.integers(1, 4))
def test_streamed_chunked_counts_equal_whole_text(tmp_path_factory, parts, specials, block, chunks):
    text = "".join(parts)
    path = tmp_path_factory.mktemp("c") / "t.txt"
    path.write_text(text, encoding="utf-8", newline="")
    bounds = bpe.chunk_boundaries(path, chunks, specials)
    assert bounds[0] == 0 and bounds[-1] == len(text.encode()) and bounds == sorted(set(bounds))
    total: Counter = Counter()
    for s, e in zip(bounds[:-1], bounds[1:]):
        r = bpe.count_chunk(str(path), s, e, specials, block_size=block)
        assert r.bad_offset is None
        total.update({k.encode(): v for k, v in r.counts.items()})
    assert total == naive_pretokens(text, specials)


# ---------------------------------------------------------------------------------------------
# train_bpe end to end against the naive trainer


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(["the", " cat", " sat", "!", "\n", " ", EOT, "<|pad|>", "é", "aa", "'s", "12"]),
                min_size=1, max_size=120),
       st.sampled_from([[EOT], [EOT, "<|pad|>"], []]), st.integers(0, 40), st.sampled_from([1, 2]))
def test_train_bpe_matches_naive(tmp_path_factory, parts, specials, extra, workers):
    text = "".join(parts)
    path = tmp_path_factory.mktemp("t") / "corpus.txt"
    path.write_text(text, encoding="utf-8", newline="")
    vocab_size = 256 + len(specials) + extra
    vocab, merges = train_bpe(path, vocab_size, specials, workers=workers)
    want_vocab, want_merges = naive_train(text, vocab_size, specials)
    assert merges == want_merges
    assert vocab == want_vocab
    assert len(vocab) <= vocab_size


def _story_corpus(n: int = 300) -> str:
    words = ["Once", " upon", " a", " time", ",", " there", " was", " a", " little", " cat", ".", " The", " cat",
             " liked", " to", " play", "!", "\n", " \n", "  ", " 42", " don't", " café"]
    out, x = [], 7
    for i in range(n):
        x = (x * 1103515245 + 12345) % (1 << 31)
        out.append(words[x % len(words)])
        if i % 25 == 24:
            out.append(EOT)
    return "".join(out)


def test_workers_agree_and_specials_never_merged(tmp_path):
    text = _story_corpus() * 4
    path = tmp_path / "stories.txt"
    path.write_text(text, encoding="utf-8")
    one = train_bpe(path, 400, [EOT], workers=1)
    two = train_bpe(path, 400, [EOT], workers=2)
    three = train_bpe(path, 400, [EOT], workers=3)
    assert one == two == three
    vocab, merges = one
    assert vocab[0] == EOT.encode() and vocab[1] == b"\x00" and vocab[256] == b"\xff"
    assert one == naive_train(text, 400, [EOT])
    for i, tok in vocab.items():
        if i >= 257:
            assert b"<|" not in tok and b"|>" not in tok, tok  # frequent, yet never merged across a special


def test_vocab_size_caps_and_early_stop(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("ab ab ab", encoding="utf-8")
    vocab, merges = train_bpe(path, 1000, [], workers=1)
    assert merges == [(b"a", b"b"), (b" ", b"ab")]  # pairs run out before 1000
    assert len(vocab) == 258
    vocab, merges = train_bpe(path, 256, [], workers=1)
    assert merges == [] and len(vocab) == 256


def test_round_trip_through_files(tmp_path):
    path = tmp_path / "stories.txt"
    path.write_text(_story_corpus(), encoding="utf-8")
    specials = [EOT, "<|pad|>"]
    vocab, merges = train_bpe(path, 330, specials, workers=1)
    fp = bpe.training_fingerprint(330, specials, "0" * 64)
    out = bpe.save_tokenizer(tmp_path / "tok", vocab, merges, fp)
    assert sorted(p.name for p in out.iterdir()) == ["merges.txt", "tokenizer_config.json", "vocab.json"]
    v2, m2 = read_vocab_merges(out / "vocab.json", out / "merges.txt")
    assert v2 == vocab and m2 == merges
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["special_tokens"] == specials and cfg["special_token_ids"] == {EOT: 0, "<|pad|>": 1}
    assert cfg["vocab_size"] == len(vocab) and cfg["pattern"] == bpe.GPT2_SPLIT_PATTERN
    # saving again into the existing directory also leaves a complete tokenizer
    bpe.save_tokenizer(out, vocab, merges, fp)
    assert read_vocab_merges(out / "vocab.json", out / "merges.txt") == (vocab, merges)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_invalid_utf8_names_the_offset(tmp_path):
    path = tmp_path / "bad.txt"
    good = ("hello world\n" * 50).encode()
    path.write_bytes(good + b"caf\xe9 x\n" + good)
    offset = len(good) + 3
    for workers in (1, 2):
        with pytest.raises(UserError, match=f"byte offset {offset}"):
            train_bpe(path, 300, [EOT], workers=workers)
    counts = bpe.count_pretokens(path, [EOT], workers=2, errors="replace")
    assert counts["\N{REPLACEMENT CHARACTER}".encode()] == 1 and counts[b"caf"] == 1 and counts[b"hello"] == 100


@pytest.mark.parametrize("specials,vocab_size,match", [
    ([EOT, EOT], 300, "duplicate special token"),
    ([""], 300, "empty special token"),
    ([EOT], 256, "smaller than 256"),
])
def test_library_rejects_bad_arguments(tmp_path, specials, vocab_size, match):
    path = tmp_path / "x.txt"
    path.write_text("hello", encoding="utf-8")
    with pytest.raises(UserError, match=match):
        train_bpe(path, vocab_size, specials)


# ---------------------------------------------------------------------------------------------
# shared data (real text)


@pytest.mark.shared_data
def test_corpus_en_parallel_counts_and_first_merges(shared_data):
    path = shared_data / "corpus.en"
    text = path.read_text(encoding="utf-8")
    counts = bpe.count_pretokens(path, [EOT], workers=2)
    assert counts == naive_pretokens(text, [EOT]) == bpe.count_pretokens(path, [EOT], workers=1)
    vocab, merges = train_bpe(path, 500, [EOT], workers=2)
    assert len(vocab) == 500 and merges == bpe.bpe_merges(counts, 500 - 257)
    assert merges[:6] == naive_merges(counts, 6)


# ---------------------------------------------------------------------------------------------
# CLI


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "stories.txt"
    path.write_text(_story_corpus(), encoding="utf-8")
    return path


def test_cli_trains_and_writes_a_tokenizer(run_cli, corpus, tmp_path):
    out = tmp_path / "tok"
    code, stdout, _ = run_cli("bpe", str(corpus), "--vocab-size", "300", "--out", str(out), "--workers", "2", "--json")
    assert code == 0
    summary = json.loads(stdout)
    assert summary["vocab_size"] == 300 and summary["num_merges"] == 43 and summary["peak_rss_bytes"] > 0
    vocab, merges = read_vocab_merges(out / "vocab.json", out / "merges.txt")
    assert (vocab, merges) == train_bpe(corpus, 300, [EOT], workers=1)
    # same tokenizer again: fine; a different one: refused without --force, nothing touched
    assert run_cli("bpe", str(corpus), "--vocab-size", "300", "--out", str(out))[0] == 0
    before = (out / "merges.txt").read_bytes()
    code, _, err = run_cli("bpe", str(corpus), "--vocab-size", "310", "--out", str(out))
    assert code == 2 and "different tokenizer" in err and "--force" in err
    assert (out / "merges.txt").read_bytes() == before
    assert run_cli("bpe", str(corpus), "--vocab-size", "310", "--out", str(out), "--force")[0] == 0
    assert len(read_vocab_merges(out / "vocab.json", out / "merges.txt")[1]) == 53


def test_cli_default_output_dirs(run_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data" / "tinystories"
    data.mkdir(parents=True)
    (data / "train.txt").write_text(_story_corpus(), encoding="utf-8")
    code, _, _ = run_cli("bpe", "--vocab-size", "280", "--workers", "1")
    assert code == 0 and (data / "tokenizer" / "tokenizer_config.json").is_file()
    other = tmp_path / "notes.txt"
    other.write_text(_story_corpus(), encoding="utf-8")
    code, _, _ = run_cli("bpe", str(other), "--vocab-size", "280", "--workers", "1")
    assert code == 0 and (tmp_path / "notes_tokenizer" / "merges.txt").is_file()


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"hello\ncaf\xe9\n")
    ok = tmp_path / "ok.txt"
    ok.write_text("hello world\n", encoding="utf-8")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "vocab.json").write_text("{}", encoding="utf-8")
    return {
        "missing": ([str(tmp_path / "nope.txt")], "not found"),
        "empty": ([str(empty)], "is empty"),
        "directory": ([str(tmp_path)], "is a directory"),
        "small vocab": ([str(ok), "--vocab-size", "256"], "smaller than 256"),
        "empty special": ([str(ok), "--special-token", ""], "empty special token"),
        "duplicate special": ([str(ok), "--special-token", "<a>", "--special-token", "<a>"], "duplicate special token"),
        "invalid utf-8": ([str(bad)], "byte offset 9"),
        "foreign out dir": ([str(ok), "--out", str(foreign)], "already holds tokenizer files"),
        "bad errors mode": ([str(ok), "--errors", "ignore"], "--errors"),
        "bad workers": ([str(ok), "--workers", "0"], "--workers"),
    }


def test_cli_bad_inputs_exit_2_and_write_nothing(run_cli, tmp_path):
    cases = _bad_inputs(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for name, (args, match) in cases.items():
        out = ["--out", str(tmp_path / "out")] if "--out" not in args else []
        code, _, err = run_cli("bpe", *args, "--vocab-size", "300", *out) if "--vocab-size" not in args \
            else run_cli("bpe", *args, *out)
        assert code == 2, name
        assert match in err, (name, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, name
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written


def test_cli_errors_replace_opts_in(run_cli, tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"hello\ncaf\xe9\n" * 10)
    code, _, _ = run_cli("bpe", str(bad), "--vocab-size", "270", "--errors", "replace", "--out", str(tmp_path / "t"))
    assert code == 0
    vocab, merges = read_vocab_merges(tmp_path / "t" / "vocab.json", tmp_path / "t" / "merges.txt")
    assert (b"\xef\xbf", b"\xbd") in merges  # U+FFFD was counted (10 times) and merged


# ----------------------------------------------------------------------------------------------
# the output directory is replaced as a whole


def _save_worker(out: str, seed: int, rounds: int) -> None:
    """Save `rounds` different tokenizers into `out` (runs in its own process)."""
    import random as _random

    rng = _random.Random(seed)
    for _ in range(rounds):
        merges = [(b"a", b"b")] + [(b"ab", bytes([c])) for c in rng.sample(range(97, 123), 8)]
        vocab = bpe.build_vocab(["<|endoftext|>"], merges)
        fp = bpe.training_fingerprint(len(vocab), ["<|endoftext|>"], f"{seed:064x}")
        bpe.save_tokenizer(out, vocab, merges, fp)


def _consistent(out: Path) -> bool:
    """Read the three files through one directory handle: the config's hashes must match the files."""
    import hashlib

    fd = os.open(out, os.O_RDONLY)
    try:
        def read(name: str) -> bytes:
            f = os.open(name, os.O_RDONLY, dir_fd=fd)
            with os.fdopen(f, "rb") as fh:
                return fh.read()

        cfg = json.loads(read(bpe.CONFIG_NAME))
        return all(hashlib.sha256(read(n)).hexdigest() == h for n, h in cfg["files"].items())
    finally:
        os.close(fd)


def test_save_replaces_the_whole_directory_and_leaves_no_temp(tmp_path):
    out = tmp_path / "tok"
    _save_worker(str(out), 1, 1)
    first = (out / "merges.txt").read_text()
    _save_worker(str(out), 2, 1)
    assert (out / "merges.txt").read_text() != first and _consistent(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]
    assert sorted(p.name for p in out.iterdir()) == sorted(bpe.TOKENIZER_FILES)


def test_concurrent_saves_never_interleave(tmp_path):
    import multiprocessing

    out = tmp_path / "tok"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_save_worker, args=(str(out), seed, 25)) for seed in (1, 2)]
    for p in procs:
        p.start()
    checks = 0
    while any(p.is_alive() for p in procs):
        if (out / bpe.CONFIG_NAME).exists():
            try:
                assert _consistent(out)
                checks += 1
            except FileNotFoundError:  # the directory we hold was just replaced and is being removed
                pass
    for p in procs:
        p.join()
        assert p.exitcode == 0
    assert checks > 0 and _consistent(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]


def test_directory_with_other_files_is_refused(tmp_path, run_cli, corpus):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    code, _, err = run_cli("bpe", str(corpus), "--vocab-size", "300", "--out", str(out), "--force")
    assert code == 2 and "notes.txt" in err and "another --out" in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_save_without_atomic_exchange_moves_the_old_one_aside(tmp_path, monkeypatch):
    """Where renameat2 is missing, the old directory is moved aside, the new one renamed in, the old removed."""
    monkeypatch.setattr(bpe, "exchange_dirs", lambda a, b: False)
    out = tmp_path / "tok"
    _save_worker(str(out), 1, 1)
    _save_worker(str(out), 2, 1)
    assert _consistent(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]


def test_bpe_doctests():
    """The worked examples in the merge loop's docstrings (MergeState, PairCounts, the naive reference)."""
    import doctest

    assert doctest.testmod(bpe).failed == 0
