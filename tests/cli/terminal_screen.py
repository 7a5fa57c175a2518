"""A small terminal emulator for tests: runs a command under a real pseudo-terminal and replays its output
onto a screen with scrollback, the way a terminal would show it.

It understands what rich (and a plain program) writes: printable text with auto-wrap at the width, CR, LF,
BS, TAB, CSI cursor moves (A B C D G H), erase in line/display (K, J), and ignores colours (m), modes (h l)
and OSC strings. That is enough to see whether a live display redraws over text printed after it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import termios
import time
from dataclasses import dataclass, field

_CSI = re.compile(r"\x1b\[([?0-9;]*)([@-~])")
_OSC = re.compile(r"\x1b\].*?(?:\x07|\x1b\\)", re.S)


@dataclass
class Screen:
    rows: int
    cols: int
    lines: list[list[str]] = field(default_factory=lambda: [[]])
    wrapped: list[bool] = field(default_factory=lambda: [False])  # line i continues on line i + 1
    row: int = 0
    col: int = 0
    cursor_moves_up: int = 0

    def _ensure(self, row: int) -> None:
        while len(self.lines) <= row:
            self.lines.append([])
            self.wrapped.append(False)

    @property
    def top(self) -> int:
        """The buffer index of the screen's first row (everything above is scrollback)."""
        return max(0, len(self.lines) - self.rows)

    def _put(self, ch: str) -> None:
        if self.col >= self.cols:  # deferred auto-wrap
            self.wrapped[self.row] = True
            self.row += 1
            self.col = 0
            self._ensure(self.row)
        line = self.lines[self.row]
        while len(line) < self.col:
            line.append(" ")
        if self.col < len(line):
            line[self.col] = ch
        else:
            line.append(ch)
        self.col += 1

    def feed(self, text: str) -> None:
        text = _OSC.sub("", text)
        i = 0
        while i < len(text):
            ch = text[i]
            if ch == "\x1b":
                m = _CSI.match(text, i)
                if m:
                    self._csi(m.group(1), m.group(2))
                    i = m.end()
                    continue
                i += 2  # a two-byte escape (e.g. ESC 7 / ESC 8): ignored
                continue
            if ch == "\r":
                self.col = 0
            elif ch == "\n":
                self.row += 1
                self._ensure(self.row)
            elif ch == "\b":
                self.col = max(0, self.col - 1)
            elif ch == "\t":
                self.col = min(self.cols - 1, (self.col // 8 + 1) * 8)
            elif ch == "\x07" or ord(ch) < 32:
                pass
            else:
                self._put(ch)
            i += 1

    def _csi(self, params: str, final: str) -> None:
        if params.startswith("?"):
            return  # private modes (cursor visibility, bracketed paste)
        nums = [int(p) if p else 0 for p in params.split(";")] if params else []
        n = nums[0] if nums else 0
        if final == "A":
            self.cursor_moves_up += 1
            self.row = max(self.top, self.row - max(n, 1))
        elif final == "B":
            self.row += max(n, 1)
            self._ensure(self.row)
        elif final == "C":
            self.col = min(self.cols - 1, self.col + max(n, 1))
        elif final == "D":
            self.col = max(0, self.col - max(n, 1))
        elif final == "G":
            self.col = max(0, max(n, 1) - 1)
        elif final == "H":
            r = (nums[0] if nums else 1) or 1
            c = (nums[1] if len(nums) > 1 else 1) or 1
            self.row, self.col = self.top + r - 1, c - 1
            self._ensure(self.row)
        elif final == "K":
            line = self.lines[self.row]
            if n == 0:
                del line[self.col:]
            elif n == 1:
                for k in range(min(self.col + 1, len(line))):
                    line[k] = " "
            else:
                line.clear()
            if n in (0, 2):
                self.wrapped[self.row] = False
        elif final == "J":
            if n == 0:
                del self.lines[self.row][self.col:]
                for k in range(self.row + 1, len(self.lines)):
                    self.lines[k] = []
            elif n in (2, 3):
                for k in range(self.top, len(self.lines)):
                    self.lines[k] = []

    def text_lines(self) -> list[str]:
        """Every line of the buffer (scrollback and screen), trailing blanks dropped."""
        out = ["".join(line).rstrip() for line in self.lines]
        while out and not out[-1]:
            out.pop()
        return out

    def screen_lines(self) -> list[str]:
        lines = self.text_lines()
        return lines[-self.rows:]

    def logical_lines(self, start: int = 0) -> list[str]:
        """Lines with auto-wrapped rows joined again (what was printed as one line)."""
        out, cur = [], ""
        for k in range(start, len(self.lines)):
            cur += "".join(self.lines[k]) if self.wrapped[k] else "".join(self.lines[k]).rstrip()
            if not self.wrapped[k]:
                out.append(cur)
                cur = ""
        if cur:
            out.append(cur)
        return out


def run_in_pty(argv: list[str], *, rows: int = 50, cols: int = 120, env: dict | None = None, cwd=None,
               timeout: float = 600.0) -> tuple[int, bytes]:
    """Run `argv` with stdin/stdout/stderr on one pseudo-terminal of `rows` x `cols`; returns (exit code,
    every byte it wrote)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd, start_new_session=True,
                            close_fds=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while True:
            if time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                raise TimeoutError(f"{argv} ran over {timeout} s")
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 1 << 16)
            except OSError as e:
                if e.errno == errno.EIO:  # the child closed the terminal
                    break
                raise
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
    return proc.wait(timeout=60), b"".join(chunks)
