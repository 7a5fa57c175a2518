"""`tslm import`: Hugging Face LlamaForCausalLM / GPT2LMHeadModel directories become runs that compute the same.

The references are `transformers` models built here with random weights (a dev dependency, offline):
logits equal to 1e-4 and greedy generations identical to `generate(do_sample=False)`. Also: export ->
import is the identity on tensors, GPT-2's tokenizer imports to tiktoken's ids, refusals are one line.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tinystories_cli import export, runs
from tinystories_cli.checkpoint import read_checkpoint
from tinystories_cli.generate import generate_tokens
from tinystories_cli.importer import import_hf
from tinystories_cli.interop import gpt2 as gpt2_map
from tinystories_cli.interop.hf import read_hf_tokenizer
from tinystories_cli.runs import load_trained_model
from tinystories_cli.tokenizer import Tokenizer
from tinystories_cli.tokenizer.files import write_vocab_merges

from train_fixtures import bpe_tokenizer, refused

transformers = pytest.importorskip("transformers", reason="SKIPPED LOUDLY: transformers (dev dependency) is needed")
transformers.utils.logging.disable_progress_bar()  # save_pretrained's bars would mix into the checked stderr

EOT = "<|endoftext|>"
TEXT = ("Once upon a time there was a little cat. The cat liked to play with a red ball in the sun.\n"
        "One day the cat saw a big dog. \"Hello!\" said the dog. They became friends." + EOT) * 4


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> Tokenizer:
    return bpe_tokenizer(tmp_path_factory.mktemp("bpe"), TEXT, 300, (EOT,))


def write_tokenizer_json(tok: Tokenizer, out) -> None:
    specials = export.special_token_ids(tok)
    (out / "tokenizer.json").write_text(json.dumps(export.tokenizer_json(tok.vocab, tok.merges, specials)))


def randomize(model) -> None:
    """Weights far from init (norm gains and biases too), so a misplaced tensor shows in the logits."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.dim() == 1 and p.shape[0] % 2 == 0 else 0.0))


def llama_dir(tmp_path, tok: Tokenizer, *, kv_heads=4, tie=False, attention_bias=False, mlp_bias=False):
    cfg = transformers.LlamaConfig(
        vocab_size=tok.vocab_size + 4,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=64,
        rope_theta=500.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
        attention_bias=attention_bias,
        mlp_bias=mlp_bias,
        attn_implementation="eager",
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    randomize(model)
    out = tmp_path / "hf-llama"
    model.save_pretrained(out)
    write_tokenizer_json(tok, out)
    return model, out


def gpt2_dir(tmp_path, tok: Tokenizer, *, tie=True, activation="gelu_new", name="hf-gpt2"):
    cfg = transformers.GPT2Config(vocab_size=tok.vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=48,
                                  tie_word_embeddings=tie, activation_function=activation, bos_token_id=tok.eot_id,
                                  eos_token_id=tok.eot_id, attn_implementation="eager")
    model = transformers.GPT2LMHeadModel(cfg).eval()
    randomize(model)
    out = tmp_path / name
    model.save_pretrained(out)
    write_vocab_merges(out, tok.vocab, tok.merges)  # GPT-2's own tokenizer format this time
    return model, out


def check_parity(hf_model, run_dir, tok: Tokenizer) -> float:
    """Logits equal to 1e-4 and identical greedy continuations; returns the max abs logit difference."""
    model, tokenizer, cfg = load_trained_model(run_dir)
    assert tokenizer.fingerprint == tok.fingerprint
    ids = torch.tensor([tok.encode(TEXT)[:40], tok.encode(TEXT[50:])[:40]])
    with torch.no_grad():
        ref = hf_model(ids).logits
        got = model(ids)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    prompt = tok.encode("Once upon a time")
    hf_out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                               pad_token_id=0, eos_token_id=None)[0, len(prompt):].tolist()
    ours = list(generate_tokens(model, prompt, max_new_tokens=12, temperature=0.0))
    assert ours == hf_out
    return (got - ref).abs().max().item()


@pytest.mark.parametrize("kv_heads,tie,attention_bias,mlp_bias", [(4, False, False, False), (2, True, False, False),
                                                                   (4, False, True, False)])
