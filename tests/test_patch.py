"""gradstats.patch_torch() and gradstats.clip_grad_value_ against torch.nn.utils."""
import math
import threading

import pytest
import torch
import torch.nn.utils
import torch.nn.utils.clip_grad as torch_clip_grad

import gradstats
from gradstats import clip as gs_clip
from gradstats import patch as gs_patch

from conftest import params_with_grads

SHAPES = [(20, 7), (7,), (0,), (3, 3, 3), (50,), (1,)]
NORM_SHAPES = [(20, 7), (7,), (3, 3, 3), (50,), (1,)]  # torch's inf norm rejects empty ones
NAMES = ("clip_grad_norm_", "clip_grad_norm", "get_total_norm", "clip_grads_with_norm_",
         "clip_grad_value_", "_get_total_norm", "_clip_grads_with_norm_")


def _snapshot():
    out = {}
    for mod in (torch.nn.utils, torch_clip_grad):
        for n in NAMES:
            if hasattr(mod, n):
                out[(mod.__name__, n)] = getattr(mod, n)
    return out


def _is_ours(fn):
    return getattr(fn, "__gradstats_patch__", None) is not None


@pytest.fixture(autouse=True)
def _clean_patch_state():
    """Every test starts and ends unpatched with torch's own functions in place."""
    before = _snapshot()
    assert not gs_patch.is_patched()
    yield
    leaked = gs_patch.is_patched()
    for (modname, n), fn in before.items():
        mod = torch.nn.utils if modname == "torch.nn.utils" else torch_clip_grad
        setattr(mod, n, fn)
    assert not leaked, "a test left a patch_torch() handle active"


