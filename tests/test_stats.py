"""`tslm stats`: streaming corpus counts, document-length histograms, and the CLI."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from tinystories_cli import stats
from tinystories_cli.cli import main

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
EOT = "<|endoftext|>"
DOCS = ["Once upon a time, a cat sat.", "Élodie a vu un chat 🐈 hier.", "The end.\n\nReally the end."]
TEXT = "".join(d + "\n" + EOT + "\n" for d in DOCS)


class ByteEncoder:
    """A stand-in tokenizer: one token per UTF-8 byte, the separator as one special token."""

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece, special in stats_split(text):
            ids.extend([256] if special else piece.encode("utf-8"))
        return ids


def stats_split(text):
    from tinystories_cli.tokenizer.pretokenize import split_special

    return split_special(text, [EOT])


def test_counts_on_fixture():
    s = stats.corpus_stats(io.BytesIO(TEXT.encode()), tokenizer=ByteEncoder())
    assert s.documents == 3 and s.separators == 3 and s.blank == 1  # the final "\n" is not a document
    assert s.file_bytes == len(TEXT.encode())
    assert s.characters == len(TEXT) - 3 * len(EOT)
    assert s.bytes == len(TEXT.encode()) - 3 * len(EOT)
    assert s.bytes > s.characters  # É and the emoji take several bytes
    # Document 2 is "\n" + text + "\n" (separators are flanked by newlines).
    assert s.doc_chars[1] == len(DOCS[1]) + 2 and s.doc_bytes[1] == len(DOCS[1].encode()) + 2
    assert s.doc_words == [len(d.split()) for d in DOCS]
    assert s.tokens == len(ByteEncoder().encode(TEXT)) == s.bytes + 3
    assert s.bytes_per_token == pytest.approx(s.file_bytes / s.tokens)
    summary = s.summary()
    json.dumps(summary)
    assert summary["doc_words"]["max"] == max(len(d.split()) for d in DOCS)


def test_streaming_is_block_size_invariant_and_reads_in_blocks():
    data = (TEXT * 50).encode()
    whole = stats.corpus_stats(io.BytesIO(data), tokenizer=ByteEncoder())

    class Guard(io.BytesIO):
        def read(self, n=-1):
            assert 0 < n <= 5, "stats must read in bounded blocks"
            return super().read(n)

    tiny = stats.corpus_stats(Guard(data), tokenizer=ByteEncoder(), block=5)
    assert tiny.summary() == whole.summary() and tiny.doc_chars == whole.doc_chars


def test_long_document_without_separator_is_cut_in_pieces():
    text = ("a line with é ü 🐈 words\n" * 40) + "no newline at all " * 30
    pieces = list(stats.iter_documents(io.BytesIO(text.encode()), b"<|endoftext|>", block=64, max_piece=100))
    assert len(pieces) > 5 and all(len(p) <= 100 for p, _, _ in pieces)
    assert b"".join(p for p, _, _ in pieces) == text.encode()
    assert [e for _, e, _ in pieces].count(True) == 1
    for p, _, _ in pieces:
        p.decode("utf-8")  # never cut inside a character
    s = stats.corpus_stats(io.BytesIO(text.encode()), max_piece=100, block=64)
    assert s.documents == 1 and s.separators == 0 and s.doc_chars == [len(text)] and s.words == len(text.split())


def test_separator_escapes_and_lines_as_documents():
    assert stats.parse_separator(r"\n") == "\n"
    s = stats.corpus_stats(io.BytesIO(b"one two\nthree\n\nfour\n"), separator="\n")
    assert s.documents == 3 and s.doc_words == [2, 1, 1] and s.blank == 1  # the empty line


def test_histogram_bins_and_overflow():
    edges, counts, overflow = stats.histogram(list(range(1, 101)) + [10_000], bins=10)
    assert edges[0] == 1 and sum(counts) + overflow == 101 and overflow == 1
    assert all(c == 10 for c in counts)
    text = stats.render_histogram_ascii([5, 5, 6, 9], "words", bins=5, width=8)
    assert text.splitlines()[0] == "document length (words), 4 documents"
    assert "######## 2" in text  # the tallest bar is full width


@pytest.fixture
def corpus(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text(TEXT * 20, encoding="utf-8")
    return p


def test_cli_ascii_png_json(corpus, tmp_path, capsys):
    assert main(["stats", str(corpus)]) == 0
    out = capsys.readouterr().out
    assert "documents" in out and "60" in out and "document length (words), 60 documents" in out
    png = tmp_path / "h.png"
    assert main(["stats", str(corpus), "--out", str(png), "--unit", "chars"]) == 0
    assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 5000
    assert "document length (" not in capsys.readouterr().out  # the PNG replaces the terminal histogram
    assert main(["stats", str(corpus), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["documents"] == 60 and data["separators"] == 60 and "tokens" not in data


def test_cli_errors(corpus, tmp_path, capsys):
    cases = [
        (["stats", str(tmp_path / "missing.txt")], "not found"),
        (["stats", str(corpus), "--unit", "tokens"], "needs a tokenizer"),
        (["stats", str(corpus), "--unit", "lines"], "unknown --unit"),
        (["stats", str(corpus), "--separator", ""], "must not be empty"),
        (["stats", str(corpus), "--tokenizer", str(tmp_path / "nodir")], "tokenizer directory not found"),
        (["stats", str(corpus), "--out", str(tmp_path / "h.svg")], "must be a .png"),
    ]
    for argv, msg in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err
    assert main(["stats", str(corpus), "--separator", "@@@"]) == 0
    assert "not found: the whole file is one document" in capsys.readouterr().err


def _train_tiny_tokenizer(tmp_path) -> Path:
    """A 300-token BPE trained on the fixture text, saved as `tslm bpe` saves it."""
    from tinystories_cli.tokenizer.bpe import train_bpe
    from tinystories_cli.tokenizer.files import write_vocab_merges

    src = tmp_path / "train.txt"
    src.write_text(TEXT * 5, encoding="utf-8")
    vocab, merges = train_bpe(src, 300, [EOT], workers=1)
    d = tmp_path / "tok"
    d.mkdir()
    write_vocab_merges(d, vocab, merges)
    return d


def test_cli_with_trained_tokenizer(corpus, tmp_path, capsys):
    from tinystories_cli.tokenizer import Tokenizer

    tok_dir = _train_tiny_tokenizer(tmp_path)
    assert main(["stats", str(corpus), "--tokenizer", str(tok_dir), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    text = corpus.read_text(encoding="utf-8")
    ids = Tokenizer.from_dir(tok_dir).encode(text)
    assert data["tokens"] == len(ids)  # the whole file, separators included, as `tslm encode` counts
    assert data["bytes_per_token"] == pytest.approx(len(text.encode()) / len(ids))
    assert data["doc_tokens"]["count"] == 60
    assert main(["stats", str(corpus), "--tokenizer", str(tok_dir)]) == 0
    out = capsys.readouterr().out
    assert "bytes / token" in out and "document length (tokens), 60 documents" in out


def test_gpt2_tokens_match_whole_file_encoding(shared_data):
    """On real text: streaming per-document counts (also with forced cuts) equal encoding the file at once."""
    from tinystories_cli.tokenizer import Tokenizer

    tok = Tokenizer.from_files(shared_data / "gpt2_vocab.json", shared_data / "gpt2_merges.txt", [EOT])
    data = (shared_data / "tinystories_valid.txt").read_bytes()[:200_000]
    expected = len(tok.encode(data.decode("utf-8", errors="replace")))
    s = stats.corpus_stats(io.BytesIO(data), tokenizer=tok)
    assert s.tokens == expected
    # Pieces far shorter than a story: every document is cut several times, before a space.
    cut = stats.corpus_stats(io.BytesIO(data), tokenizer=tok, block=4096, max_piece=300)
    assert cut.tokens == expected and cut.doc_words == s.doc_words and cut.doc_chars == s.doc_chars
