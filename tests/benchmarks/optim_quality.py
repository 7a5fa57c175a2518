"""Equal-token quality of the optimizer and compute-dtype choices: AdamW vs Muon, float32 vs bf16 autocast.

Trains the library's own model (`TransformerLM`) with the library's own optimizers (`AdamW`, and `Muon` on
the hidden 2-D matrices with AdamW on the rest, `muon_param_split`) for a fixed number of tokens, and prints
one JSON line per arm with the held-out loss on fixed validation windows and the tokens/s it ran at.

Equal-token losses do not depend on how busy the machine is; the tokens/s do (say so when recording them).

    python tests/benchmarks/optim_quality.py --train data/train.npy --valid data/valid.npy \\
        --arms adamw:4e-3,muon:0.02 --dtypes float32,bfloat16 --seeds 0,1,2 --tokens 1e6

An arm is `adamw:LR` or `muon:LR` (Muon's lr; AdamW keeps `--lr` for the embeddings, head and norms),
optionally `:wd=W` (Muon's weight decay). The model shape defaults to quickstart's CPU size at 4 minutes
(d_model 128, 4 layers, 4 heads, batch 8 x 256, WSD with a 40% decay, lr 4e-3): `train/autosize.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import numpy as np
import torch

from tinystories_cli.config import ModelConfig
from tinystories_cli.data import BatchSampler, fixed_windows, window_batches
from tinystories_cli.model import TransformerLM, cross_entropy
from tinystories_cli.optim import AdamW, Muon, clip_grad_norm_, make_param_groups, muon_param_split, wsd_lr

MIN_LR_RATIO = 0.1


def parse_arm(text: str) -> dict:
    """`muon:0.02:wd=0.01` -> {"optimizer": "muon", "lr": 0.02, "wd": 0.01}."""
    name, lr, *rest = text.split(":")
    arm = {"optimizer": name, "lr": float(lr), "wd": None}
    for item in rest:
        key, _, value = item.partition("=")
        arm[key] = float(value)
    if name not in ("adamw", "muon"):
        raise SystemExit(f"unknown optimizer in arm {text!r}: adamw or muon")
    return arm


def build_optimizers(model: TransformerLM, arm: dict, adam_lr: float, weight_decay: float) -> list:
    """The optimizers of an arm, each param group remembering its peak lr under "peak_lr"."""
    if arm["optimizer"] == "adamw":
        opts = [AdamW(make_param_groups(model, weight_decay), lr=arm["lr"], betas=(0.9, 0.999), eps=1e-8)]
    else:
        hidden, rest = muon_param_split(model)
        hidden_ids = {id(p) for p in hidden}
        groups = [g for g in make_param_groups(model, weight_decay)]
        groups = [{**g, "params": [p for p in g["params"] if id(p) not in hidden_ids]} for g in groups]
        groups = [g for g in groups if g["params"]]
        wd = arm["wd"] if arm["wd"] is not None else 0.0
        opts = [Muon(hidden, lr=arm["lr"], momentum=0.95, nesterov=True, weight_decay=wd),
                AdamW(groups, lr=adam_lr, betas=(0.9, 0.999), eps=1e-8)]
    for opt in opts:
        for g in opt.param_groups:
            g["peak_lr"] = g["lr"]
    return opts


def run_arm(args, arm: dict, dtype: str, seed: int, train: np.ndarray, valid: np.ndarray) -> dict:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=args.vocab, context_length=args.ctx, d_model=args.d_model,
                      num_layers=args.layers, num_heads=args.heads)
    model = TransformerLM(cfg)
    opts = build_optimizers(model, arm, args.lr, args.weight_decay)
    params = [p for p in model.parameters() if p.requires_grad]
    tokens_per_step = args.batch * args.ctx
    steps = max(1, round(args.tokens / tokens_per_step))
    warmup = min(20, max(1, steps // 10))
    sampler = BatchSampler(train, args.batch, args.ctx, seed=seed)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if dtype == "bfloat16" else contextlib.nullcontext
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        ratio = wsd_lr(step, 1.0, MIN_LR_RATIO, warmup, steps, args.decay_fraction)
        for opt in opts:
            for g in opt.param_groups:
                g["lr"] = g["peak_lr"] * ratio
        x, y = sampler.next("cpu")
        with autocast():
            logits = model(x)
        loss = cross_entropy(logits.float(), y)
        loss.backward()
        clip_grad_norm_(params, 1.0)
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t0
    model.eval()
    starts = fixed_windows(len(valid), args.ctx, args.eval_windows)
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in window_batches(valid, starts, args.ctx, 16, "cpu"):
            with autocast():
                logits = model(x)
            total += cross_entropy(logits.float(), y).item() * y.numel()
            count += y.numel()
    return {"optimizer": arm["optimizer"], "lr": arm["lr"], "muon_wd": arm["wd"], "dtype": dtype, "seed": seed,
            "d_model": args.d_model, "layers": args.layers, "steps": steps, "tokens": steps * tokens_per_step,
            "val_loss": total / count, "train_loss_last": loss.item(), "seconds": round(seconds, 1),
            "tokens_per_s": round(steps * tokens_per_step / seconds)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", required=True)
    ap.add_argument("--valid", required=True)
    ap.add_argument("--arms", default="adamw:4e-3,muon:0.02")
    ap.add_argument("--dtypes", default="float32")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--tokens", type=float, default=1e6)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=4e-3, help="AdamW's lr for the parameters Muon does not take")
    ap.add_argument("--weight-decay", type=float, default=0.1, help="AdamW's weight decay")
    ap.add_argument("--decay-fraction", type=float, default=0.4)
    ap.add_argument("--eval-windows", type=int, default=256)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    train = np.load(args.train, mmap_mode="r")
    valid = np.load(args.valid, mmap_mode="r")
    results = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for dtype in args.dtypes.split(","):
            for arm in map(parse_arm, args.arms.split(",")):
                r = run_arm(args, arm, dtype, seed, train, valid)
                results.append(r)
                print(json.dumps(r), flush=True)
    keys = sorted({(r["optimizer"], r["lr"], r["muon_wd"], r["dtype"]) for r in results}, key=str)
    summary = []
    for k in keys:
        rs = [r for r in results if (r["optimizer"], r["lr"], r["muon_wd"], r["dtype"]) == k]
        summary.append({"optimizer": k[0], "lr": k[1], "muon_wd": k[2], "dtype": k[3], "seeds": len(rs),
                        "val_loss_median": statistics.median(r["val_loss"] for r in rs),
                        "val_losses": [round(r["val_loss"], 4) for r in rs],
                        "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in rs)})
    print(json.dumps({"summary": summary}))


if __name__ == "__main__":
    main()
