"""Commands say what they use: generate/eval/export name the run and checkpoint they loaded, and `tslm train`
on a CPU warns about a GPU-sized preset before it starts."""

from __future__ import annotations

import pytest

from train_fixtures import train_tiny


@pytest.fixture
def trained(tiny_workspace):
    from tinystories_cli import runs

    root, _ = tiny_workspace
    run = train_tiny("tiny-run", train={"max_steps": 3})
    runs.update_latest_link(run.run_dir)
    return root, run.run_dir


def test_generate_names_the_run_it_used_even_runs_latest(trained, run_cli):
    root, run_dir = trained
    code, out, err = run_cli("generate", "Once", "--max-tokens", "3", "--device", "cpu")
    assert code == 0, err
    line = next(ln for ln in err.splitlines() if ln.startswith("using "))
    assert "checkpoints/" in line and "tiny-run" in line and "latest: no run given" in line
    code, out, err = run_cli("generate", "Once", "--run", str(run_dir), "--max-tokens", "3", "--device", "cpu")
    assert code == 0 and any(ln.startswith(f"using {run_dir}/checkpoints/") for ln in err.splitlines()), err


def test_eval_names_the_checkpoint_on_one_line_and_labels_the_whole_file_loss(trained, run_cli):
    root, run_dir = trained
    code, out, err = run_cli("eval", str(run_dir), "--device", "cpu")
    assert code == 0, err
    ckpt = next(ln for ln in out.splitlines() if ln.startswith("using "))
    assert ".safetensors (step " in ckpt and str(run_dir) in ckpt   # the file name is never cut in two
    assert "whole-file loss" in out


def test_export_names_the_checkpoint(trained, run_cli, tmp_path):
    root, run_dir = trained
    code, out, err = run_cli("export", str(run_dir), "--format", "safetensors", "--out", str(tmp_path / "exp"))
    assert code == 0, err
    assert any(ln.startswith("using ") and "checkpoints/" in ln for ln in err.splitlines()), err


def test_train_on_a_cpu_with_a_gpu_preset_says_so_first(tiny_workspace, run_cli):
    code, out, err = run_cli("train", "--preset", "tinystories-17m", "--dataset", "tiny", "--vocab-size", "300",
                             "--device", "cpu", "--peak-tflops", "0.1", "--print-config")
    assert code == 0, err
    note = " ".join(err.split())
    assert "tinystories-17m is sized for a GPU" in note and "take about" in note
    assert "--preset tinystories-cpu" in note and "--auto-size" in note
    # a CPU-sized run says nothing
    code, out, err = run_cli("train", "--preset", "debug", "--dataset", "tiny", "--vocab-size", "300",
                             "--device", "cpu", "--peak-tflops", "0.1", "--print-config")
    assert code == 0 and "sized for a GPU" not in err
