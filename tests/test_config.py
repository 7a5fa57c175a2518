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
    with pytest.raises(Exception):
        TrainConfig(lr=-1.0)


def test_presets_have_seed_shapes():
    m = PRESETS["tinystories-17m"].model
    assert (m.vocab_size, m.context_length, m.d_model, m.num_layers, m.num_heads, m.d_ff) == (10000, 256, 512, 4, 16, 1344)
    m = PRESETS["tinystories-33m"].model
    assert (m.num_layers, m.d_model, m.num_heads, m.d_ff, m.context_length, m.vocab_size) == (6, 384, 6, 1536, 512, 50257)
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
