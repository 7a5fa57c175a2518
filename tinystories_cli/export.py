"""Export a trained model: Hugging Face format (`--format hf`) or plain safetensors (`--format safetensors`).

`--format hf` writes a directory that `transformers` and `tokenizers` load offline, as
`LlamaForCausalLM` (pre-norm RMSNorm, RoPE, SwiGLU) or, for a pre-norm LayerNorm model with learned
positions, as `GPT2LMHeadModel` (`interop.gpt2`: q/k/v fused into c_attn, Conv1D layout, missing biases
written as zeros):

    config.json              LlamaConfig / GPT2Config (`interop.llama.hf_config` / `interop.gpt2.hf_config`)
    model.safetensors        weights under Llama names (`interop.llama.to_llama_state_dict`: q/k rows permuted
                             from our interleaved-pair RoPE to Llama's half-split rotation) or GPT-2 names
    generation_config.json   bos/eos/pad ids (the end-of-text token)
    tokenizer.json           a `tokenizers` byte-level BPE: vocab, merges, special tokens as added tokens
    tokenizer_config.json    for `AutoTokenizer` (PreTrainedTokenizerFast, no BOS/EOS added, no space clean-up)

Only the Llama-shaped architecture maps onto `LlamaForCausalLM` (pre-norm RMSNorm, RoPE, SwiGLU; tied or
untied) and only the GPT-2-shaped one (pre-norm LayerNorm, learned positions, a GELU/ReLU/SiLU FFN) onto
`GPT2LMHeadModel`; anything else is refused with the switches that cannot be represented.

`tokenizer.json` is assembled here as plain JSON, so exporting needs neither `transformers` nor
`tokenizers` (only loading the result does). Byte strings are written through the GPT-2 byte-to-
unicode alphabet, which is what the ByteLevel pre-tokenizer produces:

    >>> vocab = {i: bytes([i]) for i in range(256)} | {256: b" t", 257: b"<|endoftext|>"}
    >>> tj = tokenizer_json(vocab, [(b" ", b"t")], {"<|endoftext|>": 257})
    >>> tj["model"]["merges"], tj["model"]["vocab"]["Ġt"], tj["added_tokens"][0]["id"]
    (['Ġ t'], 256, 257)

`--format gguf` writes ONE file for llama.cpp's `llama` architecture (`interop.llamacpp`: tensor names,
hyperparameters, the tokenizer as llama.cpp's gpt2 byte-level BPE), with the `gguf` package (the gguf
extra), in f32, f16 or q8_0 (matrices whose rows are not whole q8_0 blocks, and the norms, stay f16/f32).

`--format safetensors` is the run's own format for any architecture: `model.safetensors` with our
tensor names (a tied LM head stored once), `config.json` with the full ModelConfig, and the
tokenizer files (`tokenizer/vocab.json`, `merges.txt`, `tokenizer_config.json`).

Every export is atomic: files are written into a temporary sibling directory that is renamed to
`--out` only when complete; an existing `--out` is replaced only with `force`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save

from tinystories_cli import runs
from tinystories_cli.config import ModelConfig
from tinystories_cli.errors import UserError
from tinystories_cli.fileio import (
    atomic_write_bytes,
    atomic_write_text,
    fsync_dir,
    is_within,
    remove_stale_temps,
    temp_prefix,
)
from tinystories_cli.interop import gpt2
from tinystories_cli.interop.llama import (
    EOT,
    NotLlamaCompatible,
    hf_config,
    hf_state_dict,
    llama_incompatibilities,
    plain_state,
)
from tinystories_cli.interop.llamacpp import check_gguf_compatible
from tinystories_cli.tokenizer.files import encode_token_bytes, write_vocab_merges
from tinystories_cli.trained import load_trained_model

FORMATS = ("hf", "safetensors", "gguf")
GGUF_TYPES = ("f32", "f16", "q8_0")  # --format gguf: the weight types (norms stay f32)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HF_FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json")
MARKER = ".tslm-export.json"  # written into every export: `--force` replaces only a directory holding it


# ---------------------------------------------------------------- checks


def hf_architecture(cfg: ModelConfig) -> str:
    """"llama" or "gpt2": the Hugging Face class this model maps to; refused in one line when neither."""
    bad = llama_incompatibilities(cfg)
    if not bad:
        return "llama"
    if not gpt2.gpt2_incompatibilities(cfg):
        return "gpt2"
    verb = "is" if len(bad) == 1 else "are"
    raise NotLlamaCompatible(
        f"{', '.join(bad)} {verb} not representable as LlamaForCausalLM (only pre-norm "
        f"RMSNorm/RoPE/SwiGLU models map to Llama), nor {', '.join(gpt2.gpt2_incompatibilities(cfg))} "
        "as GPT2LMHeadModel (pre-norm LayerNorm, learned positions)",
        "keep this model in tslm's own safetensors format",
    )


def check_tokenizer_fits(tokenizer, cfg: ModelConfig) -> None:
    if tokenizer.vocab_size > cfg.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only {cfg.vocab_size}",
                        "export the tokenizer the run was trained with")


def special_token_ids(tokenizer) -> dict[str, int]:
    """Special token -> id, through the tokenizer's own encoding (a special token is one id)."""
    out = {}
    for s in tokenizer.special_tokens:
        ids = tokenizer.encode(s)
        if len(ids) != 1:
            raise UserError(f"special token {s!r} does not encode to one id", "the tokenizer files are inconsistent")
        out[s] = ids[0]
    return out


