"""Host time of the stable step and of the drop-ins per call (pytest-benchmark, CPU).

Tiny tensors, so the measured time is host work (Python, dispatch, op calls), not data:
the figure the zero-overhead issue tracks. Gradients are *new tensors* before every call
(as after ``zero_grad(set_to_none=True)`` + ``backward()``), made outside the timed region.

Run (timings):    OMP_NUM_THREADS=1 pytest benchmarks/test_bench_step.py
Smoke (CI):       pytest benchmarks/test_bench_step.py --benchmark-disable
"""
from __future__ import annotations

import pytest
import torch

import gradstats

N_TENSORS = 150
SIZE = 256


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _params():
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(SIZE, generator=g)) for _ in range(N_TENSORS)]


def _fresh_grads(ps):
    bank = [[torch.randn(SIZE) for _ in ps] for _ in range(4)]
    state = {"i": 0}

    def setup():
        state["i"] += 1
        for p, gr in zip(ps, bank[state["i"] % 4]):
            p.grad = gr.clone()
        return (), {}
    return setup


@pytest.mark.benchmark(group="step-host")
@pytest.mark.parametrize("arm", ["bare", "stable", "stable_spike"])
def test_step_host_time(benchmark, arm):
    ps = _params()
    inner = torch.optim.AdamW(ps, fused=True)
    if arm == "bare":
        opt = inner
    elif arm == "stable":
        opt = gradstats.StableOptimizer(inner, max_norm=1.0)
    else:
        opt = gradstats.StableOptimizer(inner, max_norm=1.0, spike=True)
    setup = _fresh_grads(ps)
    for _ in range(5):
        setup()
        opt.step()
    benchmark.pedantic(opt.step, setup=setup, rounds=200, warmup_rounds=5)


@pytest.mark.benchmark(group="call-host")
@pytest.mark.parametrize("fn", ["torch_clip", "clip", "total_norm", "grad_stats"])
def test_call_host_time(benchmark, fn):
    ps = _params()
    setup = _fresh_grads(ps)
    setup()
    call = {
        "torch_clip": lambda: torch.nn.utils.clip_grad_norm_(ps, 1e9),
        "clip": lambda: gradstats.clip_grad_norm_(ps, 1e9),
        "total_norm": lambda: gradstats.get_total_norm([p.grad for p in ps]),
        "grad_stats": lambda: gradstats.grad_stats(ps),
    }[fn]
    for _ in range(5):
        setup()
        call()
    benchmark.pedantic(call, setup=setup, rounds=300, warmup_rounds=5)
