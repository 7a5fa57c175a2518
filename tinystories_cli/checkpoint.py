"""Checkpoints in safetensors only: model tensors, optimizer state tensors, and JSON metadata. Never pickle.

One file holds everything needed to continue a run:

    model.<name>                      model tensors with plain names (no `_orig_mod.`, no `module.`)
    optim.<param index>.<key>         optimizer state tensors (AdamW: exp_avg, exp_avg_sq, step)
    extra.<name>                      caller tensors (the trainer stores RNG states here)
    __metadata__ (str -> str)         "tslm": JSON with iteration, tied-weight aliases, the optimizer's
                                      non-tensor state and param groups, and caller metadata

A tied matrix (`lm_head.weight` is `token_embeddings.weight`) is stored once under its first name;
the alias is recorded, and a model that loads it must tie exactly the same weights. Paths are written atomically
(temp file + fsync + rename), so a crash mid-write leaves the previous checkpoint untouched.

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
from typing import IO, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from tinystories_cli.errors import UserError
from tinystories_cli.fileio import atomic_write

FORMAT = "tslm-checkpoint"
VERSION = 1
# Largest JSON header we accept (safetensors headers are a few KB per thousand tensors).
MAX_HEADER_BYTES = 100 << 20
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")
# safetensors dtype names -> bytes per element (what a header may declare).
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


class OptimizerMeta(BaseModel):
    """The optimizer's non-tensor state in a checkpoint header."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    param_groups: list[dict[str, Any]]
    scalars: dict[str, dict[str, Any]] = {}
    class_: str = Field("AdamW", alias="class")


class CheckpointHeader(BaseModel):
    """The `tslm` metadata entry of a checkpoint, validated before anything acts on it."""

    model_config = ConfigDict(extra="forbid")
    format: Literal["tslm-checkpoint"]
    version: int = Field(ge=1)
    iteration: int = Field(ge=0, lt=2**63)
    tied: dict[str, str] = {}
    optimizer: OptimizerMeta | None = None
    metadata: dict[str, Any] = {}


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


