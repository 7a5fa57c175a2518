"""`tslm compare`: run summaries from hand-written run directories, the differing-settings table,
Markdown/JSON output, user errors, and `--data` evaluation equal to `tslm eval` on real tiny runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tinystories_cli import compare, paths, runs

from train_fixtures import trained_runs, workspace_at, write_run


def test_summarize_metrics_best_final_and_nan():
    recs = [{"step": 5, "tokens": 320, "train_loss": 4.0},
            {"step": 10, "tokens": 640, "val_loss": 3.0},
            {"step": 15, "tokens": 960, "val_loss": 2.5},
            {"step": 20, "tokens": 1280, "val_loss": float("nan")}]
    s = runs.summarize_metrics(recs)
    assert (s["steps"], s["tokens"]) == (20, 1280)
    assert (s["best_val_loss"], s["best_val_step"]) == (2.5, 15)
    assert s["final_val_step"] == 20 and math.isnan(s["final_val_loss"])
    empty = runs.summarize_metrics([])
    assert empty["steps"] is None and empty["best_val_loss"] is None


def test_differing_settings_keep_only_what_changes_and_skip_bookkeeping(tmp_path):
    a = write_run(tmp_path, "a", train={"lr": 1e-3, "device": "cpu", "log_every": 1}, metrics=[])
    b = write_run(tmp_path, "b", model={"pos_emb": "nope"}, train={"lr": 3e-3, "device": "cuda"}, metrics=[])
    sa, sb = compare.summarize_run(a), compare.summarize_run(b)
    assert compare.differing_settings([sa, sb]) == ["pos_emb", "lr"]
    assert compare.differing_settings([sa]) == []
    cols, rows = compare.compare_table([sa, sb])
    assert cols[:3] == ["run", "pos_emb", "lr"] and "eval loss" not in cols
    assert rows[0][:3] == ["a", "rope", "0.001"] and rows[1][:3] == ["b", "nope", "0.003"]


def test_cli_markdown_table_has_a_row_per_run_with_eval_columns(tmp_path, run_cli):
    ev = {"loss": 2.0, "perplexity": math.exp(2.0), "bits_per_byte": 0.75, "data": "v.npy", "step": 10}
    a = write_run(tmp_path, "base", metrics=[{"step": 10, "tokens": 640, "val_loss": 2.1}], eval_result=ev)
    b = write_run(tmp_path, "tied", model={"tie_embeddings": True},
                  metrics=[{"step": 4, "tokens": 256, "val_loss": 2.6}])
    code, out, err = run_cli("compare", str(a), str(b), "--markdown")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0] == ("| run | tie_embeddings | params | steps | tokens | best val | final val | eval loss | ppl "
                        "| bpb |")
    assert lines[1].startswith("|---|---|---:|")
    assert lines[2] == "| base | no | 1.234K | 10 | 640 | 2.1000 | 2.1000 | 2.0000 | 7.39 | 0.7500 |"
    # an unfinished run shows steps done / planned, and no eval yet
    assert lines[3] == "| tied | yes | 1.234K | 4/10 | 256 | 2.6000 | 2.6000 | - | - | - |"
    assert len(lines) == 4


def test_cli_json_and_rich_outputs(tmp_path, run_cli):
    a = write_run(tmp_path, "one", metrics=[{"step": 3, "tokens": 9, "val_loss": 1.5}])
    code, out, err = run_cli("compare", str(a), "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data[0]["name"] == "one" and data[0]["best_val_loss"] == 1.5 and data[0]["settings"]["preset"] == "debug"
    code, out, err = run_cli("compare", str(a))
    assert code == 0, err
    assert "one" in out and "1.5000" in out


def test_run_without_metrics_is_listed_with_a_note(tmp_path, run_cli):
    a = write_run(tmp_path, "fresh")
    code, out, err = run_cli("compare", str(a), "--markdown")
    assert code == 0
    assert "| fresh |" in out and "no metrics.jsonl" in err


def test_same_directory_names_are_labelled_by_path(tmp_path, run_cli):
    a = write_run(tmp_path / "x", "run", metrics=[])
    b = write_run(tmp_path / "y", "run", metrics=[], train={"lr": 1e-3})
    code, out, _ = run_cli("compare", str(a), str(b), "--markdown")
    assert code == 0
    assert f"| {a} |" in out and f"| {b} |" in out


@pytest.mark.parametrize("args, expected", [
    (["nonexistent-run"], "no run or checkpoint named"),
    (["RUN", "--markdown", "--json"], "exclude each other"),
    (["RUN", "--batch-size", "0"], "--batch-size must be positive"),
    (["RUN", "--data", "missing.npy"], "token file not found"),
    (["NOTRUN"], "not a tslm run directory"),
])
def test_cli_user_errors(tmp_path, run_cli, monkeypatch, args, expected):
    monkeypatch.setattr(paths, "RUNS_ROOT", tmp_path / "runs")
    run = write_run(tmp_path, "r", metrics=[])
    (tmp_path / "plain").mkdir()
    args = [str(run) if a == "RUN" else str(tmp_path / "plain") if a == "NOTRUN" else a for a in args]
    code, _, err = run_cli("compare", *args)
    assert code == 2
    assert expected in err and "Traceback" not in err


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two tiny trained runs that differ only in lr (training is the slow part: shared by the module)."""
    return trained_runs(tmp_path_factory.mktemp("cmp"), {
        name: ["--lr", lr, "--min-lr", "1e-4"] for name, lr in (("lo", "1e-3"), ("hi", "3e-3"))})