@pytest.fixture
def counters(monkeypatch):
    """Count calls into gradstats' clipping functions (the patched torch names call them)."""
    calls = {}
    for name in ("clip_grad_norm_", "get_total_norm", "clip_grads_with_norm_",
                 "clip_grad_value_"):
        real = getattr(gs_clip, name)
        calls[name] = 0

        def wrapped(*a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(*a, **k)

        monkeypatch.setattr(gs_clip, name, wrapped)
    return calls


def _grads_equal(a, b):
    for p, q in zip(a, b):
        if p.grad is None:
            assert q.grad is None
            continue
        assert torch.equal(p.grad.isnan(), q.grad.isnan())
        assert torch.equal(p.grad.nan_to_num(), q.grad.nan_to_num())


# ----------------------------------------------------------------------------- patch

def test_patch_replaces_every_name_and_undo_restores_identity():
    before = _snapshot()
    assert ("torch.nn.utils", "clip_grad_norm_") in before
    h = gradstats.patch_torch()
    assert isinstance(h, gradstats.TorchPatch) and h.active and gs_patch.is_patched()
    now = _snapshot()
    assert now.keys() == before.keys()  # nothing added that torch lacks
    for k, fn in now.items():
        assert _is_ours(fn), k
        assert fn is not before[k]
    # the same kind of function is one wrapper in both modules
    assert torch.nn.utils.clip_grad_norm_ is torch_clip_grad.clip_grad_norm_
    if hasattr(torch_clip_grad, "_get_total_norm"):
        assert torch_clip_grad._get_total_norm is torch.nn.utils.get_total_norm
    h.undo()
    assert not h.active and not gs_patch.is_patched()
    after = _snapshot()
    for k, fn in before.items():
        assert after[k] is fn, k


def test_patch_is_idempotent_and_reference_counted():
    before = _snapshot()
    h1 = gradstats.patch_torch()
    first = _snapshot()
    h2 = gradstats.patch_torch()
    assert _snapshot() == first  # patching twice is one patch
    h1.undo()
    assert gs_patch.is_patched() and _snapshot() == first  # h2 still holds it
    h1.undo()  # a second undo of the same handle does nothing
    assert gs_patch.is_patched()
    h2.undo()
    assert not gs_patch.is_patched()
    assert all(_snapshot()[k] is v for k, v in before.items())


def test_context_manager_nested_and_on_error():
    before = _snapshot()
    with gradstats.patch_torch() as outer:
        assert isinstance(outer, gradstats.TorchPatch)
        with gradstats.patch_torch():
            assert _is_ours(torch.nn.utils.clip_grad_value_)
        assert _is_ours(torch.nn.utils.clip_grad_value_)  # outer still active
    assert torch.nn.utils.clip_grad_value_ is before[("torch.nn.utils", "clip_grad_value_")]
    with pytest.raises(KeyError):
        with gradstats.patch_torch():
            raise KeyError("boom")
    assert not gs_patch.is_patched()
    assert all(_snapshot()[k] is v for k, v in before.items())


def test_patch_is_thread_safe():
    before = _snapshot()
    errors = []
    barrier = threading.Barrier(8)

    def worker():
        try:
            barrier.wait()
            for _ in range(200):
                with gradstats.patch_torch():
                    assert _is_ours(torch.nn.utils.clip_grad_norm_)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    ts = [threading.Thread(target=worker) for _ in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors
    assert not gs_patch.is_patched()
    assert all(_snapshot()[k] is v for k, v in before.items())


def test_a_name_replaced_by_someone_else_is_left_alone():
    orig = torch.nn.utils.clip_grad_value_

    def theirs(*a, **k):
        return None

    h = gradstats.patch_torch()
    torch.nn.utils.clip_grad_value_ = theirs
    h.undo()
    assert torch.nn.utils.clip_grad_value_ is theirs
    assert _snapshot()[("torch.nn.utils", "clip_grad_norm_")] is not None
    assert not _is_ours(torch.nn.utils.clip_grad_norm_)
    torch.nn.utils.clip_grad_value_ = orig


def test_missing_functions_are_skipped(monkeypatch):
    """torch 2.4/2.5 have no get_total_norm / clip_grads_with_norm_: nothing is added."""
    for mod, n in ((torch.nn.utils, "get_total_norm"), (torch.nn.utils, "clip_grads_with_norm_"),
                   (torch_clip_grad, "_get_total_norm"),
                   (torch_clip_grad, "_clip_grads_with_norm_")):
        monkeypatch.delattr(mod, n, raising=False)
    with gradstats.patch_torch():
        assert not hasattr(torch.nn.utils, "get_total_norm")
        assert not hasattr(torch_clip_grad, "_clip_grads_with_norm_")
        assert _is_ours(torch.nn.utils.clip_grad_norm_)
    assert not hasattr(torch.nn.utils, "get_total_norm")


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 3.0])
def test_patched_functions_route_to_gradstats_and_match_torch(counters, norm_type):
    a = params_with_grads(NORM_SHAPES, seed=1, scale=3.0)
    b = params_with_grads(NORM_SHAPES, seed=1, scale=3.0)
    ref = torch.nn.utils.clip_grad_norm_(a, 0.5, norm_type)
    with gradstats.patch_torch():
        got = torch.nn.utils.clip_grad_norm_(b, 0.5, norm_type)
        assert counters["clip_grad_norm_"] == 1
        grads = [p.grad for p in b if p.grad is not None]
        total = torch.nn.utils.get_total_norm(grads, norm_type)
        torch.nn.utils.clip_grads_with_norm_(b, 0.1, total)
        torch_clip_grad.clip_grad_value_(b, 0.01)
    assert counters == {"clip_grad_norm_": 1, "get_total_norm": 1, "clip_grads_with_norm_": 1,
                        "clip_grad_value_": 1}
    torch.testing.assert_close(got, ref, rtol=2e-6, atol=0)
    ref_total = torch.nn.utils.get_total_norm([p.grad for p in a if p.grad is not None],
                                              norm_type)
    torch.testing.assert_close(total, ref_total, rtol=2e-6, atol=0)
    torch.nn.utils.clip_grads_with_norm_(a, 0.1, ref_total)
    torch.nn.utils.clip_grad_value_(a, 0.01)
    for p, q in zip(a, b):
        torch.testing.assert_close(q.grad, p.grad, rtol=2e-6, atol=1e-12)


def test_reference_taken_before_patching(counters):
    """torch's own clip_grad_norm_, bound before patching, measures and scales through
    gradstats (it looks up _get_total_norm/_clip_grads_with_norm_ in its module)."""
    early = torch.nn.utils.clip_grad_norm_
    early_value = torch.nn.utils.clip_grad_value_
    ps = params_with_grads(SHAPES, seed=2)
    with gradstats.patch_torch():
        early(ps, 0.3)
        early_value(ps, 0.1)
    assert counters["clip_grad_norm_"] == 0
    if hasattr(torch_clip_grad, "_get_total_norm"):
        assert counters["get_total_norm"] == 1 and counters["clip_grads_with_norm_"] == 1
    assert counters["clip_grad_value_"] == 0  # documented: a bound reference is torch's


