"""Training-step throughput of `TransformerLM` + our AdamW vs Hugging Face `LlamaForCausalLM` + torch.optim.AdamW.

One step = forward + cross-entropy + backward + optimizer step on a (batch x seq) batch, on CPU (fp32).
Both models have the same shape (pre-norm RMSNorm, RoPE, SwiGLU, untied) and the same weights. Steps of
the two are interleaved (ours, peer, ours, peer, ...) so load from other processes hits both alike;
tokens/s use the best step (other processes only add time); medians and every step time are kept too.
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
from datetime import datetime, timezone

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


def make_steppers(ours, peer, compile_: bool):
    ours_opt = AdamW(ours.parameters(), lr=1e-4, weight_decay=0.1)
    peer_opt = torch.optim.AdamW(peer.parameters(), lr=1e-4, weight_decay=0.1)
    ours_fwd = torch.compile(ours) if compile_ else ours
    peer_fwd = torch.compile(peer) if compile_ else peer

    def ours_step(x, y):
        loss = cross_entropy(ours_fwd(x), y)
        ours_opt.zero_grad(set_to_none=True)
        loss.backward()
        ours_opt.step()
        return loss.item()

    def peer_step(x, y):
        logits = peer_fwd(input_ids=x).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        peer_opt.zero_grad(set_to_none=True)
        loss.backward()
        peer_opt.step()
        return loss.item()

    return ours_step, peer_step


def timed(fn, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def bench_preset(preset: str, batch: int, seq: int, warmup: int, steps: int, modes: list[str], peak: float) -> dict:
    cfg, ours, peer = build_pair(preset)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    x, y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    tokens = batch * seq
    flops = account.train_flops_per_step(cfg, batch, seq)
    out = {"params": sum(p.numel() for p in ours.parameters()), "tokens_per_step": tokens,
           "train_flops_per_step": flops}
    for mode in modes:
        ours_step, peer_step = make_steppers(ours, peer, mode == "compile")
        res: dict = {}
        try:
            t0 = time.perf_counter()
            for _ in range(warmup):  # includes compilation for mode == "compile"
                ours_step(x, y)
            res["ours_warmup_s"] = round(time.perf_counter() - t0, 2)
            t0 = time.perf_counter()
            for _ in range(warmup):
                peer_step(x, y)
            res["peer_warmup_s"] = round(time.perf_counter() - t0, 2)
            ours_t, peer_t = [], []
            for _ in range(steps):
                ours_t.append(timed(ours_step, x, y))
                peer_t.append(timed(peer_step, x, y))
        except Exception as e:  # e.g. no C++ compiler for inductor: report, keep the other figures
            res["error"] = f"{type(e).__name__}: {e}"[:300]
            out[mode] = res
            continue
        for who, ts in (("ours", ours_t), ("peer", peer_t)):
            best = min(ts)  # other processes only ever add time, so the best step is the cleanest figure
            res[f"{who}_steps_s"] = [round(t, 3) for t in ts]
            res[f"{who}_best_step_s"] = round(best, 4)
            res[f"{who}_median_step_s"] = round(statistics.median(ts), 4)
            res[f"{who}_tokens_per_s"] = round(tokens / best, 1)
            res[f"{who}_mfu"] = round(flops / best / peak, 4)
        res["ratio_ours_over_peer"] = round(res["ours_tokens_per_s"] / res["peer_tokens_per_s"], 3)
        res["ratio_ours_over_peer_median"] = round(res["peer_median_step_s"] / res["ours_median_step_s"], 3)
        out[mode] = res
    if "eager" in out and "compile" in out and "ours_tokens_per_s" in out["compile"]:
        out["ratio_ours_compile_over_peer_eager"] = round(
            out["compile"]["ours_tokens_per_s"] / out["eager"]["peer_tokens_per_s"], 3)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["tinystories-17m", "tinystories-cpu"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true", help="eager only")
    ap.add_argument("--json", help="also write the JSON here")
    args = ap.parse_args(argv)
    modes = ["eager"] if args.no_compile else ["eager", "compile"]
    peak = matmul_peak_flops()
    result = {
        "benchmark": "train_step_throughput",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
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
