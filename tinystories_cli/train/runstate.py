"""The run state a step checkpoint carries, declared once: `RunState` is what `save_step` writes into the
checkpoint's metadata and what a resume reads back (`check_resumable` validates it before anything is
written, `restore` applies it). Weights, optimizer moments, the RNG and the loss scaler travel as tensors
beside it (`checkpoint.save_states`).

Every field name is a metadata key that checkpoints have always had, so old checkpoints read back.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class SamplerState(BaseModel):
    """`data.BatchSampler.state_dict()`: the batch position (batch k is a pure function of (seed, k))."""

    model_config = ConfigDict(extra="forbid")
    seed: int = Field(ge=0, lt=2**63)
    draws: int = Field(ge=0, lt=2**63)
    grad_accum: int | None = Field(None, ge=1, lt=2**31)  # absent in the oldest checkpoints

    def for_sampler(self) -> dict:
        """What `BatchSampler.load_state_dict` takes (a missing accumulation stays missing)."""
        return self.model_dump(exclude_none=True)


class RunState(BaseModel):
    """What the trainer stores in a step checkpoint's metadata, checked before a resume acts on it."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, populate_by_name=True)
    model_config_: dict = Field(alias="model_config")
    train_config: dict
    preset: str
    best_val_loss: float | None = None
    skipped_nonfinite: int = Field(0, ge=0)
    scaler_skipped: int = Field(0, ge=0)
    elapsed_s: float = Field(0.0, ge=0)
    max_steps: int = Field(gt=0)
    world_size: int | None = Field(None, ge=1)
    batch_size: int | None = Field(None, ge=1)
    grad_accum_steps: int | None = Field(None, ge=1)
    tokenizer_fingerprint: str | None = None
    sampler: SamplerState

    def metadata(self) -> dict:
        """The checkpoint metadata (the keys as checkpoints have always named them)."""
        return self.model_dump(by_alias=True)
