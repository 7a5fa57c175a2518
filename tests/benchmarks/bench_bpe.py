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
4. With --synthetic 100M,1G: the OWT-scale rows of issue 18 on the synthetic corpus of
   synth_corpus.py (written under /tmp, reused when present): `train_bpe_file` at --vocab-size
   (default 32000, <|endoftext|>) vs HF BpeTrainer (same vocab size and special token), alternating,
   each in a fresh subprocess; every run's time (ours split into pre-tokenize / merge) and peak RSS
   (ours: the parent, and the largest worker), medians, paired ratios, and an extrapolation to
   OpenWebText (11.9 GB) from the growth between the sizes measured. --only-synthetic skips 1-3.
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
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EOT = "<|endoftext|>"
FULL_TINYSTORIES_BYTES = 2.2e9
MACHINE = f"{platform.machine()} {os.cpu_count()} CPUs, {platform.python_implementation()} {platform.python_version()}"


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
    elif kind == "ours_file":
        from tinystories_cli.tokenizer.bpe import train_bpe_file

        t0 = time.perf_counter()
        r = train_bpe_file(path, vocab_size, [EOT], workers=workers)
        dt = time.perf_counter() - t0
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        extra = {"vocab_size": len(r.vocab), "merges": len(r.merges), "distinct_pretokens": r.num_distinct,
                 "pretokenize_s": round(r.seconds["pretokenize"], 2), "merge_s": round(r.seconds["merge"], 2),
                 "parent_peak_rss_mib": round(own, 1), "largest_worker_peak_rss_mib": round(kids, 1)}
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


