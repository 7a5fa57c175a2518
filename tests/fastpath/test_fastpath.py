"""The fast decode path (tinystories_cli/fastpath: a C kernel driven through ctypes) against the torch model.

Tolerances: fp32 logits of the kernel are within FP32_TOL * max(1, max |logit|) of TransformerLM's
(the two sum the same products in different orders); greedy ids are identical over >= 64 tokens;
seeded sampling draws the same ids. int8 is checked against a plain dequantize-then-matmul (the
packed weights turned back into fp32) and bf16 against bf16-rounded weights and inputs with fp32
accumulation, at the level of one matrix-vector product and of whole models.
"""

from __future__ import annotations

import pytest
import torch

from tinystories_cli import fastpath
from tinystories_cli.config import ModelConfig
from tinystories_cli.fastpath import (
    FastLM,
    build,
    dequantize_int8,
    engine,
    quantize_int8,
)
from tinystories_cli.generate import BatchDecoder, generate_samples, generate_tokens
from tinystories_cli.model import TransformerLM

FP32_TOL = 2e-5

SHAPES = [  # (vocab, d_model, heads, d_ff, layers, tied): odd sizes that are not multiples of 16 included
    (101, 40, 4, 70, 2, False),
    (257, 48, 3, 130, 2, True),
    (64, 32, 2, 96, 3, False),
    (300, 96, 6, 200, 1, True),
    (130, 128, 4, 160, 1, False),  # head size 32 (the d128 model's)
]


# tiny models: one intra-op thread for the whole module (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(vocab, d, heads, dff, layers, tied, ctx=96, seed=0, **kw) -> TransformerLM:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, context_length=ctx, d_model=d, num_layers=layers, num_heads=heads, d_ff=dff,
                      tie_embeddings=tied, **kw)
    return TransformerLM(cfg).eval()


