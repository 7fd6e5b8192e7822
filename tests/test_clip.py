"""The clipping drop-ins against torch.nn.utils on the same inputs."""
import math
import warnings

import pytest
import torch

import gradstats

from conftest import params_with_grads

SHAPES = [(20, 7), (7,), (0,), (3, 3, 3), (50,), (1,)]


@pytest.fixture
def use_backend(backend, monkeypatch):
    monkeypatch.setenv("GRADSTATS_BACKEND", backend)
    return backend


def _twin(shapes, dtype=torch.float32, seed=0, scale=1.0, none_every=0, noncontig=False):
    a = params_with_grads(shapes, dtype, seed, scale, noncontig=noncontig, none_every=none_every)
    b = params_with_grads(shapes, dtype, seed, scale, noncontig=noncontig, none_every=none_every)
    return a, b


def _assert_grads(a, b, exact):
    for p, q in zip(a, b):
        if p.grad is None:
            assert q.grad is None
            continue
        if exact:
            assert torch.equal(p.grad, q.grad) or (
                torch.equal(p.grad.isnan(), q.grad.isnan())
                and torch.equal(p.grad.nan_to_num(), q.grad.nan_to_num()))
        else:
            torch.testing.assert_close(p.grad, q.grad, equal_nan=True, rtol=2e-6, atol=1e-12)


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 3.0, "inf"])
@pytest.mark.parametrize("max_norm", [1e6, 0.5])  # no clipping / clipping
def test_clip_matches_torch(use_backend, norm_type, max_norm):
    ours, theirs = _twin(SHAPES, seed=1, none_every=4)
    if use_backend == "triton" and float(norm_type) not in (1.0, 2.0, math.inf):
        # a forced backend that cannot run says why (backend=None would use another one)
        with pytest.raises(gradstats.BackendUnavailableError, match="norm_type"):
            gradstats.clip_grad_norm_(ours, max_norm, norm_type)
        return
    t1 = gradstats.clip_grad_norm_(ours, max_norm, norm_type)
    # torch's inf-norm refuses zero-size tensors; their norm is 0 anyway
    t2 = torch.nn.utils.clip_grad_norm_([p for p in theirs if p.numel()], max_norm, norm_type)
    assert t1.dtype == torch.float32 and t1.shape == ()
    torch.testing.assert_close(t1, t2, rtol=1e-6, atol=0)
    _assert_grads(ours, theirs, exact=max_norm > 1e5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_clip_low_precision(use_backend, dtype):
    ours, theirs = _twin(SHAPES, dtype, seed=2)
    t1 = gradstats.clip_grad_norm_(ours, 0.3)
    t2 = torch.nn.utils.clip_grad_norm_(theirs, 0.3)
    assert t1.dtype == torch.float32  # documented difference: float32, not the grad dtype
    torch.testing.assert_close(t1, t2.float(), rtol=1e-2, atol=0)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-2, atol=1e-3)


def test_clip_noncontiguous(use_backend):
    ours, theirs = _twin([(12, 9), (40,), (5, 6)], seed=3, noncontig=True)
    t1 = gradstats.clip_grad_norm_(ours, 0.1)
    t2 = torch.nn.utils.clip_grad_norm_(theirs, 0.1)
    torch.testing.assert_close(t1, t2, rtol=1e-6, atol=0)
    _assert_grads(ours, theirs, exact=False)


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf", "both"])
@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_clip_nonfinite_like_torch(use_backend, bad, norm_type):
    ours, theirs = _twin([(10,), (4, 4)], seed=4)
    for ps in (ours, theirs):
        if bad in ("nan", "both"):
            ps[0].grad[2] = float("nan")
        if bad in ("inf", "both"):
            ps[1].grad[1, 1] = float("inf")
        if bad == "-inf":
            ps[1].grad[0, 0] = -float("inf")
    t1 = gradstats.clip_grad_norm_(ours, 1.0, norm_type)
    t2 = torch.nn.utils.clip_grad_norm_(theirs, 1.0, norm_type)
    assert torch.equal(t1.isnan(), t2.isnan()) and torch.equal(t1.isinf(), t2.isinf())
    _assert_grads(ours, theirs, exact=True)


def test_error_if_nonfinite(use_backend):
    ps = params_with_grads([(5,)])
    ps[0].grad[0] = float("nan")
    with pytest.raises(RuntimeError, match="non-finite"):
        gradstats.clip_grad_norm_(ps, 1.0, error_if_nonfinite=True)
    with pytest.raises(RuntimeError, match="non-finite"):
        gradstats.get_total_norm([ps[0].grad], error_if_nonfinite=True)
    ok = params_with_grads([(5,)])
    gradstats.clip_grad_norm_(ok, 1.0, error_if_nonfinite=True)


