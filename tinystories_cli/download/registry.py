"""The dataset registry: what `tslm download NAME` fetches, from which endpoint, to which file.

>>> url_for(DATASETS["tinystories"], "TinyStoriesV2-GPT4-valid.txt", "https://huggingface.co")
'https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStoriesV2-GPT4-valid.txt'
>>> url_for(DATASETS["gpt2-tokenizer"], "vocab.json", "https://hf-mirror.example/")
'https://hf-mirror.example/openai-community/gpt2/resolve/main/vocab.json'
"""

from __future__ import annotations

import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tinystories_cli import paths
from tinystories_cli.errors import UserError

DEFAULT_ENDPOINT = "https://huggingface.co"


@dataclass(frozen=True)
class RemoteFile:
    """One file of a registry entry.

    `sha256`/`size` describe the bytes as served (the compressed bytes for a .gz source). They are
    recorded only when known from a trustworthy source; None means "compute, print and record".
    `max_unpacked` caps the decompressed size of a .gz source (a gzip bomb stops there).
    """

    source: str                     # file name in the Hugging Face repo
    dest: str                       # file name under data/<dataset>/
    split: str | None = None        # "train" / "valid", or None: part of every `split`
    sha256: str | None = None
    size: int | None = None
    gunzip: bool = False
    max_unpacked: int | None = None


@dataclass(frozen=True)
class Dataset:
    name: str
    repo: str
    repo_type: Literal["dataset", "model"]
    files: tuple[RemoteFile, ...]
    description: str


# Expected hashes: none recorded yet. This registry was written without network access, so no hash
# could be checked against the files as Hugging Face serves them today, and a wrong value would make
# every download fail. Sizes recorded below are those known independently of that:
#   gpt2 vocab.json: 1,042,301 bytes, the size of GPT-2's encoder.json; the copy in
#   stanford-cs336/assignment1-basics tests/fixtures (and ../shared/data/gpt2_vocab.json) has that size and
#   sha256 196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783 (a hash candidate).
#   gpt2 merges.txt: 456,318 bytes = the header-less copy in ../shared/data (456,304 bytes) + the Hub file's
#   14-byte "#version: 0.2\n" first line.
# Both GPT-2 files are pinned by sha256 too (issue 31), computed from those copies: vocab.json as it is (its size
# is the registry's), merges.txt as "#version: 0.2\n" + the ../shared/data copy (exactly the registry's size).
# Hugging Face LFS files are checked against the sha256 the Hub publishes for them in any case.
# The .gz caps are upper bounds with headroom over the documented unpacked sizes, not exact sizes.
GPT2_VOCAB_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
GPT2_MERGES_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
DATASETS: dict[str, Dataset] = {
    d.name: d
    for d in (
        Dataset(
            "tinystories", "roneneldan/TinyStories", "dataset",
            (
                RemoteFile("TinyStoriesV2-GPT4-train.txt", "train.txt", "train"),   # ~2.2 GB
                RemoteFile("TinyStoriesV2-GPT4-valid.txt", "valid.txt", "valid"),   # ~22.5 MB
            ),
            "TinyStories V2 (GPT-4 stories), ~2.2 GB train + 22.5 MB valid",
        ),
        Dataset(
            "owt", "stanford-cs336/owt-sample", "dataset",
            (
                RemoteFile("owt_train.txt.gz", "train.txt", "train", gunzip=True,     # ~11.9 GB unpacked
                           max_unpacked=16 * 10**9),
                RemoteFile("owt_valid.txt.gz", "valid.txt", "valid", gunzip=True,     # ~290 MB unpacked
                           max_unpacked=1 * 10**9),
            ),
            "OpenWebText sample (CS336), gunzipped on the fly",
        ),
        Dataset(
            "gpt2-tokenizer", "openai-community/gpt2", "model",
            (RemoteFile("vocab.json", "vocab.json", sha256=GPT2_VOCAB_SHA256, size=1_042_301),
             RemoteFile("merges.txt", "merges.txt", sha256=GPT2_MERGES_SHA256, size=456_318)),
            "GPT-2's vocab.json + merges.txt (for Tokenizer.from_files)",
        ),
    )
}
SPLIT_CHOICES = ("train", "valid", "all")
HF_MODEL = "hf-model"  # `tslm download hf-model REPO`: not a registry entry, a Hugging Face model repo


@dataclass(frozen=True)
class PlannedFile:
    """One concrete download: where from, where to, and what to expect."""

    url: str
    dest: Path
    sha256: str | None = None
    size: int | None = None
    gunzip: bool = False
    max_unpacked: int | None = None


def get_dataset(name: str) -> Dataset:
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}",
                        f"choose one of: {', '.join(DATASETS)}; or `{HF_MODEL} REPO`; or pass a URL with `out` FILE")
    return DATASETS[name]


def resolve_endpoint(endpoint: str | None = None) -> str:
    """`endpoint`, else $HF_ENDPOINT, else huggingface.co. A local directory becomes a file:// URL.

    >>> resolve_endpoint("https://hf-mirror.com/")
    'https://hf-mirror.com'
    """
    ep = endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT
    if "://" not in ep:
        p = Path(ep).expanduser()
        if not p.is_dir():
            raise UserError(f"endpoint {ep!r} is neither a URL nor a directory",
                            "pass e.g. https://hf-mirror.com or a local mirror directory")
        ep = p.resolve().as_uri()
    return ep.rstrip("/")


def url_for(ds: Dataset, filename: str, endpoint: str) -> str:
    """The Hub's "resolve" URL: datasets live under /datasets/, models at the top level."""
    prefix = "datasets/" if ds.repo_type == "dataset" else ""
    return f"{endpoint.rstrip('/')}/{prefix}{ds.repo}/resolve/main/{urllib.parse.quote(filename)}"


def plan_dataset(name: str, split: str = "all", root: str | os.PathLike | None = None,
                 endpoint: str | None = None) -> list[PlannedFile]:
    """The files `tslm download NAME` fetches, in the data/<dataset>/ layout the other commands read."""
    ds = get_dataset(name)
    if split not in SPLIT_CHOICES:
        raise UserError(f"unknown split {split!r}", f"choose one of: {', '.join(SPLIT_CHOICES)}")
    ep = resolve_endpoint(endpoint)
    out_dir = paths.dataset_dir(name, Path(root) if root is not None else None)
    return [
        PlannedFile(url_for(ds, f.source, ep), out_dir / f.dest, f.sha256, f.size, f.gunzip, f.max_unpacked)
        for f in ds.files
        if split == "all" or f.split in (None, split)
    ]
