"""Proof with the real consumer: llama.cpp runs `tslm export --format gguf` and decodes what tslm decodes.

    pip install llama-cpp-python        # compiles llama.cpp with cmake (several minutes); not in CI
    python tests/benchmarks/check_gguf_llamacpp.py [--work DIR] [--steps 300] [--tokens 48] [--threads 2]

One command, a few minutes on 2 CPU cores:
1. A small model trained on real text: the first --train-bytes of ../shared/data/tinystories_train.txt
   (`tslm bpe` 1024 ids, `tslm encode`, `tslm train`: 2 x 64, 2 heads, ctx 128, batch 8, --steps steps), so
   greedy text is story-like. Reused when DIR already holds it.
2. `tslm export --format gguf` in f32 and q8_0.
3. For each prompt: `tslm generate PROMPT --temp 0 --json --no-stop` (ids of the prompt and the
   completion, key `ids`), and llama.cpp (llama_cpp.Llama on the GGUF file) fed the SAME prompt ids,
   greedy. Checks:
   - tokenizer: llama.cpp's own tokenization of each prompt equals ours;
   - logits: llama.cpp's logits at every prompt position vs ours (max abs difference, f32 weights and
     an f32 KV cache; q8_0 runs with llama.cpp's defaults, an f16 KV cache);
   - f32: the same ids as tslm for all --tokens (at least 32) tokens, every prompt;
   - q8_0: the same generated text for most prompts (at least half).
4. Speed: greedy decoding tokens/s of llama.cpp (its own --threads) and of tslm's library
   (`generate_tokens`, the KV cache, torch with the same thread count), prompt included, median
   over prompts. The machine may be shared: say so when recording the figures.

Prints one JSON object; exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data"
PROMPTS = ["Once upon a time", "Lily and Tom went to the park.", "The little dog was sad because",
           "One day, a girl named Sue found a", "Tim wanted to play with his ball, but", "The sun was hot and",
           "Mom said, \"Let's bake a cake!\"", "A big bird sat on the tree. It"]
RUN = "gguf-check"


def tslm(work: Path, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, "-m", "tinystories_cli", *args], cwd=work, env=env, text=True,
                         capture_output=True)
    if res.returncode != 0:
        raise SystemExit(
            f"tslm {' '.join(args)} failed ({res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
        )
    return res.stdout


def train_small_model(work: Path, steps: int, train_bytes: int, threads: int) -> float:
    """data/tinystories + runs/gguf-check under `work` (skipped when the run is finished); seconds spent."""
    t0 = time.perf_counter()
    if (work / "runs" / RUN / "checkpoints").is_dir() and any((work / "runs" / RUN / "checkpoints").glob("step_*")):
        return 0.0
    d = work / "data" / "tinystories"
    d.mkdir(parents=True, exist_ok=True)
    text = (SHARED / "tinystories_train.txt").read_bytes()[:train_bytes]
    (d / "train.txt").write_bytes(text[:text.rfind(b"<|endoftext|>") + len(b"<|endoftext|>")])
    (d / "valid.txt").write_bytes((SHARED / "tinystories_valid.txt").read_bytes()[:200_000])
    tslm(work, "bpe", str(d / "train.txt"), "--vocab-size", "1024", "--out", str(d / "tokenizer"), "--workers", "1",
         "--force")
    tslm(work, "encode", "tinystories", "--workers", "1", "--force")
    tslm(
        work,
        "train",
        "--preset",
        "debug",
        "--run-name",
        RUN,
        "--ctx",
        "128",
        "--d-model",
        "64",
        "--num-layers",
        "2",
        "--num-heads",
        "2",
        "--d-ff",
        "192",
        "--batch-size",
        "8",
        "--max-steps",
        str(steps),
        "--warmup-steps",
        "20",
        "--lr",
        "3e-3",
        "--min-lr",
        "3e-4",
        "--eval-every",
        str(steps),
        "--save-every",
        str(steps),
        "--log-every",
        "50",
        "--device",
        "cpu",
        "--plain",
        "--force",
    )
    return time.perf_counter() - t0


def first_difference(a: list[int], b: list[int]) -> int:
    """Tokens that agree before the first difference (len when one is a prefix of the other)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def llama_greedy(llm, prompt_ids: list[int], n: int) -> tuple[list[int], float]:
    """n greedy tokens after `prompt_ids` (no stop); (ids, seconds including the prompt)."""
    llm.reset()
    t0 = time.perf_counter()
    out = []
    for tok in llm.generate(prompt_ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(int(tok))
        if len(out) == n:
            break
    return out, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/tslm-gguf-check"))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--train-bytes", type=int, default=2_000_000)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.tokens < 32:
        ap.error("--tokens must be at least 32")
    try:
        llama_cpp = importlib.import_module("llama_cpp")  # not a dev dependency: it compiles llama.cpp
    except ImportError:
        raise SystemExit("this check needs llama.cpp's Python binding: pip install llama-cpp-python") from None
    sys.path.insert(0, str(REPO))
    import torch

    from tinystories_cli import runs
    from tinystories_cli.generate import generate_tokens

    torch.set_num_threads(args.threads)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    train_s = train_small_model(work, args.steps, args.train_bytes, args.threads)
    run_dir = work / "runs" / RUN
    ggufs = {}
    for gtype in ("f32", "q8_0"):
        ggufs[gtype] = work / f"model-{gtype}.gguf"
        tslm(work, "export", str(run_dir), "--format", "gguf", "--dtype", gtype, "--out", str(ggufs[gtype]), "--force")

    model, tokenizer, cfg = runs.load_trained_model(run_dir, "cpu")
    model.eval()
    # f32: llama.cpp's KV cache in f32 too (its default is f16, which alone moves logits by ~1e-4);
    # q8_0: llama.cpp's defaults, what a user gets.
    f32_cache = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32}
    llms = {g: llama_cpp.Llama(model_path=str(p), n_ctx=cfg.context_length, n_batch=cfg.context_length,
                               n_threads=args.threads, n_threads_batch=args.threads, seed=0, logits_all=True,
                               verbose=False, **(f32_cache if g == "f32" else {}))
            for g, p in ggufs.items()}
    rows = []
    for prompt in PROMPTS:
        ours = json.loads(tslm(work, "generate", prompt, "--run", str(run_dir), "--temp", "0", "--json", "--no-stop",
                               "--max-tokens", str(args.tokens), "--device", "cpu").strip().splitlines()[-1])
        prompt_ids = ours["ids"][:ours["prompt_tokens"]]
        ours_new = ours["ids"][ours["prompt_tokens"]:]
        assert len(prompt_ids) + args.tokens <= cfg.context_length, "prompt + tokens must fit the context"
        llama_tok = llms["f32"].tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
        # logits at every prompt position, llama.cpp (f32) vs ours
        llm = llms["f32"]
        llm.reset()
        llm.eval(prompt_ids)
        theirs_logits = torch.tensor(llm.scores[:len(prompt_ids)], dtype=torch.float32)
        with torch.no_grad():
            our_logits = model(torch.tensor([prompt_ids]))[0].float()
        logit_diff = float((theirs_logits[:, :cfg.vocab_size] - our_logits).abs().max())
        f32_ids, f32_s = llama_greedy(llms["f32"], prompt_ids, args.tokens)
        q8_ids, q8_s = llama_greedy(llms["q8_0"], prompt_ids, args.tokens)
        t0 = time.perf_counter()
        lib_ids = list(generate_tokens(model, prompt_ids, max_new_tokens=args.tokens, temperature=0))
        ours_s = time.perf_counter() - t0
        rows.append({
            "prompt": prompt, "prompt_ids_equal_llama_tokenize": llama_tok == prompt_ids,
            "max_abs_logit_diff_f32": logit_diff, "f32_agree": first_difference(ours_new, f32_ids),
            "q8_0_agree": first_difference(ours_new, q8_ids),
            "q8_0_same_text": tokenizer.decode(q8_ids) == tokenizer.decode(ours_new),
            "library_equals_cli": lib_ids == ours_new,
            "text": tokenizer.decode(ours_new),
            "tok_s": {"tslm_cli_reported": ours["tokens_per_s"], "tslm": args.tokens / ours_s,
                      "llama_cpp_f32": args.tokens / f32_s, "llama_cpp_q8_0": args.tokens / q8_s},
        })
    n = len(rows)
    checks = {
        "tokenizer_same_ids": all(r["prompt_ids_equal_llama_tokenize"] for r in rows),
        "f32_same_ids_all_tokens": all(r["f32_agree"] == args.tokens for r in rows),
        "q8_0_same_text_most_prompts": sum(r["q8_0_same_text"] for r in rows) * 2 >= n,
    }
    med = {k: round(statistics.median(r["tok_s"][k] for r in rows), 1) for k in rows[0]["tok_s"]}
    out = {
        "benchmark": "check_gguf_llamacpp", "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads,
                    "torch": torch.__version__, "llama_cpp_python": getattr(llama_cpp, "__version__", "?")},
        "model": {"params": model.num_parameters(), "d_model": cfg.d_model, "layers": cfg.num_layers,
                  "ctx": cfg.context_length, "vocab": cfg.vocab_size, "train_steps": args.steps,
                  "train_s": round(train_s, 1)},
        "gguf_bytes": {g: p.stat().st_size for g, p in ggufs.items()},
        "tokens": args.tokens, "prompts": n,
        "agreement": {
            "tokenizer_prompts_equal": sum(r["prompt_ids_equal_llama_tokenize"] for r in rows),
            "f32_prompts_all_tokens_equal": sum(r["f32_agree"] == args.tokens for r in rows),
            "f32_min_tokens_equal": min(r["f32_agree"] for r in rows),
            "q8_0_prompts_same_text": sum(r["q8_0_same_text"] for r in rows),
            "q8_0_min_tokens_equal": min(r["q8_0_agree"] for r in rows),
            "max_abs_logit_diff_f32": max(r["max_abs_logit_diff_f32"] for r in rows),
        },
        "tokens_per_s_median": med,
        "checks": checks, "passed": all(checks.values()),
        "rows": rows,
    }
    print(json.dumps(out, indent=2))
    return 0 if out["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
