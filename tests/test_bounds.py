"""Issue 31: bounds before allocation. A hostile config is refused from its numbers, before the model (and its
RoPE tables) is built; generation's KV cache is sized to what it will use, not to the declared context."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from tinystories_cli.config import ModelConfig
from tinystories_cli.generate import BatchDecoder
from tinystories_cli.interop import llama
from tinystories_cli.model import TransformerLM
from tinystories_cli.tokenizer.files import BYTE_TO_UNICODE

REPO = Path(__file__).resolve().parents[1]


def _hostile_llama(dst: Path) -> Path:
    """A few-MB Llama directory whose weights match a config of 64 layers and a context of 2^20:
    its RoPE tables alone would take ~35 GB (more than the machine: 2 x 2^20 x 64 x 4 bytes x 64 layers)."""
    conf = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 1,
            "num_key_value_heads": 1, "intermediate_size": 8, "num_hidden_layers": 64, "vocab_size": 256,
            "max_position_embeddings": 1 << 20, "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 1e4}
    dst.mkdir()
    (dst / "config.json").write_text(json.dumps(conf))
    cfg, kv = llama.model_config_from_llama(conf)
    shapes = llama.llama_expected_shapes(cfg, kv, False, False)
    save_file({k: torch.zeros(s) for k, s in shapes.items()}, dst / "model.safetensors")
    vocab = {"".join(BYTE_TO_UNICODE[b] for b in bytes([i])): i for i in range(256)}
    (dst / "vocab.json").write_text(json.dumps(vocab))
    (dst / "merges.txt").write_text("#version: 0.2\n")
    assert sum((dst / f).stat().st_size for f in ("model.safetensors", "vocab.json")) < 8 << 20
    assert 64 * 2 * (1 << 20) * 64 * 4 >= 32 << 30  # the RoPE tables' float32 bytes
    return dst


def test_hostile_context_is_refused_before_the_model_is_built(tmp_path):
    src = _hostile_llama(tmp_path / "hostile")
    # under a 6 GB address-space cap, as a shared machine might impose: the refusal must come from the numbers
    limit = "import resource; resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30)); "
    code = limit + ("from tinystories_cli.cli import main; "
                    f"raise SystemExit(main(['import', {str(src)!r}, '--run-name', 'run']))")
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env={"PYTHONPATH": os.environ.get("PYTHONPATH", str(REPO)), "PATH": "/usr/bin:/bin",
                            "HOME": str(tmp_path), "TSLM_RUNS": str(tmp_path / "runs")})
    took = time.perf_counter() - t
    assert p.returncode == 2, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "internal error" not in p.stderr, p.stderr
    assert "position tables" in p.stderr and "context" in p.stderr
    assert took < 30, took  # it used to take ~47 s before ending in an internal error
    assert not (tmp_path / "runs" / "run").exists()


def _decode(model, n, use_cache=True):
    dec = BatchDecoder(model, [[1, 2, 3]], seeds=[0], max_new_tokens=n, temperature=0.0, use_cache=use_cache)
    return [step[0] for step in dec]


def test_kv_cache_is_sized_to_what_generation_uses():
    cfg = ModelConfig(vocab_size=64, context_length=1 << 14, d_model=32, num_layers=2, num_heads=2, d_ff=64)
    torch.manual_seed(0)
    model = TransformerLM(cfg).eval()
    sizes = []
    setup = model.setup_caches

    def spy(batch_size, max_seq_len=None, **kw):
        sizes.append(max_seq_len)
        return setup(batch_size, max_seq_len, **kw)

    model.setup_caches = spy
    out = _decode(model, 5)
    assert sizes == [3 + 5], sizes
    assert out == _decode(model, 5, use_cache=False)  # the same tokens as full forward passes


def test_window_still_slides_at_the_context():
    cfg = ModelConfig(vocab_size=64, context_length=8, d_model=32, num_layers=1, num_heads=2, d_ff=64)
    torch.manual_seed(0)
    model = TransformerLM(cfg).eval()
    a, b = _decode(model, 20), _decode(model, 20, use_cache=False)
    assert a == b and len(a) == 20