def check_safetensors_header(raw: bytes, header_len: int, file_size: int) -> dict[str, Any]:
    """Parse and check a safetensors JSON header: every entry a known dtype with a shape whose size matches
    its byte range, every range inside the file. Raises ValueError naming the first problem."""
    try:
        entries = json.loads(raw)
    except RecursionError:
        raise ValueError("header nested too deeply") from None
    if not isinstance(entries, dict):
        raise ValueError("header is not a JSON object")
    for name, e in entries.items():
        if name == "__metadata__":
            if not isinstance(e, dict) or not all(isinstance(v, str) for v in e.values()):
                raise ValueError("__metadata__ must map strings to strings")
            continue
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise ValueError(f"tensor {name!r}: malformed entry")
        shape, offsets, dtype = e["shape"], e["data_offsets"], e["dtype"]
        if dtype not in DTYPE_BYTES:
            raise ValueError(f"tensor {name!r}: unsupported dtype {dtype!r}")
        if not (isinstance(shape, list) and all(type(d) is int and 0 <= d < 2**40 for d in shape) and len(shape) <= 8):
            raise ValueError(f"tensor {name!r}: malformed shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise ValueError(f"tensor {name!r}: malformed data_offsets {offsets!r}")
        numel = 1
        for d in shape:
            numel *= d
        if numel * DTYPE_BYTES[dtype] != offsets[1] - offsets[0]:
            raise ValueError(f"tensor {name!r}: shape {shape} does not match its {offsets[1] - offsets[0]} bytes")
        if 8 + header_len + offsets[1] > file_size:
            raise ValueError(f"tensor data ends at byte {8 + header_len + offsets[1]}, file has {file_size}")
    # The tensors' byte ranges tile the data section: no overlap, no gap, nothing after the last one.
    end = 0
    for name, e in sorted(((k, v) for k, v in entries.items() if k != "__metadata__"),
                          key=lambda kv: tuple(kv[1]["data_offsets"])):
        begin, stop = e["data_offsets"]
        if begin != end:
            raise ValueError(f"tensor {name!r}: data_offsets {[begin, stop]} "
                             f"{'overlap another tensor' if begin < end else 'leave a gap'}")
        end = stop
    if 8 + header_len + end != file_size:
        raise ValueError(f"tensor data ends at byte {8 + header_len + end}, the file has {file_size} bytes")
    return entries


def check_safetensors_file(path: str | os.PathLike, what: str = "weights file") -> dict[str, Any]:
    """The checked header entries of a safetensors file (`check_safetensors_header`), read without trusting
    any length in it; every problem is one UserError naming the file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ValueError(f"{size} bytes, too short for a safetensors header")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise ValueError(f"header length {n} exceeds the file ({size} bytes)")
            raw = f.read(n)
        return check_safetensors_header(raw, n, size)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{what} {path} is not a valid safetensors file ({e})",
                        "download or export it again") from None


def read_checkpoint(src: str | os.PathLike | IO[bytes]) -> Checkpoint:
    """Read and validate a checkpoint; any damage is a UserError naming the file.

    A path is read through a memory map (`safe_open`) after its header was checked: sizes, dtypes and
    offsets against the file, and the tslm metadata against `CheckpointHeader`.
    """
    if isinstance(src, (str, os.PathLike)):
        source = str(src)
        path = Path(src)
        if not path.is_file():
            raise UserError(f"checkpoint not found: {source}", "check the path (runs/<name>/checkpoints/*.safetensors)")
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            n = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else None
            raw = f.read(n) if n is not None and n <= MAX_HEADER_BYTES and 8 + n <= size else None
        data = None
    else:
        source = getattr(src, "name", None) or "<file object>"
        data = src.read()
        size = len(data)
        n = struct.unpack("<Q", data[:8])[0] if size >= 8 else None
        raw = data[8:8 + n] if n is not None and n <= MAX_HEADER_BYTES and 8 + n <= size else None
    if n is None:
        raise _corrupt(source, f"{size} bytes")
    if raw is None:
        raise _corrupt(source, "header length exceeds the file")
    try:
        entries = check_safetensors_header(raw, n, size)
        meta = entries.get("__metadata__") or {}
        if "tslm" not in meta:
            raise ValueError("not a tslm checkpoint")
        version = json.loads(meta["tslm"]).get("version", 0)
        if isinstance(version, int) and version > VERSION:
            raise UserError(f"checkpoint {source} has format version {version}, newer than this tslm "
                            f"understands ({VERSION})", "upgrade tslm")
        header = CheckpointHeader.model_validate_json(meta["tslm"]).model_dump(by_alias=True)
        if data is None:
            with safe_open(str(path), framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        else:
            tensors = st_load(data)
    except UserError:
        raise
    except ValidationError as e:
        err = e.errors()[0]
        raise _corrupt(source, f"metadata {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    except Exception as e:  # json, key, safetensors errors: all mean a damaged or foreign file
        raise _corrupt(source, f"{type(e).__name__}: {e}") from None
    return Checkpoint(header, tensors, source)


def tied_names(model: torch.nn.Module) -> dict[str, str]:
    """alias -> canonical name of the parameters a module shares (what `model_tensors` stores once)."""
    seen: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name, p in unwrap_model(model).named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied[clean_name(name)] = seen[id(p)]
        else:
            seen[id(p)] = clean_name(name)
    return tied


def load_model_state(ckpt: Checkpoint, model: torch.nn.Module) -> None:
    """Copy the checkpoint's tensors into `model` (any wrapper); names, shapes and ties must match exactly."""
    sd = check_model_state(ckpt, model)
    unwrap_model(model).load_state_dict(sd, strict=True)  # a tied pair is one parameter here: it stays tied


def check_model_state(ckpt: Checkpoint, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The checkpoint's state dict after checking it fits `model` (names, shapes, ties). `model` may live on
    the meta device, so a config can be checked against a checkpoint before any memory is allocated."""
    target = unwrap_model(model)
    own_ties = tied_names(target)
    if ckpt.tied != own_ties:
        raise UserError(f"checkpoint {ckpt.source} ties {ckpt.tied or 'no weights'}, but this model ties "
                        f"{own_ties or 'none'}", "load it with the config it was trained with")
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
    return sd


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
