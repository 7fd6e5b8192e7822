"""torch.compile(fullgraph=True) of functions that call the drop-ins and grad_stats (CPU)."""
import math

import pytest
import torch

import gradstats
from gradstats.backends import registry

dynamo = pytest.importorskip("torch._dynamo")


def _params(dtype=torch.float32, seed=0, nan=False):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in [(7, 5), (5,),
                                                                             (300,), (2, 3)]]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g).to(dtype) * 3
    if nan:
        ps[2].grad[4] = float("nan")
    return ps


def _graph_breaks(fn, *args):
    dynamo.reset()
    return dynamo.explain(fn)(*args).graph_break_count


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("p", [2.0, 1.0, math.inf])
def test_clip_grad_norm_compiles_fullgraph_and_matches_eager(dtype, p):
    def step(ps):
        return gradstats.clip_grad_norm_(ps, 0.5, norm_type=p)
    a, b = _params(dtype), _params(dtype)
    dynamo.reset()
    total_c = torch.compile(step, fullgraph=True, backend="aot_eager")(a)
    total_e = step(b)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype != torch.bfloat16 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(total_c.double(), total_e.double(), **tol)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad, **tol)


def test_get_total_norm_and_grad_stats_compile_fullgraph():
    ps = _params(nan=True)

    def f(ps):
        t = gradstats.get_total_norm([q.grad for q in ps])
        st = gradstats.grad_stats(ps, per_tensor=True)
        return t, st.norm, st.max_abs, st.nonfinite, st.per_tensor_norm
    dynamo.reset()
    out_c = torch.compile(f, fullgraph=True, backend="aot_eager")(ps)
    out_e = f(ps)
    for x, y in zip(out_c, out_e):
        torch.testing.assert_close(x, y, equal_nan=True, rtol=1e-5, atol=1e-6)


def test_no_more_graph_breaks_than_torch():
    ps = _params()

    def ours(ps):
        return gradstats.clip_grad_norm_(ps, 1.0)

    def theirs(ps):
        return torch.nn.utils.clip_grad_norm_(ps, 1.0)
    assert _graph_breaks(ours, ps) <= _graph_breaks(theirs, ps)

    def ours2(ps):
        t = gradstats.get_total_norm([q.grad for q in ps])
        gradstats.clip_grads_with_norm_(ps, 1.0, t)
        return t

    def theirs2(ps):
        t = torch.nn.utils.get_total_norm([q.grad for q in ps])
        torch.nn.utils.clip_grads_with_norm_(ps, 1.0, t)
        return t
    assert _graph_breaks(ours2, ps) <= _graph_breaks(theirs2, ps)


@pytest.mark.skipif(registry.unavailable_reason("native") is not None,
                    reason="needs the compiled extension")
def test_opcheck_every_op():
    from gradstats.policies import FixedNorm, SkipNonFinite, SpikeSkip, ZScoreClip
    from gradstats.policies.program import Program
    ts = [t.grad for t in _params()]
    ops = torch.ops.gradstats
    torch.library.opcheck(ops.stats.default, (ts, [0, 2, 4], 2.0, 1.0))
    torch.library.opcheck(ops.scale_.default, ([t.clone() for t in ts], [0, 4],
                                                torch.tensor(0.5)))
    prog = Program([SkipNonFinite(), SpikeSkip(window=4, warmup=2), ZScoreClip(warmup=2),
                    FixedNorm(1.0)], 2, torch.device("cpu"), 0.97)
    norm = torch.tensor([1.0, 2.0])
    args = (norm, norm.norm(), norm.clone(), torch.tensor(0.5), None, None, None,
            prog.fstate, prog.istate, prog.table, prog.params, prog.native_meta, 0.03)
    torch.library.opcheck(ops.decide.default, args)
