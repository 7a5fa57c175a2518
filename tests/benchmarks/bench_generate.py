"""Benchmark `tslm generate` decoding (not a timed test). Prints one JSON object.

    python tests/benchmarks/bench_generate.py [--repeats 3] [--threads 1] [--long] [--compile]

Model: the `tinystories-17m` shape (4 x 512, 16 heads, ctx 256, vocab 10K), random init (speed
does not depend on the weights). Batch 1, a 10-token prompt, exactly N new tokens (no stop token).

1. Peer comparison at N = 256: (a) ours with the KV cache, (b) ours without the cache (the whole
   window recomputed every step), (c) Hugging Face `LlamaForCausalLM.generate` with the SAME
   weights (mapped by `model.to_llama_state_dict`; the logits are checked against ours first) and
   the same sampling settings. Two settings: greedy, and temperature 1.0 + top-p 0.9. Reported:
   tokens/s = N / wall time of the whole call (prefill included), median over repeats, the runs
   interleaved (a, b, c, a, b, c, ...) so machine noise hits all sides alike. Also tokens per
   CPU-second of the process (time.process_time), steadier than wall time on a shared machine.
2. Cached vs uncached as the sequence grows: N = 64, N = 246 (prompt + N = the full context of
   256), N = 512 (the window slides 3 times). With `--long`, also the same model with a
   1024-token context filled completely (N = 1014, one repeat).
3. The fp32 ceiling: the time of only the matrix-vector products one decoded token needs (every
   projection and the LM head, the real weights, in order), i.e. the most tokens/s any fp32
   implementation can reach here, reported as a multiple of the peer. With `--compile`, also ours
   with `decode_one_token` under torch.compile.

Threads: `--threads 1` by default: the development machine has 2 cores shared with other jobs,
where a second OpenMP thread makes small matmuls ~10x slower and the figures meaningless.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tinystories_cli.config import PRESETS, ModelConfig  # noqa: E402
from tinystories_cli.generate import BatchDecoder, generate_tokens  # noqa: E402
from tinystories_cli.model import TransformerLM, llama_config_dict, to_llama_state_dict  # noqa: E402

SETTINGS = {"greedy": dict(temperature=0.0, top_p=1.0), "top_p_0.9": dict(temperature=1.0, top_p=0.9)}


def build(cfg: ModelConfig) -> TransformerLM:
    torch.manual_seed(0)
    return TransformerLM(cfg).eval()


def build_hf(model: TransformerLM):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = {k: v for k, v in llama_config_dict(model.config).items() if k not in ("architectures", "model_type")}
    hf = LlamaForCausalLM(LlamaConfig(**hf_cfg)).eval()
    missing, unexpected = hf.load_state_dict(to_llama_state_dict(model.state_dict(), model.config), strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return hf


def ours(model, prompt: list[int], n: int, setting: dict, use_cache: bool = True) -> list[int]:
    if use_cache:
        return list(generate_tokens(model, prompt, max_new_tokens=n, seed=0, **setting))
    dec = BatchDecoder(model, [prompt], seeds=[0], max_new_tokens=n, use_cache=False, **setting)
    return [step[0] for step in dec]


def hf_generate(hf, prompt: list[int], n: int, setting: dict) -> list[int]:
    ids = torch.tensor([prompt])
    kw = dict(do_sample=False) if setting["temperature"] == 0 else dict(
        do_sample=True, temperature=setting["temperature"], top_p=setting["top_p"], top_k=0)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          eos_token_id=None, pad_token_id=0, use_cache=True, **kw)
    return out[0, len(prompt):].tolist()


def timed(fn, *args, **kw) -> tuple[float, list[int]]:
    """(wall seconds, output); the CPU seconds of the process go to the global CPU_TIMES."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args, **kw)
    CPU_TIMES.append(time.process_time() - c0)
    return time.perf_counter() - t0, out


CPU_TIMES: list[float] = []


def tokens_per_s(times: list[float], n: int) -> float:
    return round(n / statistics.median(times), 1)


def peer_comparison(model, hf, prompt: list[int], n: int, repeats: int) -> dict:
    result = {}
    for name, setting in SETTINGS.items():
        times: dict[str, list[float]] = {"ours_cached": [], "ours_uncached": [], "hf_llama_generate": []}
        cpu: dict[str, list[float]] = {k: [] for k in times}
        outs = {}
        # warm-up (first-call allocations, lazy imports)
        ours(model, prompt, 8, setting)
        hf_generate(hf, prompt, 8, setting)
        for _ in range(repeats):
            for key, fn in (("ours_cached", lambda: ours(model, prompt, n, setting)),
                            ("ours_uncached", lambda: ours(model, prompt, n, setting, use_cache=False)),
                            ("hf_llama_generate", lambda: hf_generate(hf, prompt, n, setting))):
                dt, out = timed(fn)
                assert len(out) == n, (key, len(out))
                times[key].append(dt)
                cpu[key].append(CPU_TIMES[-1])
                outs[key] = out
        tps = {k: tokens_per_s(v, n) for k, v in times.items()}
        tpc = {k: tokens_per_s(v, n) for k, v in cpu.items()}
        entry = {"tokens_per_s": tps, "tokens_per_cpu_s": tpc,
                 "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
                 "speedup_vs_hf": round(tps["ours_cached"] / tps["hf_llama_generate"], 2),
                 "speedup_vs_hf_cpu_time": round(tpc["ours_cached"] / tpc["hf_llama_generate"], 2),
                 "cache_speedup": round(tps["ours_cached"] / tps["ours_uncached"], 2)}
        if name == "greedy":
            # same weights, same argmax: the greedy continuations should agree (up to float ties)
            same = sum(a == b for a, b in zip(outs["ours_cached"], outs["hf_llama_generate"]))
            entry["greedy_tokens_equal_to_hf"] = f"{same}/{n}"
        result[name] = entry
    return result


