"""Reading a Hugging Face model directory: config, weights and byte-level BPE tokenizer, all checked first.

    src/config.json                  LlamaForCausalLM or GPT2LMHeadModel (anything else is refused by name)
    src/model.safetensors            weights (or model.safetensors.index.json + shards); never pickle files
    src/tokenizer.json               a `tokenizers` byte-level BPE, or vocab.json + merges.txt (GPT-2 format)

`read_hf_model(src)` returns our `ModelConfig` and a state_dict under our names; `read_hf_tokenizer(src)`
returns (vocab, merges, special tokens) for our `Tokenizer` (`tokenizer_from_hf` builds it, `write_tokenizer`
writes it in our format). Order of checks: config values (typed and
bounded), then every tensor's name, dtype and shape from the safetensors header against what the config
implies, and only then are tensors read (with `safetensors.safe_open`, one at a time).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from tinystories_cli.account import check_fits_in_memory
from tinystories_cli.checkpoint import check_safetensors_file
from tinystories_cli.config import ModelConfig
from tinystories_cli.errors import UserError
from tinystories_cli.fileio import atomic_write_text, read_json
from tinystories_cli.interop import gpt2, llama
from tinystories_cli.interop.hfconfig import Unsupported, hf_bool
from tinystories_cli.tokenizer.files import MAX_ID, decode_token_string, read_vocab_merges, write_vocab_merges
from tinystories_cli.tokenizer.tokenizer import Tokenizer

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
EOT = "<|endoftext|>"
# Buffers some files carry that are not weights (rotary tables, causal masks).
IGNORED = (".rotary_emb.inv_freq",) + gpt2.IGNORED_SUFFIXES


@dataclass
class HFModel:
    """What `read_hf_model` found: our config, tensors under our names, and where they came from."""

    cfg: ModelConfig
    state_dict: dict[str, Tensor]
    architecture: str
    weights: list[Path]
    notes: list[str] = field(default_factory=list)


def is_hf_dir(path: Path) -> bool:
    """A directory with a Hugging Face config.json (model_type set, no tslm "model" section)."""
    f = Path(path) / "config.json"
    if not f.is_file():
        return False
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "model_type" in data and "model" not in data


def read_hf_config(src: Path) -> dict:
    f = Path(src) / "config.json"
    if not f.is_file():
        raise UserError(f"no config.json in {src}",
                        "pass a Hugging Face model directory (config.json + model.safetensors)")
    data = read_json(f, "Hugging Face config", "the directory must hold a valid config.json")
    if not isinstance(data, dict):
        raise UserError(f"{f} is not a JSON object")
    return data


def model_config_from_hf(hf: dict) -> tuple[ModelConfig, str, int]:
    """(our config, architecture name, key/value heads) for a Llama or GPT-2 config.json."""
    kind = hf.get("model_type")
    if kind == "llama":
        cfg, kv = llama.model_config_from_llama(hf)
        return cfg, "LlamaForCausalLM", kv
    if kind == "gpt2":
        cfg = gpt2.model_config_from_gpt2(hf)
        return cfg, "GPT2LMHeadModel", cfg.num_heads
    raise Unsupported(f"model_type {kind!r} is not supported", "tslm imports LlamaForCausalLM and GPT2LMHeadModel")


def weight_files(src: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (one file, or the shards of an index)."""
    src = Path(src)
    single, index = src / WEIGHTS, src / WEIGHTS_INDEX
    if single.is_file():
        return {k: single for k in check_safetensors_file(single) if k != "__metadata__"}
    if index.is_file():
        data = read_json(index, "safetensors index")
        wmap = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(wmap, dict) or not all(isinstance(v, str) and "/" not in v and v for v in wmap.values()):
            raise UserError(f"malformed {index}: expected a weight_map of tensor -> file name in this directory")
        files = {v: src / v for v in set(wmap.values())}
        missing = [str(p) for p in files.values() if not p.is_file()]
        if missing:
            raise UserError(f"shard {missing[0]} listed in {index.name} is missing", "download every shard")
        return {k: files[v] for k, v in wmap.items()}
    pickled = ([p.name for p in src.glob("*.bin")] + [p.name for p in src.glob("*.pt")]
               + [p.name for p in src.glob("*.pth")])
    hint = f" (found {pickled[0]}: pickle files are never loaded)" if pickled else ""
    raise UserError(f"no {WEIGHTS} in {src}{hint}", "convert the weights to safetensors, or download model.safetensors")


