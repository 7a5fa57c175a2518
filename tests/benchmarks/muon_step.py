"""The time of one optimizer step of `MuonWithAdamW` (Muon on the hidden matrices, AdamW on the rest), against
the same optimizer at another git revision, on the same model and gradients, in alternating rounds.

    python tests/benchmarks/muon_step.py [--baseline REV] [--widths 128,512] [--rounds 2] [--steps 20]

The baseline's `tinystories_cli/optim.py` is read with `git show REV:...` and loaded as a module beside the
current one (it only needs torch), so both time the same process, threads and model. Each round builds the
model of each width (4 layers, heads of 32, vocab 2048, ctx 256, SwiGLU), gives every parameter a random
gradient, runs 3 warm-up steps and times `--steps` more; the figure is the median step. Also reports the
largest difference of the parameters after one step from the same start (the two should agree to one bf16
ulp of an update times the learning rate). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from tinystories_cli import optim as current
from tinystories_cli.config import ModelConfig
from tinystories_cli.model import TransformerLM

REPO = Path(__file__).resolve().parents[2]


def optim_at(rev: str):
    """The module `tinystories_cli/optim.py` as it was at git revision `rev`."""
    text = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:tinystories_cli/optim.py"], capture_output=True,
                          text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "optim_baseline.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("optim_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["optim_baseline"] = module
    spec.loader.exec_module(module)
    return module


def model_of(width: int) -> TransformerLM:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=2048, context_length=256, d_model=width, num_layers=4, num_heads=max(1, width // 32))
    return TransformerLM(cfg)


def optimizer(module, model: TransformerLM):
    muon, rest = current.muon_param_split(model)
    return module.MuonWithAdamW(muon, [{"params": rest}], lr=4e-3, muon_lr=0.02)


def step_ms(module, width: int, steps: int) -> float:
    model = model_of(width)
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    opt = optimizer(module, model)
    for _ in range(3):
        opt.step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def one_step_difference(base, width: int) -> float:
    models = [model_of(width), model_of(width)]
    g = torch.Generator().manual_seed(1)
    for a, b in zip(*(m.parameters() for m in models)):
        a.grad = torch.randn(a.shape, generator=g)
        b.grad = a.grad.clone()
    for module, model in zip((base, current), models):
        optimizer(module, model).step()
    return max((a - b).abs().max().item() for a, b in zip(*(m.parameters() for m in models)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", default="4f4f49a~1", help="git revision to compare with")
    ap.add_argument("--widths", default="128,512")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    base = optim_at(args.baseline)
    out = {}
    for width in (int(w) for w in args.widths.split(",")):
        times = {"baseline": [], "current": []}
        for i in range(args.rounds):
            order = (("baseline", base), ("current", current))
            for name, module in order if i % 2 == 0 else order[::-1]:
                times[name].append(round(step_ms(module, width, args.steps), 2))
        out[str(width)] = {"step_ms": times, "median_ms": {k: statistics.median(v) for k, v in times.items()},
                           "max_param_difference_after_one_step": one_step_difference(base, width)}
    print(json.dumps({"benchmark": "muon_step", "baseline": args.baseline,
                      "date": datetime.now(UTC).isoformat(timespec="minutes"),
                      "machine": f"{platform.machine()} {os.cpu_count()} cpus", "torch": torch.__version__,
                      "threads": torch.get_num_threads(), "widths": out}))


if __name__ == "__main__":
    main()
