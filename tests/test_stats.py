"""grad_stats on every available backend against the reference (docs/architecture.md §4)."""
import math

import pytest
import torch

import gradstats
from gradstats.core.reference import ref_grad_stats, rel_err

from conftest import make_grads, params_with_grads

SHAPES = [(7,), (33, 5), (0,), (1,), (3, 4, 5), (1000,), (0, 3), (129,)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _check(st, ref, per_tensor=False, tol=1e-5):
    assert st.norm.dtype == torch.float32 and st.total_norm.dim() == 0
    assert st.nonfinite.dtype == torch.int64 and st.numel.dtype == torch.int64
    assert rel_err(st.norm, ref.norm) <= tol, (st.norm, ref.norm)
    assert rel_err(st.total_norm, ref.total_norm) <= tol
    assert torch.equal(st.max_abs.double(), ref.max_abs), (st.max_abs, ref.max_abs)
    assert torch.equal(st.nonfinite, ref.nonfinite)
    assert torch.equal(st.numel, ref.numel)
    if per_tensor:
        assert rel_err(st.per_tensor_norm, ref.per_tensor_norm) <= tol
    else:
        assert st.per_tensor_norm is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_random_groups(backend, dtype, norm_type):
    gs = make_grads(SHAPES, dtype, seed=3, scale=3.0)
    groups = [gs[:3], [], gs[3:]]
    ps = [[torch.nn.Parameter(torch.zeros(g.shape, dtype=dtype)) for g in grp] for grp in groups]
    for grp_p, grp_g in zip(ps, groups):
        for p, g in zip(grp_p, grp_g):
            p.grad = g
    pg = [{"params": grp} for grp in ps]
    st = gradstats.grad_stats(pg, norm_type, per_tensor=True, backend=backend)
    _check(st, ref_grad_stats(groups, norm_type), per_tensor=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_noncontiguous(backend, dtype):
    gs = make_grads([(12, 9), (40,), (5, 6), (31,)], dtype, seed=4, noncontig=True)
    assert not all(g.is_contiguous() for g in gs)
    ps = []
    for g in gs:
        p = torch.nn.Parameter(torch.zeros(g.shape, dtype=dtype))
        p.grad = g
        ps.append(p)
    st = gradstats.grad_stats(ps, per_tensor=True, backend=backend)
    _check(st, ref_grad_stats([gs]), per_tensor=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_nan_inf_injection(backend, dtype, norm_type):
    gs = make_grads([(50,), (8, 8), (13,), (20,)], dtype, seed=5)
    gs[0][3] = float("inf")
    gs[1][2, 2] = -float("inf")
    gs[1][0, 1] = float("nan")
    gs[3][7] = float("nan")
    groups = [[gs[0]], [gs[1], gs[2]], [gs[3]], [gs[2]]]
    ps_groups = []
    for grp in groups:
        ps = []
        for g in grp:
            p = torch.nn.Parameter(torch.zeros(g.shape, dtype=dtype))
            p.grad = g
            ps.append(p)
        ps_groups.append({"params": ps})
    st = gradstats.grad_stats(ps_groups, norm_type, per_tensor=True, backend=backend)
    ref = ref_grad_stats(groups, norm_type)
    _check(st, ref, per_tensor=True)
    assert math.isinf(st.norm[0]) and math.isnan(st.norm[1]) and math.isnan(st.norm[2])
    assert math.isfinite(st.norm[3]) and st.nonfinite.tolist() == [1, 2, 1, 0]


def test_all_nonfinite_group_has_zero_max(backend):
    g = torch.tensor([float("nan"), float("inf")])
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = g
    st = gradstats.grad_stats([p], backend=backend)
    assert st.max_abs.tolist() == [0.0] and st.nonfinite.tolist() == [2]


def test_deterministic_repeat(backend):
    ps = params_with_grads([(300,), (17, 23), (5,)], seed=6, scale=10.0)
    a = gradstats.grad_stats(ps, per_tensor=True, backend=backend)
    b = gradstats.grad_stats(ps, per_tensor=True, backend=backend)
    for x, y in [(a.norm, b.norm), (a.total_norm, b.total_norm), (a.max_abs, b.max_abs),
                 (a.per_tensor_norm, b.per_tensor_norm)]:
        assert torch.equal(x, y)


def test_thread_count_invariance(backend):
    ps = params_with_grads([(5000,), (70, 90), (11,)], seed=7)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = gradstats.grad_stats(ps, per_tensor=True, backend=backend)
        torch.set_num_threads(2)
        b = gradstats.grad_stats(ps, per_tensor=True, backend=backend)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(a.norm, b.norm) and torch.equal(a.per_tensor_norm, b.per_tensor_norm)


def test_input_forms():
    ps = params_with_grads([(4, 3), (5,), (2,)], seed=8, none_every=3)  # last has no grad
    ref = ref_grad_stats([[p.grad for p in ps[:2]]])
    for arg in (ps, iter(ps), tuple(ps), (p for p in ps)):
        st = gradstats.grad_stats(arg)
        assert rel_err(st.norm, ref.norm) < 1e-6
    st = gradstats.grad_stats(ps[0])
    assert rel_err(st.norm, ref_grad_stats([[ps[0].grad]]).norm) < 1e-6
    st = gradstats.grad_stats([])
    assert st.norm.tolist() == [0.0] and float(st.total_norm) == 0.0
    st = gradstats.grad_stats([ps[2]])  # no gradient at all
    assert st.numel.tolist() == [0]
    opt = torch.optim.SGD([{"params": ps[:1]}, {"params": ps[1:]}], lr=0.1)
    st = gradstats.grad_stats(opt.param_groups)
    assert st.norm.shape == (2,)


def test_to_dict_roundtrip():
    ps = params_with_grads([(4, 3), (5,)], seed=9)
    ps[1].grad[0] = float("nan")
    st = gradstats.grad_stats([{"params": [ps[0]]}, {"params": [ps[1]]}], per_tensor=True)
    d = st.to_dict()
    assert d["nonfinite"] == [0, 1] and d["numel"] == [12, 5]
    assert math.isnan(d["norm"][1]) and d["norm"][0] == pytest.approx(float(st.norm[0]))
    assert len(d["per_tensor_norm"]) == 2 and d["norm_type"] == 2.0


def test_mixed_dtypes_one_group(backend):
    gs = (make_grads([(100,), (9, 9)], torch.float32, seed=10)
          + make_grads([(64,), (3,)], torch.bfloat16, seed=11)
          + make_grads([(77,)], torch.float16, seed=12))
    ps = []
    for g in gs:
        p = torch.nn.Parameter(torch.zeros(g.shape, dtype=g.dtype))
        p.grad = g
        ps.append(p)
    st = gradstats.grad_stats(ps, per_tensor=True, backend=backend)
    _check(st, ref_grad_stats([gs]), per_tensor=True)


def test_large_values_and_other_p():
    ps = params_with_grads([(100,), (10, 10)], seed=13, scale=1e3)
    for p in (3.0, 0.5, 1.5):
        st = gradstats.grad_stats(ps, p)
        ref = ref_grad_stats([[q.grad for q in ps]], p)
        assert rel_err(st.norm, ref.norm) < 1e-5


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), "two", None])
def test_bad_norm_type(bad):
    ps = params_with_grads([(3,)])
    with pytest.raises(ValueError, match="norm_type"):
        gradstats.grad_stats(ps, bad)


