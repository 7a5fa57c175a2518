"""Training-step throughput of `TransformerLM` + our AdamW vs Hugging Face `LlamaForCausalLM` + torch.optim.AdamW.

One step = forward + cross-entropy + backward + optimizer step on a (batch x seq) batch, on CPU (fp32).
Both models have the same shape (pre-norm RMSNorm, RoPE, SwiGLU, untied) and the same weights. With
compile, the whole loss (model + cross-entropy) is one compiled graph for both, as `tslm train --compile`
does. Steps run in rounds (ours eager, peer eager, ours compiled, peer compiled, again ...) so load from
other processes hits all alike; tokens/s use the best step (other processes only add time), and each
ratio is also given as the median over rounds of the per-round ratio; every step time is kept too.
MFU = achieved matmul FLOP/s (the `tslm account` count, 3x forward per step) / this machine's measured
fp32 matmul peak.

    python tests/benchmarks/bench_model.py                      # both presets, eager and torch.compile
    python tests/benchmarks/bench_model.py --presets tinystories-cpu --no-compile --steps 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime

import torch
import torch.nn.functional as F

from tinystories_cli import account
from tinystories_cli.config import get_preset
from tinystories_cli.model import TransformerLM, cross_entropy, llama_config_dict, to_llama_state_dict
from tinystories_cli.optim import AdamW


def matmul_peak_flops(sizes: tuple[int, ...] = (1024, 2048, 4096), seconds: float = 1.5) -> float:
    """Best observed fp32 FLOP/s of square matmuls on this machine (the MFU denominator)."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            t = time.perf_counter()
            a @ b
            best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


def build_pair(preset: str):
    import transformers

    cfg = get_preset(preset).model
    torch.manual_seed(0)
    ours = TransformerLM(cfg)
    kw = {k: v for k, v in llama_config_dict(cfg).items() if k not in ("architectures", "model_type", "torch_dtype")}
    peer = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw))
    peer.load_state_dict(to_llama_state_dict(ours.state_dict(), cfg), strict=False)
    return cfg, ours, peer


def make_step(loss_fn: Callable, opt: torch.optim.Optimizer) -> Callable:
    """One training step: loss, zero grads, backward, optimizer step; returns the loss value."""

    def step(x, y):
        loss = loss_fn(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def make_steppers(ours, peer, compile_: bool, model_only: bool = False):
    """One training step for each model. With `compile_`, the whole loss (model + cross-entropy) is
    one compiled graph, as `tslm train --compile` does, for both; `model_only` compiles just the
    models (the loss stays eager), for comparison."""
    ours_fwd, peer_fwd = (torch.compile(ours), torch.compile(peer)) if compile_ and model_only else (ours, peer)

    def ours_loss(x, y):
        return cross_entropy(ours_fwd(x), y)

    def peer_loss(x, y):
        logits = peer_fwd(input_ids=x).logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    if compile_ and not model_only:
        ours_loss, peer_loss = torch.compile(ours_loss), torch.compile(peer_loss)
    return (make_step(ours_loss, AdamW(ours.parameters(), lr=1e-4, weight_decay=0.1)),
            make_step(peer_loss, torch.optim.AdamW(peer.parameters(), lr=1e-4, weight_decay=0.1)))


def timed(fn, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def bench_preset(preset: str, batch: int, seq: int, warmup: int, steps: int, modes: list[str], peak: float) -> dict:
    """Time every stepper (ours/peer x eager/compile) in rounds, one step of each per round, so that
    the machine's slow and fast phases hit all of them alike. Besides best-step figures, ratios are
    also given as the median over rounds of the per-round ratio (steadier on a noisy machine)."""
    cfg, ours, peer = build_pair(preset)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    x, y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    tokens = batch * seq
    flops = account.train_flops_per_step(cfg, batch, seq)
    out = {"params": sum(p.numel() for p in ours.parameters()), "tokens_per_step": tokens,
           "train_flops_per_step": flops}
    steppers: dict[str, Callable] = {}
    for mode in modes:
        ours_step, peer_step = make_steppers(ours, peer, mode != "eager", model_only=mode == "compilemodel")
        for who, fn in (("ours", ours_step), ("peer", peer_step)):
            t0 = time.perf_counter()
            try:
                for _ in range(warmup):  # includes compilation for mode == "compile"
                    fn(x, y)
            except Exception as e:  # e.g. no C++ compiler for inductor: report, keep the other figures
                out.setdefault(mode, {})["error"] = f"{type(e).__name__}: {e}"[:300]
                continue
            out.setdefault(mode, {})[f"{who}_warmup_s"] = round(time.perf_counter() - t0, 2)
            steppers[f"{who}_{mode}"] = fn
    times: dict[str, list[float]] = {k: [] for k in steppers}
    for _ in range(steps):
        for key, fn in steppers.items():
            times[key].append(timed(fn, x, y))

    def paired(a: str, b: str) -> float:
        """median over rounds of (b's step time / a's step time): how much faster a is than b."""
        return round(statistics.median(tb / ta for ta, tb in zip(times[a], times[b])), 3)

    for key, ts in times.items():
        who, mode = key.split("_")
        res = out[mode]
        best = min(ts)  # other processes only ever add time, so the best step is the cleanest figure
        res[f"{who}_steps_s"] = [round(t, 3) for t in ts]
        res[f"{who}_best_step_s"] = round(best, 4)
        res[f"{who}_median_step_s"] = round(statistics.median(ts), 4)
        res[f"{who}_tokens_per_s"] = round(tokens / best, 1)
        res[f"{who}_mfu"] = round(flops / best / peak, 4)
    for mode in modes:
        if f"ours_{mode}" in times and f"peer_{mode}" in times:
            res = out[mode]
            res["ratio_ours_over_peer"] = round(res["ours_tokens_per_s"] / res["peer_tokens_per_s"], 3)
            res["ratio_ours_over_peer_paired_median"] = paired(f"ours_{mode}", f"peer_{mode}")
    if "ours_compile" in times and "peer_eager" in times:
        out["ratio_ours_compile_over_peer_eager"] = round(
            out["compile"]["ours_tokens_per_s"] / out["eager"]["peer_tokens_per_s"], 3)
        out["ratio_ours_compile_over_peer_eager_paired_median"] = paired("ours_compile", "peer_eager")
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["tinystories-17m", "tinystories-cpu"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=6, help="timed rounds")
    ap.add_argument("--no-compile", action="store_true", help="eager only")
    ap.add_argument("--compile-model-only", action="store_true",
                    help="also time compiling the models alone (loss eager), mode 'compilemodel'")
    ap.add_argument("--json", help="also write the JSON here")
    args = ap.parse_args(argv)
    modes = (
        ["eager"] if args.no_compile else ["eager", "compile"] + (["compilemodel"] if args.compile_model_only else [])
    )
    peak = matmul_peak_flops()
    result = {
        "benchmark": "train_step_throughput",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
        "device": "cpu", "dtype": "float32", "batch": args.batch, "seq": args.seq,
        "warmup_steps": args.warmup, "timed_steps": args.steps,
        "peer": "transformers.LlamaForCausalLM (default attention) + torch.optim.AdamW (default impl)",
        "fp32_matmul_peak_gflops": round(peak / 1e9, 1),
        "presets": {},
    }
    for preset in args.presets:
        result["presets"][preset] = bench_preset(preset, args.batch, args.seq, args.warmup, args.steps, modes, peak)
        print(f"{preset}: {json.dumps(result['presets'][preset])}", file=sys.stderr)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return result


if __name__ == "__main__":
    main()
