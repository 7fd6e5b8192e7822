"""Never crash, never corrupt: regression tests of the bad-input / fault matrix."""
import copy
import math

import pytest
import torch

import gradstats
from gradstats import policies as P

FUSED = {
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, fused=True),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=1e-2, fused=True),
}


def _snapshot(opt, ps):
    state = {id(p): {k: (v.clone() if torch.is_tensor(v) else copy.deepcopy(v))
                     for k, v in opt.state[p].items()} for p in ps if p in opt.state}
    return [p.detach().clone() for p in ps], state


def _same(a, b):
    (pa, sa), (pb, sb) = a, b
    if not all(torch.equal(x, y) for x, y in zip(pa, pb)):
        return False
    if sa.keys() != sb.keys():
        return False
    for k in sa:
        if sa[k].keys() != sb[k].keys():
            return False
        for n in sa[k]:
            x, y = sa[k][n], sb[k][n]
            if torch.is_tensor(x):
                if not torch.equal(x, y):
                    return False
            elif x != y:
                return False
    return True


@pytest.mark.parametrize("name", list(FUSED))
def test_skip_with_a_new_subset_of_the_same_size_creates_no_state(name):
    """MoE / frozen parts / set_to_none: another subset with the same gradient count."""
    g = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(4, 3, generator=g)) for _ in range(6)]
    opt = gradstats.StableOptimizer(FUSED[name](ps), max_norm=1.0)
    a, b = ps[:3], ps[3:]
    for step in range(3):  # subset A trains
        for p in ps:
            p.grad = None
        for p in a:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    for p in ps:
        p.grad = None
    for p in b:  # subset B, same count, a NaN: must be skipped without creating state
        p.grad = torch.randn(p.shape, generator=g)
    b[0].grad[0, 0] = float("nan")
    before = _snapshot(opt, ps)
    opt.step()
    assert _same(before, _snapshot(opt, ps)), "a skipped step changed parameters or state"
    if name != "adagrad":  # Adagrad creates its state at construction
        assert all(not opt.state.get(p) for p in b)
    # the next real step on B starts from fresh, well-defined state
    for p in b:
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    for p in b:
        assert torch.isfinite(p).all() and p.abs().max() < 100
        for v in opt.state[p].values():
            if torch.is_tensor(v):
                assert torch.isfinite(v).all() and v.abs().max() < 1e6
    assert opt.summary()["skipped"] == 1


def test_cpu_and_meta_gradients_in_one_call_are_rejected():
    cpu = torch.nn.Parameter(torch.randn(5))
    meta = torch.nn.Parameter(torch.empty(5, device="meta"))
    cpu.grad = torch.randn(5)
    meta.grad = torch.empty(5, device="meta")
    with pytest.raises(NotImplementedError, match="meta"):
        gradstats.grad_stats([cpu, meta])
    with pytest.raises(NotImplementedError, match="meta"):
        gradstats.clip_grad_norm_([cpu, meta], 1.0)


def test_meta_gradients_alone_give_meta_results():
    p = torch.nn.Parameter(torch.empty(5, device="meta"))
    p.grad = torch.empty(5, device="meta")
    st = gradstats.grad_stats([p])
    assert st.norm.device.type == "meta" and st.total_norm.device.type == "meta"


@pytest.mark.parametrize("make_a, make_b, field", [
    (lambda: P.QuantileClip(0.5, history=16), lambda: P.QuantileClip(0.5, history=8),
     "history"),
    (lambda: P.SpikeSkip(window=8), lambda: P.SpikeSkip(window=16), "window"),
    (lambda: P.SpikeSkip(on=("grad_norm",)), lambda: P.SpikeSkip(on=("grad_norm", "loss")),
     "on"),
    (lambda: P.ZScoreClip(alpha=0.9), lambda: P.ZScoreClip(alpha=0.99), "alpha"),
])
def test_policy_state_from_another_configuration_is_refused(make_a, make_b, field):
    a = make_a()
    a.init(1)
    b = make_b()
    b.init(1)
    before = {k: v.clone() for k, v in b.state.items()}
    with pytest.raises(ValueError, match=field):
        b.load_state_dict(a.state_dict())
    assert all(torch.equal(before[k], b.state[k]) for k in before)


def test_optimizer_load_state_dict_refuses_before_changing_anything():
    ps = [torch.nn.Parameter(torch.randn(3))]
    src = gradstats.StableOptimizer(torch.optim.SGD(ps, lr=0.1), policy=P.QuantileClip(0.5, 16))
    ps[0].grad = torch.randn(3)
    src.step()
    dst = gradstats.StableOptimizer(torch.optim.SGD(ps, lr=0.5), policy=P.QuantileClip(0.5, 8))
    with pytest.raises(ValueError, match="history"):
        dst.load_state_dict(src.state_dict())
    assert dst.param_groups[0]["lr"] == 0.5  # the inner optimizer was not loaded either


def test_closure_optimizers_are_refused_at_construction():
    ps = [torch.nn.Parameter(torch.randn(3))]
    with pytest.raises(TypeError, match="LBFGS"):
        gradstats.StableOptimizer(torch.optim.LBFGS(ps))


def test_missing_loss_raises_before_any_state_changes():
    ps = [torch.nn.Parameter(torch.randn(3))]
    opt = gradstats.StableOptimizer(torch.optim.SGD(ps, lr=0.1),
                                    spike=P.SpikeSkip(on=("loss",)))
    ps[0].grad = torch.randn(3)
    with pytest.raises(ValueError, match="loss"):
        opt.step()
    assert opt.summary()["steps"] == 0


def test_closure_is_run_once_and_its_loss_used():
    ps = [torch.nn.Parameter(torch.randn(3))]
    opt = gradstats.StableOptimizer(torch.optim.SGD(ps, lr=0.1),
                                    spike=P.SpikeSkip(on=("loss",), warmup=2, window=4))
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = (ps[0] ** 2).sum()
        loss.backward()
        return loss
    out = opt.step(closure)
    assert len(calls) == 1 and torch.is_tensor(out)
    assert opt.last_stats.loss is not None


def test_grad_stats_accepts_one_param_group_dict():
    ps = [torch.nn.Parameter(torch.randn(3)) for _ in range(2)]
    for p in ps:
        p.grad = torch.randn(3)
    st = gradstats.grad_stats({"params": ps, "lr": 0.1})
    ref = gradstats.grad_stats([{"params": ps}])
    assert st.norm.shape == (1,) and torch.equal(st.norm, ref.norm)
    with pytest.raises(TypeError, match="params"):
        gradstats.grad_stats({"weights": ps})
