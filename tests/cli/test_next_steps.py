"""Every "next" command that `tslm quickstart` and `tslm import` print works as printed and destroys nothing.

The commands are taken from the printed output and run in a shell (cwd and environment of a user who just
ran the command). Two changes, each said where it happens: a training command gets an appended
`--time-budget 8s` (its schedule is fitted to 8 seconds) to keep the test short, and the full-TinyStories
chain (a 2.2 GB download) runs offline, where it must fail at once with the one-line offline error.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

from train_fixtures import REPO, tiny_stories


def _env() -> dict:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_ENDPOINT="http://nonexistent.invalid",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    for k in ("TSLM_DATA", "TSLM_RUNS"):
        env.pop(k, None)
    return env


def _sh(cmd: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", cmd], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)


def _printed_commands(out: str) -> list[str]:
    """The command lines of the `next` block: indented lines after `next`, not the `# what` comments."""
    lines = out.splitlines()
    start = lines.index("next")
    return [ln.strip() for ln in lines[start + 1:] if ln.startswith("  ") and not ln.strip().startswith("#")]


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _shorter(cmd: str) -> str:
    return cmd + " --time-budget 8s" if " tslm train " in f" {cmd}" else cmd


def test_every_next_step_of_quickstart_and_import_works(tmp_path: Path):
    text = tmp_path / "stories.txt"
    text.write_text(tiny_stories(400), encoding="utf-8")
    work = tmp_path / "work"
    r = _sh(f"tslm quickstart --text {text} --minutes 0.1 --dir {work} --vocab-size 300 --device cpu "
            f"--max-tokens 20", tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    cmds = _printed_commands(r.stdout)
    assert len(cmds) >= 4, r.stdout
    data_before = _digest(work / "data")
    ran = 0
    for cmd in cmds:
        if "tslm download tinystories" in cmd:  # 2.2 GB: offline here, it must say so at once
            t = time.monotonic()
            d = _sh(cmd, tmp_path)
            assert d.returncode == 2 and time.monotonic() - t < 10 and "cannot reach" in d.stderr, d.stderr
            continue
        res = _sh(_shorter(cmd), tmp_path)
        assert res.returncode == 0, (cmd, res.stdout[-1500:], res.stderr[-1500:])
        ran += 1
    assert ran >= 4
    assert _digest(work / "data") == data_before, "a next step changed a file under data/"

    # tslm export, then tslm import of that export, run from the work directory as a user would
    run_dir = work / "runs" / "quickstart"
    r = _sh(f"tslm export {run_dir} --out {tmp_path / 'hf'}", work)
    assert r.returncode == 0, r.stderr[-2000:]
    r = _sh(f"tslm import {tmp_path / 'hf'} --run-name reimported", work)
    assert r.returncode == 0, r.stderr[-2000:]
    cmds = _printed_commands(r.stdout)
    assert any(" tslm eval " in f" {c}" for c in cmds) and any("--init-from" in c for c in cmds), r.stdout
    assert not any("--force" in c for c in cmds)
    for cmd in cmds:
        res = _sh(_shorter(cmd), work)
        assert res.returncode == 0, (cmd, res.stdout[-1500:], res.stderr[-1500:])
    assert _digest(work / "data") == data_before, "a next step of import changed a file under data/"


def test_the_wrong_tokenizer_error_names_a_new_file_and_a_real_tokenizer(tmp_path: Path, run_cli, monkeypatch):
    """`tslm eval RUN --data FILE` with a token file from another tokenizer: the fix is a command that runs as
    printed (no DIR placeholder) and writes a new file, never --force over the existing one."""
    from tinystories_cli.cli.common import to_flags
    from tinystories_cli.tokens import reencode_hint
    # as `tslm eval` shows it: the library names the parameters, the CLI's translator the flags
    hint = to_flags(reencode_hint(Path("data/tinystories/valid.npy"), Path("runs/reimported/tokenizer")), "eval")
    assert "--force" not in hint and "DIR" not in hint
    assert "--tokenizer runs/reimported/tokenizer --out data/tinystories/valid.reimported.npy" in hint