def test_data_evaluates_like_tslm_eval(two_runs, run_cli, use_workspace):
    use_workspace(two_runs)
    valid = two_runs / "data" / "tiny" / "valid.npy"
    code, out, err = run_cli("compare", "lo", "hi", "--data", str(valid), "--device", "cpu", "--json")
    assert code == 0, err
    got = {r["name"]: r for r in json.loads(out)}
    for name in ("lo", "hi"):
        code, out, err = run_cli("eval", name, "--device", "cpu", "--json", "--out", str(two_runs / f"{name}.json"),
                                 "--force")
        assert code == 0, err
        ref = json.loads(out)
        assert got[name]["eval"]["loss"] == pytest.approx(ref["loss"], rel=1e-9)
        assert got[name]["eval"]["bits_per_byte"] == pytest.approx(ref["bits_per_byte"], rel=1e-9)
        assert got[name]["steps"] == 4 and got[name]["best_val_loss"] is not None
    assert got["lo"]["eval"]["loss"] != got["hi"]["eval"]["loss"]
    code, out, _ = run_cli("compare", "lo", "hi", "--data", str(valid), "--device", "cpu", "--markdown")
    assert code == 0
    header = out.splitlines()[0]
    assert header.startswith("| run | lr | params |") and header.endswith("| eval loss | ppl | bpb |")


@pytest.fixture(scope="module")
def seeded_runs(two_runs):
    """The two runs above (seed 0) plus a seed-1 twin of each, trained the same way."""
    from tinystories_cli.cli import main

    with workspace_at(two_runs):
        for name, lr in (("lo-s1", "1e-3"), ("hi-s1", "3e-3")):
            code = main(["train", "--preset", "debug", "--dataset", "tiny", "--ctx", "16", "--d-model", "32",
                         "--num-layers", "1", "--num-heads", "2", "--max-steps", "4", "--warmup-steps", "1",
                         "--eval-every", "2", "--lr", lr, "--min-lr", "1e-4", "--device", "cpu", "--run-name", name,
                         "--quiet", "--peak-tflops", "1", "--seed", "1"])
            assert code == 0
    return two_runs


