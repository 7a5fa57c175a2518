"""`tslm export`: the Hugging Face round trip (transformers logits, tokenizers ids), refusals, atomic output.

transformers/tokenizers are optional extras: they are imported here, never by the export command.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from tinystories_cli import export, runs
from tinystories_cli.checkpoint import save_checkpoint
from tinystories_cli.cli import main
from tinystories_cli.config import ModelConfig
from tinystories_cli.model import TransformerLM
from tinystories_cli.tokenizer import Tokenizer
from tinystories_cli.tokenizer.bpe import train_bpe
from tinystories_cli.tokenizer.files import write_vocab_merges

EOT = "<|endoftext|>"
SPECIALS = [EOT, "<|pad|>"]
# Fixture text with what byte-level BPE gets wrong most easily: non-ASCII, emoji, runs of spaces and
# newlines, contractions, digits, punctuation runs, and special tokens back to back.
FIXTURE = (
    "Once upon a time, there was a little cat named Tom. Tom's friend didn't like the rain!\n\n"
    "They'll play at 10:30 -- or 11?  \"Yes\",  said Mia.\t\tThe end...\n" + EOT +
    "Élodie a mangé 12 crêpes à Zürich 🐈🐈 naïve café\r\n   spaced    out   \n" + EOT + EOT +
    "<|pad|>A story about 3.14159 and 2,718 ducks; well-known 'quotes' and (parens) [brackets] {braces}.\n"
) * 3
UNSEEN = ("New words: zygomorphic QUUX xylophones!!! 42,000,001 ¿qué? 日本語テキスト  \n\n\n  trailing   "
          + EOT + "end<|pad|><|endoftext|>x")


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory) -> tuple[Tokenizer, object]:
    d = tmp_path_factory.mktemp("bpe")
    src = d / "train.txt"
    src.write_text(FIXTURE, encoding="utf-8")
    vocab, merges = train_bpe(src, 420, SPECIALS, workers=1)
    tok_dir = d / "tokenizer"
    tok_dir.mkdir()
    write_vocab_merges(tok_dir, vocab, merges)
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"special_tokens": SPECIALS}))
    return Tokenizer.from_dir(tok_dir), tok_dir


def make_run(root, name, tokenizer_dir, tok: Tokenizer, **model_kw) -> tuple:
    """A run directory in the trainer's format: config.json, tokenizer/, checkpoints/best.safetensors."""
    cfg = ModelConfig(vocab_size=tok.vocab_size, context_length=32, d_model=64, num_layers=2, num_heads=4,
                      d_ff=96, rope_theta=500.0, **model_kw)
    torch.manual_seed(0)
    model = TransformerLM(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights, so a misplaced norm would show in the logits
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    run_dir = root / name
    (run_dir / runs.CHECKPOINT_DIR).mkdir(parents=True)
    (run_dir / runs.CONFIG_FILE).write_text(json.dumps({"preset": "test", "model": cfg.model_dump()}))
    import shutil

    shutil.copytree(tokenizer_dir, run_dir / runs.TOKENIZER_DIR)
    save_checkpoint(model, None, 10, run_dir / runs.CHECKPOINT_DIR / runs.BEST_CHECKPOINT,
                    metadata={"model_config": cfg.model_dump()})
    return run_dir, model, cfg


def test_tokenizer_json_encodes_like_ours(tiny_tokenizer, tmp_path):
    """Core test: a BPE trained here, exported as plain JSON, gives exactly our ids in `tokenizers`."""
    tokenizers = pytest.importorskip("tokenizers", reason="tokenizers (the hf extra) is needed to load tokenizer.json")
    tok, _ = tiny_tokenizer
    specials = export.special_token_ids(tok)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(export.tokenizer_json(tok.vocab, tok.merges, specials)), encoding="utf-8")
    hf = tokenizers.Tokenizer.from_file(str(path))
    for text in (FIXTURE, UNSEEN, " ", "\n", EOT, "a" * 50):
        ids = tok.encode(text)
        assert hf.encode(text).ids == ids, text[:40]
        assert hf.decode(ids, skip_special_tokens=False) == text
    assert hf.get_vocab_size() == tok.vocab_size


