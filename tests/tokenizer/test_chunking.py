"""tokenizer/chunking.py: the one home of safe cuts, the file splitters and the multiprocessing context."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinystories_cli.tokenizer import bpe, chunking, encode, pretokenize, tokenizer
from tinystories_cli.tokenizer.pretokenize import GPT2_PATTERN

PACKAGE = Path(tokenizer.__file__).resolve().parent
EOT = "<|endoftext|>"
ALPHABET = st.sampled_from(list("ab c'\n\t1.,!é日🙂") + ["  ", "'ll", "\r\n", " \n", EOT])


def pretokens(text: str) -> list[str]:
    return GPT2_PATTERN.findall(text)


def test_old_homes_re_export_the_same_objects():
    assert pretokenize.find_chunk_boundaries is chunking.find_chunk_boundaries
    assert bpe.chunk_boundaries is chunking.chunk_boundaries
    assert encode.split_points is chunking.split_points
    assert tokenizer.SAFE_CUT is chunking.SAFE_CUT


def test_one_multiprocessing_context_and_no_private_cross_imports():
    """`mp_context` is defined once; no tokenizer module defines its own or imports another's private names."""
    defined, private_imports = [], []
    for path in sorted(PACKAGE.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and "mp_context" in node.name:
                defined.append(f"{path.name}:{node.name}")
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tinystories_cli"):
                private_imports += [
                    f"{path.name}: {a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")
                ]
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "get_context":
                defined.append(f"{path.name}:get_context")
    assert defined == ["chunking.py:mp_context", "chunking.py:get_context"]
    assert private_imports == []
    assert chunking.mp_context().get_start_method() in ("fork", "spawn")


@settings(max_examples=200, deadline=None)
@given(st.lists(ALPHABET, max_size=30).map("".join))
def test_every_safe_cut_keeps_the_pretokens(text):
    """Cutting plain text at any SAFE_CUT match gives the same pre-tokens as the whole text."""
    text = text.replace(EOT, "<")  # plain text: specials are the tokenizer's business
    whole = pretokens(text)
    for m in chunking.SAFE_CUT.finditer(text, overlapped=True):
        cut = m.start() + 1
        assert pretokens(text[:cut]) + pretokens(text[cut:]) == whole, (text, cut)


@settings(max_examples=200, deadline=None)
@given(st.lists(ALPHABET, max_size=40).map("".join))
def test_every_cutter_cut_keeps_the_pretokens(text):
    """Every offset `Cutter.is_safe` accepts splits the text (between specials) into the same pre-tokens."""
    data = text.encode()
    cutter = chunking.Cutter([EOT])

    def count(b: bytes) -> list[str]:
        return [p for seg in b.decode().split(EOT) for p in pretokens(seg)]

    whole = count(data)
    for p in range(1, len(data)):
        if cutter.is_safe(data + b"\0" * cutter.lookahead, p) and p < len(data):
            assert count(data[:p]) + count(data[p:]) == whole, (text, p)


@pytest.mark.parametrize("chunks", [1, 2, 7, 50])
def test_split_points_land_on_encode_cuts(tmp_path, chunks):
    src = tmp_path / "t.txt"
    src.write_bytes(("word, other\nmore text 日本 " * 500).encode())
    points = chunking.split_points(src, chunks, probe=8)
    data = src.read_bytes()
    assert points[0] == 0 and points[-1] == len(data) and points == sorted(set(points))
    assert len(points) - 1 <= chunks and (chunks == 1 or len(points) > 2)
    for p in points[1:-1]:
        assert chunking.ENCODE_CUT.match(data, p - 1), p
    assert chunking.byte_ranges(points) == list(zip(points[:-1], points[1:]))


def test_encode_cuts_safe_rejects_specials_with_spaces():
    assert chunking.encode_cuts_safe([EOT, "<pad>"])
    assert not chunking.encode_cuts_safe(["<end of text>"])
    assert not chunking.encode_cuts_safe(["a\nb"])
