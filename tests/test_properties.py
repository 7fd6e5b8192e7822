"""Property-based checks (hypothesis): random gradient sets against the reference."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gradstats
from gradstats.core.reference import ref_grad_stats, rel_err

from conftest import available_backends

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SPECIALS = [float("nan"), float("inf"), -float("inf")]

shape_st = st.lists(st.integers(0, 40), min_size=1, max_size=3).map(tuple)
tensor_st = st.tuples(shape_st, st.sampled_from(DTYPES), st.floats(1e-3, 1e3),
                      st.booleans(),  # transposed (non-contiguous) when 2-D
                      st.lists(st.tuples(st.integers(0, 10 ** 6), st.sampled_from(SPECIALS)),
                               max_size=2))
groups_st = st.lists(st.lists(tensor_st, max_size=4), min_size=1, max_size=3)


def _build(spec, seed):
    g = torch.Generator().manual_seed(seed)
    groups = []
    for grp in spec:
        out = []
        for shape, dtype, scale, transpose, specials in grp:
            t = (torch.randn(shape, generator=g) * scale).to(dtype)
            if transpose and t.dim() == 2:
                t = t.t()
            flat = t.view(-1) if t.is_contiguous() else None
            if flat is not None and t.numel():
                for pos, val in specials:
                    flat[pos % t.numel()] = val
            out.append(t)
        groups.append(out)
    return groups


def _params(groups):
    pg = []
    for grp in groups:
        ps = []
        for t in grp:
            p = torch.nn.Parameter(torch.zeros(t.shape, dtype=t.dtype))
            p.grad = t
            ps.append(p)
        pg.append({"params": ps})
    return pg


@pytest.mark.parametrize("backend", available_backends())
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=groups_st, seed=st.integers(0, 2 ** 31 - 1),
       norm_type=st.sampled_from([1.0, 2.0, math.inf]))
def test_grad_stats_matches_reference(backend, spec, seed, norm_type):
    groups = _build(spec, seed)
    got = gradstats.grad_stats(_params(groups), norm_type, per_tensor=True, backend=backend)
    ref = ref_grad_stats(groups, norm_type)
    assert rel_err(got.norm, ref.norm) <= 1e-5
    assert rel_err(got.total_norm, ref.total_norm) <= 1e-5
    assert rel_err(got.per_tensor_norm, ref.per_tensor_norm) <= 1e-5
    assert torch.equal(got.max_abs.double(), ref.max_abs)
    assert torch.equal(got.nonfinite, ref.nonfinite) and torch.equal(got.numel, ref.numel)


@settings(max_examples=30, deadline=None)
@given(spec=groups_st, seed=st.integers(0, 2 ** 31 - 1), max_norm=st.floats(0.0, 50.0),
       norm_type=st.sampled_from([1.0, 2.0, math.inf]))
def test_clip_matches_torch(spec, seed, max_norm, norm_type):
    groups = [[t.float() for t in grp] for grp in _build(spec, seed)]
    ours = [p for grp in _params(groups) for p in grp["params"]]
    theirs = [p for grp in _params([[t.clone() for t in grp] for grp in groups])
              for p in grp["params"]]
    t1 = gradstats.clip_grad_norm_(ours, max_norm, norm_type)
    # torch's inf-norm refuses zero-size tensors (their norm is 0 anyway)
    t2 = torch.nn.utils.clip_grad_norm_([p for p in theirs if p.numel()], max_norm, norm_type)
    assert rel_err(t1, t2) <= 1e-5
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-30, equal_nan=True)