def test_seeded_runs_end_to_end_mean_std_from_fresh_evaluations(seeded_runs, run_cli, use_workspace):
    use_workspace(seeded_runs)
    valid = seeded_runs / "data" / "tiny" / "valid.npy"
    names = ["lo", "lo-s1", "hi", "hi-s1"]
    code, out, err = run_cli("compare", *names, "--data", str(valid), "--device", "cpu", "--json")
    assert code == 0, err
    loss = {r["name"]: r["eval"]["loss"] for r in json.loads(out)}
    assert loss["lo"] != loss["lo-s1"]  # another seed: another initialization and batch order
    code, out, err = run_cli("compare", *names, "--data", str(valid), "--device", "cpu", "--markdown")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("| run | lr | seeds | params | steps | tokens | best val |")
    cols = [c.strip() for c in lines[0].split("|")[1:-1]]
    rows = {r[0]: dict(zip(cols, r)) for r in ([c.strip() for c in line.split("|")[1:-1]] for line in lines[2:4])}
    assert set(rows) == {"lo", "hi"} and rows["lo"]["seeds"] == "0,1" and rows["hi"]["steps"] == "4"
    for name in ("lo", "hi"):
        st = compare.stat([loss[name], loss[f"{name}-s1"]])
        mean_std = f"{st.mean:.4f} ± {st.std:.4f}"
        assert rows[name]["eval loss"].startswith(mean_std), rows[name]
    ref, other = compare.stat([loss["lo"], loss["lo-s1"]]), compare.stat([loss["hi"], loss["hi-s1"]])
    assert rows["hi"]["eval loss"].endswith(" ~") == compare.within_noise(ref, other)
    assert "within seed noise" in out and rows["lo"]["eval loss"].count("~") == 0


# ---------------------------------------------------------------- the generated run README
# (here because it summarizes run directories the same way, and reuses the trained runs above)


def test_run_readme_of_a_trained_run_and_its_commands_work(use_workspace, two_runs, run_cli, monkeypatch, tmp_path):
    import shlex

    from tinystories_cli import runs
    from tinystories_cli.run_readme import render_run_readme, write_run_readme

    use_workspace(two_runs)
    run_dir = two_runs / "runs" / "lo"
    text = render_run_readme(run_dir)
    model, _, _ = runs.load_trained_model(run_dir)
    n_params = sum(p.numel() for p in model.parameters())
    assert text.startswith("# lo\n")
    assert "- **preset**: `debug`" in text
    assert f"- **parameters**: {n_params:,}" in text and f"| **total** | {n_params:,} |" in text
    assert "- **training**: 4 of 4 steps" in text
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["tokenizer"]["fingerprint"] in text
    assert "valid.npy`: " in text and "tokens, from" in text
    assert f"tslm eval {run_dir}`." in text  # no eval yet: says how to get one
    assert f"tslm export {run_dir} --format hf" in text  # pre-norm RMSNorm + RoPE + SwiGLU: exportable

    # The README's commands run as written (from another directory: the run path is what they name).
    monkeypatch.chdir(tmp_path)
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    cmds = [shlex.split(line.split("#")[0]) for line in block.splitlines()]
    assert [c[1] for c in cmds] == ["generate", "eval", "plot", "export", "export"]
    for cmd in cmds[1:]:
        code, _, err = run_cli(*cmd[1:])
        assert code == 0, (cmd, err)
    assert (tmp_path / "lo-hf" / "config.json").is_file() and (tmp_path / "lo-safetensors").is_dir()

    dest = write_run_readme(run_dir)  # now with the eval result the command above wrote
    assert dest == run_dir / "README.md"
    after = dest.read_text(encoding="utf-8")
    ev = json.loads((run_dir / "eval_valid.json").read_text())
    assert f"| `tslm eval` bits per byte | {ev['bits_per_byte']:.4f} |" in after
    assert "`eval_valid.json`: `tslm eval` result" in after


