"""`tslm generate --grid`: the text figures (distinct-n, repetition rate), the grid parser, and the
Markdown comparison end to end on a tiny trained run."""

from __future__ import annotations

import doctest
import json
import re

import pytest

from tinystories_cli import sampling_grid
from tinystories_cli.sampling_grid import (
    corpus_distinct_n,
    distinct_n,
    grid_cells,
    ngrams,
    parse_grid,
    repetition_rate,
    words,
)

from train_fixtures import trained_runs

# tiny models: one intra-op thread for the whole module (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


def test_doctests():
    assert doctest.testmod(sampling_grid).failed == 0


# ---------------------------------------------------------------------------------------------
# The figures
# ---------------------------------------------------------------------------------------------


def test_distinct_n_by_hand():
    toks = "the dog saw the dog and the cat".split()
    # bigrams: the dog, dog saw, saw the, the dog, dog and, and the, the cat -> 6 distinct of 7
    assert distinct_n(toks, 2) == pytest.approx(6 / 7)
    assert distinct_n(toks, 1) == pytest.approx(5 / 8)  # the, dog, saw, and, cat
    assert distinct_n(toks, 3) == 1.0
    assert distinct_n(toks, 8) == 1.0 and distinct_n(toks, 9) == 0.0
    assert distinct_n([], 2) == 0.0
    assert distinct_n([1, 1, 1, 1], 2) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="at least 1"):
        distinct_n(toks, 0)


def test_corpus_distinct_pools_samples_without_crossing_them():
    a, b = [1, 2, 3], [3, 4, 5]
    # pooled: (1,2) (2,3) (3,4) (4,5); a bigram (3, 3) across the boundary is never formed
    assert corpus_distinct_n([a, b], 2) == 1.0
    assert corpus_distinct_n([a, a, a], 2) == pytest.approx(2 / 6)
    assert corpus_distinct_n([a, [7]], 2) == 1.0  # a sample too short adds no n-gram
    assert corpus_distinct_n([[7], []], 2) == 0.0
    # identical samples: per-sample distinct stays 1, the pooled one drops (the same story every seed)
    assert distinct_n(a, 2) == 1.0 and corpus_distinct_n([a, a], 2) == 0.5


def test_repetition_rate_by_hand():
    loop = "he ran and ran and ran and ran".split()  # 4-grams: 5, of which 3 repeat
    # he ran and ran | ran and ran and | and ran and ran | ran and ran and (rep) | and ran and ran (rep)
    assert repetition_rate(loop) == pytest.approx(2 / 5)
    assert repetition_rate(loop, 2) == pytest.approx(4 / 7)  # he-ran ran-and and-ran, then 4 repeats
    assert repetition_rate("a b c".split()) == 0.0  # no 4-gram at all
    assert repetition_rate(list(range(20))) == 0.0
    assert repetition_rate([0] * 20) == pytest.approx(16 / 17)
    assert ngrams([1, 2, 3, 4], 4) == [(1, 2, 3, 4)]
    assert words("Lily  saw\ta cat.\n") == ["Lily", "saw", "a", "cat."]


# ---------------------------------------------------------------------------------------------
# The grid parser
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, expected", [
    ("temp=0.5,1.0,1.2 top_p=0.3,0.9,1.0", {"temperature": [0.5, 1.0, 1.2], "top_p": [0.3, 0.9, 1.0]}),
    ("temperature=0", {"temperature": [0.0]}),
    ("  top-p=0.9   top_k=0,40,1 ", {"top_p": [0.9], "top_k": [0, 40, 1]}),
    ("top_k=5;temp=0.7,1", {"top_k": [5], "temperature": [0.7, 1.0]}),
    ("temp=1e-1 top_p=1 top_k=3", {"temperature": [0.1], "top_p": [1.0], "top_k": [3]}),
])
def test_parse_grid_good(spec, expected):
    got = parse_grid(spec)
    assert got == expected and list(got) == list(expected)  # the axes keep their order
    assert all(type(v) is int for v in got.get("top_k", []))


@pytest.mark.parametrize("spec, message", [
    ("", "the grid is empty"),
    ("   ", "the grid is empty"),
    ("temp", "is not KEY=VALUES"),
    ("temp:0.5", "is not KEY=VALUES"),
    ("heat=0.5", "unknown grid key 'heat'"),
    ("temp=", "empty value"),
    ("temp=0.5,,1", "empty value"),
    ("temp=0.5 temperature=1", "temperature is given twice"),
    ("temp=abc", "temp value 'abc' is not a number"),
    ("temp=nan", "not a finite number"),
    ("top_k=1.5", "top_k value '1.5' is not a whole number"),
    ("temp=-1", "temperature must be >= 0"),
    ("top_p=0", "top_p must be in (0, 1]"),
    ("top_p=1.01", "top_p must be in (0, 1]"),
    ("top_k=-3", "top_k must be >= 0"),
    ("temp=0.5,0.5", "repeats a value"),
    ("temp=" + ",".join(str(i / 10) for i in range(9)) + " top_p=" + ",".join(str((i + 1) / 10) for i in range(8)),
     "the grid has 72 cells; at most 64"),
])
def test_parse_grid_bad(spec, message):
    with pytest.raises(ValueError) as e:
        parse_grid(spec)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_grid_cells_every_combination_first_axis_slowest():
    cells = grid_cells(parse_grid("temp=0.5,1 top_k=0,40"), {"temperature": 1.0, "top_p": 0.9, "top_k": 0})
    assert [(c["temperature"], c["top_k"], c["top_p"]) for c in cells] == [
        (0.5, 0, 0.9), (0.5, 40, 0.9), (1.0, 0, 0.9), (1.0, 40, 0.9)]