def test_llama_import_parity(tmp_path, bpe, run_cli, monkeypatch, kv_heads, tie, attention_bias, mlp_bias):
    monkeypatch.setenv("TSLM_RUNS", str(tmp_path / "runs"))
    monkeypatch.setattr(runs.paths, "RUNS_ROOT", tmp_path / "runs")
    hf_model, src = llama_dir(tmp_path, bpe, kv_heads=kv_heads, tie=tie, attention_bias=attention_bias,
                              mlp_bias=mlp_bias)
    code, out, err = run_cli("import", str(src), "--run-name", "llama")
    assert code == 0, err
    run_dir = tmp_path / "runs" / "llama"
    assert "LlamaForCausalLM" in out and str(run_dir) in out
    assert ("grouped-query attention" in err) is (kv_heads != 4)
    conf = json.loads((run_dir / "config.json").read_text())
    assert conf["model"]["pos_emb"] == "rope" and conf["model"]["bias"] is attention_bias
    rec = conf["imported_from"]
    assert rec["architecture"] == "LlamaForCausalLM" and len(rec["weights"][0]["sha256"]) == 64
    assert (run_dir / "README.md").is_file() and "imported" in (run_dir / "README.md").read_text()
    check_parity(hf_model, run_dir, bpe)


@pytest.mark.parametrize("tie,activation", [(True, "gelu_new"), (False, "relu")])
def test_gpt2_import_parity(tmp_path, bpe, run_cli, monkeypatch, tie, activation):
    monkeypatch.setattr(runs.paths, "RUNS_ROOT", tmp_path / "runs")
    hf_model, src = gpt2_dir(tmp_path, bpe, tie=tie, activation=activation)
    code, out, err = run_cli("import", str(src), "--run-name", "gpt2")
    assert code == 0, err
    run_dir = tmp_path / "runs" / "gpt2"
    cfg = json.loads((run_dir / "config.json").read_text())["model"]
    assert cfg["ffn"] == ("gelu_tanh" if activation == "gelu_new" else "relu")
    assert cfg["norm"] == "layernorm" and cfg["pos_emb"] == "learned" and cfg["bias"] and cfg["tie_embeddings"] is tie
    check_parity(hf_model, run_dir, bpe)
    # the imported run generates through the CLI
    code, out, err = run_cli("generate", "Once upon a time", "--run", str(run_dir), "--max-tokens", "5",
                             "--temp", "0")
    assert code == 0, err


def test_export_then_import_is_identity(tmp_path, bpe, monkeypatch):
    """Llama export of a run (with biases, tied) and back: every tensor bit-identical."""
    from train_fixtures import make_run

    monkeypatch.setattr(runs.paths, "RUNS_ROOT", tmp_path / "runs")
    tok_dir = tmp_path / "tok"
    write_vocab_merges(tok_dir, bpe.vocab, bpe.merges)
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"special_tokens": [EOT]}))
    for i, kw in enumerate([{}, {"tie_embeddings": True, "bias": True}]):
        run_dir, model, cfg = make_run(tmp_path / "src", f"r{i}", tok_dir, bpe, **kw)
        if kw.get("bias"):
            randomize(model)  # make_run saved zero biases: give every tensor a distinct value, save again
            from tinystories_cli.checkpoint import save_checkpoint
            save_checkpoint(model, None, 1, run_dir / "checkpoints" / "best.safetensors",
                            metadata={"model_config": cfg.model_dump()})
        export.export_run(run_dir, "hf", tmp_path / f"hf{i}")
        imported = import_hf(tmp_path / f"hf{i}", tmp_path / "runs" / f"back{i}")
        assert imported.cfg.model_dump() == {**cfg.model_dump(), "init": imported.cfg.init}
        a = read_checkpoint(run_dir / "checkpoints" / "best.safetensors").model_state_dict()
        b = read_checkpoint(imported.run_dir / "checkpoints" / "best.safetensors").model_state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert imported.tokenizer.fingerprint == bpe.fingerprint


def test_gpt2_mapping_round_trip(bpe):
    cfg = gpt2_map.model_config_from_gpt2(transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4,
                                                                   n_positions=16, tie_word_embeddings=False).to_dict())
    from tinystories_cli.model import TransformerLM

    sd = TransformerLM(cfg).state_dict()
    back = gpt2_map.from_gpt2_state_dict(gpt2_map.to_gpt2_state_dict(sd, cfg), cfg)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