def _header(files: dict[str, Path]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) from the safetensors headers, without reading any tensor."""
    out = {}
    by_file: dict[Path, list[str]] = {}
    for name, p in files.items():
        by_file.setdefault(p, []).append(name)
    for p, names in by_file.items():
        entries = check_safetensors_file(p)  # every size, dtype and byte range checked against the file
        for name in names:
            if name not in entries or name == "__metadata__":
                raise UserError(f"{p.name} does not hold {name} (its index says it does)", "re-download the shards")
            out[name] = (entries[name]["dtype"], tuple(entries[name]["shape"]))
    return out


def check_tensors(found: dict[str, tuple[str, tuple[int, ...]]], expected: dict[str, tuple[int, ...]],
                  optional: set[str], src: Path) -> None:
    """Every expected tensor present with its shape and a float dtype; nothing unexplained left over."""
    missing = sorted(set(expected) - set(found))
    if missing:
        raise UserError(f"{src}: weights do not match config.json: missing {missing[:3]}"
                        + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""),
                        "the weights and config.json must come from the same model")
    extra = sorted(k for k in set(found) - set(expected) - optional if not k.endswith(IGNORED))
    if extra:
        raise UserError(f"{src}: unexpected tensors {extra[:3]} (a feature tslm's model does not have)",
                        "import a plain LlamaForCausalLM or GPT2LMHeadModel")
    for name, shape in expected.items():
        dtype, got = found[name]
        if got != shape:
            raise UserError(f"{src}: {name} has shape {list(got)}, config.json implies {list(shape)}",
                            "the weights and config.json must come from the same model")
        if dtype not in DTYPES:
            raise UserError(f"{src}: {name} has dtype {dtype}", f"tslm imports {', '.join(DTYPES)} weights")


def _read(files: dict[str, Path], names: list[str]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    for p, group in by_file.items():
        check_safetensors_file(p)  # again: the file may have changed since it was planned
        try:
            with safe_open(p, framework="pt") as f:
                for name in group:
                    out[name] = f.get_tensor(name).to(torch.float32)
        except (SafetensorError, OSError) as e:
            raise UserError(f"weights file {p} could not be read ({e})", "download or export it again") from None
    return out


@dataclass
class HFPlan:
    """A checked Hugging Face model directory, before any tensor is read (see `plan_hf_model`)."""

    src: Path
    hf: dict
    cfg: ModelConfig
    architecture: str
    kv_heads: int
    files: dict[str, Path]
    expected: dict[str, tuple[int, ...]]
    prefix: str = ""


def plan_hf_model(src: str | Path) -> HFPlan:
    """Config values and every tensor's name, dtype and shape checked; nothing allocated from the file yet."""
    src = Path(src)
    hf = read_hf_config(src)
    cfg, arch, kv = model_config_from_hf(hf)
    check_fits_in_memory(cfg, f"the model in {src}")  # weights and RoPE tables, before a file is read further
    files = weight_files(src)
    found = _header(files)
    optional = {"lm_head.weight"} if cfg.tie_embeddings else set()
    prefix = ""
    if arch == "LlamaForCausalLM":
        expected = llama.llama_expected_shapes(cfg, kv, hf_bool(hf, "attention_bias", False),
                                               hf_bool(hf, "mlp_bias", False))
    else:
        prefix = gpt2.PREFIX if f"{gpt2.PREFIX}wte.weight" in found else ""
        expected = gpt2.gpt2_expected_shapes(cfg, prefix)
    check_tensors(found, expected, optional, src)
    return HFPlan(src, hf, cfg, arch, kv, files, expected, prefix)


def read_hf_model(src: str | Path, plan: HFPlan | None = None) -> HFModel:
    """Our config and state_dict for the Llama or GPT-2 model in `src` (see the module docstring)."""
    plan = plan or plan_hf_model(src)
    cfg, kv = plan.cfg, plan.kv_heads
    sd = _read(plan.files, list(plan.expected))
    notes: list[str] = []
    if plan.architecture == "LlamaForCausalLM":
        sd = llama.fill_missing_biases(llama.expand_kv_heads(sd, cfg, kv), cfg)
        if kv != cfg.num_heads:
            notes.append(f"grouped-query attention ({kv} key/value heads for {cfg.num_heads} query heads) "
                         "imported as full multi-head attention (key/value heads repeated)")
        ours = llama.from_llama_state_dict(sd, cfg)
    else:
        ours = gpt2.from_gpt2_state_dict(sd, cfg, plan.prefix)
    return HFModel(cfg, ours, plan.architecture, sorted(set(plan.files.values())), notes)


# ---------------------------------------------------------------- tokenizer


def read_hf_tokenizer(src: str | Path) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]], list[str]]:
    """(vocab id -> bytes, merges, special tokens) of the byte-level BPE in `src`: tokenizer.json, else
    vocab.json + merges.txt. Anything that would encode differently from GPT-2-style byte-level BPE
    (a normalizer, another pre-tokenizer, a prefix space, byte fallback, sentencepiece) is refused."""
    src = Path(src)
    if (src / "tokenizer.json").is_file():
        vocab, merges, specials = _from_tokenizer_json(src / "tokenizer.json")
    elif (src / "vocab.json").is_file() and (src / "merges.txt").is_file():
        vocab, merges = read_vocab_merges(src / "vocab.json", src / "merges.txt")
        specials = _config_specials(src / "tokenizer_config.json", vocab)
    else:
        what = (" (tokenizer.model is sentencepiece, which tslm does not read)"
                if (src / "tokenizer.model").is_file() else "")
        raise Unsupported(f"no byte-level BPE tokenizer in {src}{what}",
                          "the directory needs tokenizer.json, or vocab.json and merges.txt")
    present = set(vocab.values())
    missing = [b for b in range(256) if bytes([b]) not in present]
    if missing:
        raise Unsupported(f"tokenizer in {src} lacks {len(missing)} of the 256 single bytes: not a byte-level BPE")
    return vocab, merges, specials