def synthetic_rows(sizes: list[str], repeats: int, vocab_size: int, workers: int) -> dict:
    """Ours vs HF BpeTrainer on synthetic corpora of the given sizes; the extrapolation to OWT."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from synth_corpus import generate, parse_size

    rows = {}
    for label in sizes:
        size = parse_size(label)
        path = Path(tempfile.gettempdir()) / f"tslm_synth_{label}.txt"
        if not path.is_file() or path.stat().st_size < size * 0.99:
            with open(path, "wb") as f:
                generate(f, size)
        ours, peer = [], []
        for _ in range(repeats):  # alternate so both see the same machine load
            ours.append(run_child("ours_file", path, vocab_size, workers))
            peer.append(run_child("hf", path, vocab_size, workers))
        ratios = [o["seconds"] / p["seconds"] for o, p in zip(ours, peer)]
        rss = [o["peak_rss_mib"] / p["peak_rss_mib"] for o, p in zip(ours, peer)]
        rows[label] = {
            "file": str(path),
            "bytes": path.stat().st_size,
            "distinct_pretokens": ours[0]["distinct_pretokens"],
            "vocab_size": vocab_size,
            "workers": workers,
            "ours_seconds_median": med(ours, "seconds"),
            "peer_seconds_median": med(peer, "seconds"),
            "time_ratio_ours_over_peer_paired_median (target <= 1.0)": round(statistics.median(ratios), 3),
            "ours_peak_rss_mib_median": med(ours, "peak_rss_mib"),
            "peer_peak_rss_mib_median": med(peer, "peak_rss_mib"),
            "rss_ratio_ours_over_peer_paired_median (target <= 2.0)": round(statistics.median(rss), 3),
            "ours_every_run": ours,
            "peer_every_run": peer,
        }
    if len(rows) >= 2:
        # Ours: pre-tokenization is linear in the bytes (and divides by the cores); the merge loop grows
        # with the distinct pre-tokens: a power law through the two largest sizes. The peer reports only
        # its total: both a linear bound and the same power-law fit. Peak RSS: power law.
        import math

        (la, a), (lb, b) = sorted(rows.items(), key=lambda kv: kv[1]["bytes"])[-2:]
        scale = 11.9e9 / b["bytes"]

        def power(xa: float, xb: float) -> tuple[float, float]:
            k = math.log(xb / xa) / math.log(b["bytes"] / a["bytes"])
            return round(xb * scale ** k, 1), round(k, 3)

        def ours_med(r: dict, key: str) -> float:
            return statistics.median(run[key] for run in r["ours_every_run"])

        pre = ours_med(b, "pretokenize_s") * scale
        merge, k_merge = power(ours_med(a, "merge_s"), ours_med(b, "merge_s"))
        peer_pow, k_peer = power(a["peer_seconds_median"], b["peer_seconds_median"])
        ours_rss, k_ours_rss = power(a["ours_peak_rss_mib_median"], b["ours_peak_rss_mib_median"])
        peer_rss, k_peer_rss = power(a["peer_peak_rss_mib_median"], b["peer_peak_rss_mib_median"])
        rows["extrapolation_owt_11_9GB"] = {
            "from": [la, lb],
            "workers": workers,
            "ours_pretokenize_s_linear": round(pre, 1),
            "ours_merge_s_power_law": merge,
            "ours_merge_growth_exponent": k_merge,
            "ours_total_s": round(pre + merge, 1),
            "peer_total_s_linear": round(b["peer_seconds_median"] * scale, 1),
            "peer_total_s_power_law": peer_pow,
            "peer_growth_exponent": k_peer,
            "ours_peak_rss_mib_power_law": ours_rss,
            "ours_rss_growth_exponent": k_ours_rss,
            "peer_peak_rss_mib_power_law": peer_rss,
            "peer_rss_growth_exponent": k_peer_rss,
        }
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", nargs=4, metavar=("KIND", "PATH", "VOCAB", "WORKERS"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--synthetic", default="", help="comma-separated sizes, e.g. 100M,1G")
    ap.add_argument(
        "--synthetic-repeats", type=int, default=None, help="repeats for the synthetic rows (default --repeats)"
    )
    ap.add_argument("--vocab-size", type=int, default=32000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--only-synthetic", action="store_true")
    args = ap.parse_args()
    if args.child:
        kind, path, vocab, workers = args.child
        child(kind, path, int(vocab), int(workers))
        return

    if args.only_synthetic:
        out = {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": MACHINE,
            "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
        }
        out["synthetic"] = synthetic_rows(args.synthetic.split(","), args.synthetic_repeats or args.repeats,
                                          args.vocab_size, args.workers)
        out["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
        print(json.dumps(out, indent=2))
        return
    corpus, stories = args.data / "corpus.en", args.data / "tinystories_train.txt"
    for p in (corpus, stories):
        if not p.is_file():
            raise SystemExit(f"missing {p}: the benchmarks need ../shared/data")
    out: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": MACHINE,
        "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
        "repeats": args.repeats,
    }

    runs = [run_child("ours", corpus, 500, 2) for _ in range(args.repeats)]
    out["corpus_en_vocab500_workers2"] = {
        "train_bpe_seconds_median": med(runs, "seconds"),
        "train_bpe_seconds_min": round(min(r["seconds"] for r in runs), 3),
        "process_seconds_median": med(runs, "process_seconds"),
        "peak_rss_mib": med(runs, "peak_rss_mib"),
        "target_seconds": 1.0,
    }

    ours, peer = [], []
    for _ in range(args.repeats):  # alternate so both see the same machine load
        ours.append(run_child("ours", stories, 10_000, 2))
        peer.append(run_child("hf", stories, 10_000, 2))
    ratio = med(ours, "seconds") / med(peer, "seconds")
    out["tinystories_train_vocab10000"] = {
        "input_mb": round(stories.stat().st_size / 1e6, 2),
        "ours_seconds_median": med(ours, "seconds"),
        "peer_seconds_median": med(peer, "seconds"),
        "ratio_ours_over_peer": round(ratio, 3),
        "ours_peak_rss_mib": med(ours, "peak_rss_mib"),
        "peer_peak_rss_mib": med(peer, "peak_rss_mib"),
        "ours_vocab_size": ours[0]["vocab_size"],
        "peer_vocab_size": peer[0]["vocab_size"],
        "ours_seconds_all": [round(r["seconds"], 3) for r in ours],
        "peer_seconds_all": [round(r["seconds"], 3) for r in peer],
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
    if args.synthetic:
        out["synthetic"] = synthetic_rows(args.synthetic.split(","), args.synthetic_repeats or args.repeats,
                                          args.vocab_size, args.workers)
    out["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
