"""Checkpoints in safetensors only: model tensors, optimizer state tensors, and JSON metadata. Never pickle.

One file holds everything needed to continue a run:

    model.<name>                      model tensors with plain names (no `_orig_mod.`, no `module.`)
    optim.<param index>.<key>         optimizer state tensors (AdamW: exp_avg, exp_avg_sq, step)
    extra.<name>                      caller tensors (the trainer stores RNG states here)
    __metadata__ (str -> str)         "tslm": JSON with iteration, tied-weight aliases, the optimizer's
                                      non-tensor state and param groups, and caller metadata

A tied matrix (`lm_head.weight` is `token_embeddings.weight`) is stored once under its first name;
the alias is recorded and re-tied on load. Paths are written atomically (temp file + fsync + rename),
so a crash mid-write leaves the previous checkpoint untouched.

    >>> import io
    >>> from tinystories_cli.model import Linear
    >>> from tinystories_cli.optim import AdamW
    >>> m = Linear(2, 2); opt = AdamW(m.parameters(), lr=0.1)
    >>> buf = io.BytesIO(); save_checkpoint(m, opt, 7, buf); _ = buf.seek(0)
    >>> load_checkpoint(buf, Linear(2, 2), None)
    7
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import IO, Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from tinystories_cli.errors import UserError
from tinystories_cli.fileio import atomic_write

FORMAT = "tslm-checkpoint"
VERSION = 1
# Largest JSON header we accept (safetensors headers are a few KB per thousand tensors).
MAX_HEADER_BYTES = 100 << 20
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def clean_name(name: str) -> str:
    """Strip wrapper prefixes anywhere they were stacked.

    >>> clean_name("module._orig_mod.layers.0.attn.q_proj.weight")
    'layers.0.attn.q_proj.weight'
    """
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
        name = name.replace("._orig_mod.", ".")
    return name


def model_tensors(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(name -> CPU tensor with tied duplicates removed, alias -> canonical name)."""
    return state_tensors(unwrap_model(model).state_dict())


