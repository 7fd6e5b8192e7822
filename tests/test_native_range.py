"""Native kernels at the edges of the float32 range (tiny and huge gradients), and float64.

The fast path sums |x|**p in float32; chunks whose sum would lose precision (below 2^-100)
or overflow are recomputed in double (csrc/gradstats_common.h). Every case is checked
against the float64 reference (relative error <= 1e-5 for norms, per group and per tensor;
max-abs and NaN/Inf counts exact), once per enabled CPU kernel build.
"""
import math

import pytest
import torch

from gradstats import grad_stats
from gradstats.backends import native
from gradstats.backends import registry as _dispatch
from gradstats.core.reference import ref_grad_stats, rel_err
from gradstats.core.stats import compute_groups

_WHY = native.NativeBackend().unavailable_reason()
if _WHY is not None:
    pytest.skip(f"native backend unavailable: {_WHY}", allow_module_level=True)

_C = native.extension()
TOL = 1e-5
INF, NAN = math.inf, math.nan
_VARIANTS = {name: (cpu, enabled) for name, cpu, _verified, enabled in _C.cpu_variants()}


@pytest.fixture(params=list(_VARIANTS))
def cap(request):
    cpu, enabled = _VARIANTS[request.param]
    if not cpu:
        pytest.skip(f"this CPU does not run the {request.param} kernels")
    if not enabled:
        pytest.skip(f"{request.param} kernels are opt-in until verified: set "
                    f"GRADSTATS_CPU_CAPABILITY={request.param.lower()} to run them")
    prev = _C.set_cpu_capability(request.param)
    yield request.param
    _C.set_cpu_capability(prev)


def _check(groups, p):
    st, _, _ = compute_groups(groups, p, per_tensor=True, backend="native", full=True)
    ref = ref_grad_stats(groups, p)
    assert rel_err(st.norm, ref.norm) <= TOL, (st.norm, ref.norm)
    assert rel_err(st.total_norm, ref.total_norm) <= TOL, (st.total_norm, ref.total_norm)
    assert rel_err(st.per_tensor_norm, ref.per_tensor_norm) <= TOL, (
        st.per_tensor_norm, ref.per_tensor_norm)
    assert torch.equal(st.max_abs.double(), ref.max_abs), (st.max_abs, ref.max_abs)
    assert torch.equal(st.nonfinite, ref.nonfinite)
    return st, ref


def _rand(n, dtype, scale, g):
    x = torch.randn(n, generator=g, dtype=torch.float64) * scale
    return x.to(dtype)


# Magnitudes of whole gradient sets. float16 holds 6e-8 .. 65504: its own range.
SCALES = {torch.float32: [1e-38, 1e-30, 1e-20, 1e-5, 1e20, 1e30, 1e36],
          torch.bfloat16: [1e-38, 1e-30, 1e-20, 1e-5, 1e20, 1e30, 1e36],
          torch.float16: [1e-7, 1e-4, 1.0, 1e2, 2e4]}
SIZES = [1, 37, 1000, 65536, 65537, 70000]  # one element, tails, chunk boundaries


def _cases():
    for dtype, scales in SCALES.items():
        for s in scales:
            for p in (2.0, 1.0, 3.0, 0.5, INF):
                yield dtype, s, p


def _fits(ref):
    """float32 outputs can only be right where the true norm is a finite float32."""
    vals = torch.cat([ref.norm, ref.total_norm.reshape(1), ref.per_tensor_norm])
    return bool((vals.abs() < 3.0e38).all())


@pytest.mark.parametrize("dtype,scale,p", list(_cases()),
                         ids=[f"{str(d)[6:]}-{s:g}-p{p:g}" for d, s, p in _cases()])
def test_whole_set_at_magnitude(cap, dtype, scale, p):
    g = torch.Generator().manual_seed(11)
    ts = [_rand(n, dtype, scale, g) for n in SIZES]
    groups = [ts[:2], ts[2:4], ts[4:]]
    ref = ref_grad_stats(groups, p)
    if not _fits(ref):
        # e.g. p=0.5 at 1e36: (sum |x|^0.5)^2 ~ n^2 * 1e36 exceeds float32; a norm beyond
        # float32 is +Inf in any float32 output. Check the tensors one at a time instead.
        groups = [[t[:1]] for t in ts]
        ref = ref_grad_stats(groups, p)
        assert _fits(ref)
    _check(groups, p)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [2.0, 1.0, 3.0, INF])
def test_mixed_magnitudes_across_tensors_and_groups(cap, dtype, p):
    g = torch.Generator().manual_seed(12)
    tiny, small, mid, big, huge = (_rand(n, dtype, s, g) for n, s in
                                   [(70000, 1e-30), (3000, 1e-20), (5000, 1e-5),
                                    (65537, 1e20), (100, 1e30)])
    # per-tensor norms show the tiny ones even where a group's norm is dominated by huge
    _check([[tiny, huge], [small], [mid, big, tiny], [huge, small]], p)


@pytest.mark.parametrize("p", [2.0, 1.0, 3.0, 0.5])
def test_mixed_magnitudes_inside_one_chunk(cap, p):
    g = torch.Generator().manual_seed(13)
    # squares of 1e-25 underflow float32; squares of 1e-16 are below 2^-100: exact path
    x = _rand(65536, torch.float32, 1e-25, g)
    x[::1000] = _rand(66, torch.float32, 1e-16, g)
    y = _rand(65536, torch.float32, 1e-30, g)
    y[7] = 1.0  # one normal element: the fast path stands (the tiny ones do not matter)
    _check([[x], [y]], p)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [2.0, 1.0, 3.0, INF])
@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1e20, 1e30])
def test_nan_inf_among_tiny_and_huge(cap, dtype, p, scale):
    g = torch.Generator().manual_seed(14)
    a = _rand(70000, dtype, scale, g)
    a[3] = NAN
    b = _rand(1000, dtype, scale, g)
    b[999] = -INF
    c = _rand(500, dtype, scale, g)
    st, _ = _check([[a], [b], [c]], p)
    assert math.isnan(st.norm[0]) and st.norm[1] == INF and math.isfinite(st.norm[2])
    assert st.nonfinite.tolist() == [1, 1, 0]


def test_tiny_gradients_are_not_zero(cap):
    """The regression: gradients of 1e-30 had norm 0 (x*x underflows float32)."""
    ps = [torch.nn.Parameter(torch.zeros(4096)) for _ in range(3)]
    g = torch.Generator().manual_seed(15)
    for prm in ps:
        prm.grad = torch.randn(4096, generator=g) * 1e-30
    st = grad_stats(ps, backend="native")
    ref = ref_grad_stats([[prm.grad for prm in ps]], 2.0)
    assert float(st.total_norm) > 0
    assert rel_err(st.total_norm, ref.total_norm) <= TOL


def test_float64_is_left_to_the_torch_backend():
    from gradstats.core import grouping
    g64 = [torch.randn(300, dtype=torch.float64), torch.randn(20, dtype=torch.float64)]
    mixed = [torch.randn(300), torch.randn(20, dtype=torch.float64)]
    for grads in (g64, mixed):
        s = grouping.slices([grads])[0][0]
        why = native.NativeBackend().unsupported_reasons(s, 2.0)
        assert any(w.startswith("float64 gradients") and "torch backend" in w for w in why), why
        assert _dispatch.select(s, 2.0, None).name == "torch"
