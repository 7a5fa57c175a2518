"""Muon written from scratch equals torch.optim.Muon; its split of a model, state and skipped steps."""

from __future__ import annotations

import pytest
import torch

from tinystories_cli.config import ModelConfig
from tinystories_cli.model import TransformerLM, cross_entropy
from tinystories_cli.optim import AdamW, Muon, muon_param_split, newton_schulz


def _pair(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    ours = [torch.nn.Parameter(torch.randn(*s, generator=g) * 0.1) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    return ours, ref


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("lr_scale", ["original", "match_rms_adamw"])
def test_muon_matches_torch_optim_muon_over_20_steps(nesterov, lr_scale):
    shapes = [(32, 16), (16, 48), (24, 24), (7, 5)]  # tall, wide, square, odd
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
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(opt.state[a]["momentum_buffer"], ref_opt.state[b]["momentum_buffer"])


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
