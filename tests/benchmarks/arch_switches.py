"""The NanoGPT speedrun's architecture switches at equal tokens and their speed cost (issue 27).

    python tests/benchmarks/arch_switches.py --work /work/scratch_h4 [--steps 500] [--seeds 0 1] [--workers 2]

`--work` is a workspace holding data/tinystories/{train,valid}.npy and data/tinystories/tokenizer/ (the
quickstart layout: `tslm bpe` with 2048 ids on the first 4 MB of the text, then `tslm encode`); the runs go
under its runs/arch_switches/. Every arm trains quickstart's CPU size for the 4-minute budget (the auto-size
rule's row: d_model 128, 4 layers, 4 heads, batch 8 x 256, lr 4e-3, WSD with the decay over the last 40%)
with `tslm train` for the same number of steps, in fp32 eager, one thread per run:

    baseline    the defaults (SwiGLU, d_ff 384)
    qk_norm     --qk-norm
    relu2       --ffn relu2 (d_ff 576 = 3/2 x 384: SwiGLU's parameter count and FLOPs)
    softcap     --logit-softcap 30
    zero_init   --zero-init-proj

then `combo`: every switch whose mean held-out loss beat the baseline's, together (when two or more did).
The held-out loss is the run's last evaluation (the same fixed validation windows for every run), so the
arms compare paired by seed.

Speed: the training runs share the machine (with each other and with whatever else runs), so their tokens/s
are only indicative. The speed cost of each switch is measured separately first, in this process: one
training step (forward, cross-entropy, backward, clip, AdamW) of each arm on one fixed batch, the arms
interleaved round by round, the median of the rounds (one thread).

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import torch

from tinystories_cli.config import ModelConfig, default_d_ff
from tinystories_cli.model import TransformerLM, cross_entropy
from tinystories_cli.optim import AdamW, clip_grad_norm_, make_param_groups

D_MODEL, LAYERS, HEADS, CTX, BATCH, LR = 128, 4, 4, 256, 8, 4e-3
VOCAB = 2048
ARMS: dict[str, dict] = {
    "baseline": {},
    "qk_norm": {"qk_norm": True},
    "relu2": {"ffn": "relu2"},
    "softcap": {"logit_softcap": 30.0},
    "zero_init": {"zero_init_proj": True},
}


def flags(switches: dict) -> list[str]:
    out = []
    for k, v in switches.items():
        name = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            out.append(name if v else "--no-" + name[2:])
        else:
            out += [name, str(v)]
    ffn = switches.get("ffn", "swiglu")
    return out + ["--d-ff", str(default_d_ff(D_MODEL, ffn))]


def train_cmd(run_dir: Path, switches: dict, seed: int, steps: int, eval_batches: int) -> list[str]:
    return [sys.executable, "-m", "tinystories_cli", "train", "--preset", "tinystories-cpu",
            "--d-model", str(D_MODEL), "--num-layers", str(LAYERS), "--num-heads", str(HEADS), "--ctx", str(CTX),
            "--batch-size", str(BATCH), "--max-steps", str(steps), "--lr", str(LR), "--min-lr", str(LR / 10),
            "--warmup-steps", str(min(20, max(1, steps // 10))), "--schedule", "wsd", "--decay-fraction", "0.4",
            "--eval-every", str(steps), "--eval-batches", str(eval_batches), "--save-every", str(steps),
            "--seed", str(seed), "--dtype", "float32", "--no-compile", "--device", "cpu",
            "--run-dir", str(run_dir), "--force", "--quiet", *flags(switches)]


def train_one(work: Path, arm: str, switches: dict, seed: int, steps: int, eval_batches: int) -> dict:
    run_dir = work / "runs" / "arch_switches" / f"{arm}-s{seed}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(train_cmd(run_dir, switches, seed, steps, eval_batches), cwd=work, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{arm} seed {seed} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = [r for r in rows if "val_loss" in r][-1]
    train_rows = [r for r in rows if "tokens" in r and "elapsed_s" in r]
    end = train_rows[-1]
    return {"arm": arm, "seed": seed, "steps": last["step"], "tokens": end["tokens"],
            "val_loss": round(last["val_loss"], 4), "val_bpb": round(last.get("val_bpb", float("nan")), 4),
            "train_tokens_per_s": round(end["tokens"] / end["elapsed_s"]), "wall_s": round(wall, 1)}


def speed(arms: dict[str, dict], rounds: int, steps_per_round: int, seed: int = 0) -> dict[str, dict]:
    """Training tokens/s of each arm, interleaved round by round in this process: the median round and the
    fastest (on a shared machine other processes only ever add time, so the fastest is the least disturbed)."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (BATCH, CTX + 1), generator=g)
    x, y = ids[:, :-1], ids[:, 1:]
    setups = {}
    for arm, sw in arms.items():
        torch.manual_seed(seed)
        cfg = ModelConfig(vocab_size=VOCAB, context_length=CTX, d_model=D_MODEL, num_layers=LAYERS, num_heads=HEADS,
                          **sw)
        model = TransformerLM(cfg).train()
        opt = AdamW(make_param_groups(model, 0.1), lr=1e-4)
        setups[arm] = (model, opt)

    def step(model, opt):
        loss = cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    for model, opt in setups.values():  # warm-up
        for _ in range(2):
            step(model, opt)
    times: dict[str, list[float]] = {arm: [] for arm in arms}
    for _ in range(rounds):
        for arm, (model, opt) in setups.items():
            t0 = time.perf_counter()
            for _ in range(steps_per_round):
                step(model, opt)
            times[arm].append((time.perf_counter() - t0) / steps_per_round)
    return {arm: {"median": round(BATCH * CTX / statistics.median(t)), "fastest": round(BATCH * CTX / min(t))}
            for arm, t in times.items()}


