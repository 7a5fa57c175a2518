"""Options shared by several subcommands, and the options generated from the config fields.

Each model and training setting is declared once, as a field of `ModelConfig` / `TrainConfig` (see
`config.setting`); `config_options` turns those fields into Typer options (name, type, help, panel) and
`with_options` adds them to a command, so a new field needs one edit to appear in `tslm train --help`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import re
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from tinystories_cli.config import TrainConfig
from tinystories_cli.errors import UserError

MODEL = "Model overrides"
TRAIN = "Training overrides"

ConfigFile = Annotated[
    Path | None, typer.Option("--config", help="TOML or JSON config file (sections \\[model], \\[train]).")
]
PrintConfig = Annotated[bool, typer.Option("--print-config", help="Print the fully resolved config as JSON and exit.")]


def device_option(when: str = "") -> Any:
    """The one --device option; its help is the `device` setting's (`tslm train --device`), after `when`."""
    return typer.Option("--device", help=when + TrainConfig.model_fields["device"].description)


Device = Annotated[str, device_option()]  # every command but train: `device: common.Device = "auto"`

# The model settings that change a model's size and FLOPs (what `tslm account` takes).
SHAPE_FIELDS = ("context_length", "vocab_size", "d_model", "num_layers", "num_heads", "d_ff", "norm", "norm_position",
                "pos_emb", "ffn", "tie_embeddings")
CLI_TYPES = {"float": float, "int": int, "str": str}


def flags_of(*models: type) -> dict[str, str]:
    """{setting name: its (first) flag} for every field of the given settings models.

    >>> flags_of(TrainConfig)["grad_accum_steps"]
    '--grad-accum'
    """
    return {name: _flags(name, _extra(f))[0].split("/")[0] for m in models for name, f in m.model_fields.items()}


def _extra(field: Any) -> dict:
    return field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}


def _flags(name: str, extra: dict) -> list[str]:
    return list(extra.get("flags") or [f"--{name.replace('_', '-')}"])


def _option(name: str, kind: Any, help_text: str, extra: dict, panel: str, default: Any = None,
            show_default: bool = False) -> inspect.Parameter:
    flags = _flags(name, extra)
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if typing.get_origin(kind) is not Literal and args:  # X | None
        kind = args[0]
    if typing.get_origin(kind) is Literal:
        help_text = f"{help_text.rstrip('.')}: {' | '.join(map(str, typing.get_args(kind)))}."
        kind = str
    elif kind is bool and "/" not in flags[0]:
        flags = [f"{flags[0]}/--no-{flags[0][2:]}"]
    kind = CLI_TYPES.get(extra.get("cli_type"), kind)
    show = (show_default or bool(extra.get("show_default"))) and default is not None  # the field's default
    opt = typer.Option(*flags, help=help_text, rich_help_panel=extra.get("panel") or panel, show_default=show)
    annotation = Annotated[kind if show else kind | None, opt]
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default if show else None,
                             annotation=annotation)


def config_options(model: type, panel: str, include: tuple[str, ...] | None = None,
                   defaults: bool = False) -> list[inspect.Parameter]:
    """One Typer option per field of `model` (all, or those in `include`), in declaration order: a config
    (pydantic, fields declared with `config.setting`) or options (a dataclass, fields declared with
    `config.option`; those marked `cli=False` are left to the command).

    Without `defaults` an option of a config not given is None (a preset or config file decides); with it,
    the field's default, shown in --help."""
    if dataclasses.is_dataclass(model):
        hints = typing.get_type_hints(model)
        return [_option(f.name, hints[f.name], f.metadata.get("description", ""), dict(f.metadata), panel, f.default)
                for f in dataclasses.fields(model)
                if f.metadata.get("cli", False) and (include is None or f.name in include)]
    return [_option(name, f.annotation, f.description or "", _extra(f), panel, f.default if defaults else None,
                    show_default=defaults)
            for name, f in model.model_fields.items() if include is None or name in include]


def options_from(model: type, settings: dict[str, Any]) -> dict[str, Any]:
    """The fields of options dataclass `model` given on the command line, each read by its `parse`."""
    out = {}
    for f in dataclasses.fields(model):
        value = settings.get(f.name)
        if value is not None:
            parse = f.metadata.get("parse")
            out[f.name] = parse(value) if parse is not None else value
    return out


def flag_renames(*models: type) -> dict[str, str]:
    """{parameter: flag} for every generated option whose flag is not `--parameter-name` (the flag the
    CLI's messages use for a parameter a library message names)."""
    out = {}
    for model in models:
        for p in config_options(model, ""):
            info = typing.get_args(p.annotation)[1]  # (in Annotated, typer reads its first argument as a flag)
            flag = (info.default if isinstance(info.default, str) else info.param_decls[0]).split("/")[0]
            if flag != f"--{p.name.replace('_', '-')}":
                out[p.name] = flag
    return out


