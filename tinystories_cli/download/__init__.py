"""Verified, resumable downloads: the dataset registry behind `tslm download`.

One file at a time, the life of a download is:

    <dest>.part       bytes arrive here. It is opened without following symlinks, must be a regular
                      file with one link, and is locked (flock) while a download writes it, so two
                      commands never append to the same .part.
    <dest>.part.json  the .part's origin, written atomically before its first byte: URL, ETag /
                      Last-Modified, expected size and the sha256 the server published (Hugging Face
                      LFS files). A resume sends `Range` + `If-Range`; a .part without a valid origin,
                      from another URL, or whose validators changed (the server answers 200 to the
                      If-Range, or a different ETag / size / published sha256) is discarded and
                      fetched again from the first byte, never spliced.
    verify            size against Content-Length, the registry and the server's X-Linked-Size; sha256
                      against the registry or `sha256` and against the sha256 the server publishes for
                      LFS files (X-Linked-Etag). On a mismatch the .part is deleted.
    <dest>            renamed into place only when complete and verified (with `force` too: the old
                      file stays until the new one is verified). For .gz sources the verified .part
                      (the compressed bytes) is kept until the decompressed file is complete; the
                      decompression is capped (registry value or `max_bytes`) so a gzip bomb stops.
    <dest>.sha256     a small JSON record beside the file: its sha256, size and mtime, and where it
                      came from. A later run trusts the file without re-reading it while size and
                      mtime are unchanged (hashing 2 GB is not instant); when either changed, it
                      re-hashes and reports a corrupted file instead of silently using it.

The destination is never written through a symlink: a destination that is a symlink is refused
(replacing it would silently undo a link the user made, e.g. onto a bigger disk; writing through it
would change a file outside the data directory). The final step is a rename, which replaces a
directory entry and never follows one.

Network errors, timeouts, stalls and HTTP 5xx/408/429 are retried with exponential backoff (1, 2,
4, ... seconds; a retry that made progress resets the count). A stall is an idle window
(`IDLE_TIMEOUT` seconds) in which fewer than `IDLE_MIN_BYTES` arrived, so a server trickling one byte
every 29 s does not hang the download. Other HTTP 4xx are a `UserError` at once, and so is a
redirect from https to http. A full disk is a `UserError` naming what was kept (a resumable .part and
its origin file). `file://` URLs and local directories work as sources/endpoints for offline copies.

Nothing here prints: callers pass a `progress(stage, done, total)` callback.

The modules, bottom up: `registry` (datasets, endpoints, URLs), `records` (the .part, its origin and the
.sha256 record on disk), `transfer` (HTTP fetch with resume, retries and guards), `verified` (one URL to one
verified file) and `hf_model` (a Hugging Face model repo). Every name is importable from here.
"""

from __future__ import annotations

from tinystories_cli.download.hf_model import (
    HF_MODEL_FILES,
    HF_SMALL_FILE_CAP,
    HFModelResult,
    check_repo,
    download_hf_model,
    hf_model_dir,
    plan_hf_model,
)
from tinystories_cli.download.records import (
    CHUNK_SIZE,
    ORIGIN_VERSION,
    DownloadResult,
    Origin,
    Progress,
    check_complete,
    origin_path,
    part_path,
    read_origin,
    record_path,
    same_source,
)
from tinystories_cli.download.records import locked_part as _locked_part  # noqa: F401  (tests hold a .part's lock)
from tinystories_cli.download.registry import (
    DATASETS,
    DEFAULT_ENDPOINT,
    GPT2_MERGES_SHA256,
    GPT2_VOCAB_SHA256,
    HF_MODEL,
    SPLIT_CHOICES,
    Dataset,
    PlannedFile,
    RemoteFile,
    get_dataset,
    plan_dataset,
    resolve_endpoint,
    url_for,
)
from tinystories_cli.download.transfer import (
    BACKOFF,
    IDLE_MIN_BYTES,
    IDLE_TIMEOUT,
    MAX_BACKOFF,
    OFFLINE_FIX,
    RETRIES,
    SLEEP,
    TIMEOUT,
    DownloadInterrupted,
    NotFound,
    Unreachable,
    fetch,
)
from tinystories_cli.download.transfer import RedirectGuard as _RedirectGuard  # noqa: F401  (tests drive it)
from tinystories_cli.download.verified import download_dataset, download_planned, download_url

__all__ = [
    "BACKOFF", "CHUNK_SIZE", "DATASETS", "DEFAULT_ENDPOINT", "GPT2_MERGES_SHA256", "GPT2_VOCAB_SHA256", "HF_MODEL",
    "HF_MODEL_FILES", "HF_SMALL_FILE_CAP", "IDLE_MIN_BYTES", "IDLE_TIMEOUT", "MAX_BACKOFF", "OFFLINE_FIX",
    "ORIGIN_VERSION", "RETRIES", "SLEEP", "SPLIT_CHOICES", "TIMEOUT", "Dataset", "DownloadInterrupted",
    "DownloadResult", "HFModelResult", "NotFound", "Origin", "PlannedFile", "Progress", "RemoteFile", "Unreachable",
    "check_complete", "check_repo", "download_dataset", "download_hf_model", "download_planned", "download_url",
    "fetch", "get_dataset", "hf_model_dir", "origin_path", "part_path", "plan_dataset", "plan_hf_model",
    "read_origin", "record_path", "resolve_endpoint", "same_source", "url_for",
]
