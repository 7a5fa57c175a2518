"""Typed configuration: `ModelConfig`, `TrainConfig`, the presets registry and config-file loading.

One source of truth for every value: a preset gives defaults, a `--config` file (TOML or JSON)
overrides the preset, and CLI flags override the file. Unknown keys are rejected by name.

A config file looks like this (every section and key optional):

    preset = "tinystories-17m"
    [model]
    num_layers = 6
    [train]
    lr = 3e-4
"""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tinystories_cli.errors import UserError


class StrictModel(BaseModel):
    """Base for every config: unknown keys are errors, assignments are validated, floats are finite."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False)


def setting(default: Any, description: str, *, flags: tuple[str, ...] = (), neutral: bool = False,
            cli_type: type | None = None, **constraints: Any) -> Any:
    """A config field declared once: its description is its `--help`, and the CLI option is generated from it.

    `flags` overrides the option names (default `--field-name`; a bool gets `--name/--no-name`); `cli_type`
    parses the flag as another type first (1e9 tokens as a float); `neutral` marks a setting that never
    changes what a run computes (cadence, hardware, kernels): it may change on resume, and `tslm compare`
    does not list it as a difference between runs.
    """
    extra: dict[str, Any] = {"neutral": neutral}
    if flags:
        extra["flags"] = list(flags)
    if cli_type is not None:
        extra["cli_type"] = cli_type.__name__
    return Field(default, description=description, json_schema_extra=extra, **constraints)


def option(default: Any, description: str, *, flags: tuple[str, ...] = (), cli_type: type | None = None,
           parse: Any = None, panel: str | None = None, show_default: bool = False, cli: bool = True) -> Any:
    """A run-level option (a field of a dataclass such as `train.TrainOptions`) declared once, as `setting`
    declares a config field: its description is its `--help` and the CLI option is generated from it
    (`cli.common.config_options`). `flags`: the option names when they differ from `--field-name`;
    `cli_type`: the type the flag is read as, and `parse` turns that into the field's value (a duration
    such as 90m into seconds); `panel`: the help panel, when not the command's; `cli=False`: the command
    declares the option itself (it is more than one flag)."""
    import dataclasses

    meta = {"description": description, "flags": list(flags), "cli_type": cli_type.__name__ if cli_type else None,
            "parse": parse, "panel": panel, "show_default": show_default, "cli": cli}
    return dataclasses.field(default=default, metadata=meta)


def results_neutral(*models: type[BaseModel]) -> set[str]:
    """Names of the `neutral` settings of the given config classes.

    >>> sorted(results_neutral(TrainConfig))[:3]
    ['activation_checkpointing', 'compile', 'device']
    """
    return {name for m in models for name, f in m.model_fields.items()
            if isinstance(f.json_schema_extra, dict) and f.json_schema_extra.get("neutral")}


def default_d_ff(d_model: int, ffn: str) -> int:
    """Default FFN width: 8/3 d_model rounded up to a multiple of 64 for SwiGLU, else 4 d_model.

    SwiGLU has three matrices instead of two, so 8/3 keeps the parameter count of a 4x FFN.

    >>> default_d_ff(512, "swiglu"), default_d_ff(512, "gelu")
    (1408, 2048)
    """
    if ffn == "swiglu":
        return 64 * math.ceil(8 * d_model / 3 / 64)
    return 4 * d_model


class ModelConfig(StrictModel):
    """The architecture of a `TransformerLM`, with a switch for every ablation in the seeds."""

    # Upper bounds far past any model this tool trains: a crafted config is refused before it allocates.
    vocab_size: int = setting(10_000, "Vocabulary size (default: the tokenizer's).", gt=0, le=2**24)
    context_length: int = setting(256, "Context length.", flags=("--ctx", "--context-length"), gt=0, le=2**20)
    d_model: int = setting(512, "Model width.", gt=0, le=2**16)
    num_layers: int = setting(4, "Transformer blocks.", gt=0, le=1024)
    num_heads: int = setting(16, "Attention heads.", gt=0, le=2**12)
    d_ff: int = setting(0, "FFN width (default: 8/3 d_model for SwiGLU, else 4 d_model).", ge=0, le=2**20)
    rope_theta: float = setting(10_000.0, "RoPE base.", gt=0)
    norm: Literal["rmsnorm", "layernorm", "none"] = setting("rmsnorm", "Normalization.")
    norm_position: Literal["pre", "post"] = setting("pre", "Norm before (pre) or after (post) each sublayer.")
    norm_eps: float = setting(1e-5, "Epsilon of the norms.", gt=0)
    layernorm_bias: bool = setting(True, "LayerNorm has a bias.")
    pos_emb: Literal["rope", "nope", "sinusoidal", "learned"] = setting("rope", "Position information.")
    ffn: Literal["swiglu", "silu", "gelu", "gelu_tanh", "relu"] = setting(
        "swiglu", "Feed-forward network (gelu_tanh: GELU with the tanh approximation, as GPT-2).")
    bias: bool = setting(False, "Biases in the attention and FFN projections (GPT-2 has them).")
    tie_embeddings: bool = setting(False, "Share the token embedding with the LM head.",
                                   flags=("--tie-embeddings/--untie-embeddings",))
    dropout: float = setting(0.0, "Dropout on embeddings, attention and FFN outputs.", ge=0.0, lt=1.0)
    init: Literal["cs336", "gpt2"] = setting("cs336", "Weight initialization scheme.")
    attention_backend: Literal["auto", "reference", "sdpa"] = setting(
        "auto", "Attention kernel: the from-scratch reference or fused SDPA (tested equal).", neutral=True)

    @model_validator(mode="before")
    @classmethod
    def _fill_d_ff(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("d_ff"):
            d_model = data.get("d_model", cls.model_fields["d_model"].default)
            ffn = data.get("ffn", cls.model_fields["ffn"].default)
            if isinstance(d_model, int) and d_model > 0 and isinstance(ffn, str):
                data = {**data, "d_ff": default_d_ff(d_model, ffn)}
        return data

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelConfig:
        if self.d_model % self.num_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads}); "
                f"try num_heads in {divisors(self.d_model)[:8]}"
            )
        if self.pos_emb == "rope" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head dim, got d_model/num_heads = {self.head_dim}")
        if self.pos_emb == "sinusoidal" and self.d_model % 2:
            raise ValueError(f"sinusoidal positions need an even d_model, got {self.d_model}")
        return self

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads


LOGGERS = ("tensorboard", "wandb")  # what `--log` may name (train/loggers.py)


def parse_log(value: Any) -> str:
    """The `log` setting normalized: a comma-separated string (or a list) of logger names -> "a,b" ("" = none).

    >>> parse_log("wandb, tensorboard"), parse_log(["tensorboard"]), parse_log("none")
    ('tensorboard,wandb', 'tensorboard', '')
    """
    items = value if isinstance(value, (list, tuple)) else str(value or "").split(",")
    names = {str(x).strip().lower() for x in items} - {"", "none"}
    bad = sorted(names - set(LOGGERS))
    if bad:
        raise ValueError(f"unknown logger {', '.join(map(repr, bad))}: choose from {', '.join(LOGGERS)} "
                         "(comma-separated)")
    return ",".join(n for n in LOGGERS if n in names)


def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


class TrainConfig(StrictModel):
    """Training hyperparameters. The schedule ends exactly at `max_steps` (or at the step that
    `train_tokens` implies)."""

    dataset: str = setting("tinystories", "Dataset under data/ (token files and tokenizer).")
    batch_size: int = setting(64, "Sequences per micro-batch per process.", gt=0)
    grad_accum_steps: int = setting(1, "Micro-batches per optimizer step.", flags=("--grad-accum",), gt=0)
    max_steps: int = setting(20_000, "Optimizer steps (the learning-rate schedule ends here).", gt=0)
    train_tokens: int | None = setting(None, "Token budget; sets --max-steps.", gt=0, cli_type=float)
    lr: float = setting(8e-4, "Peak learning rate.", gt=0)
    min_lr: float = setting(8e-5, "Learning rate at the end of the schedule.", ge=0)
    warmup_steps: int = setting(2000, "Linear warmup steps.", ge=0)
    schedule: Literal["cosine", "wsd"] = setting(
        "cosine", "Learning-rate schedule after the warmup: cosine (decay to min_lr at the last step) or wsd "
        "(warmup-stable-decay: constant, then a linear decay to min_lr over the last --decay-fraction of the steps).")
    decay_fraction: float = setting(0.2, "wsd: share of the steps spent decaying at the end.", ge=0, le=1)
    weight_decay: float = setting(1e-4, "AdamW weight decay (matrices only).", ge=0)
    beta1: float = setting(0.9, "AdamW beta1.", ge=0, lt=1)
    beta2: float = setting(0.999, "AdamW beta2.", ge=0, lt=1)
    eps: float = setting(1e-8, "AdamW epsilon.", gt=0)
    optimizer: Literal["adamw", "muon"] = setting(
        "adamw", "adamw, or muon: Muon on the hidden 2-D matrices (momentum orthogonalized by Newton-Schulz), AdamW "
        "with --lr on the embeddings, LM head and norms.")
    muon_lr: float = setting(0.02, "Muon's peak learning rate (the schedule scales it as it scales --lr).", gt=0)
    muon_momentum: float = setting(0.95, "Muon's (Nesterov) momentum.", ge=0, lt=1)
    muon_weight_decay: float = setting(
        0.1, "Muon's decoupled weight decay (each step multiplies the matrices by 1 - muon_lr x this).", ge=0)
    grad_clip: float = setting(1.0, "Global gradient-norm clip (0 = off).", ge=0)
    eval_every: int = setting(500, "Validation every N steps.", gt=0, neutral=True)
    eval_batches: int = setting(20, "Validation batches (fixed windows).", gt=0, neutral=True)
    log_every: int = setting(10, "Log every N steps.", gt=0, neutral=True)
    save_every: int = setting(1000, "Checkpoint every N steps.", gt=0, neutral=True)
    keep_last: int = setting(2, "Step checkpoints to keep (plus best).", ge=1, neutral=True)
    seed: int = setting(0, "Seed for init and batches.", ge=0, lt=2**62)
    device: str = setting("auto", "auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps.", neutral=True)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = setting(
        "auto", "Compute dtype: auto = bfloat16 autocast where bf16 is native (a CUDA GPU with bf16, a CPU with "
        "AVX512-BF16 or AMX), else float32; weights, optimizer state and the loss stay float32; float16 = autocast "
        "with loss scaling.")
    compile: bool | None = setting(
        None,
        "torch.compile the model and loss as one graph (falls back to eager if it "
        "fails); default: on for CUDA; on a CPU when a C++ compiler is found and the run is long enough to pay "
        "back the compile (about 90 s); off for MPS.",
        neutral=True,
    )
    keep_freed_memory: bool = setting(
        True, "On a CPU under glibc, keep the memory a step frees for the next step instead of handing it back to "
        "the OS (fresh pages for every step's largest buffers cost up to a third of a step); the process then "
        "holds its peak memory until it exits, and ~40% more of it at large batches.",
        neutral=True,
    )
    parallel: Literal["ddp", "fsdp"] = setting(
        "ddp", "Under torchrun: ddp (replicate the model) or fsdp (shard weights, gradients and AdamW state).",
        neutral=True)
    activation_checkpointing: bool = setting(
        False, "Recompute each block's activations in the backward instead of keeping them (less memory, ~1/3 "
        "more compute).", neutral=True)
    log: str = setting("", "Also log to: tensorboard, wandb (comma-separated; needs the track extra). metrics.jsonl "
                       "is always written.", neutral=True)

    @field_validator("log", mode="before")
    @classmethod
    def _parse_log(cls, value: Any) -> str:
        return parse_log(value)

    @model_validator(mode="after")
    def _check_schedule(self) -> TrainConfig:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        if self.train_tokens is None and self.warmup_steps > self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must not exceed max_steps ({self.max_steps})")
        return self


class Preset(StrictModel):
    name: str
    description: str
    model: ModelConfig
    train: TrainConfig = TrainConfig()
    tokenizer: str = Field("bpe", description="'bpe' (train one with tslm bpe) or 'gpt2' (GPT-2's files)")


def _gpt2_shaped(name: str, d_model: int, layers: int, heads: int, d_ff: int) -> Preset:
    return Preset(
        name=name,
        description=f"GPT-2 {name.split('-')[1]} shape in this project's architecture (RMSNorm, RoPE, SwiGLU, untied)",
        model=ModelConfig(
            vocab_size=50257, context_length=1024, d_model=d_model, num_layers=layers, num_heads=heads, d_ff=d_ff
        ),
        tokenizer="gpt2",
    )


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        _gpt2_shaped("gpt2-small", 768, 12, 12, 3072),
        _gpt2_shaped("gpt2-medium", 1024, 24, 16, 4096),
        _gpt2_shaped("gpt2-large", 1280, 36, 20, 5120),
        _gpt2_shaped("gpt2-xl", 1600, 48, 25, 6400),
        Preset(
            name="tinystories-17m",
            description="CS336 baseline: 4 layers, d 512, pre-norm RMSNorm, RoPE, SwiGLU, 10K BPE",
            model=ModelConfig(
                vocab_size=10_000, context_length=256, d_model=512, num_layers=4, num_heads=16, d_ff=1344
            ),
            train=TrainConfig(batch_size=64, max_steps=20_000, lr=8e-4, min_lr=8e-5, warmup_steps=2000,
                              weight_decay=1e-4, grad_clip=1.0, eval_every=500, save_every=2000),
        ),
        Preset(
            name="tinystories-33m",
            description="GPT-2 style TinyStories-33M (seed 004): LayerNorm, learned positions, GELU, tied, GPT-2 BPE",
            model=ModelConfig(
                vocab_size=50257, context_length=512, d_model=384, num_layers=6, num_heads=6, d_ff=1536,
                norm="layernorm", pos_emb="learned", ffn="gelu", tie_embeddings=True, dropout=0.1, init="gpt2",
            ),
            train=TrainConfig(batch_size=32, grad_accum_steps=32, max_steps=20_000, lr=1e-4, min_lr=1e-5,
                              warmup_steps=1000, weight_decay=0.1, beta2=0.95, grad_clip=0.5,
                              eval_every=500, save_every=1000),
            tokenizer="gpt2",
        ),
        Preset(
            name="owt-modern",
            description="OpenWebText ablation base (seed 002): pre-norm RMSNorm, RoPE, SwiGLU, tied",
            model=ModelConfig(vocab_size=32_000, context_length=256, d_model=256, num_layers=4, num_heads=4,
                              tie_embeddings=True),
            train=TrainConfig(dataset="owt", batch_size=64, max_steps=40_000, lr=3e-4, min_lr=3e-5,
                              warmup_steps=2000, weight_decay=0.1, eval_every=1000, save_every=5000),
        ),
        Preset(
            name="owt-vanilla",
            description="OpenWebText vanilla (seed 002): post-norm LayerNorm, sinusoidal positions, ReLU, tied",
            model=ModelConfig(vocab_size=32_000, context_length=256, d_model=256, num_layers=4, num_heads=4,
                              norm="layernorm", norm_position="post", pos_emb="sinusoidal", ffn="relu",
                              tie_embeddings=True),
            train=TrainConfig(dataset="owt", batch_size=64, max_steps=40_000, lr=3e-4, min_lr=3e-5,
                              warmup_steps=2000, weight_decay=0.1, eval_every=1000, save_every=5000),
        ),
        Preset(
            # Sized for ~30 minutes on 2 CPU cores. Measured with tests/benchmarks/bench_train.py (torch
            # 2.13 CPU, 2 cores, otherwise idle): ~3.0K training tokens/s for this 5.3M-parameter model
            # (28.7 MFLOP/token), 1.38 s per step of 16 x 256 tokens; 3-4x slower when the cores are shared.
            # 1,000 steps = 4.1M tokens (~3 passes over the 1.29M-token tinystories_train.txt) take ~24 min
            # plus ~2% for evaluation, leaving headroom for a slower machine. At this budget more, smaller
            # steps beat fewer large ones, hence batch 16.
            name="tinystories-cpu",
            description="Laptop-CPU model: 4 layers, d 256, 8 heads, ctx 256, 4K BPE; ~30 min on 2 cores",
            model=ModelConfig(vocab_size=4096, context_length=256, d_model=256, num_layers=4, num_heads=8, d_ff=704),
            train=TrainConfig(batch_size=16, max_steps=1000, lr=2e-3, min_lr=2e-4, warmup_steps=50,
                              weight_decay=0.1, grad_clip=1.0, eval_every=100, eval_batches=6, save_every=100),
        ),
        Preset(
            name="debug",
            description="Seconds-sized model for smoke tests",
            model=ModelConfig(vocab_size=512, context_length=64, d_model=64, num_layers=2, num_heads=4, d_ff=192),
            train=TrainConfig(batch_size=8, max_steps=50, lr=3e-3, min_lr=3e-4, warmup_steps=5, weight_decay=0.0,
                              eval_every=25, eval_batches=2, log_every=5, save_every=25),
        ),
    ]
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise UserError(f"unknown preset {name!r}", f"valid presets: {', '.join(PRESETS)}") from None


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML or JSON config file into a plain dict (sections `model`, `train`, key `preset`)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}", "check the `config` path")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
        else:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"cannot parse config file {path}: {e}", "fix the syntax (TOML or JSON)") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a table/object at the top level")
    allowed = {"preset", "model", "train"}
    for key in data:
        if key not in allowed:
            raise UserError(f"unknown key {key!r} in config file {path}", f"allowed top-level keys: {sorted(allowed)}")
    return data


def format_validation_error(err: ValidationError, where: str) -> str:
    """Turn a pydantic error into one line naming the offending key."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown key {loc!r}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            parts.append(f"{loc}: {msg}" if loc else msg)
    return f"invalid {where}: " + "; ".join(parts)