def kernel_logits(fast: FastLM, model, ids: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits of every column, one kernel step per column."""
    B, T = ids.shape
    model.setup_caches(B, model.config.context_length)
    fast.bind_caches(model)
    out = torch.stack([fast.step(ids[:, c].contiguous(), c).clone() for c in range(T)], dim=1)
    model.clear_caches()
    return out


def assert_logits_close(got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    scale = max(1.0, want.abs().max().item())
    err = (got - want).abs().max().item()
    assert err <= tol * scale, f"max |diff| {err:.3g} > {tol} x {scale:.3g}"


@pytest.mark.parametrize("shape", SHAPES)
@torch.inference_mode()
def test_fp32_logits_equal_the_model(shape):
    model = make_model(*shape)
    ids = torch.randint(0, shape[0], (2, 40), generator=torch.Generator().manual_seed(1))
    assert_logits_close(kernel_logits(FastLM(model, "fp32"), model, ids), model(ids), FP32_TOL)


@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_greedy_ids_identical_over_80_tokens(shape):
    model = make_model(*shape)
    prompt = [3, 1, 4, 1, 5]
    fast = list(generate_tokens(model, prompt, max_new_tokens=80, temperature=0, engine="fast"))
    ref = list(generate_tokens(model, prompt, max_new_tokens=80, temperature=0, engine="torch"))
    assert len(fast) == 80 and fast == ref


def test_two_threads_give_the_same_logits():
    model = make_model(*SHAPES[1])
    fast = FastLM(model, "fp32")
    ids = torch.tensor([[5, 9, 2, 7]])
    with torch.inference_mode():
        model.setup_caches(1, 96)
        fast.bind_caches(model)
        one = [fast.step(ids[:, c].contiguous(), c, threads=1).clone() for c in range(4)]
        model.setup_caches(1, 96)
        fast.bind_caches(model)
        two = [fast.step(ids[:, c].contiguous(), c, threads=2).clone() for c in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(one, two))  # rows are split, sums are not reordered


def rows_of(model, prompts, engine, **kw):
    class Tok:  # bytes tokenizer over the model's vocabulary, no end-of-text
        eot_id = None
        vocab_size = model.config.vocab_size

        def encode(self, s):
            return [ord(c) % self.vocab_size for c in s]

        def decode(self, ids):
            return "".join(chr(65 + i % 26) for i in ids)

    samples = generate_samples(model, Tok(), prompts, engine=engine, stop_at_eot=False, **kw)
    return [(s.token_ids, s.context_shifts, s.stop_reason) for s in samples]


@pytest.mark.parametrize("setting", [dict(temperature=0), dict(temperature=0.9, top_k=20, top_p=0.9, seed=7),
                                     dict(temperature=1.3, seed=3)])
def test_batches_of_different_prompts_and_sampling_match_torch(setting):
    model = make_model(*SHAPES[0])
    prompts = ["abc", "a much longer prompt here", "xy"]
    kw = dict(num_samples=2, max_new_tokens=70, **setting)
    fast, ref = rows_of(model, prompts, "fast", **kw), rows_of(model, prompts, "torch", **kw)
    assert fast == ref and all(len(ids) == 70 for ids, _, _ in fast)


@pytest.mark.parametrize("setting", [dict(temperature=0), dict(temperature=1.0, seed=11)])
@pytest.mark.parametrize("prompt", ["ab", "a prompt longer than sixteen tokens"])
def test_sliding_window_past_the_context_matches_torch(setting, prompt):
    model = make_model(*SHAPES[2], ctx=24)
    kw = dict(max_new_tokens=100, **setting)
    fast, ref = rows_of(model, [prompt], "fast", **kw), rows_of(model, [prompt], "torch", **kw)
    assert fast == ref and fast[0][1] >= 4  # the window slid


# ---------------------------------------------------------------------------------------------
# int8 and bf16
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows, cols", [(37, 70), (64, 128), (5, 200), (8, 33)])
def test_int8_packing_and_kernel_equal_dequantize_then_matmul(rows, cols):
    g = torch.Generator().manual_seed(rows * cols)
    w = torch.randn(rows, cols, generator=g)
    w[0, :10] = 0.0  # an all-zero group start does not divide by zero
    q, s = quantize_int8(w)
    group = fastpath.engine.int8_group()
    assert q.dtype == torch.int8 and s.shape == (rows, -(-cols // group))
    deq = dequantize_int8(q, s)
    # each weight within half a quantization step of its group's scale
    step = s.repeat_interleave(group, dim=1)[:, :cols]
    assert bool(((deq - w).abs() <= step / 2 + 1e-7).all()) and int(q.abs().max()) <= 127
    model = make_model(*SHAPES[0])
    fast = FastLM(model, "int8")
    mat = engine._Mat(q.data_ptr(), s.data_ptr())
    x = torch.randn(cols, generator=g)
    got = fast.matvec(mat, rows, cols, x)
    want = (deq.double() @ x.double()).float()
    assert_logits_close(got, want, 1e-5)


@pytest.mark.parametrize("rows, cols", [(37, 70), (64, 128), (5, 200), (8, 33)])
def test_bf16_kernel_equals_bf16_rounded_matmul(rows, cols):
    g = torch.Generator().manual_seed(rows + cols)
    w, x = torch.randn(rows, cols, generator=g), torch.randn(cols, generator=g)
    wb = w.to(torch.bfloat16).contiguous()
    model = make_model(*SHAPES[0])
    fast = FastLM(model, "bf16")
    got = fast.matvec(engine._Mat(wb.data_ptr(), None), rows, cols, x)
    want = (wb.double() @ x.to(torch.bfloat16).double()).float()
    assert_logits_close(got, want, 1e-5)


def dequantized_copy(model, precision: str) -> TransformerLM:
    """The model with every projection and the LM head replaced by what `precision` packs (untied:
    the kernel reads the embedding in fp32 whatever the precision)."""
    ref = make_model(*SHAPES[0])  # shape replaced below
    ref = TransformerLM(model.config.model_copy(update={"tie_embeddings": False})).eval()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        sd["lm_head.weight"] = sd["token_embeddings.weight"].clone()
    for k, v in sd.items():
        if k.endswith("weight") and v.dim() == 2 and not k.startswith("token_embeddings"):
            sd[k] = dequantize_int8(*quantize_int8(v)) if precision == "int8" else v.to(torch.bfloat16).float()
    ref.load_state_dict(sd)
    return ref


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1]])
@torch.inference_mode()
def test_int8_model_equals_the_dequantized_model(shape):
    model = make_model(*shape)
    ids = torch.randint(0, shape[0], (1, 30), generator=torch.Generator().manual_seed(2))
    got = kernel_logits(FastLM(model, "int8"), model, ids)
    assert_logits_close(got, dequantized_copy(model, "int8")(ids), FP32_TOL)


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1]])
@torch.inference_mode()
def test_bf16_model_is_close_to_the_bf16_weight_model(shape):
    # the kernel also rounds each matrix input to bf16, so it is compared at bf16's input precision
    model = make_model(*shape)
    ids = torch.randint(0, shape[0], (1, 30), generator=torch.Generator().manual_seed(3))
    got = kernel_logits(FastLM(model, "bf16"), model, ids)
    assert_logits_close(got, dequantized_copy(model, "bf16")(ids), 3e-2)


def test_packed_engines_are_reused_until_the_weights_change():
    model = make_model(*SHAPES[0])
    a = fastpath.fast_model(model, "int8")
    assert fastpath.fast_model(model, "int8") is a
    with torch.no_grad():
        model.layers[0].ffn.w1.weight.mul_(2.0)
    assert fastpath.fast_model(model, "int8") is not a


# ---------------------------------------------------------------------------------------------
# Choosing the path: fallback with a note, refusals
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, why", [(dict(norm="layernorm"), "layernorm"), (dict(norm_position="post"), "post"),
                                     (dict(ffn="gelu"), "gelu"), (dict(bias=True), "biases"),
                                     (dict(pos_emb="learned"), "learned")])
def test_models_that_are_not_llama_style_fall_back_to_torch(kw, why):
    model = make_model(101, 32, 4, 64, 1, False, **kw)
    fast, note = fastpath.select(model, "auto", "fp32")
    assert fast is None and why in note and len(note.splitlines()) == 1
    with pytest.raises(ValueError, match=why):
        fastpath.select(model, "fast", "fp32")
    with pytest.raises(ValueError, match="int8"):
        fastpath.select(model, "auto", "int8")
    ids = list(generate_tokens(model, [1, 2], max_new_tokens=5, temperature=0))  # auto: the torch path
    assert ids == list(generate_tokens(model, [1, 2], max_new_tokens=5, temperature=0, engine="torch"))


def test_no_compiler_falls_back_with_a_note(monkeypatch):
    monkeypatch.setattr(build, "compiler", lambda: None)
    model = make_model(*SHAPES[0])
    fast, note = fastpath.select(model, "auto", "fp32")
    assert fast is None and "no C compiler" in note
    dec = BatchDecoder(model, [[1, 2]], seeds=[0], max_new_tokens=3, temperature=0)
    assert dec.fast is None and "no C compiler" in dec.engine_note and len(list(dec)) == 3


def test_a_failing_compile_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("TSLM_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(build, "FLAGS", [*build.FLAGS, "-fdefinitely-not-a-flag"])
    with pytest.raises(build.KernelUnavailable, match="failed") as e:
        build.build()
    assert len(str(e.value).splitlines()) == 1
    assert not list(tmp_path.iterdir())  # no half-written library left behind


def test_bf16_is_refused_without_native_bf16(monkeypatch):
    monkeypatch.setattr(build, "cpu_flags", lambda: {"avx2", "fma"})
    model = make_model(*SHAPES[0])
    with pytest.raises(ValueError, match="bf16"):
        fastpath.select(model, "auto", "bf16")
    with pytest.raises(ValueError, match="bf16"):
        list(generate_tokens(model, [1], max_new_tokens=2, temperature=0, precision="bf16"))
    monkeypatch.setattr(build, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert fastpath.select(model, "auto", "bf16")[0] is not None


def test_unknown_names_and_torch_with_other_precisions_are_refused():
    model = make_model(*SHAPES[0])
    for engine_, prec, msg in (("gpu", "fp32", "engine"), ("auto", "fp16", "precision"), ("torch", "int8", "torch")):
        with pytest.raises(ValueError, match=msg):
            fastpath.select(model, engine_, prec)
