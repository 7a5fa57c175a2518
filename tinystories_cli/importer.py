"""A Hugging Face model directory as a tslm run directory (what `tslm import` writes).

    runs/<name>/
        config.json                 "model" (our ModelConfig), parameters, tokenizer fingerprint, and
                                    "imported_from": the source path, architecture and sha256 of its weights
        tokenizer/                  vocab.json, merges.txt, tokenizer_config.json (our format)
        checkpoints/best.safetensors   the weights under our names (a weights-only checkpoint, step 0)
        README.md                   generated, as for a trained run

`tslm eval`, `generate`, `export` and `train --init-from` read it like any run. The directory is
assembled under a temporary name beside it and renamed into place when complete; an existing run
directory is never replaced.

The reading and mapping happen one floor down (`interop/hf.py`, `trained.load_weights`); this module
composes them into a run directory, beside `export.py`, which goes the other way.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch

from tinystories_cli import __version__, runs
from tinystories_cli.checkpoint import save_checkpoint
from tinystories_cli.config import ModelConfig
from tinystories_cli.errors import UserError
from tinystories_cli.fileio import atomic_write_text, remove_stale_temps, sha256_file, temp_prefix
from tinystories_cli.interop.hf import read_hf_model, tokenizer_from_hf, write_tokenizer
from tinystories_cli.model import TransformerLM
from tinystories_cli.run_readme import write_run_readme
from tinystories_cli.tokenizer.tokenizer import Tokenizer
from tinystories_cli.trained import load_weights

IMPORTED_PRESET = "imported"


@dataclass
class Imported:
    run_dir: Path
    cfg: ModelConfig
    architecture: str
    parameters: int
    tokenizer: Tokenizer
    notes: list[str]


def weights_record(files: list[Path]) -> list[dict[str, str]]:
    return [{"file": str(Path(f).resolve()), "sha256": sha256_file(f)} for f in files]


def import_hf(src: str | os.PathLike, run_dir: str | os.PathLike) -> Imported:
    """Read the Hugging Face directory `src` (all checks first), then write the run directory `run_dir`."""
    src, run_dir = Path(src), Path(run_dir)
    if not src.is_dir():
        raise UserError(f"not a directory: {src}",
                        "pass a Hugging Face model directory holding config.json, model.safetensors and tokenizer.json")
    if run_dir.exists() or run_dir.is_symlink():
        raise UserError(f"{run_dir} already exists", "choose another run name (an existing run is never replaced)")
    hf = read_hf_model(src)
    tokenizer = tokenizer_from_hf(src)
    if tokenizer.vocab_size > hf.cfg.vocab_size:
        raise UserError(f"the tokenizer in {src} has {tokenizer.vocab_size} ids but the model only {hf.cfg.vocab_size}",
                        "the tokenizer and the model must come from the same directory")
    model = TransformerLM(hf.cfg)
    load_weights(model, hf.state_dict, str(src))
    record = {"path": str(src.resolve()), "kind": "huggingface", "architecture": hf.architecture,
              "weights": weights_record(hf.weights), "notes": hf.notes}
    config = {"preset": IMPORTED_PRESET, "model": hf.cfg.model_dump(), "parameters": model.num_parameters(),
              "imported_from": record,
              "tokenizer": {"fingerprint": tokenizer.fingerprint, "source": str(src)},
              "tslm_version": __version__, "torch_version": torch.__version__,
              "created": datetime.now(UTC).isoformat(timespec="seconds")}
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(run_dir.parent)  # what a killed import left beside it
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(run_dir.name), suffix=".tmp", dir=run_dir.parent))
    try:
        atomic_write_text(tmp / runs.CONFIG_FILE, json.dumps(config, indent=2) + "\n")
        write_tokenizer(tokenizer, tmp / runs.TOKENIZER_DIR, str(src))
        (tmp / runs.CHECKPOINT_DIR).mkdir()
        save_checkpoint(model, None, 0, tmp / runs.CHECKPOINT_DIR / runs.BEST_CHECKPOINT,
                        metadata={"model_config": hf.cfg.model_dump(), "preset": IMPORTED_PRESET,
                                  "imported_from": record})
        # the last file, written before the rename under the name the run will have: a full disk or a kill
        # at any file leaves no run directory (the rerun starts clean), never a run missing a file
        write_run_readme(tmp, named=run_dir)
        os.chmod(tmp, 0o755)
        os.rename(tmp, run_dir)  # refuses to replace a directory that appeared meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    runs.update_latest_link(run_dir)
    return Imported(run_dir, hf.cfg, hf.architecture, model.num_parameters(), tokenizer, hf.notes)