@pytest.mark.parametrize("norm_type,max_norm", [(0.0, 1.0), (-math.inf, 1.0), (-1.0, 1.0),
                                                (2.0, -1.0), (2.0, math.nan)])
def test_arguments_gradstats_rejects_go_to_torch(counters, norm_type, max_norm):
    a = params_with_grads(NORM_SHAPES, seed=3)
    b = params_with_grads(NORM_SHAPES, seed=3)
    ref = torch.nn.utils.clip_grad_norm_(a, max_norm, norm_type)
    with gradstats.patch_torch():
        got = torch.nn.utils.clip_grad_norm_(b, max_norm, norm_type)
    assert counters["clip_grad_norm_"] == 0
    if norm_type > 0:  # torch's function, measuring through the patched _get_total_norm
        assert counters["get_total_norm"] == 1
        torch.testing.assert_close(got, ref, rtol=2e-6, atol=0, equal_nan=True)
        for p, q in zip(a, b):
            torch.testing.assert_close(q.grad, p.grad, rtol=2e-6, atol=1e-12, equal_nan=True)
    else:
        assert torch.equal(got, ref)
        _grads_equal(a, b)


def test_get_total_norm_fallback_for_zero_norm(counters):
    grads = [p.grad for p in params_with_grads(SHAPES, seed=4) if p.grad is not None]
    ref = torch.nn.utils.get_total_norm(grads, 0.0)
    with gradstats.patch_torch():
        got = torch.nn.utils.get_total_norm(grads, 0.0)
    assert counters["get_total_norm"] == 0
    assert torch.equal(got, ref)


def test_gradstats_own_fallback_does_not_recurse_under_patch():
    ps = params_with_grads(SHAPES, seed=5)
    with gradstats.patch_torch():
        n0 = gradstats.clip_grad_norm_(ps, 1.0, norm_type=0)  # gradstats -> torch name
    assert float(n0) == sum(1 for p in ps if p.grad is not None and p.grad.numel())


def test_deprecated_alias_keeps_warning_and_routes(counters):
    if not hasattr(torch.nn.utils, "clip_grad_norm"):
        pytest.fail("torch.nn.utils.clip_grad_norm missing: update this test")
    ps = params_with_grads(SHAPES, seed=6)
    with gradstats.patch_torch():
        with pytest.warns(FutureWarning, match="clip_grad_norm_"):
            torch.nn.utils.clip_grad_norm(ps, 0.2)
    assert counters["clip_grad_norm_"] == 1


# ------------------------------------------------------------------- clip_grad_value_

def _bits(t):
    """Bit pattern of a float tensor (so -0.0 != 0.0 and NaN payloads compare)."""
    it = {torch.float64: torch.int64, torch.float32: torch.int32,
          torch.bfloat16: torch.int16, torch.float16: torch.int16}[t.dtype]
    return t.contiguous().view(it)


def _assert_bitwise(a, b):
    for p, q in zip(a, b):
        if p.grad is None:
            assert q.grad is None
            continue
        assert p.grad.stride() == q.grad.stride()
        assert torch.equal(_bits(p.grad), _bits(q.grad))


@pytest.fixture
def use_backend(backend, monkeypatch):
    monkeypatch.setenv("GRADSTATS_BACKEND", backend)
    return backend


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16,
                                   torch.float64])
