"""Import parity figures (not a timed test). Prints one JSON object per run, then a summary object.

    python tests/benchmarks/bench_import.py [--seeds 5] [--data ../shared/data]

For each seed, a random `LlamaForCausalLM` (d 256, 4 layers, 8 heads, 4 key/value heads: GQA) and a
random `GPT2LMHeadModel` (d 256, 4 layers, 4 heads, learned positions, tied) are built with
`transformers` at their own initialization, saved with `save_pretrained` beside GPT-2's tokenizer
(vocab 50257, from ../shared/data), imported with `tslm import`'s library function, and compared
side by side with the peer (transformers, eager attention, float32, CPU) on the same ids:
- max |logit difference| over a 256-token window of tinystories_valid.txt (all 50257 logits per position),
  beside the largest |logit| of the peer (the scale the difference is measured against);
- greedy continuation of a 64-token prompt, 64 new tokens: ours (`generate_tokens`, KV cache,
  temperature 0) vs `generate(do_sample=False)`: identical or not, and the first differing position.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tinystories_cli.generate import generate_tokens  # noqa: E402
from tinystories_cli.importer import import_hf  # noqa: E402
from tinystories_cli.runs import load_trained_model  # noqa: E402


def build(kind: str, seed: int, out: Path, data: Path):
    import transformers

    torch.manual_seed(seed)
    if kind == "llama":
        cfg = transformers.LlamaConfig(vocab_size=50257, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                                       num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                                       rope_theta=10000.0, tie_word_embeddings=False, attn_implementation="eager")
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.GPT2Config(vocab_size=50257, n_embd=256, n_layer=4, n_head=4, n_positions=512,
                                      attn_implementation="eager")
        model = transformers.GPT2LMHeadModel(cfg)
    model.eval()
    model.save_pretrained(out)
    shutil.copyfile(data / "gpt2_vocab.json", out / "vocab.json")
    shutil.copyfile(data / "gpt2_merges.txt", out / "merges.txt")
    return model


def one(kind: str, seed: int, data: Path, text: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        peer = build(kind, seed, tmp / "hf", data)
        t0 = time.perf_counter()
        import_hf(tmp / "hf", tmp / "runs" / kind)
        import_s = time.perf_counter() - t0
        ours, tok, _ = load_trained_model(tmp / "runs" / kind)
        ids = tok.encode(text)
        window = torch.tensor([ids[:256]])
        with torch.no_grad():
            ref_logits = peer(window).logits
            diff = (ours(window) - ref_logits).abs().max().item()
            scale = ref_logits.abs().max().item()
        prompt = ids[:64]
        ref = peer.generate(torch.tensor([prompt]), max_new_tokens=64, do_sample=False, pad_token_id=0,
                            eos_token_id=None)[0, 64:].tolist()
        got = list(generate_tokens(ours, prompt, max_new_tokens=64, temperature=0.0))
        first_diff = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), None)
        return {
            "model": kind,
            "seed": seed,
            "max_abs_logit_diff": diff,
            "max_abs_logit": scale,
            "greedy_identical": got == ref,
            "greedy_tokens": len(got),
            "first_differing_token": first_diff,
            "import_s": round(import_s, 3),
        }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    args = ap.parse_args()
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(2)
    text = (args.data / "tinystories_valid.txt").read_text(encoding="utf-8")[:20_000]
    results = []
    for seed in range(args.seeds):
        for kind in ("llama", "gpt2"):
            r = one(kind, seed, args.data, text)
            print(json.dumps(r), flush=True)
            results.append(r)
    summary = {"benchmark": "import_parity", "machine": f"{platform.machine()} {torch.get_num_threads()} threads",
               "torch": torch.__version__, "transformers": transformers.__version__, "seeds": args.seeds}
    for kind in ("llama", "gpt2"):
        rs = [r for r in results if r["model"] == kind]
        summary[kind] = {"median_max_abs_logit_diff": statistics.median(r["max_abs_logit_diff"] for r in rs),
                         "worst_max_abs_logit_diff": max(r["max_abs_logit_diff"] for r in rs),
                         "greedy_identical": f"{sum(r['greedy_identical'] for r in rs)}/{len(rs)}",
                         "median_import_s": statistics.median(r["import_s"] for r in rs)}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