def test_bad_inputs():
    with pytest.raises(TypeError, match="params_or_groups"):
        gradstats.grad_stats([1, 2])
    with pytest.raises(TypeError, match="floating point"):
        gradstats.get_total_norm([torch.ones(3, dtype=torch.int32)])
    with pytest.raises(TypeError, match="complex"):
        gradstats.get_total_norm([torch.ones(3, dtype=torch.complex64)])
    with pytest.raises(TypeError, match="sparse"):
        gradstats.get_total_norm([torch.ones(3).to_sparse()])
    with pytest.raises(ValueError, match="backend"):
        gradstats.grad_stats(params_with_grads([(3,)]), backend="cuda-magic")


def test_cache_key_tells_aliased_views_apart(backend):
    """Same address and element count, other dtype or layout: a new plan, right answers."""
    from gradstats.core import grouping as _grouping
    # fp16 storage whose bits also read as sane bf16/fp32 values (|x| in ~[2^-7, 4])
    base = torch.randn(512, generator=torch.Generator().manual_seed(14)).half()
    views = [base[:256], base[::2], base.view(torch.bfloat16)[:256],
             base.view(torch.float32)[:256]]
    assert len({v.data_ptr() for v in views}) == 1 and {v.numel() for v in views} == {256}
    keys = [_grouping.slices([[v]])[0][0].key for v in views]
    assert len(set(keys)) == len(keys)
    for v in views:
        p = torch.nn.Parameter(torch.zeros(v.shape, dtype=v.dtype))
        p.grad = v
        _check(gradstats.grad_stats([p], backend=backend), ref_grad_stats([[v]]))
