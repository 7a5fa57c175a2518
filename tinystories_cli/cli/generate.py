"""`tslm generate`: sample text from a trained run, streaming it to the terminal."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from tinystories_cli import fastpath, sampling_grid
from tinystories_cli import generate as gen
from tinystories_cli.cli import common
from tinystories_cli.console import console, err_console, print_note
from tinystories_cli.device import pick_device
from tinystories_cli.errors import UserError
from tinystories_cli.fileio import atomic_write_text, check_output_path, strict_json

DEFAULT_PROMPT = "Once upon a time"
# The library's sampling parameters whose flag here is shorter (common.to_flags shows these in errors).
FLAG_RENAMES = {"max_new_tokens": "--max-tokens", "temperature": "--temp"}
SAMPLING = "Sampling"
GRID = "Sampling grid"


# the command's options, one alias each (keeps the signature one line per parameter)
PromptArg = Annotated[
    str | None,
    typer.Argument(help=f'The prompt; "-" reads it from stdin. Default: "{DEFAULT_PROMPT}".', show_default=False),
]
RunOpt = Annotated[
    str | None,
    typer.Option(
        "--run", help="Run name or directory (default: runs/latest); loads its best checkpoint if present."
    ),
]
CheckpointOpt = Annotated[
    Path | None, typer.Option("--checkpoint", help="A checkpoint file (its run directory supplies the tokenizer).")
]
PromptFileOpt = Annotated[
    Path | None,
    typer.Option("--prompt-file", help="A file with one prompt per line (blank lines skipped), batched."),
]
StopOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--stop",
        help="Also stop when the completion contains this string (repeatable; not included in the text).",
        rich_help_panel=SAMPLING,
        show_default=False,
    ),
]
NoStopOpt = Annotated[
    bool,
    typer.Option(
        "--no-stop",
        help="Do not stop at <|endoftext|>: always generate --max-tokens tokens.",
        rich_help_panel=SAMPLING,
    ),
]
AsJsonOpt = Annotated[
    bool,
    typer.Option(
        "--json",
        help="Print one JSON object per sample (JSON lines) "
        "instead of streaming text; `ids`: the prompt's and the generated token ids).",
    ),
]
NoCacheOpt = Annotated[
    bool, typer.Option("--no-cache", help="Recompute the whole context every step (slow; for comparison).")
]
PrecisionOpt = Annotated[
    str,
    typer.Option(
        "--precision",
        help="Weight precision of the fast CPU decode path: fp32 (exact), bf16 (needs a CPU with "
        "avx512_bf16) or int8 (per-group weight quantization).",
    ),
]
EngineOpt = Annotated[
    str,
    typer.Option(
        "--engine",
        help="Decode path: auto (the C kernel for Llama-style models on the CPU, else torch), fast "
        "(the C kernel, or an error) or torch (the reference).",
    ),
]
GridOpt = Annotated[
    str | None,
    typer.Option(
        "--grid",
        help='Compare sampling settings: e.g. "temp=0.5,1.0,1.2 top_p=0.3,0.9,1.0" (keys temp, top_p, '
        "top_k). Every cell samples the same prompt with the same --num-samples seeds; prints a Markdown table "
        "with distinct-2/distinct-3 and the repetition rate per cell, then the samples.",
        rich_help_panel=GRID,
        show_default=False,
    ),
]
OutOpt = Annotated[
    Path | None,
    typer.Option(
        "--out",
        help="With --grid: write the Markdown here instead of printing it.",
        rich_help_panel=GRID,
        show_default=False,
    ),
]
ForceOpt = Annotated[
    bool, typer.Option("--force", help="With --out: overwrite the file if it exists.", rich_help_panel=GRID)
]


@common.with_options(common.config_options(gen.SamplingSettings, SAMPLING, defaults=True))
def command(
    prompt: PromptArg = None,
    run: RunOpt = None,
    checkpoint: CheckpointOpt = None,
    prompt_file: PromptFileOpt = None,
    stop: StopOpt = None,
    no_stop: NoStopOpt = False,
    as_json: AsJsonOpt = False,
    device: common.Device = "auto",
    no_cache: NoCacheOpt = False,
    precision: PrecisionOpt = "fp32",
    engine: EngineOpt = "auto",
    grid: GridOpt = None,
    out: OutOpt = None,
    force: ForceOpt = False,
    settings: dict | None = None,
) -> None:
    """Generate text from a trained model: temperature, top-k, top-p, KV cache, streaming output.

    Streams the completion as it is produced, then prints a summary line (prompt tokens, new tokens, tokens/s, why it stopped) on stderr. When the context fills up, the window slides: the newest half of the context is kept and re-read, and generation continues. A prompt longer than the context keeps its end.

    --grid "temp=0.5,1.0 top_p=0.3,0.9" compares sampling settings on one prompt and one set of seeds (a Markdown table; --out FILE writes it).
    """  # noqa: E501 (one line per paragraph: the help renderer keeps line breaks)
    sampling = gen.SamplingSettings(**settings)
    _check_sampling(sampling, stop, no_stop)
    if run is not None and checkpoint is not None:
        raise UserError("--run and --checkpoint are exclusive", "pass one of them")
    grid_spec = _grid_spec(grid, out, force, prompt_file)
    _check_decode_path(precision, engine)
    prompts = _prompts(prompt, prompt_file)
    model, tokenizer, source, used = _load(checkpoint, run, device)
    _select_decode_path(model, engine, precision, use_cache=not no_cache)
    decode = {"precision": precision, "engine": engine, "stop_at_eot": not no_stop,
              "stop_strings": [] if no_stop else (stop or []), "use_cache": not no_cache}
    if grid_spec is not None:
        return _grid(model, tokenizer, prompts[0], grid_spec, sampling, source=source, used=used, out=out,
                     as_json=as_json, **decode)
    with common.flag_names(common.flags_of(gen.SamplingSettings)):
        _sample(model, tokenizer, prompts, used=used, as_json=as_json, **sampling.model_dump(), **decode)


def _check_sampling(sampling: gen.SamplingSettings, stop: list[str] | None, no_stop: bool) -> None:
    s = sampling
    with common.flag_names(common.flags_of(gen.SamplingSettings)):
        gen.check_sampling_args(s.max_new_tokens, s.temperature, s.top_p, s.top_k)
    if s.num_samples < 1:
        raise UserError(f"--num-samples must be at least 1, got {s.num_samples}")
    if stop and no_stop:
        raise UserError("--stop and --no-stop contradict each other", "pass one of them")


def _grid_spec(grid: str | None, out: Path | None, force: bool, prompt_file: Path | None) -> dict | None:
    """--grid parsed (None without it); --out/--force only with it."""
    if grid is None:
        if out is not None or force:
            raise UserError("--out and --force go with --grid", 'add --grid "temp=0.5,1.0 top_p=0.9,1.0", or drop them')
        return None
    try:
        grid_spec = sampling_grid.parse_grid(grid)
    except ValueError as e:
        raise UserError(f"--grid: {e}", 'write it like --grid "temp=0.5,1.0,1.2 top_p=0.3,0.9,1.0"') from None
    if prompt_file is not None:
        raise UserError("--grid samples one prompt; --prompt-file gives several", "pass one PROMPT")
    if out is not None:
        check_output_path(out, force)
    return grid_spec


def _check_decode_path(precision: str, engine: str) -> None:
    if precision not in fastpath.PRECISIONS:
        raise UserError(f"unknown --precision {precision!r}", "use fp32, bf16 or int8")
    if engine not in fastpath.ENGINES:
        raise UserError(f"unknown --engine {engine!r}", "use auto, fast or torch")
    try:
        fastpath.check_precision(precision)
    except ValueError as e:
        raise UserError(f"--precision {precision}: {e}") from None
    if engine == "torch" and precision != "fp32":
        raise UserError(f"--precision {precision} runs on the fast engine only", "drop --engine torch")


def _select_decode_path(model, engine: str, precision: str, use_cache: bool) -> None:
    """Check that the model can take this engine and precision; say which path decodes (a dim note)."""
    try:
        _, note = fastpath.select(model, engine, precision, use_cache=use_cache)
    except ValueError as e:
        raise UserError(f"--engine {engine} --precision {precision}: {e}") from None
    if note:
        err_console.print(Text(f"[{note}]", style="dim"), soft_wrap=True)


def _sample(model, tokenizer, prompts: list[str], *, used: str, as_json: bool, **kwargs) -> None:
    """Generate and print: one sample streams as it is produced; several print one after another."""
    stream = not as_json and len(prompts) * kwargs["num_samples"] == 1
    if stream and prompts[0]:
        console.print(Text(prompts[0], style="bold"), end="", soft_wrap=True)
        console.file.flush()

    def on_text(_k: int, chunk: str) -> None:
        console.file.write(chunk)
        console.file.flush()

    samples = gen.generate_samples(model, tokenizer, prompts, on_text=on_text if stream else None, **kwargs)
    for k, s in enumerate(samples):
        if as_json:
            console.file.write(strict_json(s.to_json(), ensure_ascii=False) + "\n")
            continue
        if not stream:
            seed_note = f", seed {s.seed}" if s.seed is not None else ""
            console.rule(f"sample {k + 1}/{len(samples)}{seed_note}", align="left", style="dim")
            console.print(Text(s.prompt, style="bold"), end="", soft_wrap=True)
            console.file.write(s.text)
        console.file.write("\n")
        console.file.flush()
        if k == 0:
            print_note(used)
        _summary(s, with_seed=stream)
    console.file.flush()
    if as_json:
        print_note(used)


def _prompts(prompt: str | None, prompt_file: Path | None) -> list[str]:
    if prompt is not None and prompt_file is not None:
        raise UserError("give either a PROMPT or --prompt-file, not both")
    if prompt_file is not None:
        from tinystories_cli.fileio import check_input_file

        check_input_file(prompt_file, "prompt file")
        try:
            lines = prompt_file.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise UserError(f"prompt file {prompt_file} is not UTF-8 text: {e}") from None
        prompts = [line for line in lines if line.strip()]
        if not prompts:
            raise UserError(f"prompt file {prompt_file} has no prompts", "write one prompt per line")
        return prompts
    if prompt == "-":
        stream = getattr(sys.stdin, "buffer", None)  # bytes, so that bad UTF-8 is our error, not the locale's
        try:
            text = stream.read().decode("utf-8") if stream is not None else sys.stdin.read()
            return [text.rstrip("\r\n")]
        except UnicodeDecodeError as e:
            raise UserError(f"the prompt on standard input is not UTF-8 text: {e}", "pipe UTF-8 text") from None
    return [DEFAULT_PROMPT if prompt is None else prompt]


def _load(checkpoint: Path | None, run: str | None, device: str):
    """(model on the device, tokenizer, the checkpoint or run it came from, a note on which model that is).

    The note (runs/latest may be a surprise) is printed as one dim line once the text is out (before its
    summary line), so that an error in the arguments stays the only line.
    """
    from tinystories_cli import runs

    if checkpoint is not None and not checkpoint.is_file():
        raise UserError(f"checkpoint file not found: {checkpoint}",
                        "train a model first with `tslm train`, or pass a file from runs/<name>/checkpoints/")
    device = str(pick_device(device))
    try:
        path = runs.resolve_run(checkpoint if checkpoint is not None else run)
    except UserError as e:
        if "tslm train" in str(e):
            raise
        raise UserError(e.what, f"{e.fix}; or train one first with `tslm train`" if e.fix else
                        "train one first with `tslm train`") from None
    model, tokenizer, cfg = runs.load_trained_model(path, device=device)
    check_tokenizer_matches(cfg, tokenizer, runs.run_dir_of(path))
    return model, tokenizer, path, runs.describe_source(checkpoint if checkpoint is not None else run)


def _grid(model, tokenizer, prompt: str, grid: dict, sampling: gen.SamplingSettings, *, source: Path, used: str,
          out: Path | None, as_json: bool, **decode) -> None:
    """--grid: sample every cell, then print (or write) the Markdown comparison, then which model it was."""
    seed = gen.random_seed() if sampling.seed is None else sampling.seed
    num_samples, max_tokens = sampling.num_samples, sampling.max_new_tokens
    base = {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k}

    def on_cell(i: int, n: int, settings: dict) -> None:
        label = " ".join(f"{sampling_grid.LABELS[k]}={settings[k]:g}" for k in grid)
        err_console.print(Text(f"[cell {i + 1}/{n}: {label}]", style="dim"))

    cells = sampling_grid.run_grid(model, tokenizer, prompt, grid, seed=seed, num_samples=num_samples,
                                   max_new_tokens=max_tokens, base=base, on_cell=on_cell, **decode)
    if as_json:
        text = strict_json([c.to_json() for c in cells], ensure_ascii=False, indent=2) + "\n"
    else:
        text = sampling_grid.grid_markdown(cells, grid, prompt=prompt, seed=seed, num_samples=num_samples,
                                           max_new_tokens=max_tokens, source=str(source))
    if out is None:
        console.file.write(text)  # plain: rich would wrap lines and read [brackets] as markup
        console.file.flush()
    else:
        atomic_write_text(out, text)
        err_console.print(f"wrote {out}")
    print_note(used)


def check_tokenizer_matches(cfg, tokenizer, run_dir: Path | None = None) -> None:
    """A tokenizer with ids the model has no rows for (or another fingerprint than the run was
    trained with) would give garbage or crash: refuse it with a clear message."""
    fix = "use the tokenizer/ directory saved in the run (it is copied there by `tslm train`)"
    if tokenizer.vocab_size > cfg.vocab_size:
        raise UserError(f"checkpoint/tokenizer mismatch: the tokenizer has {tokenizer.vocab_size} tokens, "
                        f"the model only {cfg.vocab_size}", fix)
    if run_dir is not None:
        from tinystories_cli import runs

        try:
            recorded = (runs.read_run_config(run_dir).get("tokenizer") or {}).get("fingerprint")
        except UserError:
            recorded = None
        fp = getattr(tokenizer, "fingerprint", None)
        if recorded and fp and recorded != fp:
            raise UserError(f"checkpoint/tokenizer mismatch: {run_dir}/tokenizer is not the tokenizer the run was "
                            f"trained with (fingerprint {fp[:12]} != {recorded[:12]})", fix)


def _summary(s: gen.Sample, with_seed: bool) -> None:
    parts = [f"{s.prompt_tokens} prompt tokens", f"{s.new_tokens} new tokens", f"{s.tokens_per_s:.1f} tokens/s",
             f"stopped: {s.stop_reason.replace('_', ' ')}"]
    if with_seed and s.seed is not None:
        parts.append(f"seed {s.seed}")
    if s.prompt_dropped:
        parts.append(f"prompt longer than the context: kept its last {s.prompt_tokens} tokens")
    if s.context_shifts:
        parts.append(f"context full: the window slid {s.context_shifts}x")
    err_console.print(Text("[" + ", ".join(parts) + "]", style="dim"), soft_wrap=True)
