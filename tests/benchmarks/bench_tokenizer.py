"""Tokenizer throughput, side by side in one run: ours vs tiktoken vs Hugging Face `tokenizers`.

    python tests/benchmarks/bench_tokenizer.py [--data ../shared/data] [--repeats 3] [--no-train-10k]
                                               [--scale N | --big FILE] [--only-big]

Prints one JSON object. Small rows, on tinystories_train.txt with GPT-2's vocab/merges:

  ours_single          Tokenizer.encode(whole text), fresh tokenizer (cold cache), one process
  ours_single_warm     the same call again (pre-token cache filled)
  ours_file_serial     encode_file(..., workers=1, backend="python"): read + encode + write .npy
  ours_file_parallel   encode_file(..., workers=cores, backend="python")
  ours_file_auto       encode_file(..., workers=cores, backend="auto") (tiktoken when installed: `tslm encode`)
  tiktoken_single      tiktoken Encoding.encode(whole text), one thread
  tiktoken_batch       tiktoken encode_batch(stories, num_threads=cores)
  hf_single / hf_batch tokenizers BPE + ByteLevel pre-tokenizer from the same files

Big rows (`--scale N`: the file repeated N times under /tmp; `--big FILE`: any large text file, e.g.
the synthetic corpus of synth_corpus.py), the scaling targets of issue 18 on a >= 40 MB file:

  big_python_w1 / big_python_w2      encode_file, from-scratch backend, 1 and 2 workers
  big_tiktoken_w1 / big_tiktoken_w2  encode_file, tiktoken backend, 1 and 2 workers
  big_tiktoken_batch                 tiktoken encode_batch(documents, num_threads=cores), text in memory

Every repeat builds fresh tokenizers (cold caches) outside the timing (tiktoken's Encoding for the
peer rows is built once, outside the timing; our tiktoken backend builds its own inside
`encode_file`, as `tslm encode` does). Contenders are interleaved within each round, so background
load hits them alike. Reported: every repeat's wall time, the median per row, and the ratios as paired
medians (the median over rounds of the per-round ratio). No best-of.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tinystories_cli.tokenizer.encode import encode_file  # noqa: E402
from tinystories_cli.tokenizer.pretokenize import GPT2_SPLIT_PATTERN  # noqa: E402
from tinystories_cli.tokenizer.tokenizer import Tokenizer  # noqa: E402

EOT = "<|endoftext|>"


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _cpu() -> float:
    """CPU seconds of this process (all threads) plus its finished, waited-for children (workers)."""
    import resource

    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + kids.ru_utime + kids.ru_stime


def timed(fn):
    t0, c0 = time.perf_counter(), _cpu()
    out = fn()
    return out, time.perf_counter() - t0, _cpu() - c0


def build_hf(vocab_path: Path, merges_path: Path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
    lines = merges_path.read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([EOT])
    return hf


class Rows:
    """Wall (and CPU) seconds of every repeat per row; medians and paired-median ratios."""

    def __init__(self):
        self.wall: dict[str, list[float]] = {}
        self.cpu: dict[str, list[float]] = {}

    def add(self, name: str, wall: float, cpu: float | None = None) -> None:
        self.wall.setdefault(name, []).append(wall)
        if cpu is not None:
            self.cpu.setdefault(name, []).append(cpu)

    def summary(self, nbytes: int) -> dict:
        out = {}
        for name, walls in self.wall.items():
            med = statistics.median(walls)
            r = {"wall_s_median": round(med, 4), "MB_per_s_median": round(nbytes / med / 1e6, 3),
                 "wall_s_every_repeat": [round(w, 4) for w in walls]}
            if name in self.cpu:
                r["cpu_s_median"] = round(statistics.median(self.cpu[name]), 4)
                # cores the row actually got: on a shared machine, 2 workers may get only one core's worth
                r["cores_used_median"] = round(statistics.median(c / w for c, w in zip(self.cpu[name], walls)), 2)
                r["MB_per_cpu_s_median"] = round(nbytes / statistics.median(self.cpu[name]) / 1e6, 3)
            out[name] = r
        return out

    def paired(self, faster: str, than: str) -> dict:
        """Speed of `faster` relative to `than`: median over rounds of than_time / faster_time."""
        ratios = [b / a for a, b in zip(self.wall[faster], self.wall[than])]
        return {"paired_median": round(statistics.median(ratios), 3), "every_round": [round(r, 3) for r in ratios]}


def _burn(n: int) -> int:
    s = 0
    for i in range(n):
        s += i
    return s


def cores_available(procs: int = 2, n: int = 10_000_000) -> float:
    """Cores a trivial CPU-bound job of `procs` processes gets right now (CPU / wall): a control for
    the scaling rows on a shared machine, where other jobs may hold a core."""
    import multiprocessing
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(procs) as pool:
        pool.map(_burn, [n] * procs)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return round((after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / wall, 2)


def big_rows(big: Path, base: Tokenizer, tt, tmp: Path, ncores: int, repeats: int) -> dict:
    """The >= 40 MB scaling rows: encode_file on 1 and 2 workers with each backend vs tiktoken encode_batch."""
    nbytes = big.stat().st_size
    text = big.read_bytes().decode("utf-8")
    docs = [s + EOT for s in text.split(EOT)]
    docs[-1] = docs[-1][: -len(EOT)]
    del text
    rows = Rows()
    metas = {}
    control = []
    for _ in range(repeats):
        control.append(cores_available())
        for backend in ("python", "tiktoken"):
            for w in (1, 2):
                tok = Tokenizer(base.vocab, base.merges, [EOT])  # fresh: cold caches, nothing memoized
                name = f"big_{backend}_w{w}"
                metas[name], wall, cpu = timed(
                    lambda: encode_file(big, tmp / f"{name}.npy", tok, workers=w, force=True, backend=backend)
                )
                rows.add(name, wall, cpu)
        _, wall, cpu = timed(lambda: tt.encode_batch(docs, num_threads=ncores, allowed_special="all"))
        rows.add("big_tiktoken_batch", wall, cpu)
    same = len({(tmp / f"{n}.npy").read_bytes() for n in metas}) == 1
    for n in metas:
        (tmp / f"{n}.npy").unlink()
        (tmp / f"{n}.json").unlink()
    return {
        "file": str(big), "bytes": nbytes, "tokens": metas["big_python_w1"]["num_tokens"], "cores": ncores,
        "chunks": metas["big_python_w2"]["chunks"], "all_outputs_identical": same,
        "control_cores_a_2_process_burner_got_each_round": control,
        "rows": rows.summary(nbytes),
        "ratios": {
            "python_w2_vs_python_w1 (target >= 1.7)": rows.paired("big_python_w2", "big_python_w1"),
            "tiktoken_w2_vs_tiktoken_w1 (target >= 1.7)": rows.paired("big_tiktoken_w2", "big_tiktoken_w1"),
            "tiktoken_w2_vs_tiktoken_batch (target >= 1.0)": rows.paired("big_tiktoken_w2", "big_tiktoken_batch"),
            "python_w2_vs_tiktoken_batch": rows.paired("big_python_w2", "big_tiktoken_batch"),
        },
        # what the second worker costs in CPU: on two idle cores, speedup ~= 2 * (w1 CPU / w2 CPU)
        "cpu_efficiency_w2": {
            b: round(statistics.median(rows.cpu[f"big_{b}_w1"]) / statistics.median(rows.cpu[f"big_{b}_w2"]), 3)
            for b in ("python", "tiktoken")},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-train-10k", action="store_true")
    ap.add_argument(
        "--scale", type=int, default=0, metavar="N", help="big rows on tinystories_train.txt repeated N times"
    )
    ap.add_argument("--big", type=Path, default=None, help="big rows on this text file instead")
    ap.add_argument("--only-big", action="store_true", help="skip the small rows")
    args = ap.parse_args()
    src = args.data / "tinystories_train.txt"
    vocab_path, merges_path = args.data / "gpt2_vocab.json", args.data / "gpt2_merges.txt"
    text = src.read_bytes().decode("utf-8")
    nbytes = src.stat().st_size
    stories = [s + EOT for s in text.split(EOT)]
    stories[-1] = stories[-1][: -len(EOT)]
    ncores = cores()

    import numpy as np
    import tiktoken

    base = Tokenizer.from_files(vocab_path, merges_path, [EOT])
    ranks = {b: i for i, b in base.vocab.items() if i != base.eot_id}
    tt = tiktoken.Encoding(
        name="gpt2-local", pat_str=GPT2_SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens={EOT: base.eot_id}
    )
    tmp = Path(tempfile.mkdtemp(prefix="bench-tok-"))
    out: dict = {
        "benchmark": "tokenizer throughput",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cores": ncores,
                    "load_avg_1m_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None},
        "versions": {"tiktoken": tiktoken.__version__, "tokenizers": __import__("tokenizers").__version__},
        "repeats": args.repeats,
    }

    if not args.only_big:
        hf = build_hf(vocab_path, merges_path)
        ref = tt.encode(text, allowed_special="all")
        rows = Rows()
        checks = {}
        for _ in range(args.repeats):
            tok = Tokenizer(base.vocab, base.merges, [EOT])  # fresh: cold cache every repeat
            ids, w, c = timed(lambda: tok.encode(text))
            rows.add("ours_single", w, c)
            checks["ours_equals_tiktoken"] = ids == ref
            _, w, c = timed(lambda: tok.encode(text))
            rows.add("ours_single_warm", w, c)
            t_serial, t_par, t_auto = (Tokenizer(base.vocab, base.merges, [EOT]) for _ in range(3))
            _, w, c = timed(
                lambda: encode_file(src, tmp / "serial.npy", t_serial, workers=1, force=True, backend="python")
            )
            rows.add("ours_file_serial", w, c)
            _, w, c = timed(
                lambda: encode_file(src, tmp / "par.npy", t_par, workers=ncores, force=True, backend="python")
            )
            rows.add("ours_file_parallel", w, c)
            _, w, c = timed(
                lambda: encode_file(src, tmp / "auto.npy", t_auto, workers=ncores, force=True, backend="auto")
            )
            rows.add("ours_file_auto", w, c)
            _, w, c = timed(lambda: tt.encode(text, allowed_special="all"))
            rows.add("tiktoken_single", w, c)
            _, w, _ = timed(lambda: tt.encode_batch(stories, num_threads=ncores, allowed_special="all"))
            rows.add("tiktoken_batch", w)
            hf_ids, w, c = timed(lambda: hf.encode(text).ids)
            rows.add("hf_single", w, c)
            checks["hf_equals_tiktoken"] = hf_ids == ref
            _, w, _ = timed(lambda: hf.encode_batch(stories))
            rows.add("hf_batch", w)
        checks["file_parallel_equals_serial"] = (tmp / "serial.npy").read_bytes() == (tmp / "par.npy").read_bytes()
        checks["file_auto_equals_serial"] = (tmp / "serial.npy").read_bytes() == (tmp / "auto.npy").read_bytes()
        checks["file_equals_tiktoken"] = np.load(tmp / "par.npy").tolist() == ref
        out.update({
            "file": str(src), "bytes": nbytes, "gpt2_tokens": len(ref), "bytes_per_token": round(nbytes / len(ref), 4),
            "results": rows.summary(nbytes), "checks": checks,
            "ratios": {
                "ours_single_vs_tiktoken_single (target >= 0.5)": rows.paired("ours_single", "tiktoken_single"),
                "ours_single_warm_vs_tiktoken_single": rows.paired("ours_single_warm", "tiktoken_single"),
                "ours_file_parallel_vs_tiktoken_batch": rows.paired("ours_file_parallel", "tiktoken_batch"),
                "ours_file_auto_vs_tiktoken_batch (target >= 1.0)": rows.paired("ours_file_auto", "tiktoken_batch"),
                "ours_file_parallel_vs_ours_file_serial": rows.paired("ours_file_parallel", "ours_file_serial"),
                "ours_single_vs_hf_single": rows.paired("ours_single", "hf_single"),
            },
        })

    big = args.big
    if big is None and args.scale > 1:
        big = tmp / "scaled.txt"
        big.write_bytes(src.read_bytes() * args.scale)
    if big is not None:
        out["big"] = big_rows(big, base, tt, tmp, ncores, args.repeats)
        if big.parent == tmp:
            big.unlink()

    if not args.no_train_10k and not args.only_big:
        from tinystories_cli.tokenizer.bpe import train_bpe

        (vocab, merges), train_s, _ = timed(lambda: train_bpe(src, 10_000, [EOT]))
        walls, cpus, pwalls = [], [], []
        for _ in range(args.repeats):  # fresh tokenizers (cold caches) every time, as above
            t = Tokenizer(vocab, merges, [EOT])
            ids, w, c = timed(lambda: t.encode(text))
            walls.append(w)
            cpus.append(c)
            fresh = Tokenizer(vocab, merges, [EOT])
            pwalls.append(
                timed(lambda: encode_file(src, tmp / "small.npy", fresh, workers=ncores, force=True, backend="python"))[
                    1
                ]
            )
        small = Tokenizer(vocab, merges, [EOT])
        out["tinystories_10k"] = {
            "train_s": round(train_s, 2), "vocab_size": small.vocab_size, "tokens": len(ids),
            "bytes_per_token": round(nbytes / len(ids), 4), "roundtrip": small.decode(ids) == text,
            "single_MB_per_s_median": round(nbytes / statistics.median(walls) / 1e6, 3),
            "single_MB_per_cpu_s_median": round(nbytes / statistics.median(cpus) / 1e6, 3),
            "file_parallel_python_MB_per_s_median": round(nbytes / statistics.median(pwalls) / 1e6, 3),
            "single_wall_s_every_repeat": [round(w, 4) for w in walls],
        }
    for p in tmp.iterdir():
        p.unlink()
    tmp.rmdir()
    out["load_avg_1m_at_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