def test_gpt2_tokenizer_imports_like_tiktoken(shared_data, tmp_path):
    """GPT-2's vocab.json/merges.txt arranged as a Hugging Face directory import to tiktoken's gpt2 ids."""
    tiktoken = pytest.importorskip("tiktoken", reason="SKIPPED LOUDLY: tiktoken (dev dependency) is not installed")
    from tinystories_cli.tokenizer.files import decode_token_string
    from tinystories_cli.tokenizer.pretokenize import GPT2_SPLIT_PATTERN

    src = tmp_path / "gpt2"
    src.mkdir()
    shutil.copyfile(shared_data / "gpt2_vocab.json", src / "vocab.json")
    shutil.copyfile(shared_data / "gpt2_merges.txt", src / "merges.txt")
    vocab, merges, specials = read_hf_tokenizer(src)
    assert specials == [EOT] and len(vocab) == 50257
    tok = Tokenizer(vocab, merges, specials)
    # tiktoken's gpt2 encoding, built offline from the same files (ranks = GPT-2 ids)
    raw = json.loads((shared_data / "gpt2_vocab.json").read_text(encoding="utf-8"))
    ranks = {decode_token_string(s): i for s, i in raw.items() if s != EOT}
    ref = tiktoken.Encoding(name="gpt2-local", pat_str=GPT2_SPLIT_PATTERN, mergeable_ranks=ranks,
                            special_tokens={EOT: raw[EOT]})
    text = (shared_data / "tinystories_valid.txt").read_text(encoding="utf-8")[:300_000]
    assert tok.encode(text) == ref.encode(text, allowed_special="all")
    # and the same files as one tokenizer.json (what transformers writes) import to the same tokenizer
    tj = tmp_path / "tj"
    tj.mkdir()
    (tj / "tokenizer.json").write_text(json.dumps(export.tokenizer_json(tok.vocab, tok.merges, {EOT: 50256})))
    assert Tokenizer(*read_hf_tokenizer(tj)).fingerprint == tok.fingerprint


@pytest.mark.parametrize("change,expect", [
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope scaling"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope scaling"),
    ({"sliding_window": 16}, "sliding_window"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"model_type": "mistral"}, "model_type 'mistral'"),
    ({"hidden_size": -3}, "hidden_size"),
    ({"intermediate_size": 128}, "shape"),
])
def test_unsupported_llama_refused_by_name(tmp_path, bpe, run_cli, monkeypatch, change, expect):
    monkeypatch.setattr(runs.paths, "RUNS_ROOT", tmp_path / "runs")
    _, src = llama_dir(tmp_path, bpe)
    conf = json.loads((src / "config.json").read_text())
    conf.update(change)
    (src / "config.json").write_text(json.dumps(conf))
    err = refused(run_cli, "import", str(src), "--run-name", "x")
    assert expect in err
    assert not (tmp_path / "runs" / "x").exists()


def test_bad_sources_refused(tmp_path, bpe, run_cli, monkeypatch):
    monkeypatch.setattr(runs.paths, "RUNS_ROOT", tmp_path / "runs")
    _, src = gpt2_dir(tmp_path, bpe)
    conf = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**conf, "scale_attn_by_inverse_layer_idx": True}))
    assert "scale_attn_by_inverse_layer_idx" in refused(run_cli, "import", str(src))
    (src / "config.json").write_text(json.dumps(conf))
    # pickle weights are never read
    sd = load_file(src / "model.safetensors")
    (src / "model.safetensors").unlink()
    (src / "pytorch_model.bin").write_bytes(b"not read")
    assert "pickle" in refused(run_cli, "import", str(src))
    (src / "pytorch_model.bin").unlink()
    # a tensor of the wrong shape is refused before the model is built
    sd["transformer.wpe.weight"] = sd["transformer.wpe.weight"][:10]
    save_file(sd, src / "model.safetensors")
    assert "transformer.wpe.weight has shape [10, 64]" in refused(run_cli, "import", str(src))
    # a sentencepiece-only tokenizer is refused by name; an existing run is never replaced
    _, ok = gpt2_dir(tmp_path, bpe, name="ok")
    assert run_cli("import", str(ok), "--run-name", "taken")[0] == 0
    assert "already exists" in refused(run_cli, "import", str(ok), "--run-name", "taken")
    (ok / "vocab.json").unlink()
    (ok / "tokenizer.model").write_bytes(b"spm")
    assert "sentencepiece" in refused(run_cli, "import", str(ok), "--run-name", "spm")
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["latest", "taken"]
