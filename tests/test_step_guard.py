"""CI guards of the zero-overhead step (CPU): aten ops dispatched by one warm
``StableOptimizer(AdamW(fused=True)).step()`` beyond the inner step, and no host read."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import gradstats
from gradstats import policies as P
from gradstats.backends import registry

pytestmark = pytest.mark.skipif(registry.unavailable_reason("native") is not None,
                                reason="the guard counts the native CPU path: "
                                       f"{registry.unavailable_reason('native')}")


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _params(n=150, size=256, groups=1):
    g = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(size, generator=g)) for _ in range(n)]
    if groups == 1:
        return ps, ps
    k = n // groups
    return ps, [{"params": ps[i * k:(i + 1) * k]} for i in range(groups)]


def _set_grads(ps, seed):
    g = torch.Generator().manual_seed(seed)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g)  # new tensors: the gradients move


def _ops_of_warm_step(make, ps, groups):
    opt = make(groups)
    for i in range(3):
        _set_grads(ps, i)
        opt.step()
    _set_grads(ps, 99)
    with _Count() as c:
        opt.step()
    return c.ops


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("policy", ["max_norm", "zscore+spike", "none"])
def test_stable_step_dispatches_at_most_6_ops_beyond_the_inner_step(one_thread, groups,
                                                                     policy):
    ps, grp = _params(groups=groups)
    bare = _ops_of_warm_step(lambda g: torch.optim.AdamW(g, fused=True), ps, grp)

    def make(g):
        inner = torch.optim.AdamW(g, fused=True)
        if policy == "max_norm":
            return gradstats.StableOptimizer(inner, max_norm=1.0)
        if policy == "zscore+spike":
            return gradstats.StableOptimizer(inner, policy=P.ZScoreClip(warmup=2),
                                             spike=P.SpikeSkip(window=8, warmup=2))
        return gradstats.StableOptimizer(inner)
    ops = _ops_of_warm_step(make, ps, grp)
    extra = len(ops) - len(bare)
    assert extra <= 6, (extra, ops, bare)
    assert not any("_local_scalar_dense" in o or "item" in o for o in ops), ops
    # the measure and the decision are one op each
    assert ops.count("gradstats.stats.default") == 1
    assert ops.count("gradstats.decide.default") == 1


def test_skip_decision_after_first_step_is_on_device(one_thread):
    """After every parameter has been stepped, a NaN step is skipped without a host read."""
    ps, grp = _params()
    opt = gradstats.StableOptimizer(torch.optim.AdamW(grp, fused=True), max_norm=1.0)
    _set_grads(ps, 0)
    opt.step()
    _set_grads(ps, 1)
    ps[3].grad[0] = float("nan")
    before = [p.detach().clone() for p in ps]
    with _Count() as c:
        opt.step()
    assert not any("_local_scalar_dense" in o for o in c.ops)
    assert all(torch.equal(a, b) for a, b in zip(before, ps))
    assert opt.summary()["skipped"] == 1
