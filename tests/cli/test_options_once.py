"""Each run-level option is declared once (issue 25): a field of `TrainOptions` / `QuickstartOptions` with its
help text (`config.option`), and `tslm train` / `tslm quickstart` generate their options from the fields."""

from __future__ import annotations

import dataclasses
import inspect

from tinystories_cli import quickstart as qs
from tinystories_cli import train as T
from tinystories_cli.cli import common
from tinystories_cli.cli import quickstart as cli_quickstart
from tinystories_cli.cli import train as cli_train


def _generated(model) -> set[str]:
    return {f.name for f in dataclasses.fields(model) if f.metadata.get("cli")}


def test_every_option_field_is_an_option_of_its_command():
    train_params = inspect.signature(cli_train.command).parameters
    assert _generated(T.TrainOptions) and _generated(T.TrainOptions) <= set(train_params)
    qs_params = inspect.signature(cli_quickstart.command).parameters
    assert _generated(qs.QuickstartOptions) and _generated(qs.QuickstartOptions) <= set(qs_params)
    # the fields left to the command are the ones that are more than one flag (or none)
    assert {f.name for f in dataclasses.fields(T.TrainOptions)} - _generated(T.TrainOptions) == {"resume", "display"}


def test_renamed_flags_are_listed_once_for_messages():
    assert {k: cli_train.FLAG_RENAMES[k] for k in ("train_file", "valid_file", "tokenizer_dir", "grad_accum_steps",
                                                  "context_length")} == {
        "train_file": "--train-data", "valid_file": "--valid-data", "tokenizer_dir": "--tokenizer",
        "grad_accum_steps": "--grad-accum", "context_length": "--ctx"}
    assert common.flag_renames(qs.QuickstartOptions) == {"workdir": "--dir", "max_new_tokens": "--max-tokens"}


def test_options_are_read_by_their_fields_parsers():
    opts = common.options_from(T.TrainOptions, {"time_budget": "1h30m", "fit_memory": "2GB", "stop_at": 5,
                                                "run_name": None})
    assert opts["time_budget"] == 5400.0 and opts["stop_at"] == 5 and "run_name" not in opts
    assert isinstance(opts["fit_memory"], int) and opts["fit_memory"] > 10**9


def test_quickstart_shows_the_fields_defaults(run_cli):
    code, out, _ = run_cli("quickstart", "--help")
    assert code == 0
    assert f"[default: {qs.DEFAULT_MINUTES}]" in out and f"[default: {qs.DEFAULT_VOCAB_SIZE}]" in out
