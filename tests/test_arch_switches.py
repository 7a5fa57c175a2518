"""The speedrun's architecture switches (issue 27): QK-norm, ReLU², logit soft-capping, zero-initialized output
projections. Each against an independent reference written with torch.nn.functional; off, the model is the
same as before; the accounting counts them; exports that cannot represent them refuse in one line."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tinystories_cli import account
from tinystories_cli.config import ModelConfig, default_d_ff
from tinystories_cli.fastpath import unsupported_reason
from tinystories_cli.interop import gpt2, llama, llamacpp
from tinystories_cli.interop.llama import NotLlamaCompatible
from tinystories_cli.model import FeedForward, MultiHeadSelfAttention, TransformerLM

SMALL = dict(vocab_size=64, context_length=16, d_model=32, num_layers=2, num_heads=4)
SWITCHES = [dict(qk_norm=True), dict(ffn="relu2"), dict(logit_softcap=30.0), dict(zero_init_proj=True)]


def ids_for(vocab: int, T: int = 12) -> torch.Tensor:
    return torch.arange(2 * T).reshape(2, T) * 5 % vocab


def test_default_model_unchanged():
    """Seed 0's default model gives the logits it gave before the switches existed (recorded then), with the
    same tensor names: old checkpoints load and old runs reproduce."""
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(**SMALL))
    assert sorted(model.state_dict()) == sorted(
        [f"layers.{i}.{n}" for i in range(2) for n in (
            "attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight", "attn.output_proj.weight",
            "ffn.w1.weight", "ffn.w2.weight", "ffn.w3.weight", "ln1.weight", "ln2.weight")]
        + ["lm_head.weight", "ln_final.weight", "token_embeddings.weight"])
    with torch.no_grad():
        logits = model(ids_for(64)[:1])
    assert abs(logits.double().sum().item() - 56.24954) < 1e-3
    want = [-0.8516167, 0.0626181, 1.2690616, 0.1702879, 0.7721839, -0.7376503]
    torch.testing.assert_close(logits[0, -1, :6], torch.tensor(want), atol=1e-5, rtol=0)


@pytest.mark.parametrize("switch", [dict(qk_norm=True), dict(logit_softcap=30.0), dict(zero_init_proj=True)])
def test_a_switch_draws_the_same_init(switch):
    """A switch adds its own tensors or zeroes some, but every tensor the default model has is drawn the same."""
    torch.manual_seed(0)
    base = TransformerLM(ModelConfig(**SMALL)).state_dict()
    torch.manual_seed(0)
    other = TransformerLM(ModelConfig(**SMALL, **switch)).state_dict()
    for name, t in base.items():
        zeroed = switch.get("zero_init_proj") and name.endswith(("output_proj.weight", "w2.weight"))
        assert torch.equal(other[name], torch.zeros_like(t) if zeroed else t), name


def rope_reference(x: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE as complex multiplication of consecutive pairs, x (B, T, h, hd)."""
    B, T, h, hd = x.shape
    freqs = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angles = torch.arange(T, dtype=torch.float64)[:, None] * freqs  # (T, hd/2)
    rot = torch.polar(torch.ones_like(angles), angles)[None, :, None, :]
    z = torch.view_as_complex(x.double().reshape(B, T, h, hd // 2, 2).contiguous())
    return torch.view_as_real(z * rot).reshape(B, T, h, hd).to(x.dtype)


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_qk_norm_attention_matches_functional_reference(backend):
    torch.manual_seed(1)
    d, h, T = 32, 4, 10
    attn = MultiHeadSelfAttention(d, h, max_seq_len=16, theta=100.0, attention_backend=backend, qk_norm=True)
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 1.5)
        attn.k_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, T, d) * 3
    hd = d // h

    def heads(w):
        return F.linear(x, w).view(2, T, h, hd)

    q = F.rms_norm(heads(attn.q_proj.weight), (hd,), attn.q_norm.weight, eps=1e-5)
    k = F.rms_norm(heads(attn.k_proj.weight), (hd,), attn.k_norm.weight, eps=1e-5)
    q, k = rope_reference(q, 100.0), rope_reference(k, 100.0)
    v = heads(attn.v_proj.weight)
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    want = F.linear(y.transpose(1, 2).reshape(2, T, d), attn.output_proj.weight)
    torch.testing.assert_close(attn(x), want, atol=1e-5, rtol=1e-5)


def test_qk_norm_makes_attention_scores_scale_free():
    """With QK-norm the attention pattern does not depend on the size of q and k: scaling W_Q and W_K by 10
    changes nothing (without it the pattern sharpens)."""
    torch.manual_seed(2)
    x = torch.randn(1, 8, 32)
    for qk_norm, same in ((True, True), (False, False)):
        attn = MultiHeadSelfAttention(32, 4, 16, 100.0, attention_backend="reference", qk_norm=qk_norm)
        before = attn(x)
        with torch.no_grad():
            attn.q_proj.weight.mul_(10)
            attn.k_proj.weight.mul_(10)
        assert torch.allclose(attn(x), before, atol=1e-4) is same


