"""`tslm plot`: metrics.jsonl reading, smoothing, PNG and terminal rendering, and its errors."""

from __future__ import annotations

import json
import math
import sys

import pytest

from tinystories_cli import plot
from tinystories_cli.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(root, name, records, raw_tail: str = ""):
    d = root / name
    d.mkdir(parents=True)
    with open(d / "metrics.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        f.write(raw_tail)
    return d


def curve(n, nan_after=None, scale=1.0):
    recs = []
    for s in range(1, n + 1):
        loss = 2 + 8 * math.exp(-s / 10 * scale)
        if nan_after is not None and s > nan_after:
            loss = float("nan")
        rec = {"step": s * 10, "tokens": s * 10 * 512, "elapsed_s": s * 1.5, "train_loss": loss, "lr": 1e-3}
        if s % 5 == 0:
            rec["val_loss"] = loss
        recs.append(rec)
    return recs


@pytest.fixture
def runs(tmp_path):
    base = write_run(tmp_path, "base", curve(40))
    # A diverged run: NaN as written by json.dumps, a null, and a half-written last line.
    diverged = write_run(tmp_path, "diverged", curve(30, nan_after=20, scale=0.4) + [{"step": 310, "train_loss": None}],
                         raw_tail='{"step": 320, "train_lo')
    single = write_run(tmp_path, "single", [{"step": 7, "tokens": 100, "elapsed_s": 0.5, "val_loss": 5.5}])
    return base, diverged, single


def test_load_series_drops_non_finite_and_partial_line(runs):
    _, diverged, _ = runs
    s = plot.load_series(diverged, "train_loss")
    assert len(s.x) == 20 and all(math.isfinite(v) for v in s.y)
    assert s.dropped == 11  # 10 NaN + 1 null; the half-written line is ignored
    assert s.name == "diverged"
    t = plot.load_series(diverged / "metrics.jsonl", "train_loss", x="time")
    assert t.x[:2] == [1.5, 3.0]


def test_malformed_middle_line_is_an_error(tmp_path):
    d = write_run(tmp_path, "bad", [{"step": 1, "val_loss": 1.0}], raw_tail='garbage\n{"step": 2, "val_loss": 1.0}\n')
    with pytest.raises(Exception, match="malformed line 2"):
        plot.load_series(d, "val_loss")


def test_smooth_is_trailing_mean():
    assert plot.smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert plot.smooth([1.0, 3.0], 1) == [1.0, 3.0]
    assert plot.smooth([], 5) == []


def test_png_written_with_nan_and_single_point_runs(runs, tmp_path, capsys):
    out = tmp_path / "loss.png"
    rc = main(
        [
            "plot",
            *map(str, runs),
            "--metric",
            "val_loss",
            "--x",
            "tokens",
            "--out",
            str(out),
            "--log-y",
            "--smooth",
            "3",
        ]
    )
    assert rc == 0
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5000
    # Only a single-point run: must still draw.
    out2 = tmp_path / "one.png"
    assert main(["plot", str(runs[2]), "--out", str(out2)]) == 0
    assert out2.read_bytes().startswith(PNG_MAGIC)
    # Existing output is refused without --force.
    assert main(["plot", str(runs[0]), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["plot", str(runs[0]), "--out", str(out), "--force", "--metric", "train_loss", "--x", "time"]) == 0


def test_ascii_distinct_markers_and_legend(runs, capsys):
    rc = main(["plot", *map(str, runs), "--metric", "train_loss", "--ascii", "--width", "40", "--height", "10"])
    assert rc == 0
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert lines[0].startswith("train_loss vs step")
    assert "* base (40 points)" in out.out
    assert "o diverged (20 points, 11 non-finite dropped)" in out.out
    grid = "\n".join(lines[1:11])
    assert "*" in grid and "o" in grid
    assert "single: no finite train_loss values" in out.err
    # The plot's x range ends at the last finite step of the longest run.
    assert lines[12].rstrip().endswith("400")


def test_ascii_single_point():
    text = plot.render_ascii([plot.Series("one", [7.0], [5.5])], "val_loss", width=20, height=5)
    grid = text.splitlines()[1:6]
    assert sum(row.count("*") for row in grid) == 1
    assert "*" in grid[2]  # a degenerate range puts the point mid-axis


def test_errors(runs, tmp_path, capsys):
    base = str(runs[0])
    cases = [
        (["plot", str(tmp_path / "nope"), "--ascii"], "run not found"),
        (["plot", base, "--ascii", "--metric", "bogus"], "no finite 'bogus' values"),
        (["plot", base, "--ascii", "--x", "epochs"], "unknown --x"),
        (["plot", base], "nothing to draw to"),
        (["plot", base, "--out", str(tmp_path / "a.jpg")], "must be a .png"),
        (["plot", base, "--ascii", "--smooth", "0"], "--smooth must be >= 1"),
    ]
    for argv, msg in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err
    empty_run = tmp_path / "empty"
    empty_run.mkdir()
    assert main(["plot", str(empty_run), "--ascii"]) == 2
    assert "no metrics file" in capsys.readouterr().err


def test_missing_matplotlib_is_one_line(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    assert main(["plot", str(runs[0]), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "matplotlib is not installed" in err and "pip install matplotlib" in err
    assert not (tmp_path / "x.png").exists()
    # The terminal plot needs no matplotlib.
    assert main(["plot", str(runs[0]), "--ascii"]) == 0


def test_missing_x_axis_is_explained(tmp_path, capsys):
    d = write_run(tmp_path, "old", [{"step": 1, "val_loss": 3.0}, {"step": 2, "val_loss": 2.5}])
    assert main(["plot", str(d), "--ascii", "--x", "time"]) == 2
    assert "have no x value" in capsys.readouterr().err
    assert main(["plot", str(d), "--ascii", "--x", "step"]) == 0
