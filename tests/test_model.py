"""The from-scratch layers and TransformerLM against PyTorch's own implementations and invariants."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from tinystories_cli import account
from tinystories_cli.config import ModelConfig
from tinystories_cli.model import (
    Embedding,
    FeedForward,
    KVCache,
    LayerNorm,
    Linear,
    MultiHeadSelfAttention,
    RMSNorm,
    RotaryPositionalEmbedding,
    SwiGLU,
    TransformerBlock,
    TransformerLM,
    cross_entropy,
    gelu,
    gelu_tanh,
    log_softmax,
    scaled_dot_product_attention,
    silu,
    softmax,
)
from tinystories_cli.optim import AdamW

TINY = dict(vocab_size=16, context_length=8, d_model=32, num_layers=1, num_heads=2, d_ff=64)


def tiny(**kw) -> ModelConfig:
    return ModelConfig(**{**TINY, **kw})


# --- layers vs PyTorch ------------------------------------------------------------------------

def test_linear_and_embedding_match_torch_and_init():
    torch.manual_seed(0)
    lin = Linear(300, 200)
    x = torch.randn(2, 3, 300)
    torch.testing.assert_close(lin(x), F.linear(x, lin.weight))
    assert lin.weight.shape == (200, 300)
    std = math.sqrt(2 / 500)
    assert lin.weight.abs().max() <= 3 * std + 1e-6
    assert abs(lin.weight.std().item() - std) < 0.1 * std  # truncation at 3 std barely shrinks it
    emb = Embedding(1000, 64)
    ids = torch.randint(0, 1000, (4, 7))
    torch.testing.assert_close(emb(ids), F.embedding(ids, emb.weight))
    assert emb.weight.abs().max() <= 3.0 and abs(emb.weight.std().item() - 1) < 0.05


def test_rmsnorm_matches_float64_formula_and_keeps_dtype():
    torch.manual_seed(0)
    norm = RMSNorm(64, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 64) * 10
    x64 = x.double()
    ref = x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight.double()
    torch.testing.assert_close(norm(x).double(), ref, atol=1e-5, rtol=1e-5)
    xb = x.bfloat16()
    assert norm(xb).dtype == torch.bfloat16
    torch.testing.assert_close(norm(xb).float(), norm(xb.float()), atol=0.05, rtol=0.02)


@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_matches_torch(bias):
    torch.manual_seed(0)
    ln = LayerNorm(48, eps=1e-5, bias=bias)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        if bias:
            ln.bias.uniform_(-1, 1)
    x = torch.randn(4, 6, 48) * 3 + 2
    torch.testing.assert_close(ln(x), F.layer_norm(x, (48,), ln.weight, ln.bias, 1e-5), atol=1e-5, rtol=1e-5)
    assert (ln.bias is None) == (not bias)


def test_softmax_log_softmax_cross_entropy_match_torch_with_huge_logits():
    torch.manual_seed(0)
    x = torch.randn(4, 5, 11)
    for dim in (0, -1):
        torch.testing.assert_close(softmax(x, dim), F.softmax(x, dim))
        torch.testing.assert_close(log_softmax(x, dim), F.log_softmax(x, dim))
    big = x * 1e4
    assert torch.isfinite(softmax(big, -1)).all() and torch.isfinite(log_softmax(big, -1)).all()
    torch.testing.assert_close(softmax(big, -1), F.softmax(big, -1))
    targets = torch.randint(0, 11, (4, 5))
    for logits in (x, big):
        got = cross_entropy(logits, targets)
        assert torch.isfinite(got)
        torch.testing.assert_close(got, F.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1)))
    # gradient too
    xg = x.clone().requires_grad_()
    cross_entropy(xg, targets).backward()
    xr = x.clone().requires_grad_()
    F.cross_entropy(xr.reshape(-1, 11), targets.reshape(-1)).backward()
    torch.testing.assert_close(xg.grad, xr.grad)


def test_activations_match_torch():
    x = torch.linspace(-8, 8, 101)
    torch.testing.assert_close(silu(x), F.silu(x))
    torch.testing.assert_close(gelu(x), F.gelu(x, approximate="none"))
    torch.testing.assert_close(gelu_tanh(x), F.gelu(x, approximate="tanh"))
    assert (gelu_tanh(x) - gelu(x)).abs().max() > 1e-4  # a different function from the exact GELU


def test_bias_option_matches_torch_and_keeps_default_names():
    """`bias=True` adds zero-initialized biases to every attention/FFN projection (x W^T + b, as F.linear);
    without it no bias tensor exists at all, so the default parameter names and shapes are unchanged."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16)
    lin = Linear(16, 8, bias=True)
    assert torch.equal(lin.bias, torch.zeros(8))
    with torch.no_grad():
        lin.bias.normal_()
    torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias))
    assert Linear(16, 8).bias is None and set(Linear(16, 8).state_dict()) == {"weight"}
    base = tiny()
    plain, biased = TransformerLM(base), TransformerLM(base.model_copy(update={"bias": True}))
    extra = set(biased.state_dict()) - set(plain.state_dict())
    assert set(plain.state_dict()) < set(biased.state_dict())
    per_layer = {f"attn.{p}_proj.bias" for p in ("q", "k", "v", "output")} | {f"ffn.w{j}.bias" for j in (1, 2, 3)}
    assert extra == {f"layers.{i}.{n}" for i in range(base.num_layers) for n in per_layer}
    for name, p in plain.state_dict().items():
        assert biased.state_dict()[name].shape == p.shape
    ff = FeedForward(16, 40, "gelu_tanh", bias=True)
    with torch.no_grad():
        ff.w1.bias.normal_(), ff.w2.bias.normal_()
    ref = F.linear(F.gelu(F.linear(x, ff.w1.weight, ff.w1.bias), approximate="tanh"), ff.w2.weight, ff.w2.bias)
    torch.testing.assert_close(ff(x), ref)