# ---------------------------------------------------------------- tokenizer.json (plain JSON)


def tokenizer_json(vocab: dict[int, bytes], merges: list[tuple[bytes, bytes]], specials: dict[str, int]) -> dict:
    """A `tokenizers` byte-level BPE that encodes exactly like our Tokenizer.

    - added tokens (the specials) are split off first, leftmost-longest, as our tokenizer does;
    - ByteLevel pre-tokenizer with the GPT-2 regex (use_regex) and no prefix space;
    - BPE applies merges by rank inside each pre-token (ignore_merges false: no whole-word lookup);
    - ByteLevel decoder maps the byte alphabet back to bytes.
    """
    # Lowest id wins for duplicate byte strings, as in our Tokenizer.
    model_vocab: dict[str, int] = {}
    for i in sorted(vocab, reverse=True):
        model_vocab[encode_token_bytes(vocab[i])] = i
    model_vocab = dict(sorted(model_vocab.items(), key=lambda kv: kv[1]))
    added = [
        {"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": True}
        for s, i in sorted(specials.items(), key=lambda kv: kv[1])
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": model_vocab,
            # "a b" strings: byte-level tokens never hold a literal space (it is written as Ġ).
            "merges": [f"{encode_token_bytes(a)} {encode_token_bytes(b)}" for a, b in merges],
        },
    }


def tokenizer_config_json(specials: dict[str, int], context_length: int) -> dict:
    eot = EOT if EOT in specials else None
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": context_length,
        "bos_token": eot, "eos_token": eot, "unk_token": None, "pad_token": None,
        # The model was trained on raw ids: nothing is prepended or appended, spaces are kept as is.
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {
            str(i): {"content": s, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
                     "special": True}
            for s, i in sorted(specials.items(), key=lambda kv: kv[1])
        },
    }


# ---------------------------------------------------------------- configs and weights


def generation_config(specials: dict[str, int]) -> dict[str, Any]:
    eot = specials.get(EOT)
    # No max_length: HF's would clash with max_new_tokens; positions past context_length are the user's call.
    return {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot}


