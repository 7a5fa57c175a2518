"""Muon written from scratch equals torch.optim.Muon; its split of a model, state and skipped steps."""

from __future__ import annotations

import json

import pytest
import torch

from tinystories_cli.config import ModelConfig
from tinystories_cli.model import TransformerLM, cross_entropy
from tinystories_cli.optim import (
    AdamW,
    Muon,
    MuonWithAdamW,
    make_param_groups,
    muon_param_split,
    newton_schulz,
    orthogonalize_all,
)


def _pair(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    ours = [torch.nn.Parameter(torch.randn(*s, generator=g) * 0.1) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    return ours, ref


# tall, wide, square, odd; the second list repeats shapes (and a tall one's transpose), so Muon orthogonalizes
# those as one batch (`orthogonalize_all`) where torch.optim.Muon does one matrix at a time
SHAPES = [(32, 16), (16, 48), (24, 24), (7, 5)]
BATCHED_SHAPES = [(32, 16), (16, 32), (24, 24), (32, 16), (24, 24), (7, 5), (16, 32)]


@pytest.mark.parametrize("shapes", [SHAPES, BATCHED_SHAPES], ids=["distinct", "batched"])
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("lr_scale", ["original", "match_rms_adamw"])
def test_muon_matches_torch_optim_muon_over_20_steps(nesterov, lr_scale, shapes):
    ours, ref = _pair(shapes)
    kw = dict(lr=0.02, momentum=0.95, nesterov=nesterov, weight_decay=0.1, ns_steps=5)
    opt = Muon(ours, lr_scale=lr_scale, **kw)
    ref_opt = torch.optim.Muon(ref, adjust_lr_fn=lr_scale, **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        for a, b in zip(ours, ref):
            grad = torch.randn(a.shape, generator=g)
            a.grad, b.grad = grad.clone(), grad.clone()
        opt.step()
        ref_opt.step()
    # One matrix at a time, ours is torch's to float32 rounding. Batched, the bf16 products of torch.bmm are
    # now and then rounded one bf16 ulp away from torch.mm's (2^-8 of an update entry of ~1, times lr and the
    # shape scale sqrt(2): ~1e-4 per such step); the momentum never goes through bf16 and stays exact.
    atol = 1e-6 if shapes is SHAPES else 5e-4
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=atol)
        torch.testing.assert_close(opt.state[a]["momentum_buffer"], ref_opt.state[b]["momentum_buffer"])


@pytest.mark.parametrize(("max_elements", "max_matrix"), [(1 << 24, 1 << 17), (3 * 16 * 32, 1 << 17), (1, 1 << 17),
                                                         (1 << 24, 24 * 24)])
def test_orthogonalize_all_equals_one_matrix_at_a_time(max_elements, max_matrix):
    g = torch.Generator().manual_seed(0)
    ms = [torch.randn(*s, generator=g) for s in BATCHED_SHAPES]
    # one batch per shape; batches of 3 and 1; all singletons; (24, 24) batched but (16, 32) too big to batch
    outs = orthogonalize_all(ms, max_elements=max_elements, max_matrix=max_matrix)
    for m, q in zip(ms, outs):
        assert q.shape == m.shape and q.dtype == torch.bfloat16
        torch.testing.assert_close(q, newton_schulz(m), rtol=0, atol=0)
    stacked = newton_schulz(torch.stack([ms[0], ms[3]]))  # a stack of tall matrices, as one call
    torch.testing.assert_close(stacked, torch.stack([newton_schulz(ms[0]), newton_schulz(ms[3])]), rtol=0, atol=0)


def test_newton_schulz_orthogonalizes_tall_and_wide():
    g = torch.Generator().manual_seed(0)
    for shape in [(64, 16), (16, 64)]:
        m = torch.randn(*shape, generator=g)
        q = newton_schulz(m).float()
        assert q.shape == m.shape
        s = torch.linalg.svdvals(q)
        assert s.min() > 0.5 and s.max() < 1.3  # singular values pushed towards 1
        # same singular vectors as m: q is close to U V^T
        u, _, vh = torch.linalg.svd(m, full_matrices=False)
        cos = torch.nn.functional.cosine_similarity(q.flatten(), (u @ vh).flatten(), dim=0)
        assert cos > 0.95
    with pytest.raises(ValueError, match="2-D"):
        newton_schulz(torch.ones(3))


def test_muon_split_and_a_model_trains_with_muon_plus_adamw():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, context_length=16, d_model=32, num_layers=2, num_heads=4)
    model = TransformerLM(cfg)
    hidden, rest = muon_param_split(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim == 2 for p in hidden)
    assert not any("embedding" in names[id(p)] or "lm_head" in names[id(p)] for p in hidden)
    assert {id(p) for p in hidden} | {id(p) for p in rest} == {id(p) for p in model.parameters()}
    assert len(hidden) == 2 * 7  # q, k, v, o and the three SwiGLU matrices per block
    muon, adamw = Muon(hidden, lr=0.02), AdamW(rest, lr=3e-3)
    x = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(2))
    losses = []
    for _ in range(30):
        loss = cross_entropy(model(x[:, :-1]), x[:, 1:])
        loss.backward()
        muon.step()
        adamw.step()
        muon.zero_grad()
        adamw.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0