def build_config(cls: type[StrictModel], base: StrictModel | None, *layers: dict[str, Any] | None, where: str):
    """Merge dict layers over `base` (later wins) and validate into `cls` with one-line errors."""
    data: dict[str, Any] = base.model_dump() if base is not None else {}
    for layer in layers:
        if layer:
            data.update({k: v for k, v in layer.items() if v is not None})
    given = {k for layer in layers if layer for k, v in layer.items() if v is not None}
    if cls is ModelConfig and given & {"d_model", "ffn"} and "d_ff" not in given:
        data["d_ff"] = 0  # derived from the old d_model/ffn: derive it again for the new ones
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise UserError(format_validation_error(e, where), "fix the value or see `help`") from None


def resolve_configs(
    preset: str | None,
    config_file: str | Path | None = None,
    model_overrides: dict[str, Any] | None = None,
    train_overrides: dict[str, Any] | None = None,
) -> tuple[Preset, ModelConfig, TrainConfig]:
    """preset < config file < CLI flags. Returns (preset, model config, train config)."""
    file_data = load_config_file(config_file) if config_file else {}
    name = preset or file_data.get("preset")
    if not name:
        raise UserError("no preset given",
                        f"pass a preset name (one of: {', '.join(PRESETS)}) or set preset in `config`")
    p = get_preset(name)
    for section in ("model", "train"):
        if section in file_data and not isinstance(file_data[section], dict):
            raise UserError(f"[{section}] in the config file must be a table")
    model = build_config(ModelConfig, p.model, file_data.get("model"), model_overrides, where="model config")
    train = build_config(TrainConfig, p.train, file_data.get("train"), train_overrides, where="train config")
    return p, model, train
