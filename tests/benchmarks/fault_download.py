"""Fault injection for `tslm download`: `kill -9` at random points, then the same command again.

    python tests/benchmarks/fault_download.py [--trials 200] [--seed 0]

Prints one JSON object. Each trial runs the real CLI in a child process against a local HTTP
server (127.0.0.1, throttled so the transfer takes ~0.6 s), kills it with SIGKILL after a
random delay (once or twice), checks what is on disk after each kill, then reruns the same command
to the end and checks the result. Scenarios, in turn:

    plain   `tslm download URL --out FILE` into an empty directory
    force   `... --force` over a good, different file that was downloaded before
    gzip    `tslm download owt --split valid` (the .gz is fetched, verified, then unpacked)

After every kill the destination must be absent or complete and correct (for `force`: the old
file or the new one, whole). After the final run: exit 0, the right sha256, the record agrees, and
nothing else in the directory (no .part, no origin file, no temp file). Counted: trials, faults
injected (kills that landed while the child was running, by what the .part held at that moment),
files lost or corrupted, litter, internal errors (exit 1 or "internal error" from any run) and
failed final runs. All but the first two must be 0. The default test suite runs ~10 trials
(tests/download/test_download_faults.py).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (download_server)
from download_server import Route, serve  # noqa: E402  (after the path it is found on)

# The child sets SIGINT's disposition itself (a suite may run in the background with SIGINT ignored).
CHILD = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
         "from tinystories_cli.cli import main; sys.exit(main(sys.argv[1:]))")
OWT_PATH = "/datasets/stanford-cs336/owt-sample/resolve/main/owt_valid.txt.gz"


def _text(n: int, seed: int) -> bytes:
    rng = random.Random(seed)
    words = [b"once", b"upon", b"a", b"time", b"there", b"was", b"little", b"cat", b"dog", b"happy", b"sun"]
    out, size = [], 0
    while size < n:
        line = b" ".join(rng.choice(words) for _ in range(12)) + b".\n"
        out.append(line)
        size += len(line)
    return b"".join(out)[:n]


def _run(args: list[str], cwd: Path, kill_after: float | None = None) -> tuple[int, str, bool]:
    """Run the CLI; with kill_after, SIGKILL it then. Returns (exit code, stderr, killed while running)."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("HF_ENDPOINT", None)
    proc = subprocess.Popen([sys.executable, "-c", CHILD, *args], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed = False
    if kill_after is not None:
        try:
            proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            killed = True
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        return -999, "timed out", killed
    return proc.returncode, err.decode("utf-8", "replace"), killed


def _sha(p: Path) -> str | None:
    return hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None


def run_trials(trials: int, seed: int = 0, size: int = 1 << 20, workdir: Path | None = None) -> dict:
    rng = random.Random(seed)
    old, new = _text(size, seed + 1), _text(size, seed + 2)
    gz = gzip.compress(new, mtime=0)
    counts = {
        "trials": 0,
        "faults_injected": 0,
        "kills_by_state": {"before_first_byte": 0, "part_with_bytes": 0, "done": 0},
        "files_lost": 0,
        "files_corrupted": 0,
        "litter": 0,
        "internal_errors": 0,
        "final_failures": 0,
        "problems": [],
    }
    # Throttled so that the transfer takes ~0.6 s, about as long as the CLI's start-up: kills land in both.
    # a throttled server (the test suite's, with Range, ETag and If-Range): about 0.6 s per whole file
    throttle = 0.6 * 8192 / size  # Route.throttle pauses after every 8 KB
    with tempfile.TemporaryDirectory(dir=workdir) as tmp, serve() as srv:
        for path, body in (("/old.txt", old), ("/new.txt", new), (OWT_PATH, gz)):
            srv.routes[path] = Route(body, throttle=throttle)
        # Calibrate: whole, unkilled runs give the time span the kills are drawn from (the shorter of
        # two: the first start-up of a process is often slower, with cold caches).
        spans = []
        for c in range(2):
            t0 = time.monotonic()
            code, err, _ = _run(["download", srv.url + "/new.txt", "--out", f"cal{c}/f.txt"], Path(tmp))
            spans.append(time.monotonic() - t0)
            if code != 0:
                raise SystemExit(f"calibration run failed: {err}")
        span = min(spans)
        counts["calibrated_run_seconds"] = round(span, 2)
        for t in range(trials):
            scenario = ("plain", "force", "gzip")[t % 3]
            d = Path(tmp) / f"t{t}"
            d.mkdir()
            if scenario == "gzip":
                out = d / "owt" / "valid.txt"
                args = ["download", "owt", "--split", "valid", "--dir", str(d), "--endpoint", srv.url]
            else:
                out = d / "f.txt"
                args = ["download", srv.url + "/new.txt", "--out", str(out)]
            allowed = {hashlib.sha256(new).hexdigest()}
            if scenario == "force":
                code, err, _ = _run(["download", srv.url + "/old.txt", "--out", str(out)], d)
                assert code == 0, err
                args.append("--force")
                allowed.add(hashlib.sha256(old).hexdigest())
            counts["trials"] += 1
            for _ in range(rng.choice((1, 2))):
                code, err, killed = _run(args, d, kill_after=rng.uniform(0.0, span))
                if "internal error" in err or code == 1:
                    counts["internal_errors"] += 1
                    counts["problems"].append(f"trial {t} ({scenario}): {err.strip()[-300:]}")
                if killed:
                    counts["faults_injected"] += 1
                    part = out.with_name(out.name + ".part")
                    if part.exists() and part.stat().st_size > 0:
                        counts["kills_by_state"]["part_with_bytes"] += 1  # downloading, verifying or unpacking
                    elif _sha(out) == hashlib.sha256(new).hexdigest():
                        counts["kills_by_state"]["done"] += 1
                    else:
                        counts["kills_by_state"]["before_first_byte"] += 1
                h = _sha(out)
                if scenario == "force" and h is None:
                    counts["files_lost"] += 1
                    counts["problems"].append(f"trial {t} (force): the good file is gone after a kill")
                elif h is not None and h not in allowed:
                    counts["files_corrupted"] += 1
                    counts["problems"].append(f"trial {t} ({scenario}): wrong content after a kill")
            code, err, _ = _run(args, d)
            rec = out.with_name(out.name + ".sha256")
            expected = hashlib.sha256(new).hexdigest()
            if code != 0:
                counts["final_failures"] += 1
                counts["problems"].append(f"trial {t} ({scenario}): final run exit {code}: {err.strip()[-300:]}")
                if "internal error" in err:
                    counts["internal_errors"] += 1
            elif _sha(out) != expected or json.loads(rec.read_text())["sha256"] != expected:
                counts["files_corrupted"] += 1
                counts["problems"].append(f"trial {t} ({scenario}): wrong final content or record")
            left = sorted(p.name for p in out.parent.iterdir())
            if left != sorted([out.name, rec.name]):
                counts["litter"] += 1
                counts["problems"].append(f"trial {t} ({scenario}): left {left}")
    counts["problems"] = counts["problems"][:20]
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=1 << 20, help="bytes of the served file")
    a = ap.parse_args()
    t0 = time.monotonic()
    counts = run_trials(a.trials, a.seed, a.size)
    counts["seconds"] = round(time.monotonic() - t0, 1)
    print(json.dumps(counts, indent=1))


if __name__ == "__main__":
    main()
