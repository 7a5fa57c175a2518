"""`tslm generate` against llama2.c (run.c fp32, runq.c int8) on the same weights, with the figures that
explain the result (issue 26). Prints JSON lines, then one summary object.

    python tests/benchmarks/bench_decode_peer.py [--rounds 3] [--threads 1,2] [--tokens 256] [--work DIR]
                                                 [--precisions fp32,int8,bf16] [--steps 8]

1. Models: the three shapes of the issue, made the way a user makes them (`tslm bpe` on the shared
   TinyStories train text, `tslm encode`, `tslm train` for --steps steps on the CPU), so that
   `tslm export --format hf` accepts them:
     d128  d_model 128 x 4 layers, 4 heads, vocab 2048 (quickstart's CPU size)
     17m   512 x 4, 16 heads, d_ff 1344, vocab 10000 (tinystories-17m)
     15m   288 x 6, 6 heads, d_ff 768, vocab 32000, tied (the stories15M shape)
   The model vocabulary is set explicitly; the tokenizer may have fewer tokens (as `tslm train` allows).
2. Decode speed: ../shared/peers/llama2c/bench_decode.py on the three runs, once per precision
   (`--tslm-args "--precision P"`), paired rounds, medians; its summary lines are passed through.
3. Why: the bytes one token streams in each precision (the packed weight matrices; the embedding row
   and the KV cache are small beside them), the achieved GB/s (bytes/token x tok/s) and this machine's
   streaming-read bandwidth (torch sum over a 256 MiB array, and over a 4 MiB one that stays in cache),
   at 1 and 2 threads.
4. Quality of each precision on held-out text (the shared TinyStories valid text, encoded with each
   run's tokenizer): mean loss over QUALITY_TOKENS tokens (teacher forcing through the kernel) minus the
   fp32 torch model's, and greedy agreement with fp32 over 256 tokens from an empty prompt (share of
   equal ids, and the first position that differs).
5. Also: prefill tokens/s for a 200-token prompt (fast path and torch path), the wall time of
   `tslm export --format hf`, and the kernel's compile time on first use (a fresh cache directory).

Needs gcc, and `tslm` on PATH (or --tslm) from the environment that runs this script. The code under
test is this checkout (PYTHONPATH is set to it for every subprocess). On a shared or busy machine the
2-thread figures collapse for both sides: run it on an idle one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
PEER = REPO.parent / "shared" / "peers" / "llama2c"
DATA = REPO.parent / "shared" / "data"

MODELS = {  # name: (vocab, d_model, layers, heads, d_ff, tied)
    "d128": (2048, 128, 4, 4, 384, False),
    "17m": (10000, 512, 4, 16, 1344, False),
    "15m": (32000, 288, 6, 6, 768, True),
}
CTX = 256
QUALITY_TOKENS = 512
TRAIN_BYTES = 2_000_000


def emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def env_here(**extra: str) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra}


def sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, env=kw.pop("env", env_here()), **kw)
    if r.returncode:
        sys.exit(f"failed: {' '.join(map(str, cmd))}\n{(r.stdout + r.stderr)[-3000:]}")
    return r


def make_runs(work: Path, tslm: str, steps: int) -> dict[str, Path]:
    """The three runs (reused when --work already holds them)."""
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    train_txt, valid_txt = data / "train.txt", data / "valid.txt"
    if not train_txt.exists():
        with open(DATA / "tinystories_train.txt", "rb") as f:
            chunk = f.read(TRAIN_BYTES)
        train_txt.write_bytes(chunk[: chunk.rfind(b"\n") + 1])
        shutil.copyfile(DATA / "tinystories_valid.txt", valid_txt)
    runs = {}
    for name, (vocab, d, layers, heads, dff, tied) in MODELS.items():
        run = work / "runs" / name
        runs[name] = run
        if (run / "checkpoints").is_dir() and any((run / "checkpoints").iterdir()):
            continue
        tok = data / f"tok{vocab}"
        if not (tok / "vocab.json").exists():
            sh([tslm, "bpe", str(train_txt), "--vocab-size", str(vocab), "--out", str(tok), "--json"])
        tokens = data / f"train{vocab}.npy"
        if not tokens.exists():
            sh([tslm, "encode", str(train_txt), "-t", str(tok), "--out", str(tokens), "--json"])
            sh([tslm, "encode", str(valid_txt), "-t", str(tok), "--out", str(data / f"valid{vocab}.npy"), "--json"])
        t0 = time.perf_counter()
        sh([tslm, "train", "--preset", "tinystories-17m", "--run-dir", str(run), "--force", "--train-data", str(tokens),
            "--valid-data", str(data / f"valid{vocab}.npy"), "--tokenizer", str(tok), "--vocab-size", str(vocab),
            "--d-model", str(d), "--num-layers", str(layers), "--num-heads", str(heads), "--d-ff", str(dff),
            "--tie-embeddings" if tied else "--untie-embeddings", "--ctx", str(CTX), "--max-steps", str(steps),
            "--warmup-steps", str(max(1, steps // 10)), "--batch-size", "8", "--eval-every", str(steps),
            "--eval-batches", "1", "--device", "cpu", "--quiet"])
        emit({"made_run": name, "train_steps": steps, "seconds": round(time.perf_counter() - t0, 1)})
    return runs


def bandwidth() -> dict:
    """Streaming-read GB/s of a torch sum: a 256 MiB array (memory) and a 4 MiB one (cache), 1 and 2 threads."""
    import torch

    out = {}
    n0 = torch.get_num_threads()
    for label, mib in (("dram_256MiB", 256), ("cache_4MiB", 4)):
        x = torch.ones(mib * 2**20 // 4)
        reps = 5 if mib > 16 else 400
        for t in (1, 2):
            torch.set_num_threads(t)
            x.sum()
            best = float("inf")
            for _ in range(5):
                t0 = time.perf_counter()
                for _ in range(reps // 5 or 1):
                    x.sum()
                best = min(best, (time.perf_counter() - t0) / (reps // 5 or 1))
            out[f"{label}_{t}t_GBps"] = round(x.numel() * 4 / best / 1e9, 1)
    torch.set_num_threads(n0)
    return out


def quality_and_prefill(runs: dict[str, Path], precisions: list[str]) -> list[dict]:
    import numpy as np
    import torch

    from tinystories_cli import fastpath
    from tinystories_cli import runs as runs_mod
    from tinystories_cli.generate import generate_tokens
    from tinystories_cli.model import cross_entropy

    torch.set_num_threads(1)
    rows = []
    for name, run in runs.items():
        model, tok, cfg = runs_mod.load_trained_model(run, device="cpu")
        vocab = MODELS[name][0]
        valid = np.load(run.parent.parent / "data" / f"valid{vocab}.npy", mmap_mode="r")
        ids = torch.from_numpy(np.asarray(valid[: QUALITY_TOKENS + 1], dtype=np.int64))
        windows = [ids[i:i + CTX + 1] for i in range(0, QUALITY_TOKENS, CTX)]
        with torch.inference_mode():
            ref_loss = statistics.fmean(float(cross_entropy(model(w[None, :-1])[0], w[1:])) for w in windows)
        greedy_ref = None
        for prec in precisions:
            if prec == "bf16" and not fastpath.native_bf16():
                rows.append({"run": name, "precision": prec, "skipped": "this CPU has no native bf16"})
                continue
            fast = fastpath.fast_model(model, prec)
            losses = []
            with torch.inference_mode():
                for w in windows:
                    model.setup_caches(1, CTX)
                    fast.bind_caches(model)
                    lp = []
                    for c in range(w.numel() - 1):
                        logits = fast.step(w[c:c + 1], c)
                        lp.append(float(torch.log_softmax(logits[0].double(), -1)[w[c + 1]]))
                    losses.append(-statistics.fmean(lp))
                    model.clear_caches()
            start = [tok.eot_id]  # an empty prompt; never stopping (as --no-stop)
            greedy = list(generate_tokens(model, start, max_new_tokens=256, temperature=0, precision=prec,
                                          engine="fast"))
            greedy_ref = greedy_ref if greedy_ref is not None else list(
                generate_tokens(model, start, max_new_tokens=256, temperature=0, engine="torch"))
            same = [a == b for a, b in zip(greedy, greedy_ref)]
            first_diff = next((i for i, s in enumerate(same) if not s), None)
            kv_bytes = cfg.num_layers * 2 * cfg.d_model * 4 * (CTX // 2)  # the KV cache read at the mean position
            rows.append({"run": name, "precision": prec, "heldout_tokens": QUALITY_TOKENS,
                         "loss_torch_fp32": round(ref_loss, 5), "loss": round(statistics.fmean(losses), 5),
                         "loss_minus_fp32": round(statistics.fmean(losses) - ref_loss, 5),
                         "greedy_tokens": len(greedy_ref), "greedy_agreement": round(sum(same) / max(1, len(same)), 4),
                         "greedy_first_difference": first_diff, "weight_bytes_per_token": fast.weight_bytes,
                         "kv_bytes_per_token_mean": kv_bytes})
            emit({"quality": rows[-1]})
        # prefill: a 200-token prompt, one new token
        prompt = [int(i) for i in valid[1000:1200]]
        for engine in ("fast", "torch"):
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                list(generate_tokens(model, prompt, max_new_tokens=1, temperature=0, engine=engine))
                best = min(best, time.perf_counter() - t0)
            rows.append({"run": name, "prefill_engine": engine, "prompt_tokens": 200,
                         "prefill_tok_s_1thread": round(200 / best, 1)})
            emit({"prefill": rows[-1]})
    return rows


def export_time(runs: dict[str, Path], tslm: str, work: Path) -> dict:
    out = {}
    for name, run in runs.items():
        t0 = time.perf_counter()
        sh([tslm, "export", str(run), "--format", "hf", "--out", str(work / "export" / name), "--force"])
        out[name] = round(time.perf_counter() - t0, 2)
    return out


def compile_time(work: Path) -> dict:
    cache = work / "fresh-kernel-cache"
    shutil.rmtree(cache, ignore_errors=True)
    code = ("import time; from tinystories_cli.fastpath import build; t=time.perf_counter(); build.load(); "
            "print(time.perf_counter()-t)")
    first = float(sh([sys.executable, "-c", code], env=env_here(TSLM_KERNEL_CACHE=str(cache))).stdout)
    cached = float(sh([sys.executable, "-c", code], env=env_here(TSLM_KERNEL_CACHE=str(cache))).stdout)
    shutil.rmtree(cache, ignore_errors=True)
    return {"first_use_s": round(first, 2), "cached_load_s": round(cached, 3)}


def peer(runs: dict[str, Path], tslm: str, work: Path, a, prec: str) -> list[dict]:
    cmd = [sys.executable, str(PEER / "bench_decode.py"), *map(str, runs.values()), "--rounds", str(a.rounds),
           "--threads", a.threads, "--tokens", str(a.tokens), "--work", str(work / "llama2c"), "--tslm", tslm]
    if prec != "fp32":
        cmd += ["--tslm-args", f"--precision {prec}"]
    r = sh(cmd)
    summaries = []
    for line in r.stdout.splitlines():
        obj = json.loads(line)
        if "summary" in obj:
            summaries.append({"precision": prec, **obj["summary"]})
            emit({"peer": summaries[-1]})
    return summaries


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument(
        "--steps", type=int, default=8, help="training steps per model (a few: the speed does not depend on them)"
    )
    ap.add_argument("--precisions", default="fp32,int8,bf16")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "tslm-bench-decode-peer")
    ap.add_argument("--tslm", default=shutil.which("tslm") or "tslm")
    a = ap.parse_args()
    precisions = a.precisions.split(",")
    t_start = time.perf_counter()
    a.work.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    runs = make_runs(a.work, a.tslm, a.steps)
    result: dict = {"benchmark": "tslm generate vs llama2.c, batch 1, greedy, empty prompt", "machine": {
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "loadavg_at_start": [round(x, 2) for x in load]}}
    result["compile"] = compile_time(a.work)
    emit({"compile": result["compile"]})
    result["bandwidth"] = bandwidth()
    emit({"bandwidth": result["bandwidth"]})
    result["export_hf_seconds"] = export_time(runs, a.tslm, a.work)
    result["quality_prefill"] = quality_and_prefill(runs, precisions)
    peers = []
    for prec in precisions:
        if prec == "bf16":
            from tinystories_cli.fastpath import native_bf16

            if not native_bf16():
                continue
        peers += peer(runs, a.tslm, a.work, a, prec)
    wb = {(r["run"], r["precision"]): r["weight_bytes_per_token"] for r in result["quality_prefill"]
          if "weight_bytes_per_token" in r}
    for row in peers:
        b = wb.get((row["run"], row["precision"]))
        if b:
            row["tslm_weight_GBps"] = round(b * row["tslm_tok_s"] / 1e9, 1)
    result["peer"] = peers
    result["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    emit(result)


if __name__ == "__main__":
    main()
