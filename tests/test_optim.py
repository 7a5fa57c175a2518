"""AdamW, the cosine schedule, gradient clipping and parameter groups against PyTorch's references."""

import copy
import math

import pytest
import torch

from tinystories_cli.config import ModelConfig
from tinystories_cli.model import TransformerLM, cross_entropy
from tinystories_cli.optim import AdamW, clip_grad_norm_, cosine_lr, make_param_groups

CFG = ModelConfig(vocab_size=16, context_length=8, d_model=32, num_layers=1, num_heads=2, d_ff=64,
                  norm="layernorm", tie_embeddings=True)


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 16, (4, 9), generator=g)
    return ids[:, :-1], ids[:, 1:]


def _step(model, opt, x, y):
    opt.zero_grad(set_to_none=True)
    cross_entropy(model(x), y).backward()
    opt.step()


def test_adamw_matches_torch_over_100_steps_with_param_groups():
    torch.manual_seed(0)
    ours_model = TransformerLM(CFG)
    ref_model = copy.deepcopy(ours_model)
    hp = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    ours = AdamW(make_param_groups(ours_model, weight_decay=0.1), **hp)
    ref = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"}
                             for g in make_param_groups(ref_model, weight_decay=0.1)], **hp, foreach=False)
    x, y = _batch()
    for _ in range(100):
        _step(ours_model, ours, x, y)
        _step(ref_model, ref, x, y)
    for (name, a), b in zip(ours_model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
    state = ours.state[next(ours_model.parameters())]
    assert state["step"] == 100 and set(state) == {"step", "exp_avg", "exp_avg_sq"}


def test_adamw_decoupled_weight_decay_on_zero_gradient():
    p = torch.nn.Parameter(torch.full((3,), 2.0))
    opt = AdamW([p], lr=0.1, weight_decay=0.5)
    p.grad = torch.zeros(3)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((3,), 2.0 * (1 - 0.1 * 0.5)))


def test_adamw_state_dict_round_trip():
    torch.manual_seed(0)
    model = TransformerLM(CFG)
    opt = AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    x, y = _batch()
    for _ in range(3):
        _step(model, opt, x, y)
    model2 = copy.deepcopy(model)
    opt2 = AdamW(model2.parameters(), lr=1e-2, weight_decay=0.01)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for _ in range(3):
        _step(model, opt, x, y)
        _step(model2, opt2, x, y)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    assert opt2.state_dict()["state"][0]["step"] == 6


def test_adamw_skips_params_without_grad_and_rejects_bad_hyperparameters():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = AdamW([a, b], lr=0.1)
    a.grad = torch.ones(2)
    opt.step()
    assert torch.equal(b.detach(), torch.ones(2)) and b not in opt.state
    with pytest.raises(ValueError):
        AdamW([a], lr=-1)
    with pytest.raises(ValueError):
        AdamW([a], betas=(1.0, 0.9))


def test_cosine_lr_boundaries():
    max_lr, min_lr, w, c = 1.0, 0.1, 7, 21
    assert cosine_lr(0, max_lr, min_lr, w, c) == 0.0
    assert cosine_lr(3, max_lr, min_lr, w, c) == pytest.approx(3 / 7)
    assert cosine_lr(w, max_lr, min_lr, w, c) == pytest.approx(max_lr)
    assert cosine_lr(14, max_lr, min_lr, w, c) == pytest.approx((max_lr + min_lr) / 2)
    assert cosine_lr(c, max_lr, min_lr, w, c) == pytest.approx(min_lr)
    assert cosine_lr(c + 1, max_lr, min_lr, w, c) == min_lr
    assert cosine_lr(10**6, max_lr, min_lr, w, c) == min_lr
    assert cosine_lr(0, max_lr, min_lr, 0, c) == pytest.approx(max_lr)  # no warmup
    lrs = [cosine_lr(i, max_lr, min_lr, w, c) for i in range(w, c + 1)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


@pytest.mark.parametrize("max_norm", [0.01, 1e6])
def test_clip_grad_norm_matches_torch(max_norm):
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(5, 4)) for _ in range(3)] + [torch.nn.Parameter(torch.randn(3))]
    for p in ps[:3]:
        p.grad = torch.randn_like(p) * 3
    refs = [copy.deepcopy(p) for p in ps]
    for p, r in zip(ps, refs):
        r.grad = None if p.grad is None else p.grad.clone()
    got = clip_grad_norm_(ps, max_norm)
    want = torch.nn.utils.clip_grad_norm_([r for r in refs if r.grad is not None], max_norm)
    torch.testing.assert_close(got, want)
    for p, r in zip(ps[:3], refs[:3]):
        torch.testing.assert_close(p.grad, r.grad)
    assert ps[3].grad is None
    if max_norm < 1:
        total = math.sqrt(sum(p.grad.pow(2).sum().item() for p in ps[:3]))
        assert total == pytest.approx(max_norm, rel=1e-4)