def test_muon_state_dict_round_trip_resumes_exactly():
    ours, _ = _pair([(16, 8), (8, 8)])
    copies = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    a, b = Muon(ours, lr=0.05), Muon(copies, lr=0.05)
    g = torch.Generator().manual_seed(3)
    grads = [[torch.randn(p.shape, generator=g) for p in ours] for _ in range(6)]
    for i in range(3):
        for p, q, gr in zip(ours, copies, grads[i]):
            p.grad, q.grad = gr.clone(), gr.clone()
        a.step()
        b.step()
    c = Muon(copies, lr=0.05)
    c.load_state_dict(b.state_dict())
    for i in range(3, 6):
        for p, q, gr in zip(ours, copies, grads[i]):
            p.grad, q.grad = gr.clone(), gr.clone()
        a.step()
        c.step()
    for p, q in zip(ours, copies):
        assert torch.equal(p, q)


def test_muon_found_inf_skips_on_the_device_and_rejects_bad_input():
    ours, _ = _pair([(8, 4)])
    opt = Muon(ours, lr=0.1, weight_decay=0.1)
    ours[0].grad = torch.randn(8, 4)
    opt.step()
    before = ours[0].detach().clone()
    buf = opt.state[ours[0]]["momentum_buffer"].clone()
    ours[0].grad = torch.full((8, 4), float("nan"))
    opt.step(found_inf=torch.tensor(1.0))
    assert torch.equal(ours[0], before) and torch.equal(opt.state[ours[0]]["momentum_buffer"], buf)
    ours[0].grad = torch.randn(8, 4)
    opt.step(found_inf=torch.tensor(0.0))
    assert not torch.equal(ours[0], before)
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.ones(4))])
    with pytest.raises(ValueError, match="lr_scale"):
        Muon(ours, lr_scale="bogus")
    with pytest.raises(ValueError, match="momentum"):
        Muon(ours, momentum=1.0)


def test_optim_doctests():
    import doctest

    from tinystories_cli import optim

    assert doctest.testmod(optim).failed == 0


def _model(seed=0):
    torch.manual_seed(seed)
    return TransformerLM(ModelConfig(vocab_size=64, context_length=16, d_model=32, num_layers=2, num_heads=4))


def _hybrid(model, **kw):
    hidden, _ = muon_param_split(model)
    ids = {id(p) for p in hidden}
    groups = [{**g, "params": [p for p in g["params"] if id(p) not in ids]} for g in make_param_groups(model, 0.1)]
    return MuonWithAdamW(hidden, [g for g in groups if g["params"]], lr=3e-3, muon_lr=0.02, **kw)


