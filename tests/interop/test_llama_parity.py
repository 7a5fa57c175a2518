"""The pre-norm RMSNorm/RoPE/SwiGLU TransformerLM equals Hugging Face's LlamaForCausalLM given the same weights."""

import pytest
import torch

from tinystories_cli.config import ModelConfig
from tinystories_cli.errors import UserError
from tinystories_cli.model import (
    TransformerLM,
    from_llama_state_dict,
    llama_config_dict,
    permute_for_llama,
    to_llama_state_dict,
    unpermute_from_llama,
)

transformers = pytest.importorskip("transformers", reason="transformers (dev dependency) is needed for Llama parity")


def _llama(cfg: ModelConfig):
    kw = {k: v for k, v in llama_config_dict(cfg).items() if k not in ("architectures", "model_type", "torch_dtype")}
    llama_cfg = transformers.LlamaConfig(**kw, attn_implementation="eager")
    return transformers.LlamaForCausalLM(llama_cfg).eval()


@pytest.mark.parametrize("tie", [False, True])
def test_logits_match_llama(tie):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, context_length=32, d_model=64, num_layers=2, num_heads=4, d_ff=96,
                      rope_theta=500.0, tie_embeddings=tie)
    ours = TransformerLM(cfg).eval()
    # non-trivial norm weights so a swapped norm would show
    with torch.no_grad():
        for p in ours.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    llama = _llama(cfg)
    missing, unexpected = llama.load_state_dict(to_llama_state_dict(ours.state_dict(), cfg), strict=False)
    assert not unexpected
    assert all("rotary" in k for k in missing), missing
    ids = torch.randint(0, cfg.vocab_size, (3, 32))
    with torch.no_grad():
        ref = llama(ids).logits
        got = ours(ids)
    assert ref.shape == got.shape
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_llama_round_trip_and_permutation():
    w = torch.arange(8 * 3, dtype=torch.float32).reshape(8, 3)
    p = permute_for_llama(w, num_heads=2)  # head_dim 4: rows per head (0, 2, 1, 3)
    assert p[:, 0].tolist() == [0, 6, 3, 9, 12, 18, 15, 21]
    assert torch.equal(unpermute_from_llama(p, 2), w)
    cfg = ModelConfig(vocab_size=50, context_length=16, d_model=32, num_layers=1, num_heads=2)
    sd = TransformerLM(cfg).state_dict()
    back = from_llama_state_dict(to_llama_state_dict(sd, cfg), cfg)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_non_llama_architecture_is_refused():
    cfg = ModelConfig(vocab_size=50, context_length=16, d_model=32, num_layers=1, num_heads=2, ffn="gelu")
    with pytest.raises(UserError, match="only pre-norm RMSNorm/RoPE/SwiGLU"):
        to_llama_state_dict(TransformerLM(cfg).state_dict(), cfg)
