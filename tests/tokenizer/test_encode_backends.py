"""Encoding backends (tokenizer/backends.py): tiktoken gives exactly the from-scratch encoder's ids
whenever `auto` would pick it, on GPT-2's files, on tokenizers trained by `tslm bpe`, on
hypothesis-generated text and on the tokenizer tests' edge cases; otherwise it is refused."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tinystories_cli.tokenizer import backends
from tinystories_cli.tokenizer import encode as enc
from tinystories_cli.tokenizer.bpe import train_bpe
from tinystories_cli.tokenizer.files import write_vocab_merges
from tinystories_cli.tokenizer.tokenizer import Tokenizer

from train_fixtures import SHARED_DATA, TEXT, TRICKY

pytest.importorskip("tiktoken", reason="SKIPPED LOUDLY: tiktoken (dev dependency) is not installed")

EOT = "<|endoftext|>"
PAD = "<|pad|>"
CHARS = list("abcdeé th'sl0129 .,!?\n\t\r日本🙂") + ["  ", "'ll", "\u00a0", "\u3000", EOT, PAD, "<|", "|>"]
TEXTS = st.lists(st.sampled_from(CHARS), max_size=60).map("".join) | st.text(max_size=40)


def same_ids(tok: Tokenizer, text: str) -> None:
    fast = backends.PackedEncoder(tok, "tiktoken")
    assert fast.backend == "tiktoken"
    assert fast.encode(text) == tok.encode(text), text


# --------------------------------------------------------------------------- GPT-2's files


@pytest.mark.shared_data
def test_gpt2_qualifies_and_matches_on_edge_cases_and_files(gpt2):
    assert backends.tiktoken_unfit(gpt2) is None
    assert backends.resolve_backend(gpt2, "auto") == "tiktoken"
    for text in TRICKY + [TEXT]:
        same_ids(gpt2, text)
    same_ids(gpt2, (SHARED_DATA / "corpus.en").read_text(encoding="utf-8"))
    same_ids(gpt2, (SHARED_DATA / "tinystories_valid.txt").read_text(encoding="utf-8")[:2_000_000])


@pytest.mark.shared_data
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXTS)
def test_gpt2_hypothesis(gpt2, text):
    same_ids(gpt2, text)


@pytest.mark.shared_data
@pytest.mark.parametrize("workers", [1, 2])
def test_gpt2_encode_file_backends_byte_identical(gpt2, tmp_path, monkeypatch, workers):
    monkeypatch.setattr(enc, "MIN_PARALLEL_BYTES", 0)
    src = SHARED_DATA / "tinystories_valid.txt"
    m_py = enc.encode_file(src, tmp_path / "py.npy", gpt2, workers=workers, backend="python")
    m_tt = enc.encode_file(src, tmp_path / "tt.npy", gpt2, workers=workers, backend="tiktoken")
    assert (m_py["backend"], m_tt["backend"]) == ("python", "tiktoken")
    assert (tmp_path / "py.npy").read_bytes() == (tmp_path / "tt.npy").read_bytes()
    assert {k: v for k, v in m_py.items() if k not in ("backend", "seconds")} == \
           {k: v for k, v in m_tt.items() if k not in ("backend", "seconds")}


# --------------------------------------------------------------------------- tokenizers trained by tslm bpe


def _corpus() -> str:
    rng = random.Random(0)
    words = [
        "the",
        "cat",
        "dog",
        "ran",
        "Lily",
        "Tom's",
        "they'll",
        "café",
        "日本語",
        "🙂",
        "1234",
        "3.14",
        "!!",
        "...",
    ]
    parts = []
    for _ in range(1500):
        parts.append(" ".join(rng.choice(words) for _ in range(rng.randint(1, 12))))
        parts.append(rng.choice([". ", ".\n", "\n\n", "  ", "\t", EOT, EOT + "\n", PAD]))
    return "".join(parts) + TEXT * 3


@pytest.fixture(scope="module", params=[(300, ()), (700, (EOT,)), (1200, (EOT, PAD)), (2000, (PAD, EOT))],
                ids=["300-none", "700-eot", "1200-eot-pad", "2000-pad-eot"])
def trained(request, tmp_path_factory) -> Tokenizer:
    vocab_size, specials = request.param
    src = tmp_path_factory.mktemp("bpe") / "corpus.txt"
    src.write_text(_corpus(), encoding="utf-8")
    vocab, merges = train_bpe(src, vocab_size, list(specials), workers=1)
    return Tokenizer(vocab, merges, list(specials))


def test_trained_tokenizers_qualify_and_match_on_edge_cases(trained):
    assert backends.tiktoken_unfit(trained) is None
    for text in TRICKY + [TEXT, _corpus()]:
        same_ids(trained, text)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXTS)
def test_trained_tokenizers_hypothesis(trained, text):
    same_ids(trained, text)


def test_encode_file_backends_byte_identical_on_trained(trained, tmp_path, monkeypatch):
    monkeypatch.setattr(enc, "MIN_PARALLEL_BYTES", 0)
    src = tmp_path / "t.txt"
    src.write_text(_corpus() * 4, encoding="utf-8")
    enc.encode_file(src, tmp_path / "py.npy", trained, workers=2, backend="python")
    meta = enc.encode_file(src, tmp_path / "auto.npy", trained, workers=2)
    assert meta["backend"] == "tiktoken"
    assert (tmp_path / "py.npy").read_bytes() == (tmp_path / "auto.npy").read_bytes()


# --------------------------------------------------------------------------- the qualification is sound


@settings(max_examples=300, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 40),
    text=st.lists(st.sampled_from(list("abc ab\n")), max_size=30).map("".join),
)
def test_any_qualifying_merge_list_gives_tiktoken_ids(seed, n, text):
    """Random merge lists in training order (each merge joins two existing tokens): whenever
    `tiktoken_unfit` accepts one, tiktoken's ids equal ours; many are refused, and must be."""
    rng = random.Random(seed)
    vocab = {i: bytes([i]) for i in range(256)}
    pool = [b"a", b"b", b"c", b" ", b"\n"]
    merges = []
    for _ in range(n):
        a, b = rng.choice(pool), rng.choice(pool)
        if a + b in vocab.values():
            continue
        vocab[len(vocab)] = a + b
        merges.append((a, b))
        pool.append(a + b)
    tok = Tokenizer(vocab, merges, [])
    if backends.tiktoken_unfit(tok) is None:
        same_ids(tok, text)
        same_ids(tok, text * 3 + b"".join(pool).decode())


