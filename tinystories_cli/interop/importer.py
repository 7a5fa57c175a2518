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
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from tinystories_cli import __version__, runs
from tinystories_cli.checkpoint import save_checkpoint
from tinystories_cli.config import ModelConfig
from tinystories_cli.errors import UserError
from tinystories_cli.fileio import atomic_write_text, remove_stale_temps, sha256_file, temp_prefix
from tinystories_cli.interop.hf import read_hf_model, read_hf_tokenizer
from tinystories_cli.model import TransformerLM
from tinystories_cli.run_readme import write_run_readme
from tinystories_cli.tokenizer.files import write_vocab_merges
from tinystories_cli.tokenizer.tokenizer import Tokenizer

IMPORTED_PRESET = "imported"


@dataclass
class Imported:
    run_dir: Path
    cfg: ModelConfig
    architecture: str
    parameters: int
    tokenizer: Tokenizer
    notes: list[str]


def load_weights(model: TransformerLM, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Copy `state_dict` (our names) into `model`: same names, same shapes, except that learned position
    rows beyond the model's context are dropped (a model may use a shorter context than its source)."""
    sd = dict(state_dict)
    pos = sd.get("position_embeddings.weight")
    if pos is not None and hasattr(model, "position_embeddings") and pos.shape[0] > model.config.context_length:
        sd["position_embeddings.weight"] = pos[: model.config.context_length]
    own = model.state_dict()
    if model.config.tie_embeddings and "lm_head.weight" not in sd and "token_embeddings.weight" in sd:
        sd["lm_head.weight"] = sd["token_embeddings.weight"]
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or unexpected:
        raise UserError(f"weights of {source} do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}",
                        "the weights and the model config must come from the same model")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise UserError(f"weights of {source}: {k} has shape {list(v.shape)}, the model expects {list(own[k].shape)}",
                            "the weights and the model config must come from the same model")
    with torch.no_grad():
        for k, v in sd.items():
            if not (model.config.tie_embeddings and k == "lm_head.weight"):  # tied: the embedding is the head
                own[k].copy_(v)


def tokenizer_from_hf(src: Path) -> Tokenizer:
    vocab, merges, specials = read_hf_tokenizer(src)
    return Tokenizer(vocab, merges, specials)


def write_tokenizer(tokenizer: Tokenizer, out_dir: Path, source: str) -> None:
    """Our tokenizer directory format: vocab.json, merges.txt, tokenizer_config.json (special tokens)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    specials = list(tokenizer.special_tokens)
    vocab = {i: b for i, b in tokenizer.vocab.items()}
    write_vocab_merges(out_dir, vocab, tokenizer.merges)
    ids = {s: tokenizer.encode(s)[0] for s in specials}
    atomic_write_text(out_dir / "tokenizer_config.json", json.dumps(
        {"format": "tslm-bpe", "special_tokens": specials, "special_token_ids": ids,
         "vocab_size": tokenizer.vocab_size, "source": source}, indent=2, ensure_ascii=False) + "\n")


def weights_record(files: list[Path]) -> list[dict[str, str]]:
    return [{"file": str(Path(f).resolve()), "sha256": sha256_file(f)} for f in files]


def import_hf(src: str | os.PathLike, run_dir: str | os.PathLike) -> Imported:
    """Read the Hugging Face directory `src` (all checks first), then write the run directory `run_dir`."""
    src, run_dir = Path(src), Path(run_dir)
    if not src.is_dir():
        raise UserError(f"not a directory: {src}", "pass a Hugging Face model directory holding config.json, model.safetensors and tokenizer.json")
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
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
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
