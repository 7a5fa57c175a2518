"""`tslm quickstart` in a real terminal: a pseudo-terminal of fixed size, its output replayed onto an
emulated screen with scrollback (tests/cli/terminal_screen.py). Captured (piped) output cannot show a live
display that keeps redrawing over later text; this can."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tinystories_cli import sample

from terminal_screen import Screen, run_in_pty
from train_fixtures import REPO

ROWS, COLS = 50, 120
BAR = "━"


def test_screen_emulator_replays_redraws_and_wraps():
    s = Screen(rows=5, cols=10)
    s.feed("abc\r\x1b[2Kxy\r\n")                 # a redrawn line: only the last drawing stays
    s.feed("0123456789ABC\r\n")                  # auto-wrap at the width
    s.feed("bar 1\r\nbar 2\r\n\x1b[2A\r\x1b[2Kstory")  # cursor up over two lines, then overwrite
    assert s.text_lines() == ["xy", "0123456789", "ABC", "story", "bar 2"]
    assert s.logical_lines()[:2] == ["xy", "0123456789ABC"]


def _pty_env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "NO_COLOR", "FORCE_COLOR",
                                                          "TERM", "TTY_COMPATIBLE", "TTY_INTERACTIVE")}
    env.update(TERM="xterm-256color", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HOME=str(tmp_path),
               HF_ENDPOINT="http://nonexistent.invalid")
    return env


def test_quickstart_in_a_terminal_keeps_the_story_on_screen(tmp_path: Path):
    # ~400 KB of real TinyStories text (the bundled sample), enough for every bar to be drawn a few times
    text = tmp_path / "stories.txt"
    data = sample.read_sample()[:400_000]
    text.write_bytes(data[: data.rfind(b"<|endoftext|>") + len(b"<|endoftext|>\n")])
    work = tmp_path / "work"
    argv = [sys.executable, "-m", "tinystories_cli", "quickstart", "--text", str(text), "--minutes", "0.3",
            "--dir", str(work), "--vocab-size", "300", "--device", "cpu", "--max-tokens", "40"]
    code, raw = run_in_pty(argv, rows=ROWS, cols=COLS, env=_pty_env(tmp_path), cwd=tmp_path, timeout=900)
    out = raw.decode("utf-8", "replace")
    assert code == 0, out[-3000:]
    assert "\x1b[" in out, "rich did not see a terminal: this test checks nothing"

    screen = Screen(ROWS, COLS)
    screen.feed(out)
    lines = screen.text_lines()
    story_file = work / "runs" / "quickstart" / "story.txt"
    story_first = " ".join(story_file.read_text(encoding="utf-8").splitlines()[0].split())

    # The streamed story is on the final screen, whole, and so is the summary.
    screen_text = " ".join(" ".join(screen.logical_lines(max(0, len(screen.lines) - ROWS))).split())
    assert story_first[:100] in screen_text, (story_first, screen.screen_lines())
    assert any(line.startswith("model: ") for line in screen.screen_lines()), screen.screen_lines()
    assert any(line.startswith("done ─") for line in screen.screen_lines()), screen.screen_lines()
    assert "story temperature" in screen_text

    # The scrollback holds at most one line per finished bar: the tokenizer and encode bars are transient,
    # the training bar leaves its last state.
    bar_lines = [line for line in lines if BAR in line]
    assert not [line for line in bar_lines if "tokenizer:" in line or line.lstrip().startswith("encode ")], bar_lines
    assert len([line for line in bar_lines if line.startswith("step ")]) <= 1, bar_lines
    assert len(bar_lines) <= 1, bar_lines
    assert "sampled estimate" in screen_text   # which of the two losses this is (`tslm eval` gives the other)
    # nothing the pipeline printed was overwritten: every stage line is there once
    for stage in ("split", "tokenizer", "encode"):
        said = [ln for ln in lines if ln.startswith((f"{stage} wrote ", f"{stage} trained ", f"{stage} kept "))]
        assert len(said) == 1, [ln for ln in lines if stage in ln]

    # A rerun skips every stage and tells the story again: every word of it stays on the screen.
    code, raw = run_in_pty(argv, rows=ROWS, cols=COLS, env=_pty_env(tmp_path), cwd=tmp_path, timeout=900)
    assert code == 0, raw.decode("utf-8", "replace")[-3000:]
    again = Screen(ROWS, COLS)
    again.feed(raw.decode("utf-8", "replace"))
    story = " ".join(story_file.read_text(encoding="utf-8").split())
    text = " ".join(" ".join(again.logical_lines()).split())
    assert story in text, (story, again.screen_lines())
    assert not [line for line in again.text_lines() if BAR in line], again.text_lines()