def test_gpt2_tokenizer_encodes_corpus_en_exactly(shared_data, tmp_path):
    """The issue's test: `tokenizers` encodes ../shared/data/corpus.en to exactly our ids (GPT-2's 50K BPE)."""
    tokenizers = pytest.importorskip("tokenizers", reason="tokenizers (the hf extra) is needed to load tokenizer.json")
    tok = Tokenizer.from_files(shared_data / "gpt2_vocab.json", shared_data / "gpt2_merges.txt", [EOT])
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(export.tokenizer_json(tok.vocab, tok.merges, export.special_token_ids(tok))))
    text = (shared_data / "corpus.en").read_text(encoding="utf-8")
    ours = tok.encode(text)
    assert len(ours) > 10_000
    assert tokenizers.Tokenizer.from_file(str(path)).encode(text).ids == ours


@pytest.mark.parametrize("tie", [False, True])
def test_hf_round_trip_logits_and_tokenizer(tiny_tokenizer, tmp_path, tie, capsys):
    transformers = pytest.importorskip("transformers", reason="transformers (the hf extra) is needed to load the export")
    tok, tok_dir = tiny_tokenizer
    run_dir, model, cfg = make_run(tmp_path / "runs", "tiny", tok_dir, tok, tie_embeddings=tie)
    out = tmp_path / "hf"
    assert main(["export", str(run_dir), "--format", "hf", "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == sorted([*export.HF_FILES, export.MARKER])
    conf = json.loads((out / "config.json").read_text())
    assert conf["architectures"] == ["LlamaForCausalLM"] and conf["model_type"] == "llama"
    assert conf["tie_word_embeddings"] is tie and conf["num_key_value_heads"] == 4
    assert conf["eos_token_id"] == tok.eot_id
    assert ("lm_head.weight" in load_file(out / "model.safetensors")) is not tie

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([tok.encode(FIXTURE)[:32], tok.encode(UNSEEN)[:32]])
    with torch.no_grad():
        ref = hf_model(ids).logits
        got = model(ids)
    torch.testing.assert_close(ref, got, atol=1e-4, rtol=1e-4)

    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    for text in (FIXTURE, UNSEEN):
        ours = tok.encode(text)
        assert hf_tok(text)["input_ids"] == ours  # nothing prepended or appended
        assert hf_tok.decode(ours) == text
    assert hf_tok.eos_token == EOT


@pytest.mark.parametrize("switch,value", [("norm_position", "post"), ("ffn", "gelu"), ("pos_emb", "nope"),
                                          ("norm", "layernorm")])
def test_non_llama_architecture_refused_in_one_line(tiny_tokenizer, tmp_path, capsys, switch, value):
    tok, tok_dir = tiny_tokenizer
    run_dir, _, _ = make_run(tmp_path / "runs", "other", tok_dir, tok, **{switch: value})
    out = tmp_path / "hf"
    assert main(["export", str(run_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{switch}={value} is not representable as LlamaForCausalLM" in err
    assert "--format safetensors" in err and "Traceback" not in err and len(err.strip().splitlines()) <= 2
    assert not out.exists() and not list(tmp_path.glob(".hf.*"))


def test_safetensors_format_any_architecture(tiny_tokenizer, tmp_path):
    tok, tok_dir = tiny_tokenizer
    run_dir, model, cfg = make_run(tmp_path / "runs", "post", tok_dir, tok, norm_position="post", tie_embeddings=True)
    out = tmp_path / "st"
    assert main(["export", str(run_dir), "--format", "safetensors", "--out", str(out)]) == 0
    conf = json.loads((out / "config.json").read_text())
    back = TransformerLM(ModelConfig.model_validate(conf["model"])).eval()
    sd = load_file(out / "model.safetensors")
    assert "lm_head.weight" not in sd  # tied: stored once
    for alias, canonical in conf["tied"].items():
        sd[alias] = sd[canonical]
    back.load_state_dict(sd)
    ids = torch.tensor([tok.encode(FIXTURE)[:32]])
    with torch.no_grad():
        torch.testing.assert_close(back(ids), model(ids), atol=0, rtol=0)
    assert Tokenizer.from_dir(out / "tokenizer").encode(UNSEEN) == tok.encode(UNSEEN)


def test_output_is_atomic_and_protected(tiny_tokenizer, tmp_path, capsys):
    tok, tok_dir = tiny_tokenizer
    run_dir, _, _ = make_run(tmp_path / "runs", "tiny", tok_dir, tok)
    out = tmp_path / "exp"
    assert main(["export", str(run_dir), "--format", "safetensors", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["export", str(run_dir), "--format", "safetensors", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    first = (out / "config.json").read_text()
    assert main(["export", str(run_dir), "--format", "hf", "--out", str(out), "--force"]) == 0
    assert (out / "tokenizer.json").is_file() and not (out / "tokenizer").exists() and first != (out / "config.json").read_text()
    # --force never deletes a directory that is not an earlier export, nor the run itself.
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert main(["export", str(run_dir), "--out", str(other), "--force"]) == 2
    assert "was not written by tslm export" in capsys.readouterr().err and (other / "keep.txt").exists()
    assert main(["export", str(run_dir), "--out", str(run_dir), "--force"]) == 2
    assert "would replace the run directory" in capsys.readouterr().err
    # Another run's directory has a config.json too: it is still not an export.
    other_run, _, _ = make_run(tmp_path / "runs", "other", tok_dir, tok)
    before = sorted(str(p.relative_to(other_run)) for p in other_run.rglob("*"))
    assert main(["export", str(run_dir), "--out", str(other_run), "--force"]) == 2
    assert "was not written by tslm export" in capsys.readouterr().err
    assert sorted(str(p.relative_to(other_run)) for p in other_run.rglob("*")) == before
    assert main(["export", str(run_dir), "--out", str(tmp_path / "x"), "--format", "onnx"]) == 2
    assert "unknown --format" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "no-such-run"), "--out", str(tmp_path / "y")]) == 2
    assert "no run or checkpoint" in capsys.readouterr().err
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_export_command_does_not_need_hf_libraries(tiny_tokenizer, tmp_path, monkeypatch):
    """transformers/tokenizers stay optional: with both made unimportable, the export still works."""
    for name in ("transformers", "tokenizers"):
        monkeypatch.setitem(sys.modules, name, None)  # `import transformers` now raises ImportError
    tok, tok_dir = tiny_tokenizer
    run_dir, _, _ = make_run(tmp_path / "runs", "tiny", tok_dir, tok)
    assert main(["export", str(run_dir), "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "tokenizer.json").is_file()


@pytest.mark.parametrize("ffn,bias,tie", [("gelu_tanh", True, True), ("gelu", False, True), ("relu", True, False)])
def test_gpt2_shaped_run_exports_as_gpt2(tiny_tokenizer, tmp_path, capsys, ffn, bias, tie):
    """Pre-norm LayerNorm + learned positions export as GPT2LMHeadModel (zero biases where the model has
    none); transformers' logits equal ours, and importing the export back gives the same tensors."""
    transformers = pytest.importorskip("transformers", reason="transformers (the hf extra) is needed to load the export")
    from tinystories_cli.interop.importer import import_hf

    tok, tok_dir = tiny_tokenizer
    run_dir, model, cfg = make_run(tmp_path / "runs", "g", tok_dir, tok, norm="layernorm", pos_emb="learned", ffn=ffn,
                                   bias=bias, tie_embeddings=tie)
    with torch.no_grad():  # non-zero biases, so a misplaced one would show
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.uniform_(-0.5, 0.5)
    save_checkpoint(model, None, 10, run_dir / runs.CHECKPOINT_DIR / runs.BEST_CHECKPOINT,
                    metadata={"model_config": cfg.model_dump()})
    out = tmp_path / "hf"
    assert main(["export", str(run_dir), "--format", "hf", "--out", str(out)]) == 0
    conf = json.loads((out / "config.json").read_text())
    assert conf["architectures"] == ["GPT2LMHeadModel"] and conf["tie_word_embeddings"] is tie
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([tok.encode(FIXTURE)[:32], tok.encode(UNSEEN)[:32]])
    with torch.no_grad():
        torch.testing.assert_close(hf_model(ids).logits, model(ids), atol=1e-4, rtol=1e-4)
    back = import_hf(out, tmp_path / "runs" / "back")
    sd = model.state_dict()
    got = runs.load_trained_model(back.run_dir)[0].state_dict()
    for k, v in got.items():
        assert torch.equal(v, sd[k]) if k in sd else (k.endswith(".bias") and not bias and not v.any()), k
    assert set(sd) <= set(got)
