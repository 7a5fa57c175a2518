"""tests/gpu/check.py --dry-run: the GPU check script runs every check on the CPU, so it is ready for a GPU.

One subprocess (the script as it is run on a GPU machine): every check prints one JSON line, each one passes
or is skipped with a reason, the CUDA-only parts the dry run cannot do are named, and the summary says all ok.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "gpu" / "check.py"
CHECKS = ["env", "data", "correct_fp32_cuda_vs_cpu", "correct_bf16_vs_fp32", "correct_greedy_generate",
          "speed_defaults", "memory_estimate", "fit_memory", "fp16_loss_scaler", "distributed_fsdp", "time_budget_run"]
# what a CPU cannot do, per check: each must be named with its reason
CUDA_ONLY = {"correct_fp32_cuda_vs_cpu": {"cuda_side"}, "correct_greedy_generate": {"cuda_side"},
             "speed_defaults": {"gpu_peak_table", "compile"}, "memory_estimate": {"cuda_peak"},
             "fit_memory": {"memory_cap"}, "distributed_fsdp": {"nccl", "torchrun_fsdp"}}


def test_dry_run_passes_every_check_and_names_what_it_skips(tmp_path):
    out = tmp_path / "gpu"
    p = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)
    lines = [json.loads(x) for x in p.stdout.splitlines()]  # nothing but JSON lines on stdout
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    by_name = {r["check"]: r for r in lines}
    assert [r["check"] for r in lines] == ["plan", *CHECKS, "summary"]
    plan, summary = by_name["plan"], by_name["summary"]
    assert plan["dry_run"] is True and set(plan["budgets_s"]) == set(CHECKS)
    for name in CHECKS:
        r = by_name[name]
        assert r["ok"] is True, r
        assert isinstance(r["seconds"], float) and r["budget_s"] > 0
        assert set(r.get("skipped_parts", {})) == CUDA_ONLY.get(name, set()), r
        assert all(isinstance(why, str) and why for why in r.get("skipped_parts", {}).values())
    assert summary["ok"] is True and summary["failed"] == [] and summary["skipped"] == {}
    assert summary["passed"] == CHECKS
    # the figures a GPU run reports are there (dry-run values, but real measurements of the same code)
    speed = by_name["speed_defaults"]
    assert speed["train_tokens_per_s"] > 0 and speed["mfu_vs_measured"] > 0
    assert speed["decode"]["batch_1_tokens_per_s"] > 0 and speed["prefill"]["tokens_per_s"] > 0
    assert by_name["correct_fp32_cuda_vs_cpu"]["max_rel_diff"] == 0.0  # both sides on the CPU: bit-identical
    assert by_name["correct_greedy_generate"]["equal"] is True
    fp16 = by_name["fp16_loss_scaler"]
    assert fp16["skipped_at_inf_step"] == 1 and fp16["loss_scale_after"] == fp16["loss_scale_before"] / 2
    forced = by_name["distributed_fsdp"]["torchrun_fsdp_forced"]
    assert forced["parallel"] == "fsdp" and forced["process_group"] == {"backend": "gloo", "world_size": 1}
    assert forced["generate_cpu"]["new_tokens"] == 16
    tb = by_name["time_budget_run"]
    assert tb["tokens"] > 0 and tb["val_curve"] and tb["projection"]["account_time_s"] > 0
    # everything printed is also in results.jsonl (survives a timeout), and each check has its log
    saved = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert saved == lines
    assert all((out / "logs" / f"{name}.log").is_file() for name in CHECKS)


def test_a_failing_check_is_reported_and_the_rest_still_run(tmp_path):
    """A failing check prints its error and the next ones still run; the summary is not ok (exit 1). Here the
    data is missing (not a dry run: no fallback text), so --only adds the data check, which fails, and the
    checks that need it fail with their own error. Past the global deadline a check is skipped with the reason."""
    out = tmp_path / "gpu"
    p = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--only", "fit_memory,fp16_loss_scaler",
                        "--data", str(tmp_path / "nowhere")], capture_output=True, text=True, timeout=120)
    lines = [json.loads(x) for x in p.stdout.splitlines()]
    by_name = {r["check"]: r for r in lines}
    assert p.returncode == 1
    assert [r["check"] for r in lines] == ["plan", "data", "fit_memory", "fp16_loss_scaler", "summary"]
    assert by_name["plan"]["added"].startswith("data")
    assert by_name["data"]["ok"] is False and "shared data not found" in by_name["data"]["error"]
    for name in ("fit_memory", "fp16_loss_scaler"):
        assert by_name[name]["ok"] is False and "no encoded data" in by_name[name]["error"]
        assert (out / "logs" / f"{name}.log").read_text().strip()  # the traceback is in the check's log
    assert by_name["summary"]["failed"] == ["data", "fit_memory", "fp16_loss_scaler"]
    assert by_name["summary"]["ok"] is False
    p = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), "--only", "env",
                        "--deadline", "0"], capture_output=True, text=True, timeout=120)
    by_name = {r["check"]: r for r in map(json.loads, p.stdout.splitlines())}
    assert p.returncode == 1
    assert by_name["env"]["ok"] is None and "global deadline" in by_name["env"]["skipped"]
    assert by_name["summary"]["ok"] is False
