"""The run's stateful components (issue 25): each owns its state (`state_dict` / `load_state_dict`), the
schedule is the one owner of the run's length, and the trainer's functions stay short."""

from __future__ import annotations

import ast
import time
from pathlib import Path

import pytest
import torch

from tinystories_cli.config import TrainConfig
from tinystories_cli.errors import UserError
from tinystories_cli.train import budget, loop
from tinystories_cli.train.parallel import LossScaler
from tinystories_cli.train.schedule import RNG, Schedule, scheduled_lr

PACKAGE = Path(__file__).resolve().parents[2] / "tinystories_cli"


def test_no_function_in_train_is_over_60_lines():
    long = []
    for path in sorted((PACKAGE / "train").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60:
                long.append(f"{path.name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long


def _schedule(max_steps=100, end_step=100, **tc) -> Schedule:
    cfg = TrainConfig(max_steps=max_steps, warmup_steps=10, lr=1e-3, min_lr=1e-4, **tc)
    return Schedule(cfg, max_steps, end_step)


def test_schedule_owns_the_length_and_the_rate():
    s = _schedule(schedule="wsd", decay_fraction=0.2)
    assert s.lr(50) == scheduled_lr(s.train_cfg, 50, 100) == 1e-3
    assert s.can_lengthen(50) and not s.can_lengthen(90)  # the decay starts at step 80
    plan = budget.time_plan(60.0, time.perf_counter() + 60, 1.0, 1e3, 100)
    s.plan = plan
    assert s.resize(70, step=20) == 100
    assert (s.max_steps, s.end_step, s.train_cfg.max_steps, s.train_cfg.train_tokens) == (70, 70, 70, None)
    assert plan.replanned == [{"at_step": 20, "from": 100, "to": 70}]
    assert s.state_dict() == {"max_steps": 70}
    assert s.lr(70) == pytest.approx(1e-4)  # the rate now decays to its floor at the new end


def test_a_stop_at_stays_when_the_schedule_moves():
    s = _schedule(end_step=40)
    s.resize(120, step=10)
    assert (s.max_steps, s.end_step) == (120, 40)
    assert s.resize(30, step=20) == 120 and (s.max_steps, s.end_step) == (30, 30)


def test_plan_deadline_sets_the_length_and_shortens_a_long_warmup():
    s = _schedule()
    note = s.plan_deadline(budget.time_plan(10.0, time.perf_counter() + 10, 1.0, 1e3, 16), stop_at=None)
    assert (s.max_steps, s.end_step, s.train_cfg.max_steps, s.train_cfg.warmup_steps) == (16, 16, 16, 1)
    assert note == "warmup shortened to 1 steps (10% of the planned 16)"
    s = _schedule(end_step=5)
    assert s.plan_deadline(budget.time_plan(10.0, time.perf_counter() + 10, 1.0, 1e3, 40), stop_at=5) is None
    assert (s.max_steps, s.end_step) == (40, 5) and s.plan.planned_steps == 40


def test_a_resumed_schedule_must_have_steps_left():
    s = _schedule(end_step=50)
    s.load_state_dict({"max_steps": 100}, step=49, where="ck")
    with pytest.raises(UserError, match="already at step 50 .the run ends at 50"):
        s.load_state_dict({"max_steps": 100}, step=50, where="ck")


def test_rng_round_trip_applies_at_the_loops_start():
    rng = RNG(torch.device("cpu"))
    torch.manual_seed(3)
    saved = rng.state_dict()
    want = torch.rand(4)
    rng.load_state_dict({**saved, "scaler.scale": torch.tensor(1.0)})
    assert list(rng.pending) == ["rng.torch_cpu"]
    torch.rand(10)  # building the model draws too: nothing is set until apply()
    rng.apply()
    assert torch.equal(torch.rand(4), want)
    assert loop.rng_tensors(torch.device("cpu")).keys() == saved.keys()


def test_loss_scaler_state_dict_round_trip():
    a, b = LossScaler(torch.device("cpu")), LossScaler(torch.device("cpu"))
    a.update(torch.tensor(1.0))  # an overflow halves the scale
    b.load_state_dict(a.state_dict())
    assert set(a.state_dict()) == {"scaler.scale", "scaler.good_steps"}
    assert torch.equal(b.scale, a.scale) and torch.equal(b.good_steps, a.good_steps)


def test_the_run_reads_its_length_from_the_schedule(tiny_workspace):
    import tinystories_cli.train as T

    from train_fixtures import TINY_MODEL, TINY_TRAIN

    run = T.prepare_run("debug", None, TINY_MODEL, {"dataset": "tiny", **TINY_TRAIN, "max_steps": 12},
                        T.TrainOptions(run_name="comp", stop_at=8))
    assert (run.max_steps, run.end_step, run.train_cfg.max_steps) == (12, 8, 12)
    run.schedule.resize(10, step=3)
    assert (run.max_steps, run.end_step, run.train_cfg.max_steps) == (10, 8, 10)
    with pytest.raises(AttributeError):
        run.max_steps = 5  # one owner: only the schedule's methods change the length
    plan = budget.time_plan(5.0, time.perf_counter() + 5, 0.5, 1e3, 10)
    run.time_plan = plan  # a deadline may be attached before training
    assert run.schedule.plan is plan