# ---------------------------------------------------------------------------------------------
# tslm generate --grid, end to end on a tiny trained run
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def _grid_run(tmp_path_factory):
    return trained_runs(tmp_path_factory.mktemp("gridrun"), {"g": [
        "--ctx", "32", "--max-steps", "30", "--warmup-steps", "2", "--lr", "1e-2", "--eval-every", "30"]})


@pytest.fixture
def grid_run(_grid_run, use_workspace):
    return use_workspace(_grid_run)


def test_cli_grid_markdown_same_prompt_and_seeds_per_cell(grid_run, run_cli):
    args = ["generate", "The cat", "--grid", "temp=0.7,1.2 top_p=0.5,1.0", "-n", "2", "--seed", "3",
            "--max-tokens", "40", "--no-stop", "--device", "cpu"]
    code, out, err = run_cli(*args)
    assert code == 0, err
    assert "[cell 1/4: temp=0.7 top_p=0.5]" in err and "[cell 4/4: temp=1.2 top_p=1]" in err
    lines = out.splitlines()
    assert lines[0] == "# Sampling grid"
    assert "prompt `The cat`; seeds 3-4 in every cell; at most 40 new tokens; top_k=0." in out
    header = lines.index("| temp | top_p | distinct-2 | distinct-3 | repetition | new tokens |")
    rows = [r.split("|")[1:-1] for r in lines[header + 2:header + 6]]
    assert [(r[0].strip(), r[1].strip()) for r in rows] == [("0.7", "0.5"), ("0.7", "1"), ("1.2", "0.5"),
                                                           ("1.2", "1")]
    assert lines[header + 6] == ""
    # every cell's samples are those of a plain `tslm generate` with the same prompt, settings and seeds;
    # the table's figures are the library's on those texts
    code, js, err = run_cli(*args, "--json")
    assert code == 0, err
    cells = json.loads(js)
    assert len(cells) == 4
    for cell, row in zip(cells, rows):
        assert [s["seed"] for s in cell["samples"]] == [3, 4]
        assert all(s["prompt"] == "The cat" for s in cell["samples"])
        code, single, _ = run_cli(
            "generate",
            "The cat",
            "--temp",
            str(cell["temperature"]),
            "--top-p",
            str(cell["top_p"]),
            "--seed",
            "3",
            "-n",
            "2",
            "--max-tokens",
            "40",
            "--no-stop",
            "--json",
            "--device",
            "cpu",
        )
        assert [json.loads(x)["text"] for x in single.splitlines()] == [s["text"] for s in cell["samples"]]
        texts = [words(s["text"]) for s in cell["samples"]]
        assert cell["distinct_2"] == pytest.approx(corpus_distinct_n(texts, 2))
        assert row[2].strip() == f"{corpus_distinct_n(texts, 2):.3f}"
        assert row[3].strip() == f"{corpus_distinct_n(texts, 3):.3f}"
        rep = sum(repetition_rate(t) for t in texts) / 2
        assert row[4].strip() == f"{rep:.3f}"
        for s in cell["samples"]:
            assert f"The cat{s['text']}\n" in out  # the samples section holds the full texts
    # the lower temperature and nucleus concentrate the distribution: a hotter, wider cell is more varied
    assert cells[3]["distinct_2"] >= cells[0]["distinct_2"]


def test_cli_grid_out_writes_the_file_and_refuses_to_overwrite(grid_run, run_cli, tmp_path):
    dest = tmp_path / "grid.md"
    common = ["generate", "--grid", "top_k=1,0", "--seed", "0", "--max-tokens", "8", "--device", "cpu", "--stop", "."]
    code, out, err = run_cli(*common, "--out", str(dest))
    assert code == 0, err
    text = dest.read_text(encoding="utf-8")
    assert text.startswith("# Sampling grid\n") and "| top_k | distinct-2 |" in text and out == ""
    assert f"wrote {dest}" in " ".join(err.split())
    assert [p.name for p in tmp_path.iterdir()] == ["grid.md"]  # no temporary file left behind
    samples = re.findall(r"```text\n(.*?)\n```", text, re.S)
    assert len(samples) == 2 and all("." not in t for t in samples)  # --stop holds in every cell
    code, _, err = run_cli(*common, "--out", str(dest))
    assert code == 2 and "already exists" in err
    code, _, err = run_cli(*common, "--out", str(dest), "--force", "--temp", "0")
    assert code == 0, err
    assert "greedy (" in dest.read_text(encoding="utf-8")  # temperature 0: no seed


@pytest.mark.parametrize("args, message", [
    (["--grid", "temp=0.5,x"], "--grid: temp value 'x' is not a number"),
    (["--grid", "heat=1"], "--grid: unknown grid key 'heat'"),
    (["--grid", "top_p=2"], "--grid: grid value top_p=2: top_p must be in (0, 1]"),
    (["--grid", ""], "--grid: the grid is empty"),
    (["--out", "x.md"], "--out and --force go with --grid"),
    (["--grid", "temp=1", "--prompt-file", "p.txt"], "--grid samples one prompt"),
])
def test_cli_grid_errors_are_one_line_exit_2(grid_run, run_cli, args, message):
    code, out, err = run_cli("generate", *args)
    assert code == 2 and message in " ".join(err.split()), err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and out == ""