def state_tensors(state_dict: dict[str, torch.Tensor], tied: dict[str, str] | None = None
                  ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """`model_tensors` of a state dict; `tied` (alias -> canonical) names the shared tensors when they
    are not recognizable by storage (copies gathered from shards)."""
    tensors: dict[str, torch.Tensor] = {}
    tied = dict(tied or {})
    seen: dict[tuple, str] = {}
    for name, t in state_dict.items():
        name = clean_name(name)
        if name in tied:
            continue
        # Same storage, offset, shape and strides = the same tensor (weight tying).
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() and key in seen:
            tied[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().to("cpu").contiguous()
    return tensors, tied


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, torch.Tensor):
        return value.item()
    return value


def optimizer_tensors(optimizer: torch.optim.Optimizer, sd: dict | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Split `optimizer.state_dict()` (or `sd`, a state dict of that form) into tensors and a JSON-able structure."""
    sd = optimizer.state_dict() if sd is None else sd
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = _jsonable(value)
    groups = [{k: _jsonable(v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars, "class": type(optimizer).__name__}


def save_checkpoint(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    iteration: int,
    out: str | os.PathLike | IO[bytes],
    metadata: dict[str, Any] | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write model (+ optimizer) state and `iteration` to `out` (a path, written atomically, or a binary file).

    `metadata` must be JSON-able; `extra_tensors` are stored under `extra.<name>`.
    """
    save_states(*model_tensors(model), optimizer, None, iteration, out, metadata, extra_tensors)


def save_states(
    model_tensors: dict[str, torch.Tensor],
    tied: dict[str, str],
    optimizer: torch.optim.Optimizer | None,
    optimizer_state: dict | None,
    iteration: int,
    out: str | os.PathLike | IO[bytes],
    metadata: dict[str, Any] | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> None:
    """`save_checkpoint` from tensors already gathered (`state_tensors`), e.g. the full state of a sharded
    model: `optimizer_state` (in `optimizer.state_dict()` form, full tensors) replaces the optimizer's own."""
    tensors = {f"model.{k}": v for k, v in model_tensors.items()}
    optim_meta = None
    if optimizer is not None:
        opt_tensors, optim_meta = optimizer_tensors(optimizer, optimizer_state)
        tensors.update(opt_tensors)
    for name, t in (extra_tensors or {}).items():
        tensors[f"extra.{name}"] = t.detach().to("cpu").contiguous()
    header = {"format": FORMAT, "version": VERSION, "iteration": int(iteration), "tied": tied,
              "optimizer": optim_meta, "metadata": metadata or {}}
    blob = st_save(tensors, metadata={"tslm": json.dumps(header)})
    if isinstance(out, (str, os.PathLike)):
        with atomic_write(out, "wb") as f:
            f.write(blob)
    else:
        out.write(blob)


class Checkpoint:
    """A parsed checkpoint file: `iteration`, `metadata`, and tensors by section."""

    def __init__(self, header: dict, tensors: dict[str, torch.Tensor], source: str):
        self.header = header
        self.source = source
        self.iteration: int = int(header["iteration"])
        self.metadata: dict = header.get("metadata") or {}
        self.tied: dict[str, str] = header.get("tied") or {}
        self.optimizer_meta: dict | None = header.get("optimizer")
        self.model = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        self.optim = {k[6:]: v for k, v in tensors.items() if k.startswith("optim.")}
        self.extra = {k[6:]: v for k, v in tensors.items() if k.startswith("extra.")}

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        sd = dict(self.model)
        for alias, canonical in self.tied.items():
            sd[alias] = sd[canonical]
        return sd


def _corrupt(source: str, why: str) -> UserError:
    return UserError(f"checkpoint {source} is corrupted or truncated ({why})",
                     "use an earlier checkpoint of the run (older ones are kept), or retrain")


def read_checkpoint(src: str | os.PathLike | IO[bytes]) -> Checkpoint:
    """Read and validate a checkpoint; any damage is a UserError naming the file."""
    if isinstance(src, (str, os.PathLike)):
        source = str(src)
        path = Path(src)
        if not path.is_file():
            raise UserError(f"checkpoint not found: {source}", "check the path (runs/<name>/checkpoints/*.safetensors)")
        data = path.read_bytes()
    else:
        source = getattr(src, "name", None) or "<file object>"
        data = src.read()
    if len(data) < 8:
        raise _corrupt(source, f"{len(data)} bytes")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER_BYTES or 8 + n > len(data):
        raise _corrupt(source, "header length exceeds the file")
    try:
        raw_header = json.loads(data[8:8 + n])
        meta = raw_header.get("__metadata__") or {}
        header = json.loads(meta["tslm"])
        if header.get("format") != FORMAT:
            raise ValueError("not a tslm checkpoint")
        # Every tensor must lie inside the file (safetensors checks this too; say it in our words).
        end = max((v["data_offsets"][1] for k, v in raw_header.items() if k != "__metadata__"), default=0)
        if 8 + n + end > len(data):
            raise ValueError(f"tensor data ends at byte {8 + n + end}, file has {len(data)}")
        tensors = st_load(data)
    except UserError:
        raise
    except Exception as e:  # json, key, safetensors errors: all mean a damaged or foreign file
        raise _corrupt(source, f"{type(e).__name__}: {e}") from None
    if header.get("version", 0) > VERSION:
        raise UserError(f"checkpoint {source} has format version {header['version']}, newer than this tslm "
                        f"understands ({VERSION})", "upgrade tslm")
    return Checkpoint(header, tensors, source)


def load_model_state(ckpt: Checkpoint, model: torch.nn.Module) -> None:
    """Copy the checkpoint's tensors into `model` (any wrapper); names and shapes must match exactly."""
    target = unwrap_model(model)
    sd = ckpt.model_state_dict()
    own = {clean_name(k): v for k, v in target.state_dict().items()}
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        raise UserError(f"checkpoint {ckpt.source} does not fit this model: missing {missing[:4]}, "
                        f"unexpected {unexpected[:4]}", "load it with the config it was trained with")
    for k, v in sd.items():
        if tuple(own[k].shape) != tuple(v.shape):
            raise UserError(f"checkpoint {ckpt.source}: {k} has shape {tuple(v.shape)}, the model expects "
                            f"{tuple(own[k].shape)}", "load it with the config it was trained with")
    target.load_state_dict(sd, strict=True)
    # Re-tie: load_state_dict copies values, but a model built untied would now hold two copies.
    for alias, canonical in ckpt.tied.items():
        a_mod, a_attr = _owner(target, alias)
        c_mod, c_attr = _owner(target, canonical)
        if getattr(a_mod, a_attr) is not getattr(c_mod, c_attr):
            setattr(a_mod, a_attr, getattr(c_mod, c_attr))


def _owner(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    *path, attr = name.split(".")
    mod = model
    for p in path:
        mod = getattr(mod, p)
    return mod, attr


def load_optimizer_state(ckpt: Checkpoint, optimizer: torch.optim.Optimizer) -> None:
    meta = ckpt.optimizer_meta
    if meta is None:
        raise UserError(f"checkpoint {ckpt.source} holds no optimizer state (a weights-only checkpoint)",
                        "resume from a step_*.safetensors checkpoint instead")
    current = optimizer.state_dict()
    saved_groups = meta["param_groups"]
    if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in current["param_groups"]]:
        raise UserError(f"checkpoint {ckpt.source}: optimizer parameter groups do not match this model",
                        "load it with the config it was trained with")
    state: dict[int, dict[str, Any]] = {}
    # In a fixed order: the file's tensor order can differ between processes, and a sharded optimizer
    # gathers its state key by key on every rank at once.
    for key, t in sorted(ckpt.optim.items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = t
    for idx, values in (meta.get("scalars") or {}).items():
        state.setdefault(int(idx), {}).update(values)
    groups = []
    for saved, cur in zip(saved_groups, current["param_groups"]):
        g = dict(saved)
        for k, v in g.items():  # JSON turned tuples (betas) into lists: restore the original type
            if isinstance(cur.get(k), tuple) and isinstance(v, list):
                g[k] = tuple(v)
        groups.append(g)
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"checkpoint {ckpt.source}: optimizer state does not fit ({e})",
                        "load it with the config it was trained with") from None


def load_checkpoint(
    src: str | os.PathLike | IO[bytes],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
) -> int:
    """Restore model (and optimizer, if given) from `src`; return the saved iteration."""
    ckpt = read_checkpoint(src)
    load_model_state(ckpt, model)
    if optimizer is not None:
        load_optimizer_state(ckpt, optimizer)
    return ckpt.iteration
