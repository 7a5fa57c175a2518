"""A generated README.md for a run directory, so a shared run explains itself.

`render_run_readme(run_dir)` reads only what the run directory holds (config.json, metrics.jsonl,
eval_*.json, tokenizer/, checkpoints/) plus the sidecars of the token files it was trained on, and
returns Markdown: what was trained (preset, resolved config, parameters by component), on what (token
files, tokenizer fingerprint), how well (best/final validation loss; loss, perplexity and bits per
byte from `tslm eval`), and the exact commands to generate, evaluate, plot, export and resume.
Missing pieces (a run still training, no eval yet) are said so, never an error.

`write_run_readme(run_dir)` writes it atomically to `<run_dir>/README.md`; `tslm train` calls it when
training ends and `tslm eval` may call it again so the README shows the new numbers.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import Any

from tinystories_cli import paths, runs
from tinystories_cli.account import parameter_counts
from tinystories_cli.config import ModelConfig
from tinystories_cli.errors import UserError
from tinystories_cli.fileio import atomic_write_text
from tinystories_cli.interop.gpt2 import gpt2_incompatibilities
from tinystories_cli.interop.llama import llama_incompatibilities

README_FILE = "README.md"


def _run_ref(run_dir: Path) -> str:
    """How commands should name the run: its path as given (shell-quoted)."""
    return shlex.quote(str(run_dir))


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) >= 1e-2 or v == 0 else f"{v:g}"
    return str(v)


def _setting(v: Any) -> str:
    """A config value as written in a config file: floats in short form (3e-4, 10000.0 -> 10000)."""
    if isinstance(v, float):
        return f"{v:g}"
    return _fmt(v)


def _table(rows: list[tuple[str, str]], head: tuple[str, str] = ("setting", "value")) -> list[str]:
    out = [f"| {head[0]} | {head[1]} |", "|---|---|"]
    out += [f"| {k} | {str(v).replace('|', chr(92) + '|')} |" for k, v in rows]
    return out


def _param_rows(model: dict) -> list[tuple[str, str]]:
    try:
        counts = parameter_counts(ModelConfig.model_validate(model))
    except Exception:  # an unreadable model section: the README still gets written, without this table
        return []
    names = [("token_embedding", "token embedding"), ("position_embedding", "position embedding"),
             ("layers", f"{model.get('num_layers')} blocks"), ("final_norm", "final norm"),
             ("lm_head", "LM head" + (" (tied to the embedding)" if model.get("tie_embeddings") else "")),
             ("total", "**total**")]
    return [(label, f"{counts[k]:,}") for k, label in names]


def _data_lines(config: dict) -> list[str]:
    lines = []
    tok = config.get("tokenizer") or {}
    for split in ("train", "valid"):
        f = (config.get("data") or {}).get(split)
        if not f:
            continue
        meta = _read_json(paths.sidecar_path(f)) or {}
        detail = []
        if meta.get("num_tokens") is not None:
            detail.append(f"{meta['num_tokens']:,} tokens")
        if meta.get("source"):
            src = f"from `{meta['source']}`"
            if meta.get("source_bytes") is not None:
                src += f" ({meta['source_bytes']:,} bytes"
                src += f", sha256 `{meta['source_sha256'][:16]}…`)" if meta.get("source_sha256") else ")"
            detail.append(src)
        lines.append(f"- {split}: `{f}`" + (f": {', '.join(detail)}" if detail else " (sidecar not found here)"))
    if tok.get("fingerprint"):
        lines.append(f"- tokenizer fingerprint: `{tok['fingerprint']}` (trained as `{tok.get('source', '?')}`; "
                     "token files made by another tokenizer are refused)")
    return lines


def _weights_ref(record: dict) -> str:
    """`path` (sha256 `abcd…`) of the weights a run started from or was imported from."""
    files = record.get("weights") or []
    if isinstance(files, dict):
        files = [files]
    shas = ", ".join(f"`{str(f.get('sha256', '?'))[:16]}…`" for f in files if isinstance(f, dict))
    return f"`{record.get('path', '?')}`" + (f" (weights sha256 {shas})" if shas else "")


def _origin(config: dict) -> str:
    """Where the weights came from: from scratch, fine-tuned from a source, or imported."""
    imported, init = config.get("imported_from"), config.get("init_from")
    if isinstance(imported, dict):
        return (f"A {imported.get('architecture', 'Hugging Face')} model imported with `tslm import` from "
                f"{_weights_ref(imported)}.")
    if isinstance(init, dict):
        return (f"A language model fine-tuned with `tslm train --init-from` from {_weights_ref(init)} "
                "(its weights and model config; a fresh optimizer and schedule).")
    return "A language model trained from scratch with `tslm`."


def render_run_readme(run_dir: str | os.PathLike, named: str | os.PathLike | None = None) -> str:
    """The Markdown README of a run directory (a pure function of the files it reads). `named`: the path
    the run will have, when it is rendered in a temporary directory that is then renamed into place."""
    run_dir = Path(run_dir)
    config = runs.read_run_config(run_dir)
    shown = Path(named or run_dir)  # where the run is (or will be, once renamed into place)
    try:
        m = runs.summarize_run_metrics(run_dir)
    except UserError:  # a damaged metrics file must not stop the README (nor the training that writes it)
        m = runs.summarize_metrics([])
    ev = runs.read_eval_result(run_dir)
    ref = _run_ref(shown)
    out = [f"# {shown.name}", ""] + _summary(config, m)
    out += ["", "## Results", ""] + _results(m, ev, ref)
    out += ["", "## Use it", ""] + _use_it(shown, ref, config, m)
    out += ["", "## Model", ""] + _model_section(config.get("model") or {})
    out += ["", "## Training", ""] + _training_section(config)
    out += ["", "## Data", ""] + (_data_lines(config) or ["Not recorded in config.json."])
    out += ["", "## Files", ""] + _files_section(run_dir)
    return "\n".join(out) + "\n"


def _max_steps(config: dict) -> Any:
    return config.get("max_steps") or (config.get("train") or {}).get("max_steps")


def _unfinished(m: dict, config: dict) -> bool:
    max_steps = _max_steps(config)
    return m["steps"] is not None and isinstance(max_steps, int) and m["steps"] < max_steps


def _summary(config: dict, m: dict) -> list[str]:
    """Where the run came from, its shape, size, progress and the software that made it."""
    model = config.get("model") or {}
    max_steps, params = _max_steps(config), config.get("parameters")
    arch = (f"{model.get('num_layers')} layers x d_model {model.get('d_model')}, {model.get('num_heads')} heads, "
            f"d_ff {model.get('d_ff')}, context {model.get('context_length')}, vocab {model.get('vocab_size')}; "
            f"{model.get('norm_position')}-norm {model.get('norm')}, {model.get('pos_emb')} positions, "
            f"{model.get('ffn')} FFN, {'tied' if model.get('tie_embeddings') else 'untied'} embeddings")
    out = [_origin(config) + " This file is generated from the run directory; rerun `tslm eval` or training "
           "to refresh it.", "",
           f"- **preset**: `{config.get('preset')}`",
           f"- **model**: {arch}",
           f"- **parameters**: {params:,}" if isinstance(params, int) else "- **parameters**: -",
           f"- **training**: {m['steps'] if m['steps'] is not None else 0:,} of {max_steps or '?':,} steps"
           if isinstance(max_steps, int) else f"- **training**: {m['steps'] or 'no'} steps in this directory",
           ]
    if m["tokens"] is not None:
        out[-1] += f", {m['tokens']:,} tokens ({config.get('tokens_per_step', '?'):,} per step)" \
            if isinstance(config.get("tokens_per_step"), int) else f", {m['tokens']:,} tokens"
    if _unfinished(m, config):
        out[-1] += " (not finished: resume it with the command below)"
    created = config.get("created")
    out.append(f"- **made with**: tslm {config.get('tslm_version', '?')}, torch {config.get('torch_version', '?')}, "
               f"device `{config.get('device', '?')}` x {config.get('world_size', 1)}"
               + (f", started {created}" if created else ""))
    return out


def _results(m: dict, ev: dict | None, ref: str) -> list[str]:
    """The validation losses logged in training and the last `tslm eval` result."""
    rows = []
    if m["best_val_loss"] is not None:
        rows.append((f"best validation loss (step {m['best_val_step']}, fixed windows)", _fmt(m["best_val_loss"])))
    if m["final_val_loss"] is not None or m["final_val_step"] is not None:
        rows.append((f"final validation loss (step {m['final_val_step']})", _fmt(m["final_val_loss"])))
    if ev is not None:
        where = f" on `{ev['data']}`" if ev.get("data") else ""
        step = f", step {ev['step']}" if ev.get("step") is not None else ""
        rows += [(f"`tslm eval` loss{where}{step} (nats/token)", _fmt(ev.get("loss"))),
                 ("`tslm eval` perplexity", _fmt(ev.get("perplexity"), 3)),
                 ("`tslm eval` bits per byte", _fmt(ev.get("bits_per_byte")))]
    out = _table(rows, ("metric", "value")) if rows else ["No validation loss logged yet."]
    if ev is None:
        out += ["", f"Loss over the whole validation file, perplexity and bits per byte: `tslm eval {ref}`."]
    return out


def _export_blockers(model: dict) -> tuple[list[str], list[str]]:
    """(why not Llama, why not GPT-2); the Llama list is empty when GPT-2 export works instead."""
    try:
        cfg = ModelConfig.model_validate(model)
        bad, gpt2_bad = llama_incompatibilities(cfg), gpt2_incompatibilities(cfg)
    except Exception:
        return ["unknown architecture"], ["unknown architecture"]
    return ([] if bad and not gpt2_bad else bad), gpt2_bad


def _use_it(run_dir: Path, ref: str, config: dict, m: dict) -> list[str]:
    """The commands that use the run: generate, eval, plot, export, resume."""
    name, max_steps = run_dir.name, _max_steps(config)
    bad, gpt2_bad = _export_blockers(config.get("model") or {})
    out = ["```bash",
           f"tslm generate \"Once upon a time\" --run {ref} --temp 0.8 --top-p 0.95   # a story",
           f"tslm eval {ref}                                   # loss, perplexity, bits per byte",
           f"tslm plot {ref} --metric val_loss --out {shlex.quote(str(run_dir / 'val_loss.png'))}   # loss curve",
           ]
    if not bad:
        out.append(f"tslm export {ref} --format hf --out {shlex.quote(f'{name}-hf')}   # transformers / tokenizers")
    out.append(f"tslm export {ref} --format safetensors --out {shlex.quote(name + '-safetensors')}   # plain weights")
    if _unfinished(m, config):
        out.append(f"tslm train --resume {ref}                           # continue to step {max_steps:,}")
    out.append("```")
    if not bad:
        out += ["", "After `--format hf`, in Python (`pip install transformers`):", "", "```python",
                "from transformers import AutoModelForCausalLM, AutoTokenizer",
                f"model = AutoModelForCausalLM.from_pretrained({f'{name}-hf'!r})",
                f"tokenizer = AutoTokenizer.from_pretrained({f'{name}-hf'!r})", "```"]
    else:
        out += ["", f"Not exportable to Hugging Face Llama format ({', '.join(bad)}) nor GPT-2 format "
                f"({', '.join(gpt2_bad)}); "
                "`--format safetensors` works for every architecture."]
    return out


def _model_section(model: dict) -> list[str]:
    """Every model setting, then the parameters by component."""
    out = _table([(k, f"`{_setting(v)}`") for k, v in model.items()])
    prow = _param_rows(model)
    if prow:
        out += ["", "Parameters by component:", ""] + _table(prow, ("component", "parameters"))
    return out


def _training_section(config: dict) -> list[str]:
    """Every training setting, the token budget, a --time-budget plan and an --auto-size choice."""
    train = config.get("train") or {}
    extra = [("tokens per step", config.get("tokens_per_step")), ("steps (schedule)", _max_steps(config)),
             ("planned tokens", config.get("planned_tokens")), ("processes", config.get("world_size"))]
    if isinstance(config.get("time_budget"), dict):  # --time-budget: the plan and the time it took
        tb = config["time_budget"]
        extra += [("time budget (s)", tb.get("budget_s")), ("probe tokens/s", tb.get("probe_tokens_per_s")),
                  ("planned steps", tb.get("planned_steps")), ("actual time (s)", tb.get("actual_s"))]
    chosen = config.get("chosen") if isinstance(config.get("chosen"), dict) else {}
    used = [("dtype used", chosen.get("dtype")), ("compiled", chosen.get("compile"))]  # what `auto` resolved to
    out = _table([(k, f"`{_setting(v)}`") for k, v in train.items()]
                 + [(k, f"{v:,}" if isinstance(v, int) else _fmt(v)) for k, v in extra if v is not None]
                 + [(k, f"`{_setting(v)}`") for k, v in used if v is not None])
    auto = config.get("auto_size")
    if isinstance(auto, dict):  # --auto-size: what the rule chose and why
        out += [
            "",
            f"Sized by `--auto-size`: d_model {_fmt(auto.get('d_model'))}, {_fmt(auto.get('num_layers'))} "
            f"layers, {_fmt(auto.get('num_heads'))} heads, lr {_setting(auto.get('lr'))}; "
            f"{auto.get('why', '')}."
            + (f" Given explicitly (kept): {', '.join(map(str, auto['explicit']))}." if auto.get("explicit") else ""),
        ]
    return out


def _files_section(run_dir: Path) -> list[str]:
    """What each file of the run directory holds."""
    files = [(runs.CONFIG_FILE, "resolved preset + model + train config, parameter count, token budget")]
    if (run_dir / runs.TOKENIZER_DIR).is_dir():
        names = ", ".join(sorted(f.name for f in (run_dir / runs.TOKENIZER_DIR).iterdir() if f.is_file()))
        files.append((f"{runs.TOKENIZER_DIR}/", f"the tokenizer the run was trained with ({names})"))
    if (run_dir / runs.METRICS_FILE).is_file():
        files.append((runs.METRICS_FILE, "one JSON object per logged step and evaluation"))
    for step, p in runs.step_checkpoints(run_dir):
        files.append((f"{runs.CHECKPOINT_DIR}/{p.name}", f"full state at step {step:,} (model, optimizer, RNG, "
                      "data position): resumable"))
    if runs.best_checkpoint(run_dir):
        files.append((f"{runs.CHECKPOINT_DIR}/{runs.BEST_CHECKPOINT}", "weights with the lowest validation loss "
                      "(what generate, eval and export load)"))
    for p in sorted(run_dir.glob("eval_*.json")):
        files.append((p.name, "`tslm eval` result"))
    return [f"- `{f}`: {what}" for f, what in files]


def write_run_readme(run_dir: str | os.PathLike, named: str | os.PathLike | None = None) -> Path:
    """Render and atomically write `<run_dir>/README.md` (see `render_run_readme` for `named`); returns its path."""
    dest = Path(run_dir) / README_FILE
    atomic_write_text(dest, render_run_readme(run_dir, named))
    return dest