def test_single_tensor_generator_empty(use_backend):
    ours, theirs = _twin([(30,)], seed=5)
    t1 = gradstats.clip_grad_norm_(ours[0], 0.5)
    t2 = torch.nn.utils.clip_grad_norm_(theirs[0], 0.5)
    torch.testing.assert_close(t1, t2, rtol=1e-6, atol=0)
    ours, theirs = _twin([(30,), (4, 2)], seed=6)
    t1 = gradstats.clip_grad_norm_((p for p in ours), 0.5)
    t2 = torch.nn.utils.clip_grad_norm_((p for p in theirs), 0.5)
    torch.testing.assert_close(t1, t2, rtol=1e-6, atol=0)
    _assert_grads(ours, theirs, exact=False)
    r = gradstats.clip_grad_norm_([], 1.0)
    assert torch.equal(r, torch.nn.utils.clip_grad_norm_([], 1.0)) and r.device.type == "cpu"
    with pytest.warns(UserWarning, match="empty generator"):
        gradstats.clip_grad_norm_((p for p in []), 1.0)
    nograd = [torch.nn.Parameter(torch.ones(3))]
    assert float(gradstats.clip_grad_norm_(nograd, 1.0)) == 0.0
    assert float(gradstats.get_total_norm([])) == 0.0


@pytest.mark.parametrize("foreach", [None, True, False])
def test_foreach_accepted(use_backend, foreach):
    ours, theirs = _twin(SHAPES, seed=7)
    t1 = gradstats.clip_grad_norm_(ours, 0.5, foreach=foreach)
    t2 = torch.nn.utils.clip_grad_norm_(theirs, 0.5, foreach=foreach)
    torch.testing.assert_close(t1, t2, rtol=1e-6, atol=0)


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_get_total_norm_and_clip_with_norm(use_backend, norm_type):
    ours, theirs = _twin(SHAPES, seed=8, scale=4.0)
    g1 = [p.grad for p in ours]
    g2 = [p.grad for p in theirs]
    n1 = gradstats.get_total_norm(g1, norm_type)
    n2 = torch.nn.utils.get_total_norm([g for g in g2 if g.numel()], norm_type)
    torch.testing.assert_close(n1, n2, rtol=1e-6, atol=0)
    # with the same total norm, the scaling is bit-identical to torch's
    gradstats.clip_grads_with_norm_(ours, 0.7, n2)
    torch.nn.utils.clip_grads_with_norm_(theirs, 0.7, n2)
    _assert_grads(ours, theirs, exact=True)
    gradstats.clip_grads_with_norm_(ours, 1e9, n2)  # coef >= 1: untouched
    _assert_grads(ours, theirs, exact=True)
    gradstats.clip_grads_with_norm_([], 1.0, n2)


@pytest.mark.parametrize("norm_type", [0.0, -math.inf, -2.0])
def test_unusual_norm_types_follow_torch(norm_type):
    ours, theirs = _twin([(5, 5), (7,)], seed=9)
    t1 = gradstats.clip_grad_norm_(ours, 0.5, norm_type)
    t2 = torch.nn.utils.clip_grad_norm_(theirs, 0.5, norm_type)
    assert torch.equal(t1, t2)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), "x", None])
def test_bad_max_norm(bad):
    ps = params_with_grads([(5,)])
    with pytest.raises(ValueError, match="max_norm"):
        gradstats.clip_grad_norm_(ps, bad)
    with pytest.raises(ValueError, match="max_norm"):
        gradstats.clip_grads_with_norm_(ps, bad, torch.tensor(1.0))


def test_zero_max_norm_like_torch(use_backend):
    ours, theirs = _twin([(6,)], seed=10)
    gradstats.clip_grad_norm_(ours, 0.0)
    torch.nn.utils.clip_grad_norm_(theirs, 0.0)
    _assert_grads(ours, theirs, exact=True)


def test_env_backend_forced_unavailable(monkeypatch):
    """A forced backend that cannot run raises with its reason; None picks another one."""
    from gradstats.backends import registry as _dispatch
    monkeypatch.setattr(_dispatch, "unavailable_reason",
                        lambda name: "simulated: not built" if name == "native" else None)
    _dispatch.clear_selection_cache()  # choices are cached per gradient set
    monkeypatch.setattr(_dispatch, "_SELECTED", type(_dispatch._SELECTED)())
    monkeypatch.setenv("GRADSTATS_BACKEND", "native")
    with pytest.raises(gradstats.BackendUnavailableError,
                       match="'native' is unavailable because: simulated: not built"):
        gradstats.clip_grad_norm_(params_with_grads([(5,)]), 1.0)
    monkeypatch.delenv("GRADSTATS_BACKEND")
    assert float(gradstats.clip_grad_norm_(params_with_grads([(5,)]), 1e9)) > 0


def test_no_autograd_graph(use_backend):
    ps = params_with_grads([(5,)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = gradstats.clip_grad_norm_(ps, 1.0)
    assert not t.requires_grad