def native_state_dict(model: torch.nn.Module, cfg: ModelConfig,
                      dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Our own tensor names; a tied LM head is stored once (under token_embeddings.weight)."""
    sd = plain_state(model, dtype)
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return {k: v.contiguous().clone() for k, v in sd.items()}


# ---------------------------------------------------------------- writing


def check_out_dir(out: str | os.PathLike, force: bool, protect: list[Path] = ()) -> Path:
    """Refuse an existing --out without `force`; with it, replace only an empty directory or an earlier export.

    `protect` (the run directory) may never be replaced or lie inside --out: `--force` must not delete a run.
    """
    out = Path(out)
    for p in protect:  # the one rule (`fileio.is_within`): the source never lies inside what is replaced
        if is_within(p, out):
            raise UserError(f"`out` {out} would replace the run directory {Path(p).resolve()}", "choose another `out`")
    if not out.exists() and not out.is_symlink():
        return out
    if not force:
        raise UserError(f"output already exists: {out}", "pass `force` to overwrite it, or choose another `out`")
    if out.is_symlink() or not out.is_dir():
        raise UserError(f"{out} is not a directory that tslm export wrote", "choose another `out`")
    marker = out / MARKER
    if any(out.iterdir()) and (marker.is_symlink() or not marker.is_file()):
        raise UserError(f"{out} was not written by tslm export (no {MARKER}); `force` replaces only an earlier export",
                        "choose another `out`")
    return out


@contextlib.contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `out` (rename), on failure it is removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out.parent)  # what a killed export left beside it
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(out.name), suffix=".tmp", dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; the export is meant to be shared
        yield tmp
        old = None
        if out.exists() or out.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=temp_prefix(out.name), suffix=".old", dir=out.parent))
            os.replace(out, old / "x")  # move aside first, so `out` is never half old, half new
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def export_hf(model: torch.nn.Module, tokenizer, cfg: ModelConfig, out: str | os.PathLike, force: bool = False,
              dtype: str = "float32", protect: list[Path] = ()) -> Path:
    """Write the Hugging Face Llama or GPT-2 directory (see the module docstring); returns its path."""
    arch = hf_architecture(cfg)
    check_tokenizer_fits(tokenizer, cfg)
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}", f"choose one of: {', '.join(DTYPES)}")
    out = check_out_dir(out, force, protect)
    specials = special_token_ids(tokenizer)
    if arch == "llama":
        tensors, config = hf_state_dict(model, cfg, DTYPES[dtype]), hf_config(cfg, specials, dtype)
    else:
        tensors = gpt2.hf_state_dict(plain_state(model, DTYPES[dtype]), cfg)
        config = gpt2.hf_config(cfg, specials, dtype)
    with atomic_dir(out) as d:
        _write_json(d / "config.json", config)
        atomic_write_bytes(d / "model.safetensors", st_save(tensors, metadata={"format": "pt"}))
        _write_json(d / "generation_config.json", generation_config(specials))
        _write_json(d / "tokenizer.json", tokenizer_json(tokenizer.vocab, tokenizer.merges, specials))
        _write_json(d / "tokenizer_config.json", tokenizer_config_json(specials, cfg.context_length))
        _write_json(d / MARKER, {"format": "hf", "dtype": dtype})
    return out


def export_safetensors(model: torch.nn.Module, tokenizer, cfg: ModelConfig, out: str | os.PathLike,
                       force: bool = False, dtype: str = "float32", protect: list[Path] = ()) -> Path:
    """Write model.safetensors (our names) + config.json + tokenizer/ (any architecture)."""
    check_tokenizer_fits(tokenizer, cfg)
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}", f"choose one of: {', '.join(DTYPES)}")
    out = check_out_dir(out, force, protect)
    specials = special_token_ids(tokenizer)
    tensors = native_state_dict(model, cfg, DTYPES[dtype])
    config = {"format": "tslm", "model": cfg.model_dump(), "dtype": dtype,
              "tied": {"lm_head.weight": "token_embeddings.weight"} if cfg.tie_embeddings else {},
              "special_tokens": specials}
    with atomic_dir(out) as d:
        atomic_write_bytes(
            d / "model.safetensors",
            st_save(tensors, metadata={"format": "pt", "tslm_model_config": json.dumps(cfg.model_dump())}),
        )
        _write_json(d / "config.json", config)
        write_vocab_merges(d / "tokenizer", tokenizer.vocab, tokenizer.merges)
        _write_json(d / "tokenizer" / "tokenizer_config.json",
                    {"format": "tslm-bpe", "special_tokens": list(tokenizer.special_tokens),
                     "special_token_ids": specials, "vocab_size": tokenizer.vocab_size})
        _write_json(d / MARKER, {"format": "safetensors", "dtype": dtype})
    return out


GGUF_HINT = 'pip install -e ".[gguf]" (or pip install "tslm[gguf]")'
GGUF_MAGIC = b"GGUF"


def gguf_type(dtype: str) -> str:
    """f32 | f16 | q8_0 (float32 and float16 are accepted as f32 and f16)."""
    t = {"float32": "f32", "float16": "f16"}.get(dtype, dtype)
    if t not in GGUF_TYPES:
        raise UserError(f"unknown GGUF type {dtype!r}", f"choose one of: {', '.join(GGUF_TYPES)}")
    return t


def import_gguf():
    try:
        import gguf
    except ImportError:
        raise UserError("writing GGUF needs the gguf package, which is not installed",
                        f"install the gguf extra: {GGUF_HINT}") from None
    return gguf


def check_out_file(out: str | os.PathLike, force: bool, protect: list[Path] = ()) -> Path:
    """A single-file output: refuse an existing one without `force`; with it, replace only an earlier GGUF file."""
    out = Path(out)
    for p in protect:
        if out.resolve() == Path(p).resolve() or Path(p).resolve() in out.resolve().parents:
            raise UserError(f"`out` {out} lies inside the run directory {p}", "choose another `out`")
    if out.is_symlink() or (out.exists() and not out.is_file()):
        raise UserError(f"{out} exists and is not a GGUF file that tslm export wrote", "choose another `out`")
    if out.exists():
        if not force:
            raise UserError(f"output already exists: {out}", "pass `force` to overwrite it, or choose another `out`")
        with open(out, "rb") as f:
            if f.read(4) != GGUF_MAGIC:
                raise UserError(f"{out} is not a GGUF file; `force` replaces only an earlier export",
                                "choose another `out`")
    return out


def export_gguf(model: torch.nn.Module, tokenizer, cfg: ModelConfig, out: str | os.PathLike, force: bool = False,
                dtype: str = "f32", protect: list[Path] = ()) -> Path:
    """Write one GGUF file for llama.cpp (see the module docstring and `interop.llamacpp`); returns its path."""
    from tinystories_cli.interop import llamacpp

    llamacpp.check_gguf_compatible(cfg)
    check_tokenizer_fits(tokenizer, cfg)
    dtype = gguf_type(dtype)
    gguf = import_gguf()
    out = check_out_file(out, force, protect)
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = llamacpp.gguf_tensors(plain_state(model, torch.float32), cfg)
    specials = special_token_ids(tokenizer)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, llamacpp.ARCH)
        _gguf_metadata(w, gguf, cfg, out.stem, dtype, tokenizer, specials)
        _gguf_tensors(w, gguf, tensors, dtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return out


def _gguf_metadata(w, gguf, cfg: ModelConfig, name: str, dtype: str, tokenizer, specials: dict[str, int]) -> None:
    """The key-value half of the GGUF file: file type, hyperparameters and the tokenizer."""
    from tinystories_cli.interop import llamacpp

    tokens, types, merges = llamacpp.gguf_vocab(tokenizer, cfg.vocab_size, specials)
    eot = specials.get(EOT)
    w.add_name(name)
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    hp = llamacpp.gguf_hparams(cfg)
    w.add_context_length(hp["context_length"])
    w.add_embedding_length(hp["embedding_length"])
    w.add_feed_forward_length(hp["feed_forward_length"])
    w.add_block_count(hp["block_count"])
    w.add_head_count(hp["attention.head_count"])
    w.add_head_count_kv(hp["attention.head_count_kv"])
    w.add_layer_norm_rms_eps(hp["attention.layer_norm_rms_epsilon"])
    w.add_rope_freq_base(hp["rope.freq_base"])
    w.add_rope_dimension_count(hp["rope.dimension_count"])
    w.add_vocab_size(hp["vocab_size"])
    w.add_tokenizer_model(llamacpp.TOKENIZER_MODEL)
    w.add_tokenizer_pre(llamacpp.TOKENIZER_PRE)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    if eot is not None:
        w.add_bos_token_id(eot)
        w.add_eos_token_id(eot)
    w.add_add_bos_token(False)  # trained on raw ids: nothing is prepended
    w.add_add_eos_token(False)


def _gguf_tensors(w, gguf, tensors: dict[str, torch.Tensor], dtype: str) -> None:
    """The weights: vectors stay f32; matrices in `dtype` (q8_0 where the row length allows, else f16)."""
    import numpy as np

    Q = gguf.GGMLQuantizationType
    for name, t in tensors.items():
        a = t.detach().to(torch.float32).contiguous().numpy()
        if a.ndim == 1 or dtype == "f32":
            w.add_tensor(name, a)
        elif dtype == "q8_0" and a.shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] == 0:
            w.add_tensor(name, gguf.quants.quantize(a, Q.Q8_0), raw_dtype=Q.Q8_0)
        else:
            w.add_tensor(name, a.astype(np.float16))


def export_run(run: str | os.PathLike | None, fmt: str, out: str | os.PathLike, force: bool = False,
               dtype: str = "float32") -> tuple[Path, ModelConfig]:
    """Export a run (name, directory, or checkpoint file; None = runs/latest). Returns (out, model config)."""
    if fmt not in FORMATS:
        raise UserError(f"unknown `fmt` {fmt!r}", f"choose one of: {', '.join(FORMATS)}")
    path = runs.resolve_run(run)
    run_dir = runs.run_dir_of(path)
    # Fail fast, before loading any weights: the output path, then the architecture (when the run's
    # config.json is readable; the checkpoint's own config is checked again after loading).
    (check_out_file if fmt == "gguf" else check_out_dir)(out, force, [run_dir])
    if fmt == "gguf":
        gguf_type(dtype)
        import_gguf()
    if fmt in ("hf", "gguf"):
        try:
            early = ModelConfig.model_validate(runs.read_run_config(run_dir)["model"])
        except Exception:
            early = None
        if early is not None:
            hf_architecture(early) if fmt == "hf" else check_gguf_compatible(early)
    model, tokenizer, cfg = load_trained_model(path, "cpu")
    writer = {"hf": export_hf, "safetensors": export_safetensors, "gguf": export_gguf}[fmt]
    return writer(model, tokenizer, cfg, out, force, dtype, protect=[run_dir]), cfg
