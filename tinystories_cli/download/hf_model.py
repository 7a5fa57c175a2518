"""Hugging Face model repos (`tslm download hf-model REPO`): config, safetensors weights and tokenizer files
into one directory."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tinystories_cli import paths
from tinystories_cli.download.records import DownloadResult, read_record, record_path, same_source
from tinystories_cli.download.registry import Dataset, PlannedFile, resolve_endpoint, url_for
from tinystories_cli.download.transfer import NotFound
from tinystories_cli.download.verified import download_planned
from tinystories_cli.errors import UserError

# (file, required). Small files first: a repo without a usable tokenizer is refused before the weights.
HF_MODEL_FILES: tuple[tuple[str, bool], ...] = (
    ("config.json", True),
    ("tokenizer.json", False),
    ("tokenizer_config.json", False),
    ("vocab.json", False),
    ("merges.txt", False),
    ("model.safetensors", True),
)
_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?")


def check_repo(repo: str) -> str:
    """A Hugging Face repo id: `name` or `owner/name`; no `..` or `--` (they would break the directory name).

    >>> check_repo("openai-community/gpt2")
    'openai-community/gpt2'
    """
    if not _REPO.fullmatch(repo) or ".." in repo or "--" in repo or repo.endswith((".", "-")):
        raise UserError(f"invalid Hugging Face repo id {repo!r}", "pass OWNER/NAME, e.g. openai-community/gpt2")
    return repo


def hf_model_dir(repo: str, root: str | os.PathLike | None = None) -> Path:
    """data/hf/<owner>--<name>/ (the Hub's own cache uses "--" the same way; repo ids cannot contain it)."""
    return paths.dataset_dir("hf", Path(root) if root is not None else None) / check_repo(repo).replace("/", "--")


def plan_hf_model(repo: str, out_dir: str | os.PathLike | None = None, root: str | os.PathLike | None = None,
                  endpoint: str | None = None) -> list[tuple[PlannedFile, bool]]:
    """(planned file, required) for each file `tslm download hf-model REPO` tries."""
    check_repo(repo)
    ep = resolve_endpoint(endpoint)
    d = Path(out_dir) if out_dir is not None else hf_model_dir(repo, root)
    ds = Dataset(repo, repo, "model", (), "")
    return [(PlannedFile(url_for(ds, name, ep), d / name), required) for name, required in HF_MODEL_FILES]


# Every file of a model repo but the weights is small (Llama 3's tokenizer.json: 9 MB): a server streaming more
# is stopped at this many bytes, not downloaded in full.
HF_SMALL_FILE_CAP = 50 << 20


def _small_file_cap(name: str, kwargs: dict) -> dict:
    if name == "model.safetensors":
        return kwargs
    given = kwargs.get("max_bytes")
    return {**kwargs, "max_bytes": HF_SMALL_FILE_CAP if given is None else min(given, HF_SMALL_FILE_CAP)}


@dataclass
class HFModelResult:
    dir: Path
    results: list[DownloadResult] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)   # optional files the repo does not have


def download_hf_model(repo: str, out_dir: str | os.PathLike | None = None, root: str | os.PathLike | None = None,
                      endpoint: str | None = None,
                      progress_for: Callable[[PlannedFile], contextlib.AbstractContextManager] | None = None,
                      on_missing: Callable[[str], None] | None = None,
                      on_done: Callable[[PlannedFile, DownloadResult], None] | None = None, **kwargs) -> HFModelResult:
    """Fetch a model repo's config, safetensors weights and tokenizer files into one directory.

    Optional files that are not there (HTTP 404) are skipped (`on_missing(name)`); a missing
    required file, or neither `tokenizer.json` nor `vocab.json` + `merges.txt`, is a UserError.
    """
    plan = plan_hf_model(repo, out_dir, root, endpoint)
    res = HFModelResult(plan[0][0].dest.parent)
    if os.path.lexists(res.dir) and (os.path.islink(res.dir) or not res.dir.is_dir()):
        raise UserError(f"{res.dir} exists and is not a directory", "pass another `out_dir` DIR, or move it away")
    force = bool(kwargs.get("force"))
    foreign = [(pf, rec) for pf, _ in plan
               if (rec := read_record(pf.dest)) is not None and not same_source(rec.get("source"), pf.url)]
    if foreign and not force:
        pf, rec = foreign[0]
        raise UserError(
            f"{res.dir} holds files downloaded from another source ({pf.dest.name} from {rec.get('source')}, "
            f"not {pf.url})",
            "pass another `out_dir` DIR, or `force` to replace them with this repo's files",
        )
    have: set[str] = set()
    for pf, required in plan:
        name = pf.dest.name
        if name == "model.safetensors" and not ("tokenizer.json" in have or {"vocab.json", "merges.txt"} <= have):
            raise UserError(
                f"{repo} has neither tokenizer.json nor vocab.json + merges.txt at {pf.url.rsplit('/', 1)[0]}",
                "check the repo id; only repos with a Hugging Face tokenizer can be imported",
            )
        try:
            with (progress_for(pf) if progress_for else contextlib.nullcontext()) as progress:
                r = download_planned(pf, progress=progress, **_small_file_cap(name, kwargs))
        except NotFound:
            if required:
                raise UserError(
                    f"{repo} has no {name} ({pf.url}: not found)",
                    "check the repo id and `endpoint`; "
                    "only single-file safetensors weights (model.safetensors) are supported",
                ) from None
            res.missing.append(name)
            if any(f is pf for f, _ in foreign):  # another repo's file that this one lacks: never mixed in
                pf.dest.unlink(missing_ok=True)
                record_path(pf.dest).unlink(missing_ok=True)
            if on_missing:
                on_missing(name)
            continue
        have.add(name)
        res.results.append(r)
        if on_done:
            on_done(pf, r)
    return res