def test_refusals_name_the_reason_and_auto_falls_back(monkeypatch):
    base = {i: bytes([i]) for i in range(256)}
    # " an" is made from " a" + "n" but " " + "an" also spells it: tiktoken would merge that pair
    steal = Tokenizer(base | {256: b"an", 257: b" a", 258: b" an"}, [(b"a", b"n"), (b" ", b"a"), (b" a", b"n")], [])
    assert "does not encode to itself" in backends.tiktoken_unfit(steal)
    assert steal.encode(" an") == [32, 256] and backends.resolve_backend(steal, "auto") == "python"
    with pytest.raises(ValueError, match="does not encode to itself"):
        backends.resolve_backend(steal, "tiktoken")
    extra = Tokenizer(base | {256: b"ab", 257: b"zz"}, [(b"a", b"b")], [])
    assert "no merge makes" in backends.tiktoken_unfit(extra)
    prefix = Tokenizer(base, [], ["<a>", "<a><b>"])
    assert "prefix" in backends.tiktoken_unfit(prefix)
    shared = Tokenizer(base | {256: b"ab"}, [(b"a", b"b")], ["ab"])  # the special token's bytes are a merge's
    assert "also an ordinary token" in backends.tiktoken_unfit(shared)
    unordered = Tokenizer(base | {256: b"abc", 257: b"ab"}, [(b"ab", b"c"), (b"a", b"b")], [])
    assert backends.tiktoken_unfit(unordered) is not None
    with pytest.raises(ValueError, match="unknown backend"):
        backends.resolve_backend(extra, "rust")
    monkeypatch.setattr(backends, "tiktoken_installed", lambda: False)
    ok = Tokenizer(base | {256: b"ab"}, [(b"a", b"b")], [EOT])
    assert backends.resolve_backend(ok, "auto") == "python"
    with pytest.raises(ValueError, match="pip install"):
        backends.resolve_backend(ok, "tiktoken")


# --------------------------------------------------------------------------- CLI


