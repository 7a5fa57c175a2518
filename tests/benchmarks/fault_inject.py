"""Fault injection for the commands that write files (issue 31): kill -9 at random points of `tslm export`,
`import`, `bpe`, `encode` and `quickstart`, and a full disk at each file they write; then count what was lost.

    python tests/benchmarks/fault_inject.py --kills 50        # prints one JSON object

For speed, this process imports tslm (and torch) once and forks a child per attempt, which runs the CLI
in-process (`tinystories_cli.cli.main`), so an attempt takes what the command takes, not an interpreter
start. Per stage:

- kill -9: a child runs the command; after a random delay in [0, 1.2 x the command's undisturbed time]
  it is sent SIGKILL (a kill after it finished counts as `finished_before_kill`). Then the checks below,
  then the same command is run again undisturbed (it must succeed), then the checks again.
- disk full: RLIMIT_FSIZE in the child (SIGXFSZ ignored, so a write past it fails with EFBIG as on a full
  disk) set just below the size of each file the command writes, so each file in turn is the one that
  does not fit. The command must exit 2 (a one-line error, never an internal error); then the checks, the
  undisturbed rerun and the checks again.

Checks, counted over all attempts (each must be 0):
- lost: an input file changed or missing (sha256 before vs after);
- half_written: an output present under its final name that fails validation (loads, matches its
  sidecar or record);
- litter: temporary files (`.NAME.p<pid>.XXXXXXXX...`, `.part`, `*.tmp`) left after the rerun;
- rerun_failed: the undisturbed rerun did not exit 0;
- internal_errors: a disk-full attempt that exited with anything but 2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import resource
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (train_fixtures)

import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # fork-safe: the parent never starts an intra-op thread pool

from tinystories_cli import paths  # noqa: E402
from tinystories_cli.cli import main as cli_main  # noqa: E402

TEMP_RE = re.compile(r"^\..+\.(p\d+\.[a-z0-9_]{8}(\.tmp|\.old|\.txt)?|[a-z0-9_]{8}\.tmp)$|\.part(\.json)?$")


def sha_tree(paths_: list[Path]) -> dict[str, str]:
    out = {}
    for p in paths_:
        for f in ([p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file())):
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def litter(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if TEMP_RE.search(p.name)
                  and "inputs" not in p.parts)


def run_child(args: list[str], kill_after: float | None = None, fsize: int | None = None) -> tuple[int | None, float]:
    """Fork, run `tslm ARGS` in the child; return (exit code or None when killed, seconds)."""
    t = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child
        try:
            fd = os.open(os.devnull, os.O_WRONLY)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            if fsize is not None:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
            code = cli_main(args)
        except BaseException:  # noqa: BLE001
            code = 99
        os._exit(code if isinstance(code, int) else 1)
    if kill_after is not None:
        deadline = time.perf_counter() + kill_after
        while time.perf_counter() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status), time.perf_counter() - t
            time.sleep(0.002)
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        return (None if code == -signal.SIGKILL else code), time.perf_counter() - t
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), time.perf_counter() - t


def validate_in_child(fn) -> bool:
    """Run a validation (which may use torch) in a forked child: True when it passes."""
    pid = os.fork()
    if pid == 0:
        try:
            ok = fn()
        except BaseException:  # noqa: BLE001
            ok = False
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


# ---------------------------------------------------------------- stages: command, inputs, output checks


class Stage:
    name = ""

    def __init__(self, root: Path):
        self.root = root

    def args(self, i: int) -> list[str]:
        raise NotImplementedError

    def inputs(self) -> list[Path]:
        raise NotImplementedError

    def broken_outputs(self) -> list[str]:
        """Outputs present under their final names that fail validation."""
        raise NotImplementedError

    def reset(self) -> None:
        """Before an attempt (what the benchmark, not the command, removes)."""


def _tokenizer_ok(d: Path) -> bool:
    from tinystories_cli.tokenizer import Tokenizer

    if not (d / "tokenizer_config.json").exists():
        return not any(d.iterdir()) if d.is_dir() else True
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    tok = Tokenizer.from_dir(d)
    return tok.vocab_size == cfg["vocab_size"] and all(
        hashlib.sha256((d / n).read_bytes()).hexdigest() == h for n, h in cfg["files"].items())


def _tokens_ok(npy: Path) -> bool:
    side = paths.sidecar_path(npy)
    if not npy.exists() and not side.exists():
        return True
    if not (npy.exists() and side.exists()):
        return True  # one of the pair alone is not complete-looking: every reader refuses it
    meta = json.loads(side.read_text())
    arr = np.load(npy, mmap_mode="r")
    return len(arr) == meta["num_tokens"] and (len(arr) == 0 or int(arr.max()) == meta["max_id"])


class Export(Stage):
    name = "export"

    def args(self, i):
        return ["export", str(self.root / "runs" / "base"), "--out", str(self.root / "exp"), "--format", "hf",
                "--force"]

    def inputs(self):
        return [self.root / "runs" / "base"]

    def broken_outputs(self):
        out = self.root / "exp"
        if not out.exists():
            return []

        def ok():
            from tinystories_cli.interop.hf import read_hf_model, read_hf_tokenizer

            read_hf_model(out)
            read_hf_tokenizer(out)
            return True
        return [] if validate_in_child(ok) else [str(out)]


class Import(Stage):
    name = "import"

    def args(self, i):
        return ["import", str(self.root / "inputs" / "hf"), "--run-name", "imp"]

    def inputs(self):
        return [self.root / "inputs" / "hf"]

    def reset(self):
        shutil.rmtree(self.root / "runs" / "imp", ignore_errors=True)

    def broken_outputs(self):
        out = self.root / "runs" / "imp"
        if not out.exists():
            return []

        def ok():
            from tinystories_cli.runs import load_trained_model

            load_trained_model(out)
            return True
        return [] if validate_in_child(ok) else [str(out)]

    def rerun_args(self, i):
        return None if (self.root / "runs" / "imp").exists() else self.args(i)  # a complete run is never replaced


class Bpe(Stage):
    name = "bpe"

    def args(self, i):  # alternating sizes: the old and the new tokenizer differ, so a mix would show
        return ["bpe", str(self.root / "inputs" / "text.txt"), "--out", str(self.root / "tok"), "--vocab-size",
                str(400 + 20 * (i % 2)), "--workers", "1", "--force"]

    def inputs(self):
        return [self.root / "inputs" / "text.txt"]

    def broken_outputs(self):
        d = self.root / "tok"
        return [] if not d.exists() or validate_in_child(lambda: _tokenizer_ok(d)) else [str(d)]


class Encode(Stage):
    name = "encode"

    def args(self, i):  # alternating tokenizers: the old and the new token file differ
        return ["encode", str(self.root / "inputs" / "text.txt"), "--tokenizer",
                str(self.root / "inputs" / f"tok{i % 2}"), "--out", str(self.root / "enc" / "t.npy"), "--force",
                "--workers", "1"]

    def inputs(self):
        return [self.root / "inputs"]

    def broken_outputs(self):
        npy = self.root / "enc" / "t.npy"
        return [] if validate_in_child(lambda: _tokens_ok(npy)) else [str(npy)]


class Quickstart(Stage):
    name = "quickstart"

    def args(self, i):
        return ["quickstart", "--text", str(self.root / "inputs" / "stories.txt"), "--dir", str(self.root / "qs"),
                "--minutes", "0.02", "--vocab-size", str(280 + 10 * (i % 2)), "--preset", "debug", "--device", "cpu",
                "--max-tokens", "8", "--force"]

    def inputs(self):
        return [self.root / "inputs" / "stories.txt"]

    def broken_outputs(self):
        d = self.root / "qs" / "data" / "quickstart"
        bad = []
        rec = d / "source.json"
        if rec.exists():
            r = json.loads(rec.read_text())
            if not ((d / "train.txt").stat().st_size == r["train_bytes"] and (d / "valid.txt").stat().st_size
                    == r["valid_bytes"]):
                bad.append(str(rec))
        if (d / "tokenizer").exists() and not validate_in_child(lambda: _tokenizer_ok(d / "tokenizer")):
            bad.append(str(d / "tokenizer"))
        for split in ("train", "valid"):
            if not validate_in_child(lambda s=split: _tokens_ok(d / f"{s}.npy")):
                bad.append(str(d / f"{split}.npy"))
        run = self.root / "qs" / "runs" / "quickstart"
        if (run / "checkpoints").is_dir() and any((run / "checkpoints").glob("*.safetensors")):
            def ok():
                from tinystories_cli.runs import load_trained_model

                load_trained_model(run)
                return True
            if not validate_in_child(ok):
                bad.append(str(run))
        return bad


STAGES = {c.name: c for c in (Export, Import, Bpe, Encode, Quickstart)}


# ---------------------------------------------------------------- the workspace


def build_workspace(root: Path) -> None:
    from train_fixtures import make_dataset, story_text, trained_runs

    trained_runs(root, {"base": []})
    inputs = root / "inputs"
    inputs.mkdir()
    text = story_text(300, 5)
    (inputs / "text.txt").write_text(text, encoding="utf-8")
    (inputs / "stories.txt").write_text(story_text(400, 6), encoding="utf-8")
    assert cli_main(["export", str(root / "runs" / "base"), "--out", str(inputs / "hf"), "--format", "hf"]) == 0
    for i, v in enumerate((300, 320)):
        assert cli_main(["bpe", str(inputs / "text.txt"), "--out", str(inputs / f"tok{i}"), "--vocab-size", str(v),
                         "--workers", "1"]) == 0
    del make_dataset


def _stats(root: Path) -> dict[str, tuple[int, int]]:
    return {str(f): (f.stat().st_size, f.stat().st_mtime_ns) for f in root.rglob("*") if f.is_file()}


def written_sizes(root: Path, before: dict[str, tuple[int, int]]) -> list[int]:
    """Sizes of the files an undisturbed run wrote (new or rewritten since `before`)."""
    return sorted({st[0] for f, st in _stats(root).items() if "inputs" not in Path(f).parts and before.get(f) != st})


def run_stage(stage: Stage, kills: int, rng: random.Random) -> dict:
    root = stage.root
    rerun = getattr(stage, "rerun_args", stage.args)
    stage.reset()
    t_base = []
    for i in range(2):  # undisturbed: its time, and the outputs exist for the first kill to replace
        stage.reset()
        code, t = run_child(stage.args(i))
        if code != 0:
            raise SystemExit(f"{stage.name}: undisturbed run of `tslm {' '.join(stage.args(i))}` exited {code}")
        t_base.append(t)
    base = max(t_base)
    counts = {"kills": 0, "finished_before_kill": 0, "disk_full_attempts": 0, "lost": 0, "half_written": 0,
              "litter": 0, "rerun_failed": 0, "internal_errors": 0, "seconds_per_run": round(base, 3)}
    examples: list[str] = []
    in_sha = sha_tree(stage.inputs())

    def check(after_rerun: bool) -> None:
        now = sha_tree(stage.inputs())
        lost = sum(1 for k, v in in_sha.items() if now.get(k) != v)
        counts["lost"] += lost
        bad = stage.broken_outputs()
        counts["half_written"] += len(bad)
        examples.extend(f"half-written: {b}" for b in bad[:2])
        if after_rerun:
            left = litter(root)
            counts["litter"] += len(left)
            examples.extend(f"litter: {x}" for x in left[:2])

    def rerun_and_check(i: int) -> None:
        args = rerun(i)
        if args is not None:
            code, _ = run_child(args)
            if code != 0:
                counts["rerun_failed"] += 1
                examples.append(f"rerun exited {code}: {' '.join(args[:3])}")
        check(after_rerun=True)

    for i in range(kills):
        stage.reset()
        code, _ = run_child(stage.args(i), kill_after=rng.uniform(0.0, 1.2 * base))
        counts["kills"] += 1
        if code is not None:
            counts["finished_before_kill"] += 1
        check(after_rerun=False)
        rerun_and_check(i)

    # disk full at each file: a limit just below each distinct size the command writes
    stage.reset()
    before = _stats(root)
    run_child(stage.args(0))
    sizes = [s for s in written_sizes(root, before) if s > 0] or [1]
    for j, size in enumerate(sizes):
        stage.reset()
        code, _ = run_child(stage.args(j + 1), fsize=size - 1)
        counts["disk_full_attempts"] += 1
        if code not in (0, 2):
            counts["internal_errors"] += 1
            examples.append(f"disk full below {size} bytes: exit {code}")
        check(after_rerun=False)
        rerun_and_check(j + 1)
    counts["examples"] = examples[:6]
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kills", type=int, default=50, help="kill -9 attempts per stage")
    ap.add_argument("--quickstart-kills", type=int, default=None, help="for quickstart (default: --kills)")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--seed", type=int, default=31)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tslm-faults-") as tmp:
        root = Path(tmp)
        paths.DATA_ROOT, paths.RUNS_ROOT = root / "data", root / "runs"
        build_workspace(root)
        results = {}
        for name in a.stages.split(","):
            n = a.quickstart_kills if name == "quickstart" and a.quickstart_kills is not None else a.kills
            results[name] = run_stage(STAGES[name](root), n, rng)
    total = {k: sum(r[k] for r in results.values()) for k in
             ("kills", "disk_full_attempts", "lost", "half_written", "litter", "rerun_failed", "internal_errors")}
    print(json.dumps({"stages": results, "total": total, "seconds": round(time.perf_counter() - t0, 1),
                      "seed": a.seed}, indent=1))


if __name__ == "__main__":
    main()
