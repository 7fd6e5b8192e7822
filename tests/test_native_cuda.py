"""Native CUDA kernels (csrc/cuda/stats_cuda.cu) on a GPU. Skipped without CUDA or without
the CUDA part of gradstats._C; CI has no GPU, run on a GPU machine:

    pytest tests/test_native_cuda.py tests/test_native_exit.py

Checks: results against the float64 reference (also at tiny/huge magnitudes); plans keyed by
structure (gradients that move build no new plan, only an 8-byte-per-tensor upload; equal
pointers upload nothing); no host synchronisation while gradients move; a CUDA graph that
captured stats + scale replays its own pointers whatever eager calls did in between; calls
from a side stream.
"""
import math

import pytest
import torch

from gradstats.backends import native
from gradstats.core.reference import ref_grad_stats, rel_err

_WHY = native.NativeBackend().unavailable_reason()
if _WHY is not None:
    pytest.skip(f"native backend unavailable: {_WHY}", allow_module_level=True)
_C = native.extension()
if not torch.cuda.is_available() or not _C.cuda_built():
    pytest.skip("needs a GPU and gradstats._C built with its CUDA kernels",
                allow_module_level=True)

OPS = torch.ops.gradstats
TOL = 1e-5
SHAPES = [(300, 70), (5,), (65536,), (32769,), (0,), (1000, 33)]


def _grads(seed, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=g, dtype=torch.float64) * scale).to(dtype).cuda()
            for s in SHAPES]


def _bounds():
    return [0, 2, 2, len(SHAPES)]


def _groups(ts):
    b = _bounds()
    return [ts[b[i]:b[i + 1]] for i in range(len(b) - 1)]


def _check(out, ts, p):
    ref = ref_grad_stats(_groups(ts), p)
    assert rel_err(out[7].cpu(), ref.norm) <= TOL, (out[7], ref.norm)
    assert rel_err(out[8].cpu(), ref.total_norm) <= TOL
    assert rel_err(out[10].cpu(), ref.per_tensor_norm) <= TOL
    assert torch.equal(out[1].cpu().double(), ref.max_abs)
    assert torch.equal(out[9].cpu(), ref.nonfinite)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [2.0, 1.0, math.inf, 3.0])
def test_matches_reference(dtype, p):
    ts = _grads(0, dtype)
    ts[0][3, 4] = math.nan
    _check(OPS.stats(ts, _bounds(), p, 1.0), ts, p)


@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1e20, 1e30])
@pytest.mark.parametrize("p", [2.0, 1.0, 3.0])
def test_tiny_and_huge(scale, p):
    ts = _grads(1, torch.float32, scale)
    _check(OPS.stats(ts, _bounds(), p, None), ts, p)


def test_moved_gradients_reuse_the_plan_and_upload_pointers_only():
    torch.cuda.synchronize()
    ts = _grads(2)
    OPS.stats(ts, _bounds(), 2.0, 1.0)
    c0 = _C.cuda_plan_counters()
    for seed in range(3, 8):  # zero_grad(set_to_none=True) + backward(): new tensors
        ts = _grads(seed)
        _check(OPS.stats(ts, _bounds(), 2.0, 1.0), ts, 2.0)
    c1 = _C.cuda_plan_counters()
    assert c1["plans_built"] == c0["plans_built"]
    assert c1["uploads"] - c0["uploads"] == 5
    for _ in range(4):  # same tensors: nothing to upload
        _check(OPS.stats(ts, _bounds(), 2.0, 1.0), ts, 2.0)
    c2 = _C.cuda_plan_counters()
    assert c2["uploads"] == c1["uploads"]
    assert c2["uploads_skipped"] - c1["uploads_skipped"] == 4


def test_no_host_sync_while_gradients_move():
    sets = [_grads(seed) for seed in range(10, 16)]
    # plans built (allocations) outside the check
    OPS.stats(sets[0], _bounds(), 2.0, 1.0)
    OPS.scale_(sets[0], _bounds(), torch.full((), 0.5, device="cuda"))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        outs = []
        for ts in sets * 2:
            out = OPS.stats(ts, _bounds(), 2.0, 0.5)
            OPS.scale_(ts, _bounds(), out[11])
            outs.append(out[8])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(bool(torch.isfinite(o)) for o in outs)


def test_many_uploads_in_flight_stay_correct():
    # more pointer sets than pinned ring slots, without synchronising in between
    sets = [_grads(seed) for seed in range(20, 32)]
    outs = [OPS.stats(ts, _bounds(), 2.0, None)[8] for ts in sets]
    for ts, o in zip(sets, outs):
        assert rel_err(o.cpu(), ref_grad_stats(_groups(ts), 2.0).total_norm) <= TOL


def test_side_stream():
    ts = _grads(40)
    main = OPS.stats(ts, _bounds(), 2.0, None)[8]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    ts2 = _grads(41)
    with torch.cuda.stream(s):
        side = OPS.stats(ts2, _bounds(), 2.0, None)[8]
    torch.cuda.current_stream().wait_stream(s)
    back = OPS.stats(ts, _bounds(), 2.0, None)[8]
    assert torch.equal(main, back)
    assert rel_err(side.cpu(), ref_grad_stats(_groups(ts2), 2.0).total_norm) <= TOL


def test_cuda_graph_replays_its_own_pointers():
    static = _grads(50)
    keep = [t.clone() for t in static]
    OPS.stats(static, _bounds(), 2.0, 0.5)  # eager warm-up: the plan exists before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = OPS.stats(static, _bounds(), 2.0, 0.5)
        OPS.scale_(static, _bounds(), out[11])
    # eager calls with other gradients of the same structure rewrite the eager table
    for seed in (51, 52):
        OPS.stats(_grads(seed), _bounds(), 2.0, 0.5)
    for t, k in zip(static, keep):
        t.copy_(k)
    graph.replay()
    torch.cuda.synchronize()
    ref = ref_grad_stats(_groups(keep), 2.0)
    assert rel_err(out[8].cpu(), ref.total_norm) <= TOL
    coef = torch.clamp(0.5 / (ref.total_norm.float() + 1e-6), max=1.0)
    for t, k in zip(static, keep):
        assert torch.allclose(t.cpu(), k.cpu() * coef, rtol=1e-6, atol=0)
    assert _C.cuda_plan_counters()["capture_uploads"] >= 2