def test_relu2_ffn_matches_functional_reference():
    torch.manual_seed(3)
    ffn = FeedForward(32, 96, "relu2")
    x = torch.randn(3, 5, 32)
    want = F.linear(F.relu(F.linear(x, ffn.w1.weight)).pow(2), ffn.w2.weight)
    torch.testing.assert_close(ffn(x), want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("d_model", [32, 128, 512])
def test_relu2_default_width_keeps_swiglu_parameters_and_flops(d_model):
    cfg = dict(SMALL, d_model=d_model)
    swiglu, relu2 = ModelConfig(**cfg), ModelConfig(**cfg, ffn="relu2")
    assert relu2.d_ff == default_d_ff(d_model, "relu2") == 3 * swiglu.d_ff // 2
    assert account.parameter_counts(relu2)["total"] == account.parameter_counts(swiglu)["total"]
    assert account.forward_flops(relu2)["total"] == account.forward_flops(swiglu)["total"]


def test_logit_softcap_matches_tanh_reference():
    torch.manual_seed(4)
    plain = TransformerLM(ModelConfig(**SMALL))
    with torch.no_grad():
        plain.lm_head.weight.mul_(20)  # logits of tens, so the cap bends them
    for cap in (30.0, 2.0):
        capped = TransformerLM(ModelConfig(**SMALL, logit_softcap=cap))
        capped.load_state_dict(plain.state_dict())
        with torch.no_grad():
            raw, got = plain(ids_for(64)), capped(ids_for(64))
        torch.testing.assert_close(got, cap * torch.tanh(raw / cap), atol=1e-5, rtol=1e-5)
        assert got.abs().max() <= cap < raw.abs().max()  # (tanh rounds to 1 in float32 far out)


def test_zero_init_projections_start_at_zero_and_learn():
    torch.manual_seed(5)
    model = TransformerLM(ModelConfig(**SMALL, zero_init_proj=True))
    for layer in model.layers:
        assert not layer.attn.output_proj.weight.any() and not layer.ffn.w2.weight.any()
    ids = ids_for(64)
    # every block adds zero: the logits are the LM head on the normalized embeddings
    want = F.linear(F.rms_norm(F.embedding(ids, model.token_embeddings.weight), (32,), model.ln_final.weight,
                               eps=1e-5), model.lm_head.weight)
    logits = model(ids)
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)
    F.cross_entropy(logits.flatten(0, 1), ids.roll(-1, 1).flatten()).backward()
    for layer in model.layers:  # the zero matrices get gradients (their inputs are not zero)
        assert layer.attn.output_proj.weight.grad.abs().sum() > 0 and layer.ffn.w2.weight.grad.abs().sum() > 0
    model.reset_parameters()  # re-initializing keeps them at zero
    assert not model.layers[0].attn.output_proj.weight.any()


@pytest.mark.parametrize("switch", SWITCHES + [dict(qk_norm=True, ffn="relu2", logit_softcap=30.0, bias=True)])
def test_parameter_counts_equal_the_built_model(switch):
    cfg = ModelConfig(**SMALL, **switch)
    assert account.parameter_counts(cfg)["total"] == TransformerLM(cfg).num_parameters()


@pytest.mark.parametrize("switch", SWITCHES[:3])
@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_activation_estimate_within_10_percent_of_measured(switch, backend):
    cfg = ModelConfig(vocab_size=300, context_length=64, d_model=96, num_layers=2, num_heads=4,
                      attention_backend=backend, **switch)
    measured = account.measure_activation_bytes(cfg, batch_size=3)
    estimated = account.activation_bytes(cfg, batch_size=3)["total"]
    assert abs(estimated / measured - 1) < 0.10, (estimated, measured)
    base = ModelConfig(**{**cfg.model_dump(), **{"qk_norm": False, "logit_softcap": 0.0}})
    if switch != dict(ffn="relu2"):  # the switch's own activations are counted, not just absorbed in the 10%
        assert account.activation_bytes(cfg, 3)["total"] > account.activation_bytes(base, 3)["total"]


@pytest.mark.parametrize("switch, shown", [(dict(qk_norm=True), "qk_norm=True"),
                                           (dict(logit_softcap=30.0), "logit_softcap=30.0"),
                                           (dict(ffn="relu2"), "ffn=relu2")])
def test_llama_and_gguf_refuse_what_they_cannot_compute(switch, shown):
    cfg = ModelConfig(**SMALL, **switch)
    for check in (llama.check_llama_compatible, llamacpp.check_gguf_compatible):
        with pytest.raises(NotLlamaCompatible, match=f"^{shown} is not r") as e:
            check(cfg)
        assert "\n" not in str(e.value)
    assert unsupported_reason(TransformerLM(cfg)) is not None  # nor does the fast decode kernel run it


def test_zero_init_exports_as_llama():
    cfg = ModelConfig(**SMALL, zero_init_proj=True)
    assert llama.llama_incompatibilities(cfg) == [] and llamacpp.gguf_incompatibilities(cfg) == []
    assert unsupported_reason(TransformerLM(cfg)) is None


def test_gpt2_takes_relu2_but_not_qk_norm_or_softcap():
    gpt2_like = dict(SMALL, norm="layernorm", pos_emb="learned")
    assert gpt2.gpt2_incompatibilities(ModelConfig(**gpt2_like, ffn="relu2")) == []
    assert gpt2.hf_config(ModelConfig(**gpt2_like, ffn="relu2"), {}, "float32")["activation_function"] == "relu2"
    assert gpt2.gpt2_incompatibilities(ModelConfig(**gpt2_like, ffn="gelu", qk_norm=True, logit_softcap=5.0)) == [
        "qk_norm=True", "logit_softcap=5.0"]


def test_softcap_is_finite_for_huge_logits():
    cap = 30.0
    x = torch.tensor([1e30, -1e30, 0.0, 3.0])
    from tinystories_cli.model import softcap

    got = softcap(x, cap)
    assert torch.isfinite(got).all() and got[0] == cap and got[1] == -cap
    assert math.isclose(got[3].item(), cap * math.tanh(0.1), rel_tol=1e-6)