def test_run_readme_of_an_unfinished_non_llama_run(tmp_path):
    from tinystories_cli.run_readme import render_run_readme

    d = write_run(tmp_path, "post", model={"norm_position": "post", "pos_emb": "nope"},
                  metrics=[{"step": 3, "tokens": 192, "val_loss": 4.25}])
    text = render_run_readme(d)
    assert "Not exportable to Hugging Face Llama format (norm_position=post, pos_emb=nope)" in text
    assert "--format hf" not in text and "--format safetensors" in text
    assert f"tslm train --resume {d}" in text and "not finished" in text
    assert "| best validation loss (step 3, fixed windows) | 4.2500 |" in text
    assert render_run_readme(d) == text  # a pure function of the directory's files


def test_run_readme_needs_a_run_directory(tmp_path):
    from tinystories_cli.errors import UserError
    from tinystories_cli.run_readme import render_run_readme

    with pytest.raises(UserError, match="not a tslm run directory"):
        render_run_readme(tmp_path)


# ---------------------------------------------------------------- runs that differ only by seed


def _seeded(root: Path, name: str, losses: list[float], model: dict | None = None, train: dict | None = None,
            evals: bool = True) -> list[Path]:
    """One run per loss: name-s<seed>, seeds 0.., best val = the loss, eval loss = the loss - 0.1."""
    out = []
    for seed, loss in enumerate(losses):
        ev = ({"loss": loss - 0.1, "perplexity": math.exp(loss - 0.1), "bits_per_byte": (loss - 0.1) / 2,
               "data": "v.npy", "step": 10} if evals else None)
        out.append(write_run(root, f"{name}-s{seed}", model=model, train={"seed": seed, **(train or {})},
                             metrics=[{"step": 10, "tokens": 640, "val_loss": loss}], eval_result=ev))
    return out


def test_compare_doctests():
    import doctest

    assert doctest.testmod(compare).failed == 0


def test_stat_and_within_noise():
    st = compare.stat([1.0, 2.0, 4.0, None, float("inf")])
    assert st.n == 3 and st.mean == pytest.approx(7 / 3)
    assert st.std == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2))
    assert compare.stat([None]) is None
    a = compare.Stat(2.0, 0.03, 3)
    # 2 SE = 2 sqrt(0.03^2/3 + 0.03^2/3) = 0.04899
    assert compare.within_noise(a, compare.Stat(2.048, 0.03, 3)) is True
    assert compare.within_noise(a, compare.Stat(2.050, 0.03, 3)) is False
    assert compare.within_noise(a, compare.Stat(1.952, 0.03, 3)) is True  # either direction
    assert compare.within_noise(a, compare.Stat(2.0, None, 1)) is None  # one seed: cannot tell
    assert compare.within_noise(None, a) is None


