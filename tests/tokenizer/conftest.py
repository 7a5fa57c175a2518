"""Fixtures of the tokenizer tests: GPT-2's tokenizer from ../shared/data and tiktoken's BPE built from the same
files (ranks = GPT-2 ids, offline), the independent reference."""

from __future__ import annotations

from pathlib import Path

import pytest

from tinystories_cli.tokenizer import Tokenizer
from tinystories_cli.tokenizer.pretokenize import GPT2_SPLIT_PATTERN

from train_fixtures import EOT, SHARED_DATA


@pytest.fixture(scope="module")
def gpt2_files() -> tuple[Path, Path]:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"SKIPPED LOUDLY: shared data not found at {SHARED_DATA}; the GPT-2 tokenizer tests need it")
    return SHARED_DATA / "gpt2_vocab.json", SHARED_DATA / "gpt2_merges.txt"


@pytest.fixture(scope="module")
def gpt2(gpt2_files) -> Tokenizer:
    return Tokenizer.from_files(*gpt2_files, special_tokens=[EOT])


@pytest.fixture(scope="module")
def tiktoken_gpt2(gpt2):
    tiktoken = pytest.importorskip("tiktoken", reason="SKIPPED LOUDLY: tiktoken (dev dependency) is not installed")
    ranks = {b: i for i, b in gpt2.vocab.items() if i != gpt2.eot_id}
    return tiktoken.Encoding(name="gpt2-local", pat_str=GPT2_SPLIT_PATTERN, mergeable_ranks=ranks,
                             special_tokens={EOT: gpt2.eot_id})