def _config_specials(path: Path, vocab: dict[int, bytes]) -> list[str]:
    """Special tokens named by a tokenizer_config.json (ours: "special_tokens"; HF: added_tokens_decoder),
    else <|endoftext|> when the vocab has it."""
    cfg = read_json(path, "tokenizer config") if path.is_file() else {}
    if isinstance(cfg, dict) and isinstance(cfg.get("special_tokens"), list):
        return [s for s in cfg["special_tokens"] if isinstance(s, str) and s]
    if isinstance(cfg, dict) and isinstance(cfg.get("added_tokens_decoder"), dict):
        names = [v.get("content") for v in cfg["added_tokens_decoder"].values() if isinstance(v, dict)]
        return [s for s in names if isinstance(s, str) and s]
    return [EOT] if EOT.encode() in set(vocab.values()) else []


def _byte_level(pre: dict | None) -> bool:
    if not isinstance(pre, dict):
        return False
    if pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers") or []
        return len(parts) == 1 and _byte_level(parts[0])
    return (pre.get("type") == "ByteLevel" and pre.get("use_regex", True) is True
            and pre.get("add_prefix_space", False) is False)


def _from_tokenizer_json(path: Path) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]], list[str]]:
    tj = read_json(path, "tokenizer.json")
    model = tj.get("model") if isinstance(tj, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE":
        kind = model.get("type") if isinstance(model, dict) else None
        raise Unsupported(f"{path}: tokenizer model {kind!r} is not supported (tslm reads byte-level BPE)")
    if tj.get("normalizer") is not None:
        kind = tj["normalizer"].get("type") if isinstance(tj["normalizer"], dict) else str(tj["normalizer"])[:40]
        raise Unsupported(f"{path}: a normalizer ({kind}) is not supported")
    if not _byte_level(tj.get("pre_tokenizer")):
        raise Unsupported(f"{path}: pre-tokenizer {json.dumps(tj.get('pre_tokenizer'))[:80]} is not supported "
                          "(tslm's is ByteLevel with the GPT-2 regex and no prefix space)")
    for key, ok in (("byte_fallback", (False, None)), ("ignore_merges", (False, None)), ("dropout", (None, 0, 0.0)),
                    ("continuing_subword_prefix", (None, "")), ("end_of_word_suffix", (None, ""))):
        if model.get(key) not in ok:
            raise Unsupported(f"{path}: BPE {key}={model.get(key)!r} is not supported")
    raw_vocab, raw_merges = model.get("vocab"), model.get("merges")
    if not isinstance(raw_vocab, dict) or not isinstance(raw_merges, list):
        raise UserError(f"malformed {path}: model.vocab must be an object and model.merges a list")
    vocab: dict[int, bytes] = {}
    try:
        for s, i in raw_vocab.items():
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < MAX_ID or i in vocab:
                raise ValueError(f"bad or repeated id {i!r} for {s!r} (ids are integers 0..{MAX_ID - 1})")
            vocab[i] = decode_token_string(s)
        merges = []
        for m in raw_merges:
            pair = m.split(" ") if isinstance(m, str) else m
            if not isinstance(pair, list) or len(pair) != 2 or not all(isinstance(x, str) for x in pair):
                raise ValueError(f"merge {m!r} is not two tokens")
            merges.append((decode_token_string(pair[0]), decode_token_string(pair[1])))
    except ValueError as e:
        raise UserError(f"malformed {path}: {e}") from None
    if vocab and max(vocab) >= len(vocab) + 1_000_000:
        raise UserError(f"malformed {path}: ids are implausibly sparse (max id {max(vocab)})")
    specials: list[str] = []
    added = tj.get("added_tokens") or []
    if not isinstance(added, list):
        raise UserError(f"malformed {path}: added_tokens must be a list")
    for t in added:
        if not isinstance(t, dict) or not isinstance(t.get("content"), str) or not t["content"] \
                or isinstance(t.get("id"), bool) or not isinstance(t.get("id"), int) or not 0 <= t["id"] < MAX_ID:
            raise UserError(f"malformed {path}: added token {str(t)[:80]} (ids are integers 0..{MAX_ID - 1})")
        b = t["content"].encode("utf-8")
        if vocab.get(t["id"], b) != b:
            raise Unsupported(f"{path}: added token {t['content']!r} has id {t['id']}, which the vocab gives "
                              f"to {vocab[t['id']]!r}")
        vocab[t["id"]] = b
        specials.append(t["content"])
    if vocab and max(vocab) >= len(vocab) + 1_000_000:
        raise UserError(f"malformed {path}: ids are implausibly sparse (max id {max(vocab)})")
    return vocab, merges, specials


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