def growth(model, prompt: list[int], lengths: list[int], repeats: int) -> dict:
    setting = SETTINGS["top_p_0.9"]
    out = {}
    for n in lengths:
        c = [timed(ours, model, prompt, n, setting)[0] for _ in range(repeats)]
        u = [timed(ours, model, prompt, n, setting, False)[0] for _ in range(repeats)]
        out[f"new_tokens_{n}"] = {
            "cached_tokens_per_s": tokens_per_s(c, n),
            "uncached_tokens_per_s": tokens_per_s(u, n),
            "cache_speedup": round(statistics.median(u) / statistics.median(c), 2),
        }
    return out


def matmul_ceiling(model: TransformerLM, repeats: int, tokens: int = 64) -> dict:
    """The fastest any fp32 implementation of this model can decode at batch 1 on this machine.

    Decoding a token multiplies one vector by every projection matrix and the LM head, each read
    once from memory (70 MB for the 17m shape: more than any cache, so from DRAM). This times just
    those matrix-vector products, in decoding order, with the real weights; nothing else.
    """
    from tinystories_cli.model import Linear

    weights = [m.weight.detach() for m in model.modules() if isinstance(m, Linear)]
    xs = {d: torch.randn(1, d) for d in {w.shape[1] for w in weights}}

    def one_token() -> None:
        for w in weights:
            xs[w.shape[1]] @ w.t()

    one_token()
    per_token = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(tokens):
            one_token()
        per_token.append((time.perf_counter() - t0) / tokens)
    t = statistics.median(per_token)
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    return {"matrices": len(weights), "weight_bytes_per_token": nbytes, "matmul_only_ms_per_token": round(t * 1e3, 3),
            "ceiling_tokens_per_s": round(1 / t, 1), "effective_GB_per_s": round(nbytes / t / 1e9, 2)}


def compiled_decode(model, prompt: list[int], n: int, repeats: int) -> dict:
    """Ours with the cache and `decode_one_token` under torch.compile (gpt-fast style)."""
    import tinystories_cli.generate as G

    eager = G.decode_one_token
    G.decode_one_token = torch.compile(eager, dynamic=True)
    try:
        setting = SETTINGS["greedy"]
        t0 = time.perf_counter()
        ours(model, prompt, 16, setting)  # compiles
        compile_s = time.perf_counter() - t0
        c = [timed(ours, model, prompt, n, setting)[0] for _ in range(repeats)]
    finally:
        G.decode_one_token = eager
    e = [timed(ours, model, prompt, n, setting)[0] for _ in range(repeats)]
    return {"compile_s": round(compile_s, 1), "greedy_compiled_tokens_per_s": tokens_per_s(c, n),
            "greedy_eager_tokens_per_s": tokens_per_s(e, n)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--long", action="store_true", help="also a 1024-context model filled completely")
    ap.add_argument("--compile", action="store_true", help="also decode with torch.compile'd decode_one_token")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cfg = PRESETS["tinystories-17m"].model
    model = build(cfg)
    hf = build_hf(model)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, cfg.vocab_size, (10,), generator=g).tolist()
    with torch.inference_mode():
        ids = torch.tensor([prompt])
        parity = (model(ids) - hf(ids).logits).abs().max().item()
    assert parity < 1e-3, f"weights did not map: max |logit diff| {parity}"

    report = {
        "benchmark": "tslm generate decode throughput, batch 1, 10-token prompt, CPU",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_avg_1m": round(os.getloadavg()[0], 2),
        },
        "versions": {
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "python": platform.python_version(),
        },
        "model": {
            "shape": "tinystories-17m",
            "parameters": model.num_parameters(),
            "context_length": cfg.context_length,
            "init": "random (seed 0)",
            "max_abs_logit_diff_vs_hf": parity,
        },
        "timing": "tokens/s = new tokens / wall time of the whole generate call (prefill included); median",
        "repeats": args.repeats,
        "peer_256_new_tokens": peer_comparison(model, hf, prompt, 256, args.repeats),
        "cached_vs_uncached": growth(model, prompt, [64, cfg.context_length - len(prompt), 512], args.repeats),
    }
    peer = report["peer_256_new_tokens"]["greedy"]["tokens_per_s"]["hf_llama_generate"]
    ceiling = matmul_ceiling(model, args.repeats)
    ceiling["ceiling_over_hf_greedy"] = round(ceiling["ceiling_tokens_per_s"] / peer, 2)
    report["fp32_matmul_ceiling"] = ceiling
    if args.compile:
        report["compiled_decode_256_new_tokens"] = compiled_decode(model, prompt, 256, args.repeats)
    if args.long:
        long_model = build(cfg.model_copy(update={"context_length": 1024}))
        report["cached_vs_uncached_ctx1024"] = growth(long_model, prompt, [1024 - len(prompt)], 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
