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
from torch.distributed.tensor import DTensor

__all__ = [
    "AdamW",
    "Muon",
    "MuonWithAdamW",
    "build_optimizer",
    "set_scheduled_lr",
    "newton_schulz",
    "muon_param_split",
    "cosine_lr",
    "wsd_lr",
    "wsd_decay_start",
    "clip_grad_norm_",
    "make_param_groups",
]


def run_closure(closure) -> Tensor | None:
    """The loss a `step(closure)` re-evaluates (with gradients on, inside the optimizers' no-grad step)."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class AdamW(torch.optim.Optimizer):
    """AdamW (Loshchilov & Hutter): decoupled weight decay, bias correction folded into the step size.

    Per parameter theta with gradient g at step t (1-based):
        theta <- theta - lr * weight_decay * theta
        m <- beta1 m + (1 - beta1) g;   v <- beta2 v + (1 - beta2) g^2
        theta <- theta - lr * sqrt(1 - beta2^t) / (1 - beta1^t) * m / (sqrt(v) + eps * sqrt(1 - beta2^t))

    which is m_hat / (sqrt(v_hat) + eps) with m_hat, v_hat the bias-corrected moments (the form
    `torch.optim.AdamW` uses, so the two agree to rounding).

    Implemented with `torch._foreach_*` ops: one kernel per op for all tensors of a param group,
    not a Python loop over parameters. State per parameter: `step` (a 0-dim float32 tensor on the
    parameter's device, so the bias corrections need no host sync), `exp_avg`, `exp_avg_sq`.

    `step(found_inf=flag)` skips the update on the device when the 0-dim tensor `flag` is nonzero (a
    NaN/inf loss or gradient): parameters, moments and step counts stay as they were, and the caller
    never has to read the flag on the host (as `torch.amp.GradScaler`'s found_inf). Gradients of a
    skipped step are zeroed in place.

    Sharded parameters (DTensor, e.g. under FSDP2's `fully_shard`) are updated through their local
    shards: the update is elementwise, so each rank updates its own slice; the moments are DTensors
    laid out like their parameter.
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
    def step(self, closure=None, found_inf: Tensor | None = None):
        loss = run_closure(closure)
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, steps = self._gather(group)
            if params:
                self._update(group, params, grads, exp_avgs, exp_avg_sqs, steps, found_inf)
        return loss

    def _gather(self, group: dict) -> tuple[list[Tensor], ...]:
        """Local tensors of the parameters with a gradient (state created on first use)."""
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("AdamW does not support sparse gradients")
            state = self.state[p]
            device = local(p).device
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            elif not isinstance(state["step"], Tensor) or state["step"].device != device:
                # a count loaded from a file (an int, or a tensor torch left on the CPU)
                state["step"] = torch.as_tensor(state["step"], dtype=torch.float32).to(device)
            params.append(local(p))
            grads.append(local(p.grad))
            exp_avgs.append(local(state["exp_avg"]))
            exp_avg_sqs.append(local(state["exp_avg_sq"]))
            steps.append(state["step"])
        return params, grads, exp_avgs, exp_avg_sqs, steps

    @staticmethod
    def _update(group: dict, params, grads, exp_avgs, exp_avg_sqs, steps, found_inf: Tensor | None) -> None:
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        if found_inf is None:
            ok: float | Tensor = 1.0
            keep1, keep2 = beta1, beta2
        else:
            skip = found_inf.to(params[0].device) != 0
            ok = (~skip).float()
            for g in grads:  # a skipped step's gradient may hold NaN/inf: it must not reach the moments
                g.masked_fill_(skip, 0.0)
            keep1, keep2 = 1.0 - (1.0 - beta1) * ok, 1.0 - (1.0 - beta2) * ok  # 1 on a skipped step
        torch._foreach_add_(steps, ok)
        if wd != 0:
            torch._foreach_mul_(params, 1.0 - lr * wd * ok)
        torch._foreach_mul_(exp_avgs, keep1)  # m <- beta1 m + (1 - beta1) g
        torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, keep2)  # v <- beta2 v + (1 - beta2) g^2
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
        # bias corrections bc1 = 1 - beta1^t, bc2 = 1 - beta2^t, computed on the device from the step counts:
        # theta <- theta - lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)   (torch.optim.AdamW's form)
        bc1 = torch._foreach_pow(beta1, steps)
        torch._foreach_sub_(bc1, 1.0)  # beta1^t - 1 = -bc1
        bc2 = torch._foreach_pow(beta2, steps)
        torch._foreach_neg_(bc2)
        torch._foreach_add_(bc2, 1.0)
        torch._foreach_sqrt_(bc2)
        step_sizes = torch._foreach_reciprocal(bc1)  # -1 / bc1
        torch._foreach_mul_(step_sizes, lr * ok)  # -lr / bc1 (0 on a skipped step)
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, bc2)
        torch._foreach_add_(denom, eps)
        torch._foreach_div_(denom, step_sizes)  # theta += m / (denom / step): +-inf on a skipped step adds 0
        torch._foreach_addcdiv_(params, exp_avgs, denom)


# Quintic Newton-Schulz coefficients (Keller Jordan's Muon, as in torch.optim.Muon): chosen for the steepest
# slope at zero, so 5 steps push every singular value into roughly [0.7, 1.2] rather than exactly to 1.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(g: Tensor, steps: int = 5, coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                  eps: float = 1e-7) -> Tensor:
    """An approximately orthogonal matrix with the singular vectors of the 2-D matrix `g` (U V^T of its SVD);
    for a stack of matrices (..., A, B), each one's.

    Works in bfloat16 on the wide orientation (rows <= columns, so the Gram matrix is the small one):
    X <- g / ||g||_F (every singular value now <= 1), then `steps` times, with A = X X^T,
    X <- a X + (b A + c A A) X, which maps each singular value s to a s + b s^3 + c s^5.

    >>> import torch
    >>> q = newton_schulz(torch.randn(16, 64, generator=torch.Generator().manual_seed(0))).float()
    >>> s = torch.linalg.svdvals(q)
    >>> bool(s.min() > 0.5 and s.max() < 1.3)
    True
    """
    if g.ndim < 2:
        raise ValueError(f"newton_schulz needs a 2-D matrix or a stack of them, got shape {tuple(g.shape)}")
    a, b, c = coefficients
    tall = g.size(-2) > g.size(-1)
    x = g.bfloat16()
    if tall:
        x = x.mT
    if x.ndim == 2:
        x = x / x.norm().clamp(min=eps)
        for _ in range(steps):
            gram = x @ x.T
            poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)  # b A + c A A
            x = torch.addmm(x, poly, x, beta=a)  # a X + (b A + c A A) X
    else:
        x = x.reshape(-1, *x.shape[-2:])
        x = x / torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp(min=eps)
        for _ in range(steps):
            gram = x @ x.mT
            poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
            x = torch.baddbmm(x, poly, x, beta=a)
        x = x.reshape(*g.shape[:-2], *x.shape[-2:])
    return x.mT if tall else x