def test_runs_differing_only_by_seed_are_grouped_with_mean_std_and_noise_marks(tmp_path):
    base = _seeded(tmp_path, "abl-base", [2.00, 2.02, 2.04])  # mean 2.02, std 0.02
    far = _seeded(tmp_path, "abl-post", [2.10, 2.12, 2.14], model={"norm_position": "post"})  # 0.10 away
    near = _seeded(tmp_path, "abl-nope", [2.01, 2.03, 2.05], model={"pos_emb": "nope"})  # 0.01 away: noise
    single = _seeded(tmp_path, "abl-lr", [2.50], train={"lr": 1e-2})  # one seed: no mark, no std
    # bookkeeping never splits a group: the third seed ran on another device and logged more often
    odd = write_run(tmp_path, "abl-tied-s0", model={"tie_embeddings": True}, train={"seed": 0, "device": "cpu"},
                    metrics=[{"step": 10, "tokens": 640, "val_loss": 3.0}])
    odd2 = write_run(tmp_path, "abl-tied-s1", model={"tie_embeddings": True},
                     train={"seed": 1, "device": "cuda", "log_every": 1},
                     metrics=[{"step": 8, "tokens": 512, "val_loss": 3.2}])
    summaries = [compare.summarize_run(p) for p in [*base, *far, *near, *single, odd, odd2]]
    groups = compare.group_runs(summaries)
    assert [(g.label, g.seeds) for g in groups] == [("abl-base", [0, 1, 2]), ("abl-post", [0, 1, 2]),
                                                    ("abl-nope", [0, 1, 2]), ("abl-lr-s0", [0]),
                                                    ("abl-tied", [0, 1])]
    cols, rows = compare.compare_table(summaries)
    assert cols == ["run", "norm_position", "pos_emb", "tie_embeddings", "lr", "seeds", "params", "steps", "tokens",
                    "best val", "final val", "eval loss", "ppl", "bpb"]
    cell = {r[0]: dict(zip(cols, r)) for r in rows}
    assert len(rows) == 5
    assert cell["abl-base"]["best val"] == "2.0200 ± 0.0200" and cell["abl-base"]["seeds"] == "0,1,2"
    assert cell["abl-base"]["eval loss"] == "1.9200 ± 0.0200"  # the reference row is never marked
    assert cell["abl-post"]["best val"] == "2.1200 ± 0.0200"  # 0.10 > 2 SE (0.033): a real difference
    assert cell["abl-post"]["bpb"] == "1.0100 ± 0.0100"
    assert cell["abl-nope"]["best val"] == "2.0300 ± 0.0200 ~"  # 0.01 < 0.033: within noise
    assert cell["abl-nope"]["eval loss"] == "1.9300 ± 0.0200 ~" and cell["abl-nope"]["bpb"].endswith(" ~")
    assert cell["abl-lr-s0"]["best val"] == "2.5000" and cell["abl-lr-s0"]["lr"] == "0.01"
    assert cell["abl-tied"]["steps"] == "8-10" and cell["abl-tied"]["tokens"] == "512-640"
    assert cell["abl-tied"]["eval loss"] == "-" and cell["abl-tied"]["best val"] == "3.1000 ± 0.1414"
    # one row per run on request: the table of before
    cols1, rows1 = compare.compare_table(summaries, group=False)
    assert len(rows1) == 12 and "seed" in cols1 and "seeds" not in cols1
    # a single run per configuration: no grouping at all
    assert compare.compare_table(summaries[:1] + summaries[3:4])[0][:2] == ["run", "norm_position"]


def test_cli_markdown_groups_seeds_and_explains_the_marks(tmp_path, run_cli):
    runs_ = [*_seeded(tmp_path, "base", [2.00, 2.02, 2.04]),
             *_seeded(tmp_path, "post", [2.01, 2.03, 2.05], model={"norm_position": "post"})]
    code, out, err = run_cli("compare", *map(str, runs_), "--markdown")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0] == ("| run | norm_position | seeds | params | steps | tokens | best val | final val | eval loss "
                        "| ppl | bpb |")
    assert lines[2].startswith("| base | pre | 0,1,2 | 1.234K | 10 | 640 | 2.0200 ± 0.0200 |")
    assert lines[3].startswith("| post | post | 0,1,2 | 1.234K | 10 | 640 | 2.0300 ± 0.0200 ~ |")
    assert lines[4] == "" and lines[5].startswith("mean ± standard deviation over the seeds")
    assert "~: within seed noise" in lines[5] and "first row's (base)" in lines[5]
    code, out, err = run_cli("compare", *map(str, runs_), "--markdown", "--no-group")
    assert code == 0, err
    assert len(out.strip().splitlines()) == 8 and "~" not in out and "| seed |" in out
    code, out, err = run_cli("compare", *map(str, runs_))  # the rich table carries the legend as its caption
    assert code == 0, err
    assert "2.0300 ± 0.0200 ~" in out and "within seed noise" in " ".join(out.split())
