"""A trained model from a run directory or a checkpoint file: what `tslm eval`, `generate` and `export` load.

`runs.py` knows where a run keeps its files (`resolve_run`, `checkpoint_for`, `model_config_of`,
`load_tokenizer`); this module builds the model from them, one floor up, so the run-directory layout
never imports the model; `load_weights` copies weights under our names into a built model (`tslm import`,
`train --init-from`):

    >>> model, tokenizer, cfg = load_trained_model("runs/latest")      # doctest: +SKIP

`tinystories_cli.runs.load_trained_model` (the library contract) is this function, re-exported lazily.
"""

from __future__ import annotations

import os

import torch

from tinystories_cli.account import check_fits_in_memory
from tinystories_cli.checkpoint import check_model_state, load_model_state, read_checkpoint
from tinystories_cli.config import ModelConfig
from tinystories_cli.errors import UserError
from tinystories_cli.model import TransformerLM
from tinystories_cli.runs import (
    checkpoint_for,
    load_tokenizer,
    model_config_of,
    resolve_run,
    run_dir_of,
    tokenizer_dir_of,
)


def model_from_checkpoint(ckpt, cfg: ModelConfig, device: str | torch.device = "cpu") -> TransformerLM:
    """Build `cfg`'s model and load `ckpt` into it, checking first, before any memory is allocated, that
    the weights fit this machine's memory and that the checkpoint's names, shapes and ties fit the config."""
    check_fits_in_memory(cfg, f"the model in {ckpt.source}")
    with torch.device("meta"):
        check_model_state(ckpt, TransformerLM(cfg))
    model = TransformerLM(cfg)
    load_model_state(ckpt, model)
    return model.to(device)


def load_trained_model(run_or_checkpoint: str | os.PathLike | None, device: str = "cpu"):
    """(model in eval mode on `device`, tokenizer, ModelConfig) from a run name/dir/checkpoint or runs/latest.

    A run directory loads `checkpoints/best.safetensors` when present, else the latest step checkpoint.
    """
    path = resolve_run(run_or_checkpoint)
    run_dir = run_dir_of(path)
    ckpt = read_checkpoint(checkpoint_for(path))
    cfg = model_config_of(ckpt, run_dir)
    tokenizer = load_tokenizer(tokenizer_dir_of(run_dir))
    model = model_from_checkpoint(ckpt, cfg, device)
    model.eval()
    return model, tokenizer, cfg


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
            raise UserError(
                f"weights of {source}: {k} has shape {list(v.shape)}, the model expects {list(own[k].shape)}",
                "the weights and the model config must come from the same model",
            )
    with torch.no_grad():
        for k, v in sd.items():
            if not (model.config.tie_embeddings and k == "lm_head.weight"):  # tied: the embedding is the head
                own[k].copy_(v)