def with_options(*groups: list[inspect.Parameter]) -> Callable[[Callable], Callable]:
    """Add generated options to a command; it receives them as `settings={name: value given or None}`."""
    def wrap(func: Callable) -> Callable:
        extra = [p for group in groups for p in group]
        names = [p.name for p in extra]

        @functools.wraps(func)
        def command(**kwargs):
            settings = {n: kwargs.pop(n) for n in names}
            return func(**kwargs, settings=settings)

        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
               for p in inspect.signature(func, eval_str=True).parameters.values() if p.name != "settings"]
        params = own + extra
        command.__signature__ = inspect.Signature(params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        del command.__wrapped__  # Typer must read the new signature, not the wrapped function's
        return command
    return wrap


# --- parameter names -> flags -----------------------------------------------------------------------------
# The library names a parameter in backticks (`time_budget`); the CLI shows its flag (--time-budget). A command's
# flags come from its own options (the Python parameter name -> the first long option), the generated settings
# (a `config.setting` field -> its flag) and these renames: library parameters whose name is not the CLI's.
FLAG_RENAMES: dict[str, str] = {
    "train_file": "--train-data", "valid_file": "--valid-data",  # train.TrainOptions
    "tokenizer_dir": "--tokenizer",                               # train.TrainOptions, encode_file, check_tokens
    "out_dir": "--out",                                           # tokenizer.bpe: check_output_dir, save_tokenizer
    "ascii": "--ascii",                                           # plot: draw with characters instead of matplotlib
    "help": "--help",                                             # config: the settings' descriptions
}
PARAMETER = re.compile(r"`([a-z][a-z0-9_]*)`")
COMMAND = re.compile(r"`tslm ([a-z]+)([^`]*)`")
ARGUMENT = re.compile(r"""("[^"]*"|'[^']*'|\S+)""")
ASSIGNED = re.compile(r"([a-z][a-z0-9_]*)=(.*)")


@functools.cache
def setting_flags() -> dict[str, str]:
    """{field: flag} of every `config.setting` field (the options `config_options` generates)."""
    from tinystories_cli.config import ModelConfig, TrainConfig
    table = {}
    for model in (ModelConfig, TrainConfig):
        for name, f in model.model_fields.items():
            extra = f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {}
            table[name] = (extra.get("flags") or [f"--{name.replace('_', '-')}"])[0].split("/")[0]
    return table


@functools.cache
def flag_table(command: str | None = None) -> dict[str, str]:
    """{parameter name: flag}, built once per command: the settings, FLAG_RENAMES, then `command`'s own options
    and its module's FLAG_RENAMES (a command's own names win). No command: the settings and FLAG_RENAMES."""
    table = {**setting_flags(), **FLAG_RENAMES}
    if command is not None:
        from tinystories_cli import cli
        for param in cli.load_command(command).params:
            longs = [o for o in getattr(param, "opts", ()) if o.startswith("--")]
            if longs and param.name:
                table[param.name] = longs[0]
        table.update(getattr(cli.command_module(command), "FLAG_RENAMES", {}))
    return table


def to_flags(text: str, command: str | None = None, renames: dict[str, str] | None = None) -> str:
    """Rewrite the backticked parameter names in a library message to the flags of `command` (the one that ran).

    A backticked name the table does not know stays as it is (`tslm bpe`, file names); inside a backticked
    `tslm CMD ...` line, each `name=value` becomes `--flag value` (`name=True`: the bare flag; see
    `command_line_flag`). Only a message with a backticked name builds the running command's table.

    >>> to_flags("`time_budget` plans the schedule when a run starts (drop `time_budget` when resuming)", "train")
    '--time-budget plans the schedule when a run starts (drop --time-budget when resuming)'
    >>> to_flags("pass `tokenizer_dir` or `context_length`, or run `tslm bpe` first (`config.json` is missing)")
    'pass --tokenizer or --ctx, or run `tslm bpe` first (`config.json` is missing)'
    >>> to_flags("`max_new_tokens` must be at least 1", "generate", {"max_new_tokens": "--max-tokens"})
    '--max-tokens must be at least 1'
    >>> to_flags("re-create it with `tslm encode a.txt tokenizer=tok out=a.npy force=True`")
    're-create it with `tslm encode a.txt --tokenizer tok --out a.npy --force`'
    """
    def command_line(m: re.Match) -> str:
        if m[1] not in commands():
            return m[0]

        def argument(a: re.Match) -> str:
            kv = ASSIGNED.fullmatch(a[0])
            if kv is None:
                return a[0]
            flag = command_line_flag(kv[1])
            return flag if kv[2] == "True" else f"{flag} {kv[2]}"
        return f"`tslm {m[1]}{ARGUMENT.sub(argument, m[2])}`"

    text = COMMAND.sub(command_line, text)
    if not PARAMETER.search(text):
        return text
    table = {**flag_table(command), **(renames or {})}
    return PARAMETER.sub(lambda m: table.get(m[1], m[0]), text)


def command_line_flag(name: str) -> str:
    """The flag of `name=value` in a suggested `tslm CMD` line: the setting's flag or the rename, else the name with
    dashes. Never imports CMD's module (an error path stays as fast as the command); tests check that it is CMD's
    flag for every such line in the library.

    >>> command_line_flag("tokenizer_dir"), command_line_flag("context_length"), command_line_flag("run_name")
    ('--tokenizer', '--ctx', '--run-name')
    """
    return {**setting_flags(), **FLAG_RENAMES}.get(name) or f"--{name.replace('_', '-')}"


def commands() -> dict[str, str]:
    from tinystories_cli import cli
    return cli.COMMANDS


@contextlib.contextmanager
def flag_names(renames: dict[str, str] | None = None, command: str | None = None) -> Iterator[None]:
    """Inside a command: a library ValueError becomes a UserError (the user's mistake, no traceback hint) whose
    backticked parameter names are flags (`to_flags`, with `renames` over the table).

    >>> with flag_names({"top_p": "--top-p"}):
    ...     raise ValueError("`top_p` must be in (0, 1], got 2.0")
    Traceback (most recent call last):
    tinystories_cli.errors.UserError: --top-p must be in (0, 1], got 2.0
    """
    try:
        yield
    except UserError:
        raise
    except ValueError as e:
        from tinystories_cli import cli
        raise UserError(to_flags(str(e), command or cli.RUNNING.get("command"), renames)) from None


def given(settings: dict[str, Any], fields: typing.Iterable[str]) -> dict[str, Any]:
    """The settings among `fields` that were given on the command line (None = not given)."""
    return {k: settings[k] for k in fields if settings.get(k) is not None}