def test_param_groups_exclude_norms_biases_embeddings():
    model = TransformerLM(CFG.model_copy(update={"pos_emb": "learned"}))
    decay, no_decay = make_param_groups(model, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(n.endswith(("proj.weight", "w1.weight", "w2.weight", "w3.weight")) for n in decay["names"])
    assert "token_embeddings.weight" in no_decay["names"]  # the tied matrix, once
    assert "position_embeddings.weight" in no_decay["names"]
    assert any(n.endswith("ln1.bias") for n in no_decay["names"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    (everything,) = make_param_groups(model, 0.1, no_decay_norms_biases_embeddings=False)
    assert len(everything["params"]) == len(list(model.parameters()))


def test_adamw_found_inf_skips_on_the_device():
    # A skipped step leaves parameters, moments and the step count exactly as they were (no host read
    # of the flag); the next good step equals the step a run without the bad one would take.
    torch.manual_seed(0)
    model = TransformerLM(CFG)
    twin = copy.deepcopy(model)
    opt, opt_twin = AdamW(model.parameters(), lr=1e-2, weight_decay=0.1), AdamW(twin.parameters(), lr=1e-2,
                                                                                  weight_decay=0.1)
    x, y = _batch()
    _step(model, opt, x, y)
    _step(twin, opt_twin, x, y)
    before = [p.detach().clone() for p in model.parameters()]
    moments = [opt.state[p]["exp_avg_sq"].clone() for p in model.parameters()]
    opt.zero_grad(set_to_none=True)
    cross_entropy(model(x), y).backward()
    next(model.parameters()).grad[0] = float("nan")
    opt.step(found_inf=torch.tensor(True))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(torch.equal(a, opt.state[p]["exp_avg_sq"]) for a, p in zip(moments, model.parameters()))
    assert opt.state[next(model.parameters())]["step"] == 1
    opt.zero_grad(set_to_none=True)
    cross_entropy(model(x), y).backward()
    opt.step(found_inf=torch.tensor(False))
    _step(twin, opt_twin, x, y)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=0)


def test_wsd_lr_warmup_stable_decay():
    from tinystories_cli.optim import wsd_lr

    max_lr, min_lr, w, total = 1.0, 0.1, 10, 100
    lrs = [wsd_lr(it, max_lr, min_lr, w, total, 0.2) for it in range(0, 150)]
    assert lrs[:w + 1] == pytest.approx([cosine_lr(it, max_lr, min_lr, w, total) for it in range(w + 1)])  # same warmup
    assert all(v == max_lr for v in lrs[w:81])               # stable up to the decay (the last 20 steps)
    assert lrs[90] == pytest.approx((max_lr + min_lr) / 2)   # linear decay ...
    assert lrs[100] == pytest.approx(min_lr)                 # ... ending exactly at the last step
    assert all(a >= b for a, b in zip(lrs[w:], lrs[w + 1:]))
    assert all(v == min_lr for v in lrs[101:])
    assert wsd_lr(total, max_lr, min_lr, w, total, 0.0) == max_lr  # no decay at all
    assert wsd_lr(w + 1, max_lr, min_lr, w, total, 1.0) < max_lr  # all decay after the warmup
    with pytest.raises(ValueError):
        wsd_lr(5, max_lr, min_lr, w, total, 1.5)


def test_the_loop_follows_the_chosen_schedule():
    from tinystories_cli.config import TrainConfig
    from tinystories_cli.optim import wsd_lr
    from tinystories_cli.train.loop import scheduled_lr

    cos = TrainConfig(max_steps=50, warmup_steps=5, lr=1e-3, min_lr=1e-4)
    wsd = cos.model_copy(update={"schedule": "wsd", "decay_fraction": 0.3})
    for step in (1, 5, 20, 35, 40, 50):
        assert scheduled_lr(cos, step, 50) == cosine_lr(step, 1e-3, 1e-4, 5, 50)
        assert scheduled_lr(wsd, step, 50) == wsd_lr(step, 1e-3, 1e-4, 5, 50, 0.3)
    assert scheduled_lr(wsd, 30, 50) == 1e-3 > scheduled_lr(cos, 30, 50)