def summarize(runs: list[dict], spd: dict[str, float]) -> dict:
    by_arm: dict[str, dict[int, float]] = {}
    for r in runs:
        by_arm.setdefault(r["arm"], {})[r["seed"]] = r["val_loss"]
    base = by_arm["baseline"]
    out = {}
    for arm, losses in by_arm.items():
        diffs = [losses[s] - base[s] for s in losses if s in base]
        out[arm] = {"val_loss": [losses[s] for s in sorted(losses)], "mean": round(statistics.mean(losses.values()), 4),
                    "paired_diff_vs_baseline": [round(d, 4) for d in diffs],
                    "mean_diff": round(statistics.mean(diffs), 4) if diffs else None}
        if spd.get(arm) and spd.get("baseline"):
            out[arm]["tokens_per_s"] = spd[arm]
            out[arm]["speed_vs_baseline"] = {k: round(spd[arm][k] / spd["baseline"][k], 3) for k in spd[arm]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--eval-batches", type=int, default=40)
    ap.add_argument("--speed-rounds", type=int, default=5)
    ap.add_argument("--speed-steps", type=int, default=3)
    ap.add_argument("--arms", nargs="+", default=list(ARMS))
    ap.add_argument("--no-combo", action="store_true")
    ap.add_argument("--speed-only", nargs="*", metavar="SWITCH_ARM",
                    help="only the speed measurement, of --arms plus a `combo` of these arms' switches")
    args = ap.parse_args()
    arms = {a: ARMS[a] for a in args.arms}
    if "baseline" not in arms:
        arms = {"baseline": {}, **arms}
    if args.speed_only is not None:
        if len(args.speed_only) >= 2:
            arms["combo"] = {k: v for a in args.speed_only for k, v in ARMS[a].items()}
        print(json.dumps({"benchmark": "arch_switches speed", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                          "load_average": os.getloadavg(), "rounds": args.speed_rounds, "steps_per_round": args.speed_steps,
                          "combo": args.speed_only, "tokens_per_s": speed(arms, args.speed_rounds, args.speed_steps)},
                         indent=1))
        return

    if args.work is None:
        ap.error("--work is needed (a workspace with data/tinystories/)")
    spd = speed(arms, args.speed_rounds, args.speed_steps) if args.speed_rounds else {}
    print(json.dumps({"speed_tokens_per_s": spd}), file=sys.stderr, flush=True)
    jobs = [(a, arms[a], s) for s in args.seeds for a in arms]
    runs = []
    with ThreadPoolExecutor(args.workers) as pool:
        for r in pool.map(lambda j: train_one(args.work, j[0], j[1], j[2], args.steps, args.eval_batches), jobs):
            runs.append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)
    table = summarize(runs, spd)
    winners = [a for a in arms if a != "baseline" and table[a]["mean_diff"] is not None and table[a]["mean_diff"] < 0]
    if len(winners) >= 2 and not args.no_combo:
        combo = {k: v for a in winners for k, v in arms[a].items()}
        if args.speed_rounds:  # paired with a fresh baseline, scaled to the first one's
            pair = speed({"baseline": {}, "combo": combo}, args.speed_rounds, args.speed_steps)
            spd["combo"] = {k: round(pair["combo"][k] * spd["baseline"][k] / pair["baseline"][k]) for k in pair["combo"]}
        with ThreadPoolExecutor(args.workers) as pool:
            for r in pool.map(lambda s: train_one(args.work, "combo", combo, s, args.steps, args.eval_batches),
                              args.seeds):
                runs.append(r)
                print(json.dumps(r), file=sys.stderr, flush=True)
        table = summarize(runs, spd)
        table["combo"]["switches"] = winners
    print(json.dumps({
        "benchmark": "arch_switches", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
        "load_average": os.getloadavg(), "shape": {"d_model": D_MODEL, "num_layers": LAYERS, "num_heads": HEADS,
                                                   "ctx": CTX, "batch": BATCH, "lr": LR, "steps": args.steps},
        "tokens_per_run": args.steps * BATCH * CTX, "winners": winners, "arms": table, "runs": runs,
    }, indent=1))


if __name__ == "__main__":
    main()
