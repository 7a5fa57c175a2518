"""The run's schedule, one owner of its length: the learning-rate schedule, the step it ends at, where the run
stops (`end_step`, before the end with `stop_at`) and the deadline plan of a run with a time budget.

`Run.max_steps`, `Run.end_step`, `Run.time_plan` and `Run.train_cfg` read it; only its methods change them:
`plan_deadline` when a time-budget run starts, `resize` when the loop keeps the run to its deadline
(`loop.fit_to_deadline`). Like the other stateful pieces of a run (`data.BatchSampler`, `RNG`,
`parallel.LossScaler`) it has `state_dict()` / `load_state_dict()`; `loop.save_step` and `loop.restore`
assemble the checkpoint's run state (`runstate.RunState`) from them.
"""

from __future__ import annotations

import torch

from tinystories_cli.config import TrainConfig
from tinystories_cli.errors import UserError
from tinystories_cli.optim import cosine_lr, wsd_decay_start, wsd_lr
from tinystories_cli.train.budget import TimePlan


def scheduled_lr(tc, step: int, max_steps: int) -> float:
    """The learning rate of `step` under the run's schedule (cosine or warmup-stable-decay)."""
    if tc.schedule == "wsd":
        return wsd_lr(step, tc.lr, tc.min_lr, tc.warmup_steps, max_steps, tc.decay_fraction)
    return cosine_lr(step, tc.lr, tc.min_lr, tc.warmup_steps, max_steps)


class Schedule:
    """How long the run is and what rate each step takes (see the module docstring)."""

    def __init__(self, train_cfg: TrainConfig, max_steps: int, end_step: int, plan: TimePlan | None = None):
        self.train_cfg = train_cfg  # the resolved settings; its max_steps is the schedule's (config.json's record)
        self.max_steps = max_steps
        self.end_step = end_step
        self.plan = plan

    def lr(self, step: int) -> float:
        return scheduled_lr(self.train_cfg, step, self.max_steps)

    def can_lengthen(self, step: int) -> bool:
        """A WSD schedule whose next step is still in its flat phase, with no `stop_at` before its end."""
        tc = self.train_cfg
        return (tc.schedule == "wsd" and self.end_step == self.max_steps
                and step < wsd_decay_start(tc.warmup_steps, self.max_steps, tc.decay_fraction))

    def plan_deadline(self, plan: TimePlan, stop_at: int | None) -> str | None:
        """A time budget planned `plan.planned_steps` steps: the schedule ends there (a `stop_at` stays, if
        earlier). Returns a note when the warmup had to be shortened to fit."""
        steps, tc = plan.planned_steps, self.train_cfg
        update, note = {"max_steps": steps}, None
        if tc.warmup_steps > steps // 2:
            update["warmup_steps"] = steps // 10
            note = f"warmup shortened to {steps // 10} steps (10% of the planned {steps})"
        self.train_cfg = tc.model_copy(update=update)
        self.max_steps = steps
        self.end_step = min(self.end_step, steps) if stop_at is not None else steps
        self.plan = plan
        return note

    def resize(self, target: int, step: int) -> int:
        """The schedule now ends at `target` (kept to its deadline at `step`); returns the old length."""
        old = self.max_steps
        self.end_step = target if self.end_step == old else min(self.end_step, target)  # (a stop_at before the end)
        self.max_steps = target
        self.train_cfg = self.train_cfg.model_copy(update={"max_steps": target, "train_tokens": None})
        if self.plan is not None:
            self.plan.replanned.append({"at_step": step, "from": old, "to": target})
        return old

    def state_dict(self) -> dict:
        """What a step checkpoint records of the schedule (`RunState.max_steps`)."""
        return {"max_steps": self.max_steps}

    def load_state_dict(self, state: dict, step: int, where: object) -> None:
        """Continue at `step` of the checkpoint at `where`. The length itself comes from the resolved config
        (config.json, which a replan rewrites at once, or a longer `max_steps` given on resume): the recorded
        one is checked, not adopted, so a resumed run may be lengthened."""
        if step >= self.end_step:
            raise UserError(f"{where} is already at step {step} (the run ends at {self.end_step})",
                            "raise `stop_at`, or the run is finished: evaluate it with `tslm eval`")


class RNG:
    """The torch random streams a run draws from (dropout): the CPU generator and, on CUDA, the device's.

    `load_state_dict` keeps the checkpoint's streams until `apply()`, the last thing before the loop (building
    the model and probing draw from them too)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pending: dict[str, torch.Tensor] | None = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The checkpoint's `rng.*` tensors."""
        out = {"rng.torch_cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            out["rng.torch_cuda"] = torch.cuda.get_rng_state(self.device)
        return out

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        self.pending = {k: v for k, v in tensors.items() if k.startswith("rng.")}

    def apply(self) -> None:
        """Set the loaded streams (if any) now."""
        if self.pending is None:
            return
        if "rng.torch_cpu" in self.pending:
            torch.set_rng_state(self.pending["rng.torch_cpu"])
        if self.device.type == "cuda" and "rng.torch_cuda" in self.pending:
            torch.cuda.set_rng_state(self.pending["rng.torch_cuda"], self.device)