def test_ffns_compute_their_formula():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16)
    sw = SwiGLU(16, 24)
    ref = F.linear(F.silu(F.linear(x, sw.w1.weight)) * F.linear(x, sw.w3.weight), sw.w2.weight)
    torch.testing.assert_close(sw(x), ref)
    fused = SwiGLU(16, 24, fused_kernels=True)
    fused.load_state_dict(sw.state_dict())
    torch.testing.assert_close(fused(x), sw(x))
    for act, fn in [("silu", F.silu), ("gelu", F.gelu), ("relu", F.relu)]:
        for fk in (False, True):
            ff = FeedForward(16, 40, act, fused_kernels=fk)
            torch.testing.assert_close(ff(x), F.linear(fn(F.linear(x, ff.w1.weight)), ff.w2.weight))
    with pytest.raises(ValueError):
        FeedForward(16, 40, "tanh")


def test_sdpa_matches_torch_with_masks_and_batch_dims():
    torch.manual_seed(0)
    Q, K, V = torch.randn(2, 3, 4, 5, 8), torch.randn(2, 3, 4, 7, 8), torch.randn(2, 3, 4, 7, 6)
    torch.testing.assert_close(scaled_dot_product_attention(Q, K, V), F.scaled_dot_product_attention(Q, K, V))
    mask = torch.rand(5, 7) > 0.4
    mask[:, 0] = True  # every query may attend somewhere
    torch.testing.assert_close(scaled_dot_product_attention(Q, K, V, mask),
                               F.scaled_dot_product_attention(Q, K, V, attn_mask=mask))
    full_mask = torch.rand(2, 3, 4, 5, 7) > 0.5
    full_mask[..., 0] = True
    torch.testing.assert_close(scaled_dot_product_attention(Q, K, V, full_mask),
                               F.scaled_dot_product_attention(Q, K, V, attn_mask=full_mask))