def test_muon_with_adamw_equals_the_two_optimizers_side_by_side():
    """One optimizer (one state dict for checkpoints) that steps exactly as Muon + AdamW would, skips included."""
    a, b = _model(), _model()
    hybrid = _hybrid(a, muon_weight_decay=0.01)
    hidden, _ = muon_param_split(b)
    ids = {id(p) for p in hidden}
    groups = [{**g, "params": [p for p in g["params"] if id(p) not in ids]} for g in make_param_groups(b, 0.1)]
    muon, adamw = Muon(hidden, lr=0.02, weight_decay=0.01), AdamW([g for g in groups if g["params"]], lr=3e-3)
    x = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    for step in range(8):
        skip = torch.tensor(float(step == 3))  # one skipped step, decided on the device
        for m in (a, b):
            cross_entropy(m(x[:, :-1]), x[:, 1:]).backward()
        hybrid.set_lr_ratio(1.0 - step / 10)
        for opt in (muon, adamw):
            for g in opt.param_groups:
                g["lr"] = (0.02 if opt is muon else 3e-3) * (1.0 - step / 10)
        hybrid.step(found_inf=skip)
        muon.step(found_inf=skip)
        adamw.step(found_inf=skip)
        for opt in (hybrid, muon, adamw):
            opt.zero_grad()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    algos = [g["algorithm"] for g in hybrid.param_groups]
    assert algos == ["muon", "adamw", "adamw"] and hybrid.param_groups[0]["weight_decay"] == 0.01


def test_muon_with_adamw_checkpoint_round_trip_resumes_bit_for_bit(tmp_path):
    """Its state goes through the safetensors checkpoint like AdamW's (momentum buffers and moments)."""
    from tinystories_cli.checkpoint import load_model_state, load_optimizer_state, read_checkpoint, save_checkpoint

    x = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))

    def train(model, opt, steps):
        for _ in range(steps):
            cross_entropy(model(x[:, :-1]), x[:, 1:]).backward()
            opt.step()
            opt.zero_grad()

    straight = _model()
    opt = _hybrid(straight)
    train(straight, opt, 6)
    first = _model()
    opt1 = _hybrid(first)
    train(first, opt1, 3)
    save_checkpoint(first, opt1, 3, tmp_path / "c.safetensors")
    resumed = _model(seed=5)
    opt2 = _hybrid(resumed)
    ckpt = read_checkpoint(tmp_path / "c.safetensors")
    load_model_state(ckpt, resumed)
    load_optimizer_state(ckpt, opt2)
    assert sum("momentum_buffer" in s for s in opt2.state.values()) == len(muon_param_split(resumed)[0])
    train(resumed, opt2, 3)
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_account_counts_muon_state_as_one_buffer_per_matrix():
    from tinystories_cli import account
    from tinystories_cli.config import PRESETS

    cfg = PRESETS["tinystories-17m"].model
    model = TransformerLM(cfg)
    hidden, rest = muon_param_split(model)
    assert account.muon_parameters(cfg) == sum(p.numel() for p in hidden)
    adamw = account.training_memory(cfg, 4)["optimizer_state"]
    muon = account.training_memory(cfg, 4, optimizer="muon")["optimizer_state"]
    # exactly the state the two optimizers allocate: one buffer per Muon matrix, two moments for the rest
    assert muon == 4 * (sum(p.numel() for p in hidden) + 2 * sum(p.numel() for p in rest))
    assert adamw - muon == 4 * account.muon_parameters(cfg)


def test_tslm_account_counts_muon_memory(run_cli):
    code, out, _ = run_cli("account", "tinystories-17m", "--json")
    adamw = json.loads(out)["memory"]["optimizer_state"]
    code2, out2, _ = run_cli("account", "tinystories-17m", "--optimizer", "muon", "--json")
    muon = json.loads(out2)["memory"]["optimizer_state"]
    from tinystories_cli import account
    from tinystories_cli.config import PRESETS

    assert code == code2 == 0 and adamw - muon == 4 * account.muon_parameters(PRESETS["tinystories-17m"].model)
    code, out, err = run_cli("account", "tinystories-17m", "--optimizer", "muon", "--parallel", "fsdp")
    assert code == 2 and "--optimizer muon needs whole matrices" in err and "--parallel fsdp" in err
