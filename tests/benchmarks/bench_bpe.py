"""Benchmark `train_bpe` (not a timed test). Prints one JSON object.

    python tests/benchmarks/bench_bpe.py [--repeats 3] [--data ../shared/data]

1. corpus.en, vocab 500, <|endoftext|>, workers=2: wall time of `train_bpe` including the start-up
   of the worker processes (each repeat in a fresh interpreter).
2. tinystories_train.txt, vocab 10000: ours vs Hugging Face `tokenizers` BpeTrainer (ByteLevel
   pre-tokenizer, add_prefix_space=False, same special token), side by side, alternating, each
   run in its own subprocess so peak RSS (getrusage, self and children) is measured separately.
   Reports medians and ratio = ours / peer (target <= 1.0).
3. Pre-tokenization throughput (MB/s per worker, workers=1 and 2) and the extrapolated time for
   the full 2.2 GB TinyStories train file on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EOT = "<|endoftext|>"
FULL_TINYSTORIES_BYTES = 2.2e9


def _peak_rss_mib() -> float:
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(self_kb, kids_kb) / 1024


def child(kind: str, path: str, vocab_size: int, workers: int) -> None:
    """Run one training in this (fresh) process and print {"seconds", "peak_rss_mib", ...}."""
    if kind == "ours":
        from tinystories_cli.tokenizer import train_bpe

        t0 = time.perf_counter()
        vocab, merges = train_bpe(path, vocab_size, [EOT], workers=workers)
        dt = time.perf_counter() - t0
        extra = {"vocab_size": len(vocab), "merges": len(merges)}
    elif kind == "hf":
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers

        t0 = time.perf_counter()
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train([path], trainer)
        dt = time.perf_counter() - t0
        extra = {"vocab_size": tok.get_vocab_size()}
    elif kind == "pretok":
        from tinystories_cli.tokenizer.bpe import count_pretokens

        t0 = time.perf_counter()
        counts = count_pretokens(path, [EOT], workers=workers)
        dt = time.perf_counter() - t0
        extra = {"distinct": len(counts)}
    else:
        raise SystemExit(f"unknown child kind {kind}")
    print(json.dumps({"seconds": dt, "peak_rss_mib": _peak_rss_mib(), **extra}))


def run_child(kind: str, path: Path, vocab_size: int, workers: int) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", kind, str(path), str(vocab_size), str(workers)],
                          capture_output=True, text=True, cwd=REPO, check=True)
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    r["process_seconds"] = time.perf_counter() - t0  # incl. interpreter start-up and imports
    return r


def med(runs: list[dict], key: str) -> float:
    return round(statistics.median(r[key] for r in runs), 3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", nargs=4, metavar=("KIND", "PATH", "VOCAB", "WORKERS"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    args = ap.parse_args()
    if args.child:
        kind, path, vocab, workers = args.child
        child(kind, path, int(vocab), int(workers))
        return

    corpus, stories = args.data / "corpus.en", args.data / "tinystories_train.txt"
    for p in (corpus, stories):
        if not p.is_file():
            raise SystemExit(f"missing {p}: the benchmarks need ../shared/data")
    out: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.python_implementation()} {platform.python_version()}",
        "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
        "repeats": args.repeats,
    }

    runs = [run_child("ours", corpus, 500, 2) for _ in range(args.repeats)]
    out["corpus_en_vocab500_workers2"] = {
        "train_bpe_seconds_median": med(runs, "seconds"), "train_bpe_seconds_min": round(min(r["seconds"] for r in runs), 3),
        "process_seconds_median": med(runs, "process_seconds"), "peak_rss_mib": med(runs, "peak_rss_mib"),
        "target_seconds": 1.0,
    }

    ours, peer = [], []
    for _ in range(args.repeats):  # alternate so both see the same machine load
        ours.append(run_child("ours", stories, 10_000, 2))
        peer.append(run_child("hf", stories, 10_000, 2))
    ratio = med(ours, "seconds") / med(peer, "seconds")
    out["tinystories_train_vocab10000"] = {
        "input_mb": round(stories.stat().st_size / 1e6, 2),
        "ours_seconds_median": med(ours, "seconds"), "peer_seconds_median": med(peer, "seconds"),
        "ratio_ours_over_peer": round(ratio, 3),
        "ours_peak_rss_mib": med(ours, "peak_rss_mib"), "peer_peak_rss_mib": med(peer, "peak_rss_mib"),
        "ours_vocab_size": ours[0]["vocab_size"], "peer_vocab_size": peer[0]["vocab_size"],
        "ours_seconds_all": [round(r["seconds"], 3) for r in ours], "peer_seconds_all": [round(r["seconds"], 3) for r in peer],
        "peer": "tokenizers BpeTrainer, ByteLevel(add_prefix_space=False), same special token",
    }

    size_mb = stories.stat().st_size / 1e6
    pre = {}
    for w in (1, 2):
        runs = [run_child("pretok", stories, 0, w) for _ in range(args.repeats)]
        s = statistics.median(r["seconds"] for r in runs)
        pre[w] = s
        out[f"pretokenize_workers{w}"] = {"seconds_median": round(s, 3), "mb_per_s_total": round(size_mb / s, 2),
                                           "mb_per_s_per_worker": round(size_mb / s / w, 2)}
    full_s = FULL_TINYSTORIES_BYTES / 1e6 / (size_mb / pre[2])
    out["extrapolated_2_2GB_pretokenize_2_cores_seconds"] = round(full_s, 1)
    out["extrapolated_2_2GB_pretokenize_2_cores_minutes"] = round(full_s / 60, 2)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
