"""The framework-free parts of gradstats.integrations, and import isolation."""
import math
import subprocess
import sys
from types import SimpleNamespace

import torch

import gradstats
from gradstats.integrations.common import (clips, double_clipping_message, find_stable,
                                           record_logs, stats_logs)
from gradstats.policies import Chain, FixedNorm, SpikeSkip


def test_importing_gradstats_imports_no_framework():
    code = ("import sys, gradstats, gradstats.patch, gradstats.integrations, "
            "gradstats.integrations.common\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('transformers', 'accelerate', 'lightning', 'pytorch_lightning'))\n"
            "print(bad); assert not bad\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def _model_and_opt(**kw):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 2))
    groups = [{"params": m[0].parameters()}, {"params": m[1].parameters()}]
    return m, gradstats.StableOptimizer(torch.optim.SGD(groups, lr=0.1), **kw)


def test_find_stable_through_wrappers():
    _, opt = _model_and_opt()
    assert find_stable(opt) is opt
    assert find_stable(SimpleNamespace(optimizer=SimpleNamespace(optimizer=opt))) is opt
    assert find_stable(opt.optimizer) is None  # the plain inner SGD
    assert find_stable(None) is None


def test_clips():
    assert not clips(None)
    assert not clips(SpikeSkip())
    assert clips(FixedNorm(1.0))
    assert clips(Chain(SpikeSkip(), FixedNorm(1.0)))
    assert not clips(Chain(SpikeSkip()))
    _, opt = _model_and_opt(max_norm=0.5)
    msg = double_clipping_message(opt, "X(clip=1)", "X(clip=0)")
    assert "X(clip=1)" in msg and "X(clip=0)" in msg and "max_norm=None" in msg


def test_stats_logs_keys_and_values():
    m, _ = _model_and_opt()
    m(torch.randn(4, 6)).pow(2).sum().backward()
    groups = [{"params": list(m[0].parameters())}, {"params": list(m[1].parameters())}]
    out = stats_logs(gradstats.grad_stats(groups), group_names=["first", "second"])
    g0 = torch.cat([p.grad.flatten() for p in m[0].parameters()])
    g1 = torch.cat([p.grad.flatten() for p in m[1].parameters()])
    assert math.isclose(out["gradstats/grad_norm/first"], g0.norm().item(), rel_tol=1e-5)
    assert math.isclose(out["gradstats/max_abs/second"], g1.abs().max().item(), rel_tol=1e-6)
    assert math.isclose(out["gradstats/total_norm"], torch.cat([g0, g1]).norm().item(),
                        rel_tol=1e-5)
    assert out["gradstats/nonfinite/first"] == 0.0
    assert all(isinstance(v, float) for v in out.values())
    # names that do not fit the group count fall back to group<i>
    assert "gradstats/grad_norm/group1" in stats_logs(gradstats.grad_stats(groups),
                                                      group_names=["only-one"])


def test_record_logs_counts_skips_and_clipping():
    m, opt = _model_and_opt(max_norm=0.01)
    assert record_logs(opt) == {}  # no step yet
    x = torch.randn(4, 6)
    m(x).pow(2).sum().backward()
    opt.step()
    first = record_logs(opt, prefix="gs/")
    assert first["gs/clipped"] == 1.0 and first["gs/skipped"] == 0.0
    assert first["gs/clip_coef/group0"] < 1 and first["gs/clipped_steps"] == 1.0
    assert math.isclose(first["gs/clip_coef/group0"], 0.01 / (first["gs/total_norm"] + 1e-6),
                        rel_tol=1e-5)
    opt.zero_grad()
    m(x).pow(2).sum().backward()
    next(m[1].parameters()).grad[0, 0] = float("nan")
    before = [p.detach().clone() for p in m.parameters()]
    opt.step()
    out = record_logs(opt, prefix="gs/")
    assert out["gs/skipped"] == 1.0 and out["gs/skipped_steps"] == 1.0
    assert out["gs/nonfinite/group1"] == 1.0 and out["gs/nonfinite/group0"] == 0.0
    assert out["gs/nonfinite_steps"] == 1.0 and math.isnan(out["gs/grad_norm/group1"])
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
