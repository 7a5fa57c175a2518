"""Optimization from scratch: AdamW, the cosine learning-rate schedule, global gradient clipping,
and parameter groups.

    >>> import torch
    >>> from tinystories_cli.optim import AdamW, cosine_lr, clip_grad_norm_, make_param_groups
    >>> model = torch.nn.Module(); model.w = torch.nn.Parameter(torch.ones(2, 2))
    >>> opt = AdamW(make_param_groups(model, weight_decay=0.1), lr=1e-3)
    >>> (model.w ** 2).sum().backward(); norm = clip_grad_norm_(model.parameters(), 1.0); opt.step()
    >>> [round(cosine_lr(it, 1.0, 0.1, 10, 100), 3) for it in (0, 5, 10, 55, 100, 200)]
    [0.0, 0.5, 1.0, 0.55, 0.1, 0.1]
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["AdamW", "cosine_lr", "clip_grad_norm_", "make_param_groups"]


class AdamW(torch.optim.Optimizer):
    """AdamW (Loshchilov & Hutter): decoupled weight decay, bias correction folded into the step size.

    Per parameter theta with gradient g at step t (1-based):
        theta <- theta - lr * weight_decay * theta
        m <- beta1 m + (1 - beta1) g;   v <- beta2 v + (1 - beta2) g^2
        theta <- theta - lr * sqrt(1 - beta2^t) / (1 - beta1^t) * m / (sqrt(v) + eps * sqrt(1 - beta2^t))

    which is m_hat / (sqrt(v_hat) + eps) with m_hat, v_hat the bias-corrected moments (the form
    `torch.optim.AdamW` uses, so the two agree to rounding).

    Implemented with `torch._foreach_*` ops: one kernel per op for all tensors of a param group,
    not a Python loop over parameters. State per parameter: `step` (int), `exp_avg`, `exp_avg_sq`.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01):
        if lr < 0:
            raise ValueError(f"invalid learning rate {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas {betas}")
        if eps < 0 or weight_decay < 0:
            raise ValueError(f"invalid eps {eps} or weight_decay {weight_decay}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                steps.append(state["step"])
            if not params:
                continue
            if wd != 0:
                torch._foreach_mul_(params, 1.0 - lr * wd)
            torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)  # m + (1-b1)(g - m) = b1 m + (1-b1) g
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
            # bias corrections bc1 = 1 - beta1^t, bc2 = 1 - beta2^t folded into the step size; eps is scaled by
            # sqrt(bc2) so the update equals m_hat / (sqrt(v_hat) + eps) exactly, as in torch.optim.AdamW
            bc2_sqrt = [math.sqrt(1.0 - beta2**t) for t in steps]
            denom = torch._foreach_sqrt(exp_avg_sqs)
            torch._foreach_add_(denom, [eps * s for s in bc2_sqrt])
            step_sizes = [-lr * s / (1.0 - beta1**t) for s, t in zip(bc2_sqrt, steps)]
            torch._foreach_addcdiv_(params, exp_avgs, denom, step_sizes)
        return loss


def cosine_lr(it: int, max_lr: float, min_lr: float, warmup_iters: int, cosine_cycle_iters: int) -> float:
    """Linear warmup to `max_lr` over `warmup_iters`, cosine decay to `min_lr` at `cosine_cycle_iters`, then flat.

    it < warmup: it / warmup * max_lr;  warmup <= it <= cycle: min + (1 + cos(pi (it-w)/(c-w))) / 2 (max - min);
    it > cycle: min_lr.
    """
    if it < warmup_iters:
        return it / warmup_iters * max_lr
    if it > cosine_cycle_iters:
        return min_lr
    if cosine_cycle_iters == warmup_iters:
        return max_lr
    progress = (it - warmup_iters) / (cosine_cycle_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def clip_grad_norm_(parameters: Iterable[nn.Parameter] | Tensor, max_norm: float, eps: float = 1e-6) -> Tensor:
    """Scale all gradients in place by max_norm / (norm + eps) when their global L2 norm exceeds max_norm.

    Parameters without a gradient are skipped. Returns the norm before clipping (a 0-dim tensor; no
    host sync happens here, so call `.item()` only when logging). Branch-free like PyTorch's: the
    scale is min(1, max_norm / (norm + eps)).
    """
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    norms = torch._foreach_norm(grads, 2.0)
    total = torch.linalg.vector_norm(torch.stack([n.to(grads[0].device) for n in norms]), 2.0)
    scale = torch.clamp(max_norm / (total + eps), max=1.0)
    torch._foreach_mul_(grads, scale.to(grads[0].dtype))
    return total


def make_param_groups(model: nn.Module, weight_decay: float, no_decay_norms_biases_embeddings: bool = True
                      ) -> list[dict[str, Any]]:
    """Split parameters into a decayed group and an undecayed one.

    With `no_decay_norms_biases_embeddings` (default), only matrices used as linear maps decay; norm
    weights, biases and embedding tables (including a tied embedding/LM-head matrix, which is owned by
    the embedding) get weight_decay 0. Otherwise every parameter decays. Empty groups are dropped.
    Each group carries a `names` list for logging.
    """
    decay, no_decay, decay_names, no_decay_names = [], [], [], []
    owner = {}
    for mod_name, mod in model.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            owner.setdefault(id(p), (mod, p_name))
    for name, p in model.named_parameters():  # deduplicated: a tied matrix appears once
        if not p.requires_grad:
            continue
        mod, p_name = owner[id(p)]
        is_embedding = type(mod).__name__ == "Embedding"
        keep = no_decay_norms_biases_embeddings and (p.dim() < 2 or p_name == "bias" or is_embedding)
        (no_decay if keep else decay).append(p)
        (no_decay_names if keep else decay_names).append(name)
    groups = [{"params": decay, "weight_decay": weight_decay, "names": decay_names},
              {"params": no_decay, "weight_decay": 0.0, "names": no_decay_names}]
    return [g for g in groups if g["params"]]
