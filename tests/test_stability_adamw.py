"""gradstats.optim_extras.StableAdamW (update clipping) and the full preset
gradstats.presets.recommended_adamw."""
import copy

import pytest
import torch

import gradstats
from gradstats.optim_extras import StableAdamW

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def test_without_update_clip_it_is_adamw():
    m1 = _mlp()
    m2 = copy.deepcopy(m1)
    o1 = torch.optim.AdamW(m1.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1,
                           foreach=True)
    o2 = StableAdamW(m2.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1,
                     update_clip=False)
    g = torch.Generator().manual_seed(1)
    for i in range(30):
        x = torch.randn(32, 8, generator=g) * (50 if i == 10 else 1)
        for m, o in ((m1, o1), (m2, o2)):
            m(x).pow(2).mean().backward()
            o.step()
            o.zero_grad()
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-6)


def test_update_is_clipped_after_a_jump_and_not_before():
    m1 = _mlp()
    m3 = copy.deepcopy(m1)
    o1 = torch.optim.AdamW(m1.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    o3 = StableAdamW(m3.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    moved = {}
    g = torch.Generator().manual_seed(2)
    for i in range(30):
        x = torch.randn(32, 8, generator=g)
        for k, (m, o) in enumerate(((m1, o1), (m3, o3))):
            before = [p.detach().clone() for p in m.parameters()]
            (m(x).pow(2).mean() * (1000.0 if i == 20 else 1.0)).backward()
            o.step()
            o.zero_grad()
            moved[(k, i)] = max((p - b).abs().max().item()
                                for p, b in zip(m.parameters(), before))
    # the first step: g**2 == v_hat exactly, so rms == 1 and nothing is clipped
    assert moved[(1, 0)] == pytest.approx(moved[(0, 0)], rel=1e-5)
    # right after a 1000x jump the second moment lags: the step is several times smaller
    assert moved[(1, 20)] < 0.35 * moved[(0, 20)]


def test_per_parameter_step_counts_and_state_dict():
    m = _mlp()
    o = StableAdamW(m.parameters(), lr=1e-2)
    x = torch.randn(4, 8)
    m(x).sum().backward()
    m[2].weight.grad = None  # this one skips the first step
    o.step()
    o.zero_grad()
    m(x).sum().backward()
    o.step()
    assert o.state[m[0].weight]["step"] == 2 and o.state[m[2].weight]["step"] == 1
    sd = copy.deepcopy(o.state_dict())
    o2 = StableAdamW(_mlp().parameters(), lr=1e-2)
    o2.load_state_dict(sd)
    assert o2.state_dict()["state"][0]["step"] == 2
    for bad in (dict(lr=-1.0), dict(betas=(0.9, 1.0)), dict(eps=-1e-8),
                dict(weight_decay=-0.1)):
        with pytest.raises(ValueError):
            StableAdamW(m.parameters(), **bad)
    m[0].weight.grad = torch.zeros_like(m[0].weight).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        o.step()


def test_recommended_adamw_full_preset():
    m = _mlp()
    opt = gradstats.presets.recommended_adamw(m.parameters(), lr=1e-2, weight_decay=0.1,
                                              spike_warmup=4)
    assert isinstance(opt, gradstats.StableOptimizer)
    assert isinstance(opt.optimizer, StableAdamW)
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.spike.warmup == 4
    g = torch.Generator().manual_seed(3)
    for s in range(1, 21):
        loss = m(torch.randn(16, 8, generator=g)).pow(2).mean()
        loss.backward()
        if s == 5:
            m[0].weight.grad.view(-1)[0] = float("inf")
        if s == 12:
            for p in m.parameters():
                p.grad.mul_(1000.0)
        opt.step(loss=loss)
        opt.zero_grad()
    s = opt.summary()
    assert s["skipped_by_reason"] == {"nonfinite": 1, "spike": 1}
    assert all(torch.isfinite(p).all() for p in m.parameters())
    assert gradstats.presets.recommended_inner() is StableAdamW