def test_rope_matches_complex_rotation():
    torch.manual_seed(0)
    d_k, theta = 8, 10000.0
    rope = RotaryPositionalEmbedding(theta, d_k, max_seq_len=32)
    x = torch.randn(2, 6, d_k)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5], [7, 3, 31, 0, 9, 2]])
    z = torch.view_as_complex(x.double().reshape(2, 6, d_k // 2, 2))
    freq = theta ** (-torch.arange(0, d_k, 2, dtype=torch.float64) / d_k)
    ref = torch.view_as_real(z * torch.polar(torch.ones_like(freq), pos[..., None].double() * freq)).reshape(2, 6, d_k)
    torch.testing.assert_close(rope(x, pos).double(), ref, atol=1e-5, rtol=1e-5)
    assert "cos" not in rope.state_dict() and "sin" not in rope.state_dict()


# --- attention / blocks -----------------------------------------------------------------------

def test_mha_names_rope_and_extra_batch_dims():
    torch.manual_seed(0)
    mha = MultiHeadSelfAttention(32, 4, max_seq_len=16, theta=10000.0, attention_backend="reference")
    assert {n for n, _ in mha.named_parameters()} == {f"{p}_proj.weight" for p in ("q", "k", "v", "output")}
    x = torch.randn(2, 10, 32)
    y = mha(x)
    torch.testing.assert_close(mha(x, torch.arange(10)), y)
    torch.testing.assert_close(mha(x, torch.arange(10).expand(2, 10)), y)
    assert not torch.allclose(mha(x, torch.arange(10) + 3), y)  # positions matter with RoPE
    # an independent formula: per-head causal softmax attention via F.* on the same weights
    plain = MultiHeadSelfAttention(32, 4)
    q = F.linear(x, plain.q_proj.weight).view(2, 10, 4, 8).transpose(1, 2)
    k = F.linear(x, plain.k_proj.weight).view(2, 10, 4, 8).transpose(1, 2)
    v = F.linear(x, plain.v_proj.weight).view(2, 10, 4, 8).transpose(1, 2)
    ref = F.linear(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, 10, 32),
                   plain.output_proj.weight)
    torch.testing.assert_close(plain(x), ref, atol=1e-5, rtol=1e-5)
    assert plain(torch.randn(3, 2, 5, 32)).shape == (3, 2, 5, 32)


def test_block_pre_and_post_norm_formulas():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 32)
    pre = TransformerBlock(32, 4, 64, 16, 10000.0)
    h = x + pre.attn(pre.ln1(x))
    torch.testing.assert_close(pre(x), h + pre.ffn(pre.ln2(h)))
    post = TransformerBlock(32, 4, 64, 16, None, norm="layernorm", norm_position="post", ffn="relu")
    h = post.ln1(x + post.attn(x))
    torch.testing.assert_close(post(x), post.ln2(h + post.ffn(h)))
    bare = TransformerBlock(32, 4, 64, 16, None, norm="none")
    assert not any("ln" in n for n, _ in bare.named_parameters())


def test_backends_agree_forward_and_backward():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, context_length=32, d_model=64, num_layers=2, num_heads=4)
    ref = TransformerLM(cfg.model_copy(update={"attention_backend": "reference"}))
    fast = TransformerLM(cfg.model_copy(update={"attention_backend": "sdpa"}))
    fast.load_state_dict(ref.state_dict())
    ids = torch.randint(0, 50, (3, 32))
    for m in (ref, fast):
        cross_entropy(m(ids[:, :-1]), ids[:, 1:]).backward()
    torch.testing.assert_close(fast(ids), ref(ids), atol=1e-5, rtol=1e-5)
    for (n, a), b in zip(ref.named_parameters(), fast.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=n)
    assert ref.layers[0].ffn.silu is silu and fast.layers[0].ffn.silu is not silu  # fused SiLU only off-reference
    auto = TransformerLM(cfg.model_copy(update={"dropout": 0.1}))
    attn = auto.layers[0].attn
    assert attn.eval()._use_sdpa()
    assert not attn.train()._use_sdpa()  # attention dropout while training -> the from-scratch path