@pytest.mark.parametrize("clip_value", [0.3, 1e-3, -0.2, 0.0, math.inf, math.nan, 2])
@pytest.mark.parametrize("noncontig", [False, True])
def test_clip_grad_value_bitwise_like_torch(use_backend, dtype, clip_value, noncontig):
    a = params_with_grads(SHAPES, dtype, seed=7, noncontig=noncontig, none_every=4)
    b = params_with_grads(SHAPES, dtype, seed=7, noncontig=noncontig, none_every=4)
    for ps in (a, b):  # NaN, +-Inf and signed zeros in the gradients
        ps[0].grad[0, :4] = torch.tensor([math.nan, math.inf, -math.inf, -0.0], dtype=dtype)
    assert a[0].grad.is_contiguous() != noncontig and a[3].grad is None
    r1 = torch.nn.utils.clip_grad_value_(a, clip_value)
    if dtype == torch.float64 and use_backend != "torch":
        # a forced backend that cannot take these gradients says so (as everywhere)
        with pytest.raises(gradstats.BackendUnavailableError, match="float64"):
            gradstats.clip_grad_value_(b, clip_value)
        return
    r2 = gradstats.clip_grad_value_(b, clip_value)
    assert r1 is None and r2 is None
    _assert_bitwise(a, b)
    fresh = params_with_grads(SHAPES, dtype, seed=7, noncontig=noncontig)[4].grad
    if 0 <= clip_value < 1:  # random data: something was actually clamped
        assert (b[4].grad != fresh).any()
    if clip_value == 0.3:  # ... and not everything
        assert (b[4].grad == fresh).any()


def test_clip_grad_value_inputs_like_torch():
    # a single tensor
    a, b = params_with_grads([(5, 5)], seed=8, scale=4.0), params_with_grads([(5, 5)], seed=8,
                                                                              scale=4.0)
    torch.nn.utils.clip_grad_value_(a[0], 1.0)
    gradstats.clip_grad_value_(b[0], 1.0)
    _assert_bitwise(a, b)
    assert b[0].grad.abs().max() == 1.0
    # a generator, a 0-dim tensor bound, foreach=False and foreach=True
    a, b = params_with_grads(SHAPES, seed=9), params_with_grads(SHAPES, seed=9)
    torch.nn.utils.clip_grad_value_((p for p in a), torch.tensor(0.5))
    gradstats.clip_grad_value_((p for p in b), torch.tensor(0.5))
    _assert_bitwise(a, b)
    for fe in (False, True):
        a, b = params_with_grads(SHAPES, seed=10), params_with_grads(SHAPES, seed=10)
        torch.nn.utils.clip_grad_value_(a, 0.25, foreach=fe)
        gradstats.clip_grad_value_(b, 0.25, foreach=fe)
        _assert_bitwise(a, b)
    # nothing with a gradient / empty
    p = torch.nn.Parameter(torch.randn(3))
    assert gradstats.clip_grad_value_([p], 1.0) is None and p.grad is None
    assert gradstats.clip_grad_value_([], 1.0) is None
    # mixed dtypes in one call
    a = params_with_grads([(4, 4)], torch.float32, seed=11) + params_with_grads(
        [(6,)], torch.bfloat16, seed=12)
    b = params_with_grads([(4, 4)], torch.float32, seed=11) + params_with_grads(
        [(6,)], torch.bfloat16, seed=12)
    torch.nn.utils.clip_grad_value_(a, 0.1)
    gradstats.clip_grad_value_(b, 0.1)
    _assert_bitwise(a, b)


def test_clip_grad_value_bad_inputs_like_torch():
    ps = params_with_grads(SHAPES, seed=13)
    for bad, exc in ((None, TypeError), ("x", ValueError), ([1.0], TypeError)):
        with pytest.raises(exc):
            torch.nn.utils.clip_grad_value_(ps, bad)
        with pytest.raises(exc):
            gradstats.clip_grad_value_(ps, bad)
    with pytest.raises(AttributeError):
        gradstats.clip_grad_value_([1, 2], 1.0)


def test_clip_grad_value_through_backend_clamp(monkeypatch):
    """The fused path goes through Backend.clamp_ (one call per device slice)."""
    from gradstats.backends.base import Backend
    seen = []
    real = Backend.clamp_

    def spy(self, dslice, clip_value):
        seen.append((type(self).__name__, len(dslice.tensors), clip_value))
        return real(self, dslice, clip_value)

    monkeypatch.setattr(Backend, "clamp_", spy)
    ps = params_with_grads(SHAPES, seed=14, none_every=3)
    gradstats.clip_grad_value_(ps, 0.7)
    assert len(seen) == 1
    assert seen[0][1] == sum(p.grad is not None for p in ps) and seen[0][2] == 0.7
    assert all(p.grad.abs().max() <= 0.7 for p in ps if p.grad is not None and p.grad.numel())
