import json

import pytest

from tinystories_cli.config import PRESETS, ModelConfig, TrainConfig, default_d_ff, resolve_configs
from tinystories_cli.errors import UserError


def test_d_ff_defaults():
    assert ModelConfig(d_model=512).d_ff == 1408  # 8/3 * 512 = 1365.3 -> next multiple of 64
    assert ModelConfig(d_model=512, ffn="gelu").d_ff == 2048
    assert ModelConfig(d_model=512, d_ff=1344).d_ff == 1344
    assert default_d_ff(768, "swiglu") == 2048


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"d_model": 512, "num_heads": 7}, "divisible by num_heads"),
        ({"d_model": 24, "num_heads": 8}, "even head dim"),
        ({"context_length": 0}, "context_length"),
        ({"norm": "batchnorm"}, "norm"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_model_config_rejects(kwargs, message):
    with pytest.raises(Exception, match=message):
        ModelConfig(**kwargs)


def test_train_config_schedule_checks():
    with pytest.raises(Exception, match="warmup_steps"):
        TrainConfig(max_steps=10, warmup_steps=20)
    with pytest.raises(Exception, match="min_lr"):
        TrainConfig(lr=1e-4, min_lr=1e-3)
    with pytest.raises(ValueError):  # pydantic's ValidationError
        TrainConfig(lr=-1.0)


def test_presets_have_seed_shapes():
    m = PRESETS["tinystories-17m"].model
    assert (m.vocab_size, m.context_length, m.d_model, m.num_layers, m.num_heads, m.d_ff) == (
        10000,
        256,
        512,
        4,
        16,
        1344,
    )
    m = PRESETS["tinystories-33m"].model
    assert (m.num_layers, m.d_model, m.num_heads, m.d_ff, m.context_length, m.vocab_size) == (
        6,
        384,
        6,
        1536,
        512,
        50257,
    )
    assert (m.ffn, m.pos_emb, m.norm, m.tie_embeddings, m.dropout) == ("gelu", "learned", "layernorm", True, 0.1)
    assert PRESETS["owt-vanilla"].model.norm_position == "post"
    assert PRESETS["gpt2-xl"].model.d_ff == 6400
    for name in ("gpt2-small", "gpt2-medium", "gpt2-large"):
        assert PRESETS[name].model.d_ff == 4 * PRESETS[name].model.d_model


def test_precedence_preset_file_flags(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('preset = "debug"\n[model]\nnum_layers = 3\nd_model = 128\n[train]\nlr = 1e-3\n')
    p, model, train = resolve_configs(None, cfg, {"num_layers": 5})
    assert p.name == "debug"
    assert model.num_layers == 5  # flag beats file
    assert model.d_model == 128  # file beats preset
    assert model.d_ff == default_d_ff(128, "swiglu")  # re-derived for the new width
    assert train.lr == 1e-3
    js = tmp_path / "c.json"
    js.write_text(json.dumps({"model": {"num_heads": 2}}))
    _, model, _ = resolve_configs("debug", js)
    assert model.num_heads == 2


@pytest.mark.parametrize(
    "content, message",
    [
        ('[model]\nnum_layerz = 3\n', "unknown key 'num_layerz'"),
        ('[modle]\nnum_layers = 3\n', "unknown key 'modle'"),
        ('[model\n', "cannot parse"),
        ('[model]\nnum_heads = 7\nd_model = 512\n', "divisible"),
    ],
)
def test_bad_config_files(tmp_path, content, message):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(content)
    with pytest.raises(UserError, match=message):
        resolve_configs("tinystories-17m", cfg)


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(UserError, match="tinystories-17m"):
        resolve_configs("gpt5", None)


# --- presets mean what they say ----------------------------------------------------------------

def _synthetic_tokenizer(d, vocab_size: int):
    """A valid tokenizer directory with exactly `vocab_size` ids (bytes, filler tokens, <|endoftext|>)."""
    from tinystories_cli.tokenizer import Tokenizer
    from tinystories_cli.tokenizer.files import write_vocab_merges

    vocab = {i: bytes([i]) for i in range(256)}
    vocab.update({i: f"<t{i}>".encode() for i in range(256, vocab_size - 1)})
    vocab[vocab_size - 1] = b"<|endoftext|>"
    write_vocab_merges(d, vocab, [])
    return Tokenizer.from_dir(d)


def _dataset_for(root, preset):
    """data/<dataset>/{train,valid}.npy for `preset`, with the tokenizer it names (GPT-2's in data/gpt2-tokenizer)."""
    from train_fixtures import write_token_file

    p = PRESETS[preset]
    tok_dir = root / "data" / ("gpt2-tokenizer" if p.tokenizer == "gpt2" else f"{p.train.dataset}/tokenizer")
    if not tok_dir.is_dir():
        tok_dir.mkdir(parents=True)
        tok = _synthetic_tokenizer(tok_dir, p.model.vocab_size)
    else:
        from tinystories_cli.tokenizer import Tokenizer
        tok = Tokenizer.from_dir(tok_dir)
    data = root / "data" / p.train.dataset
    data.mkdir(parents=True, exist_ok=True)
    for split in ("train", "valid"):
        write_token_file(data / f"{split}.npy", [1, 2, 3] * p.model.context_length, tok, 100)


def _readme_counts(doc: str = "README.md") -> dict[str, int]:
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / doc).read_text(encoding="utf-8")
    rows = [line.split("|") for line in text.splitlines() if line.startswith("| `")]
    return {r[1].strip(" `"): int(r[2].strip().replace(",", "")) for r in rows
            if r[1].strip(" `") in PRESETS and r[2].strip().replace(",", "").isdigit()}


def test_every_preset_builds_its_documented_parameter_count(tmp_path, monkeypatch, run_cli):
    """README's (and docs/configuration.md's) count == `tslm account --list` == what `tslm train --print-config`
    builds, for each preset."""
    import torch

    from tinystories_cli import account, paths
    from tinystories_cli.model import TransformerLM

    monkeypatch.setattr(paths, "RUNS_ROOT", tmp_path / "runs")
    documented = _readme_counts()
    assert set(documented) == set(PRESETS)
    assert _readme_counts("docs/configuration.md") == documented  # the reference page's copy of the table
    from tinystories_cli.console import human_count

    code, listing, _ = run_cli("account", "--list")
    assert code == 0
    rows = {
        line.split()[1]: line for line in listing.splitlines() if line.startswith("│ ") and line.split()[1] in PRESETS
    }
    assert set(rows) == set(PRESETS)
    for name in PRESETS:  # each with its own data/ (BPE presets share data/tinystories/ but not a vocabulary)
        monkeypatch.setattr(paths, "DATA_ROOT", tmp_path / name / "data")
        _dataset_for(tmp_path / name, name)
        code, out, err = run_cli("train", "--preset", name, "--print-config")
        assert code == 0, (name, err)
        cfg = ModelConfig.model_validate(json.loads(out)["model"])
        built = TransformerLM(cfg, device=torch.device("meta")).num_parameters()
        assert built == documented[name] == account.parameter_counts(PRESETS[name].model)["total"], name
        assert f" {human_count(built)} " in rows[name], (name, rows[name])


def test_gpt2_tokenizer_presets_refuse_another_tokenizer(tmp_path, use_workspace, run_cli):
    use_workspace(tmp_path)
    # the README's `tslm bpe` tokenizer (10K here) in data/tinystories/tokenizer: not what the preset names
    (tmp_path / "data" / "tinystories" / "tokenizer").mkdir(parents=True)
    _synthetic_tokenizer(tmp_path / "data" / "tinystories" / "tokenizer", 10_000)
    code, out, err = run_cli("train", "--preset", "tinystories-33m", "--print-config")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "uses GPT-2's tokenizer (vocab 50257)" in err and "tslm download gpt2-tokenizer" in err
    code, out, err = run_cli("train", "--preset", "tinystories-33m", "--print-config",
                             "--tokenizer", str(tmp_path / "data" / "tinystories" / "tokenizer"))
    assert code == 2 and "has 10000 ids" in err and "--vocab-size 10000" in err
    # choosing another vocabulary on purpose is allowed
    from tinystories_cli.tokenizer import Tokenizer

    from train_fixtures import write_token_file

    tok = Tokenizer.from_dir(tmp_path / "data" / "tinystories" / "tokenizer")
    for split in ("train", "valid"):
        write_token_file(tmp_path / "data" / "tinystories" / f"{split}.npy", [5] * 600, tok, 10)
    code, out, err = run_cli("train", "--preset", "tinystories-33m", "--print-config", "--vocab-size", "10000",
                             "--tokenizer", str(tmp_path / "data" / "tinystories" / "tokenizer"))
    assert code == 0, err
    assert json.loads(out)["model"]["vocab_size"] == 10_000
