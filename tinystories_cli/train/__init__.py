"""Training: `prepare_run` checks everything and picks the run directory, `train` runs the loop.

    from tinystories_cli import train
    run = train.prepare_run("debug", options=train.TrainOptions(run_name="smoke"))
    result = train.train(run)

`prepare.py` (configs, data, run directory, --fit-memory) -> `trainer.py` (`train`, the `Trainer` loop)
composing `loop.py` (state, train_step, guarded update, save, restore), `runstate.py` (the checkpoint's run
state, declared once) and `budget.py` (time budget -> steps, the deadline), with `display.py` (live display,
header, signals) and `parallel.py` (FSDP2, activation checkpointing, full state dicts, the float16 loss
scaler) beside it.
"""

from tinystories_cli.train.loop import NonFiniteError, TrainResult, measure_throughput, time_plan
from tinystories_cli.train.prepare import Run, TrainOptions, parse_duration, prepare_run
from tinystories_cli.train.trainer import train

__all__ = ["NonFiniteError", "Run", "TrainOptions", "TrainResult", "measure_throughput", "parse_duration",
           "prepare_run", "time_plan", "train"]