# --- the language model -----------------------------------------------------------------------

def test_state_dict_names_keyword_construction_and_tying():
    m = TransformerLM(vocab_size=100, context_length=16, d_model=32, num_layers=2, num_heads=4, d_ff=64,
                      rope_theta=10000.0)
    keys = set(m.state_dict())
    expected = {"token_embeddings.weight", "ln_final.weight", "lm_head.weight"}
    for i in range(2):
        expected |= {f"layers.{i}.attn.{p}_proj.weight" for p in ("q", "k", "v", "output")}
        expected |= {f"layers.{i}.ln1.weight", f"layers.{i}.ln2.weight"}
        expected |= {f"layers.{i}.ffn.w{j}.weight" for j in (1, 2, 3)}
    assert keys == expected
    assert m(torch.randint(0, 100, (2, 5))).shape == (2, 5, 100)  # shorter than context_length
    with pytest.raises(ValueError, match="context_length"):
        m(torch.randint(0, 100, (1, 17)))
    tied = TransformerLM(tiny(tie_embeddings=True, pos_emb="learned"))
    assert tied.lm_head.weight is tied.token_embeddings.weight
    assert "position_embeddings.weight" in tied.state_dict() and "lm_head.weight" in tied.state_dict()
    assert tied.lm_head.weight.std() < 0.5  # a tied matrix gets the head's small init, not N(0, 1)
    sin = TransformerLM(tiny(pos_emb="sinusoidal"))
    assert not any("sinusoidal" in k or "position" in k for k in sin.state_dict())
    assert TransformerLM(tiny(), num_layers=3).config.num_layers == 3
    positional = TransformerLM(100, 16, 32, 2, 4, 64, 10000.0)  # CS336 argument order
    assert positional.config == m.config


def test_gpt2_init_scales_residual_projections():
    torch.manual_seed(0)
    m = TransformerLM(ModelConfig(vocab_size=256, context_length=16, d_model=128, num_layers=8, num_heads=4,
                                  ffn="gelu", norm="layernorm", init="gpt2"))
    small = 0.02 / math.sqrt(16)
    for name, p in m.named_parameters():
        if p.dim() == 2:
            want = small if name.endswith(("output_proj.weight", "w2.weight")) else 0.02
            assert abs(p.std().item() - want) < 0.1 * want, name
        elif name.endswith("bias"):
            assert torch.all(p == 0)
        else:
            assert torch.all(p == 1)


def test_causality_every_position_embedding():
    torch.manual_seed(0)
    for pe in ("rope", "nope", "sinusoidal", "learned"):
        m = TransformerLM(tiny(pos_emb=pe, num_layers=2, attention_backend="reference")).eval()
        ids = torch.randint(0, 16, (1, 8))
        base = m(ids)
        for t in (0, 3, 7):
            changed = ids.clone()
            changed[0, t] = (changed[0, t] + 1) % 16
            out = m(changed)
            torch.testing.assert_close(out[:, :t], base[:, :t], atol=1e-6, rtol=0)
            assert not torch.allclose(out[:, t], base[:, t])


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize("pos_emb", ["rope", "nope", "sinusoidal", "learned"])
def test_kv_cache_matches_full_forward(pos_emb, backend):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=40, context_length=16, d_model=32, num_layers=2, num_heads=4, pos_emb=pos_emb,
                      attention_backend=backend)
    m = TransformerLM(cfg).eval()
    ids = torch.randint(0, 40, (2, 16))
    with torch.no_grad():
        full = m(ids)
        m.setup_caches(batch_size=2, max_seq_len=16)
        steps = [m(ids[:, :5], start_pos=0)]  # prefill
        steps += [m(ids[:, t:t + 1], start_pos=t) for t in range(5, 16)]  # one token per step
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=0)
        m.setup_caches(batch_size=2, max_seq_len=16)  # chunked prefill: queries at offset attend causally
        chunks = [m(ids[:, :3]), m(ids[:, 3:11], start_pos=3), m(ids[:, 11:], start_pos=11)]
        torch.testing.assert_close(torch.cat(chunks, 1), full, atol=1e-4, rtol=0)
        m.clear_caches()
        torch.testing.assert_close(m(ids), full)
    assert not any("kv_cache" in k for k in m.state_dict())


