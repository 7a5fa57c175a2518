"""Training past one device: FSDP2 sharding, activation checkpointing, full (portable) state dicts, loss scaling.

    apply_activation_checkpointing(model)            # each TransformerBlock recomputes its activations
    shard_model(model, "bfloat16")                   # FSDP2: one unit per block + the root
    model_sd, optim_sd = full_state(model, optimizer)  # gathered to rank 0 on the CPU (every rank calls it)
    shard_optimizer_state(optimizer)                 # after loading a full state into a sharded optimizer

A run on 1 process, DDP or FSDP saves the same single-file checkpoint (full tensors, plain names, optimizer
state indexed by parameter order), so any of them resumes any other, on any world size.
"""

from __future__ import annotations

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils.checkpoint import checkpoint

from tinystories_cli.checkpoint import clean_name
from tinystories_cli.model import TransformerLM
from tinystories_cli.optim import local


def apply_activation_checkpointing(model: TransformerLM) -> None:
    """Non-reentrant `torch.utils.checkpoint` around every TransformerBlock's forward: the backward reruns
    the block instead of reading kept activations; only each block's input stays. Module names (and so
    checkpoint names) do not change: the block's `forward` is replaced on the instance."""
    for block in model.layers:
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward


def shard_model(model: TransformerLM, dtype: str) -> None:
    """FSDP2 in place: each TransformerBlock its own unit (gathered for its forward and backward, freed
    after), the root unit holds embeddings, final norm and LM head. With bfloat16 the gathered weights
    are bf16 while the sharded master weights, gradients and their reduction stay float32."""
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if dtype == "bfloat16" \
        else MixedPrecisionPolicy()
    for block in model.layers:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)


def is_sharded(model: torch.nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Full-size moments (loaded from a checkpoint) -> DTensors laid out like their sharded parameter.
    Every rank holds the same full tensor, so each keeps its own slice without communication."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not isinstance(p, DTensor) or p not in optimizer.state:
                continue
            state = optimizer.state[p]
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and not isinstance(value, DTensor) and value.shape == p.shape:
                    full = value.to(device=local(p).device, dtype=p.dtype)
                    state[key] = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
               ) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(model state dict, optimizer state dict in `torch.optim.Optimizer.state_dict()` form) with full,
    unsharded CPU tensors and plain names. Sharded: every rank must call it (all-gathers); rank 0 gets
    the tensors, the others empty dicts. Unsharded: this process's own tensors."""
    if not is_sharded(model):
        sd = {clean_name(k): v for k, v in model.state_dict().items()}
        return sd, (optimizer.state_dict() if optimizer is not None else None)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = {clean_name(k): v for k, v in get_model_state_dict(model, options=options).items()}
    if optimizer is None:
        return model_sd, None
    by_name = get_optimizer_state_dict(model, optimizer, options=options)
    plain = optimizer.state_dict()  # param groups with integer ids, in the same order as the named ones
    state: dict[int, dict] = {}
    if by_name:
        index = 0
        for named_group in by_name["param_groups"]:
            for fqn in named_group["params"]:
                if fqn in by_name["state"]:
                    state[index] = {k: (v.cpu() if isinstance(v, torch.Tensor) else v)
                                    for k, v in by_name["state"][fqn].items()}
                index += 1
    return model_sd, {"state": state, "param_groups": plain["param_groups"]}


def tied_aliases(model: torch.nn.Module) -> dict[str, str]:
    """alias -> canonical name for parameters shared under two names (a tied embedding and LM head)."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        name = clean_name(name)
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


class LossScaler:
    """Dynamic loss scaling for float16 autocast, kept on the device (no host sync), as
    `torch.amp.GradScaler` does it: the loss is multiplied by `scale` before backward, the gradients
    divided by it before clipping; a step with non-finite gradients is skipped (the caller passes the
    flag to AdamW) and halves the scale; `growth_interval` good steps in a row double it."""

    def __init__(self, device: torch.device, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000):
        self.scale = torch.full((), init_scale, dtype=torch.float32, device=device)
        self.good_steps = torch.zeros((), dtype=torch.int64, device=device)
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale

    @torch.no_grad()
    def unscale_(self, params) -> None:
        grads = [local(p.grad) for p in params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, self.scale.reciprocal())

    @torch.no_grad()
    def update(self, found_inf: torch.Tensor) -> None:
        found = found_inf.to(self.scale.device).bool()
        grow = (self.good_steps + 1) >= self.growth_interval
        factor = torch.where(found, self.backoff_factor, torch.where(grow, self.growth_factor, 1.0))
        self.scale.mul_(factor)
        self.good_steps.copy_(torch.where(found | grow, 0, self.good_steps + 1))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The checkpoint's `scaler.*` tensors."""
        return self.state_tensors()

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        self.load_state_tensors(tensors)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"scaler.scale": self.scale.detach().cpu(), "scaler.good_steps": self.good_steps.detach().cpu()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if "scaler.scale" in tensors:
            self.scale.copy_(tensors["scaler.scale"].reshape(()))
            self.good_steps.copy_(tensors["scaler.good_steps"].reshape(()))