# Small matrices of one shape are orthogonalized together, as one batched Newton-Schulz, up to
# NS_BATCH_ELEMENTS per batch (a bf16 copy of the batch is the extra memory): on a CPU a model's dozens of
# small matrices otherwise cost more in per-call overhead than in arithmetic (d_model 128 x 4 layers: a
# MuonWithAdamW step 21.5 -> 15.2 ms). Larger ones go one at a time: there torch.bmm was slower than one
# torch.mm per matrix (d_model 512: 439 -> 497 ms batched). tests/benchmarks/muon_step.py measures both.
NS_BATCH_ELEMENTS = 1 << 24
NS_BATCH_MAX_MATRIX = 1 << 17


def orthogonalize_all(updates: list[Tensor], steps: int = 5, eps: float = 1e-7,
                      max_elements: int = NS_BATCH_ELEMENTS, max_matrix: int = NS_BATCH_MAX_MATRIX) -> list[Tensor]:
    """`newton_schulz` of every matrix in `updates`, batching the matrices of one shape with at most
    `max_matrix` elements (a tall matrix and its transpose's shape count as one: it is orthogonalized as the
    wide one, transposed back), `max_elements` per batch; larger matrices one at a time.

    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> ms = [torch.randn(8, 32, generator=g), torch.randn(32, 8, generator=g), torch.randn(8, 8, generator=g)]
    >>> outs = orthogonalize_all(ms)
    >>> [tuple(o.shape) for o in outs]
    [(8, 32), (32, 8), (8, 8)]
    >>> all(torch.equal(o, newton_schulz(m)) for o, m in zip(outs, ms))  # the same bits as one at a time
    True
    """
    out: list[Tensor | None] = [None] * len(updates)
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, u in enumerate(updates):
        by_shape.setdefault((min(u.shape), max(u.shape)), []).append(i)
    for (rows, cols), idx in by_shape.items():
        per_batch = max(1, max_elements // (rows * cols)) if rows * cols <= max_matrix else 1
        for start in range(0, len(idx), per_batch):
            chunk = idx[start:start + per_batch]
            if len(chunk) == 1:
                out[chunk[0]] = newton_schulz(updates[chunk[0]], steps, eps=eps)
                continue
            wide = torch.stack([updates[i].mT if updates[i].size(0) > updates[i].size(1) else updates[i]
                                for i in chunk])
            for i, q in zip(chunk, newton_schulz(wide, steps, eps=eps).unbind(0)):
                out[i] = q.mT if updates[i].size(0) > updates[i].size(1) else q
    return out  # type: ignore[return-value]


class Muon(torch.optim.Optimizer):
    """Muon (Jordan et al. 2024): momentum SGD whose update of each 2-D matrix is orthogonalized.

    Per matrix W (shape A x B) with gradient g:
        m <- momentum m + (1 - momentum) g
        u <- (1 - momentum) g + momentum m   (Nesterov; plain momentum: u <- m)
        W <- W (1 - lr weight_decay) - lr scale(A, B) newton_schulz(u)

    `lr_scale` is the shape-dependent learning-rate scale: "original" sqrt(max(1, A / B)) (the default,
    as torch.optim.Muon's), "match_rms_adamw" 0.2 sqrt(max(A, B)) (updates with the RMS of AdamW's, so
    AdamW's learning rate and weight decay carry over), or None (1). State per matrix: one momentum
    buffer (`momentum_buffer`), the memory of the parameter.

    Only for the hidden 2-D weight matrices: embeddings, the LM head, norms and biases belong with AdamW
    (`muon_param_split`). Needs whole matrices: FSDP-sharded parameters are refused.

    `step(found_inf=flag)` skips the update on the device when the 0-dim tensor `flag` is nonzero, as
    `AdamW.step` does: parameters and momentum stay as they were, the gradients are zeroed in place.
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, ns_steps: int = 5, lr_scale: str | None = "original",
                 eps: float = 1e-7):
        if lr < 0:
            raise ValueError(f"invalid learning rate {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0 or eps < 0:
            raise ValueError(f"invalid weight_decay {weight_decay} or eps {eps}")
        if not 1 <= ns_steps < 100:
            raise ValueError(f"ns_steps must be in [1, 100), got {ns_steps}")
        if lr_scale not in ("original", "match_rms_adamw", None):
            raise ValueError(f"lr_scale must be 'original', 'match_rms_adamw' or None, got {lr_scale!r}")
        super().__init__(params, {"lr": lr, "momentum": momentum, "nesterov": nesterov,
                                  "weight_decay": weight_decay, "ns_steps": ns_steps, "lr_scale": lr_scale,
                                  "eps": eps})
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon updates 2-D matrices only, got a parameter of shape {tuple(p.shape)}")
                if isinstance(p, DTensor):
                    raise ValueError("Muon needs whole matrices: FSDP-sharded parameters are not supported")

    @staticmethod
    def lr_multiplier(shape: torch.Size | tuple[int, ...], lr_scale: str | None) -> float:
        """The shape-dependent scale of the learning rate for an A x B matrix.

        >>> Muon.lr_multiplier((1024, 256), "original"), Muon.lr_multiplier((256, 1024), "original")
        (2.0, 1.0)
        >>> round(Muon.lr_multiplier((256, 1024), "match_rms_adamw"), 3)
        6.4
        """
        rows, cols = shape[0], shape[1]
        if lr_scale == "original":
            return math.sqrt(max(1.0, rows / cols))
        if lr_scale == "match_rms_adamw":
            return 0.2 * math.sqrt(max(rows, cols))
        return 1.0

    @torch.no_grad()
    def step(self, closure=None, found_inf: Tensor | None = None):
        loss = run_closure(closure)
        for group in self.param_groups:
            muon_update(self.state, group, found_inf)
        return loss


def muon_update(state: dict, group: dict, found_inf: Tensor | None) -> None:
    """One Muon step of the parameters of `group` (their momentum buffers kept in `state`): the momentum of
    every matrix, then all of them orthogonalized at once (`orthogonalize_all`), then the weights."""
    lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
    params = [p for p in group["params"] if p.grad is not None]
    if not params:
        return
    for p in params:
        if "momentum_buffer" not in state[p]:
            state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    grads = [p.grad for p in params]
    bufs = [state[p]["momentum_buffer"] for p in params]
    oks: list[float | Tensor] = [1.0] * len(params)
    if found_inf is None:
        torch._foreach_lerp_(bufs, grads, 1.0 - mom)
    else:
        for i, (p, g, buf) in enumerate(zip(params, grads, bufs)):
            skip = found_inf.to(p.device) != 0
            oks[i] = (~skip).to(p.dtype)
            g.masked_fill_(skip, 0.0)
            buf.lerp_(g, (1.0 - mom) * oks[i])  # unchanged on a skipped step
    updates = torch._foreach_lerp(grads, bufs, mom) if group["nesterov"] else bufs
    updates = orthogonalize_all(list(updates), group["ns_steps"], eps=group["eps"])
    for p, u, ok in zip(params, updates, oks):
        if wd != 0:
            p.mul_(1.0 - lr * wd * ok)
        step = -lr * Muon.lr_multiplier(p.shape, group["lr_scale"])
        p.add_(u if found_inf is None else u * ok, alpha=step)


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon on the hidden 2-D matrices and AdamW on everything else, as one optimizer: one `step`, one
    `state_dict` (so checkpoints and resume treat it like AdamW), one list of param groups, each marked
    `group["algorithm"]` = "muon" or "adamw" and updated by that rule (`muon_update`, or AdamW's).

    `adamw_groups` are AdamW param groups (e.g. `make_param_groups` without the Muon matrices) with AdamW's
    `lr`, `betas`, `eps` and `weight_decay` as defaults; `muon_params` get `muon_lr`, `momentum`,
    `nesterov`, `muon_weight_decay`, `ns_steps` and `lr_scale`. Every group also keeps its peak learning
    rate as `group["max_lr"]`, so a schedule scales all of them together (`set_lr_ratio`).

    >>> model = torch.nn.Module(); model.w = nn.Parameter(torch.ones(4, 4)); model.b = nn.Parameter(torch.ones(4))
    >>> opt = MuonWithAdamW([model.w], [{"params": [model.b]}], lr=1e-3, muon_lr=0.02)
    >>> [(g["algorithm"], g["lr"]) for g in opt.param_groups]
    [('muon', 0.02), ('adamw', 0.001)]
    >>> opt.set_lr_ratio(0.5); [g["lr"] for g in opt.param_groups]
    [0.01, 0.0005]
    """

    def __init__(self, muon_params, adamw_groups, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, muon_lr: float = 0.02, momentum: float = 0.95,
                 nesterov: bool = True, muon_weight_decay: float = 0.0, ns_steps: int = 5,
                 lr_scale: str | None = "original"):
        muon = Muon(list(muon_params), lr=muon_lr, momentum=momentum, nesterov=nesterov,
                    weight_decay=muon_weight_decay, ns_steps=ns_steps, lr_scale=lr_scale)  # validates
        adamw = AdamW(adamw_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)  # validates
        groups = ([{**g, "algorithm": "muon", "max_lr": g["lr"]} for g in muon.param_groups]
                  + [{**g, "algorithm": "adamw", "max_lr": g["lr"]} for g in adamw.param_groups])
        super().__init__(groups, {})

    def set_lr_ratio(self, ratio: float) -> None:
        """Every group's learning rate to `ratio` times its peak (`max_lr`)."""
        for group in self.param_groups:
            group["lr"] = group["max_lr"] * ratio

    @torch.no_grad()
    def step(self, closure=None, found_inf: Tensor | None = None):
        loss = run_closure(closure)
        for group in self.param_groups:
            if group["algorithm"] == "muon":
                muon_update(self.state, group, found_inf)
            else:
                params, grads, exp_avgs, exp_avg_sqs, steps = AdamW._gather(self, group)
                if params:
                    AdamW._update(group, params, grads, exp_avgs, exp_avg_sqs, steps, found_inf)
        return loss


def muon_param_split(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(Muon's parameters, AdamW's): the 2-D weight matrices of the hidden layers go to Muon; embedding
    tables, the LM head (tied or not), norms and biases stay on AdamW, as the NanoGPT speedrun does.

    >>> from tinystories_cli.config import ModelConfig
    >>> from tinystories_cli.model import TransformerLM
    >>> m = TransformerLM(ModelConfig(vocab_size=64, context_length=8, d_model=16, num_layers=1, num_heads=2))
    >>> hidden, rest = muon_param_split(m)
    >>> len(hidden), sorted({tuple(p.shape) for p in rest})
    (7, [(16,), (64, 16)])
    """
    hidden, rest = [], []
    owner = {}
    for mod in model.modules():
        for p in mod.parameters(recurse=False):
            owner.setdefault(id(p), mod)
    head = getattr(model, "lm_head", None)
    head_params = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
    for p in model.parameters():  # deduplicated: a tied matrix appears once
        if not p.requires_grad:
            continue
        is_embedding = type(owner[id(p)]).__name__ == "Embedding"
        (hidden if p.ndim == 2 and not is_embedding and id(p) not in head_params else rest).append(p)
    return hidden, rest


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (a view: in-place updates reach the DTensor), else `t` itself."""
    return t.to_local() if isinstance(t, DTensor) else t


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


def wsd_lr(it: int, max_lr: float, min_lr: float, warmup_iters: int, total_iters: int,
           decay_fraction: float = 0.2) -> float:
    """Warmup-stable-decay: linear warmup to `max_lr`, flat at `max_lr`, then a linear decay to `min_lr`
    over the last `decay_fraction` of `total_iters` (ending exactly there), then flat at `min_lr`.

    it < warmup: it / warmup * max_lr;  warmup <= it <= d: max_lr, with d = total - round(fraction x total);
    d < it <= total: min + (total - it) / (total - d) (max - min);  it > total: min_lr.

    >>> [round(wsd_lr(it, 1.0, 0.1, 10, 100, 0.2), 3) for it in (0, 5, 10, 50, 80, 90, 100, 200)]
    [0.0, 0.5, 1.0, 1.0, 1.0, 0.55, 0.1, 0.1]
    """
    decay_start = wsd_decay_start(warmup_iters, total_iters, decay_fraction)
    if it < warmup_iters:
        return it / warmup_iters * max_lr
    if it > total_iters:
        return min_lr
    if it <= decay_start:  # with decay_fraction 0 the rate stays at max_lr up to total_iters
        return max_lr
    return min_lr + (total_iters - it) / (total_iters - decay_start) * (max_lr - min_lr)


def wsd_decay_start(warmup_iters: int, total_iters: int, decay_fraction: float = 0.2) -> int:
    """The last step of `wsd_lr`'s flat phase: the decay runs from here to `total_iters`. It never moves
    earlier when `total_iters` grows, so a run still before it can lengthen its schedule without changing
    the rate of any step already taken.

    >>> wsd_decay_start(10, 100, 0.2), wsd_decay_start(10, 101, 0.2), wsd_decay_start(10, 12, 0.5)
    (80, 81, 10)
    """
    if not 0.0 <= decay_fraction <= 1.0:
        raise ValueError(f"decay_fraction must be in [0, 1], got {decay_fraction}")
    return max(warmup_iters, total_iters - round(decay_fraction * total_iters))


def clip_grad_norm_(parameters: Iterable[nn.Parameter] | Tensor, max_norm: float, eps: float = 1e-6) -> Tensor:
    """Scale all gradients in place by max_norm / (norm + eps) when their global L2 norm exceeds max_norm.

    Parameters without a gradient are skipped. Returns the norm before clipping (a 0-dim tensor; no
    host sync happens here, so call `.item()` only when logging). Branch-free like PyTorch's: the
    scale is min(1, max_norm / (norm + eps)).

    Sharded gradients (DTensor with a Shard placement, as FSDP2 leaves them) contribute the squared
    norms of their local shards, summed over the ranks of their mesh with one all-reduce, so every rank
    gets the global norm of the whole model; replicated ones count once.
    """
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    sharded = [g for g in grads if isinstance(g, DTensor) and any(pl.is_shard() for pl in g.placements)]
    if not sharded:
        locals_ = [local(g) for g in grads]
        norms = torch._foreach_norm(locals_, 2.0)
        total = torch.linalg.vector_norm(torch.stack([n.to(locals_[0].device) for n in norms]), 2.0)
    else:
        total = _sharded_norm(grads, sharded)
    scale = torch.clamp(max_norm / (total + eps), max=1.0)
    locals_ = [local(g) for g in grads]
    torch._foreach_mul_(locals_, scale.to(locals_[0].dtype))
    return total


def _sharded_norm(grads: list[Tensor], sharded: list[DTensor]) -> Tensor:
    """sqrt(sum over ranks of the shards' squared norms + the replicated gradients' squared norms)."""
    mesh = sharded[0].device_mesh
    if mesh.ndim != 1 or any(g.device_mesh != mesh for g in sharded):
        raise ValueError("gradient clipping supports sharded gradients on one 1-D device mesh")
    ids = {id(g) for g in sharded}
    device = local(sharded[0]).device
    parts = torch.stack([n.to(device) for n in torch._foreach_norm([local(g) for g in sharded], 2.0)])
    sq = parts.pow(2).sum()
    torch.distributed.all_reduce(sq, group=mesh.get_group())
    rest = [local(g) for g in grads if id(g) not in ids]
    if rest:
        sq = sq + torch.stack([n.to(device) for n in torch._foreach_norm(rest, 2.0)]).pow(2).sum()
    return sq.sqrt()


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
    for _mod_name, mod in model.named_modules():
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


def build_optimizer(model: nn.Module, tc: Any, sharded: bool = False) -> torch.optim.Optimizer:
    """The optimizer a `TrainConfig` asks for: AdamW on every parameter (`optimizer="adamw"`), or Muon on the
    hidden matrices with AdamW on the rest (`"muon"`, `MuonWithAdamW`). Weight decay follows
    `make_param_groups` (matrices only); Muon's own is `muon_weight_decay`. Muon needs whole matrices, so
    it refuses `sharded` (FSDP) parameters.

    >>> from tinystories_cli.config import ModelConfig, TrainConfig
    >>> from tinystories_cli.model import TransformerLM
    >>> m = TransformerLM(ModelConfig(vocab_size=64, context_length=8, d_model=16, num_layers=1, num_heads=2))
    >>> (type(build_optimizer(m, TrainConfig())).__name__,
    ...  type(build_optimizer(m, TrainConfig(optimizer="muon"))).__name__)
    ('AdamW', 'MuonWithAdamW')
    """
    groups = make_param_groups(model, tc.weight_decay)
    adamw = {"lr": tc.lr, "betas": (tc.beta1, tc.beta2), "eps": tc.eps, "weight_decay": tc.weight_decay}
    if tc.optimizer == "adamw":
        return AdamW(groups, **adamw)
    if sharded:
        raise ValueError("`optimizer` muon needs whole matrices and cannot run with `parallel` fsdp: use ddp, or adamw")
    hidden, _ = muon_param_split(model)
    ids = {id(p) for p in hidden}
    rest = [{**g, "params": [p for p in g["params"] if id(p) not in ids],
             "names": [n for n, p in zip(g["names"], g["params"]) if id(p) not in ids]} for g in groups]
    return MuonWithAdamW(hidden, [g for g in rest if g["params"]], **adamw, muon_lr=tc.muon_lr,
                         momentum=tc.muon_momentum, muon_weight_decay=tc.muon_weight_decay)


def set_scheduled_lr(optimizer: torch.optim.Optimizer, lr: float, peak_lr: float) -> None:
    """Set the schedule's learning rate `lr` (whose peak is `peak_lr`) on every param group: AdamW's groups
    take it as it is; a `MuonWithAdamW` scales each group's own peak by `lr / peak_lr`."""
    if isinstance(optimizer, MuonWithAdamW):
        optimizer.set_lr_ratio(lr / peak_lr if peak_lr > 0 else 0.0)
        return
    for group in optimizer.param_groups:
        group["lr"] = lr