def test_kv_cache_bounds():
    cache = KVCache(1, 2, 4, 8)
    with pytest.raises(ValueError, match="too small"):
        cache.update(3, torch.zeros(1, 2, 2, 8), torch.zeros(1, 2, 2, 8))
    m = TransformerLM(tiny())
    with pytest.raises(ValueError, match="exceeds context_length"):
        m.setup_caches(1, 9)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    m = TransformerLM(tiny(dropout=0.5))
    ids = torch.randint(0, 16, (2, 8))
    m.train()
    assert not torch.allclose(m(ids), m(ids))
    m.eval()
    torch.testing.assert_close(m(ids), m(ids))
    no_drop = TransformerLM(tiny(dropout=0.0)).train()
    torch.testing.assert_close(no_drop(ids), no_drop.eval()(ids))


def test_bf16_autocast_and_torch_compile():
    torch.manual_seed(0)
    m = TransformerLM(tiny(num_layers=2))
    ids = torch.randint(0, 16, (2, 8))
    ref = m(ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = m(ids)
    assert torch.isfinite(low).all()
    torch.testing.assert_close(low.float(), ref, atol=0.15, rtol=0.05)
    # aot_eager traces forward and backward through dynamo + AOTAutograd without C++ codegen (fast);
    # the benchmark exercises the inductor backend
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    out = compiled(ids)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    cross_entropy(out, ids).backward()
    assert all(p.grad is not None for p in m.parameters())


# --- every architecture combination -----------------------------------------------------------

def _combos():
    for norm, pos, pe, ffn, tie in itertools.product(("rmsnorm", "layernorm", "none"), ("pre", "post"),
                                                     ("rope", "nope", "sinusoidal", "learned"),
                                                     ("swiglu", "silu", "gelu", "relu"), (False, True)):
        if norm == "none" and pos == "post":
            continue  # without norms pre and post are the same model
        yield dict(norm=norm, norm_position=pos, pos_emb=pe, ffn=ffn, tie_embeddings=tie)


def test_every_combination_counts_runs_and_overfits():
    """Each of the 160 distinct architectures: parameter count == account's, forward/backward,
    and memorizes one batch (loss < 0.1) within 300 AdamW steps."""
    torch.manual_seed(0)
    ids = torch.stack([torch.randperm(16)[:9], torch.randperm(16)[:9]])
    ids[1, 0] = (ids[0, 0] + 1) % 16  # distinct first tokens: the next token is a function of the prefix
    x, y = ids[:, :-1], ids[:, 1:]
    failures = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: thread fan-out costs more than it saves
    try:
        _overfit_all(x, y, failures)
    finally:
        torch.set_num_threads(threads)
    assert not failures, failures


def _overfit_all(x, y, failures):
    for kw in _combos():
        torch.manual_seed(0)
        cfg = tiny(**kw)
        m = TransformerLM(cfg)
        assert m.num_parameters() == account.parameter_counts(cfg)["total"], kw
        assert sum(p.numel() for p in m.parameters()) == account.parameter_counts(cfg)["total"], kw
        opt = AdamW(m.parameters(), lr=3e-2, weight_decay=0.0)
        for _ in range(300):
            loss = cross_entropy(m(x), y)
            if loss.item() < 0.1:
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters()), kw
            opt.step()
        if loss.item() >= 0.1:
            failures.append((kw, loss.item()))