@pytest.fixture
def steal_dir(tmp_path):
    d = tmp_path / "tok"
    d.mkdir()
    base = {i: bytes([i]) for i in range(256)}
    write_vocab_merges(d, base | {256: b"an", 257: b" a", 258: b" an"}, [(b"a", b"n"), (b" ", b"a"), (b" a", b"n")])
    (d / "tokenizer_config.json").write_text(json.dumps({"special_tokens": [EOT]}))
    (tmp_path / "t.txt").write_text("a man and an ant" + EOT)
    return d


def test_cli_backend_choices(run_cli, tmp_path, steal_dir):
    src = tmp_path / "t.txt"
    code, out, err = run_cli("encode", str(src), "--tokenizer", str(steal_dir), "--backend", "tiktoken")
    assert code == 2 and "does not encode to itself" in err and "Traceback" not in err
    assert not (tmp_path / "t.npy").exists()
    code, out, err = run_cli("encode", str(src), "--tokenizer", str(steal_dir), "--backend", "rust")
    assert code == 2 and "--backend must be one of" in err
    code, out, err = run_cli("encode", str(src), "--tokenizer", str(steal_dir), "--json")
    assert code == 0, err
    meta = json.loads(out)
    assert meta["backend"] == "python"
    tok = Tokenizer.from_dir(steal_dir)
    assert np.load(tmp_path / "t.npy").tolist() == tok.encode(src.read_text())


def test_parallel_auto_falls_back_when_the_full_check_fails(tmp_path, monkeypatch):
    """In parallel, auto starts tiktoken on the quick conditions; when the full check (run beside the
    workers) refuses the tokenizer, the file is encoded again by the reference encoder."""
    monkeypatch.setattr(enc, "MIN_PARALLEL_BYTES", 0)
    base = {i: bytes([i]) for i in range(256)}
    steal = Tokenizer(base | {256: b"an", 257: b" a", 258: b" an"}, [(b"a", b"n"), (b" ", b"a"), (b" a", b"n")], [EOT])
    assert backends.tiktoken_unfit(Tokenizer(steal.vocab, steal.merges, [EOT]), quick=True) is None
    src = tmp_path / "t.txt"
    src.write_text(("a man and an ant ran. " * 50 + EOT + "\n") * 100, encoding="utf-8")
    meta = enc.encode_file(src, tmp_path / "t.npy", steal, workers=2, chunks_per_worker=3)
    assert meta["backend"] == "python" and meta["chunks"] > 2
    assert np.load(tmp_path / "t.npy").tolist() == steal.encode(src.read_text(encoding="utf-8"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json", "t.npy", "t.txt"]


@pytest.mark.parametrize("workers", [1, 2])
def test_the_deferred_check_decides_for_explicit_tiktoken_too(tmp_path, monkeypatch, workers):
    """In parallel, backend="tiktoken" also starts on the quick conditions (the costly one runs beside
    the workers; in one process it runs first); when the full check refuses, nothing is written and
    the error names why. A qualifying tokenizer gets tiktoken's output, equal to the reference's."""
    monkeypatch.setattr(enc, "MIN_PARALLEL_BYTES", 0)
    base = {i: bytes([i]) for i in range(256)}
    merges = [(b"a", b"n"), (b" ", b"a"), (b" a", b"n")]
    steal = Tokenizer(base | {256: b"an", 257: b" a", 258: b" an"}, merges, [EOT])
    src = tmp_path / "t.txt"
    src.write_text(("a man and an ant ran. " * 50 + EOT + "\n") * 100, encoding="utf-8")
    with pytest.raises(ValueError, match="does not encode to itself"):
        enc.encode_file(src, tmp_path / "t.npy", steal, workers=workers, chunks_per_worker=3, backend="tiktoken")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.txt"]
    fine = Tokenizer(base | {256: b"an", 257: b" an"}, [(b"a", b"n"), (b" ", b"an")], [EOT])
    meta = enc.encode_file(src, tmp_path / "t.npy", fine, workers=workers, chunks_per_worker=3, backend="tiktoken")
    assert meta["backend"] == "tiktoken" and (meta["chunks"] > 2) == (workers > 1)
    assert np.load(tmp_path / "t.npy").tolist() == fine.encode(src.read_text(encoding="utf-8"))
