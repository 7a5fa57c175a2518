"""Progress messages that say what happens: the speed probe takes about the time it announces, and a run
that keeps missing its plan says so in a few lines, not one per check."""

from __future__ import annotations

import functools
import re
import time
from pathlib import Path

import pytest
import torch

from tinystories_cli import quickstart as qs
from tinystories_cli.train import budget
from tinystories_cli.train.loop import replan_is_material


class _Planned(Exception):
    pass


def test_the_probe_takes_about_what_it_announces(tmp_path: Path, story_text: Path):
    """A 4-minute budget announces a 12 s probe (it took 29 s before, with the auto size's second probe).
    The run is stopped once the plan is printed: the probes are what is timed."""
    torch.set_num_threads(1)
    events: list[tuple[float, str]] = []

    def notify(stage: str, msg: str) -> None:
        events.append((time.perf_counter(), msg))
        if " tokens/s -> " in msg:
            raise _Planned

    opts = qs.QuickstartOptions(text=story_text, minutes=4, workdir=tmp_path / "w", vocab_size=300,
                                device="cpu", display="quiet")
    with pytest.raises(_Planned):
        qs.run_quickstart(opts, notify)
    start = next(i for i, (_, m) in enumerate(events) if m.startswith("measuring the speed"))
    announced = float(re.search(r"a probe of about ([0-9.]+) s", events[start][1]).group(1))
    assert announced == 12
    took = events[-1][0] - events[start][0]   # both probes and the plan
    # about the announced time: the last timed step of each probe may run over (a step is under a second here)
    assert took <= announced + 2.5, (took, announced)


def test_measure_throughput_counts_building_and_warm_up_in_its_time(tiny_workspace):
    from tinystories_cli import train as tl

    from train_fixtures import TINY_MODEL, TINY_TRAIN
    run = tl.prepare_run("debug", None, TINY_MODEL, {"dataset": "tiny", **TINY_TRAIN},
                         tl.TrainOptions(run_name="probe", display="quiet", peak_tflops=1.0))
    t = time.perf_counter()
    tps, spent = tl.measure_throughput(run, 0.0)          # no time at all: build, warm up, one timed step
    assert tps > 0 and spent <= time.perf_counter() - t
    t = time.perf_counter()
    _, spent = tl.measure_throughput(run, 1.0, max_steps=10_000)
    took = time.perf_counter() - t
    assert 1.0 <= spent <= took < 1.0 + 1.0, took          # ends within one (sub-second) step of the limit


def test_replanning_is_said_only_when_the_plan_moves_materially(tmp_path: Path, story_text: Path, run_cli, monkeypatch):
    """A probe that reads the machine 3x too fast: the run keeps shortening its schedule. Piped (--plain),
    the run says so in at most a few lines, each a change of at least 10% from the last one said."""
    real = qs.tl.measure_throughput

    def optimistic(run, seconds, max_steps=10):
        tps, spent = real(run, seconds, max_steps)
        return tps * 3, spent

    monkeypatch.setattr(qs.tl, "measure_throughput", optimistic)
    # Time, not the pass cap, must set the plan, or a fast machine plans a few data-capped steps that the
    # real pace easily keeps and never replans (seen at 55K tokens/s on the 400-story text).
    monkeypatch.setattr(budget, "plan_bounded_run", functools.partial(budget.plan_bounded_run, max_epochs=1e9))
    code, out, err = run_cli("quickstart", "--text", str(story_text), "--minutes", "0.25", "--dir",
                             str(tmp_path / "w"), "--vocab-size", "300", "--device", "cpu", "--plain",
                             "--max-tokens", "5")
    assert code == 0, err
    notes = [ln for ln in out.splitlines() if ln.startswith("steps are ")]
    assert 1 <= len(notes) <= 6, notes
    for ln in notes:
        new, old = map(lambda s: int(s.replace(",", "")),
                       re.search(r"ends at step ([0-9,]+) instead of ([0-9,]+)", ln).groups())
        assert replan_is_material(old, new), ln
    import json
    cfg = json.loads((tmp_path / "w" / "runs" / "quickstart" / "config.json").read_text())
    assert "noted_steps" not in cfg["time_budget"] and len(cfg["time_budget"]["replanned"]) >= len(notes)
