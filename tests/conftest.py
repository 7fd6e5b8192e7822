"""Shared fixtures. On a machine without CUDA, Triton kernels run under the interpreter."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from gradstats.backends import registry as _dispatch  # noqa: E402


def available_backends():
    """Backends that can run on the CPU tensors these tests use.

    Triton runs on CPU tensors only under its interpreter (set above when there is no GPU);
    on a GPU machine its kernels are checked on CUDA tensors by benchmarks/gpu_check.py.
    """
    out = []
    for name in ("torch", "triton", "native"):
        if name == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
            continue
        if _dispatch.unavailable_reason(name) is None:
            out.append(name)
    return out


@pytest.fixture(params=available_backends())
def backend(request):
    return request.param


@pytest.fixture(autouse=True)
def _no_env_backend(monkeypatch):
    monkeypatch.delenv("GRADSTATS_BACKEND", raising=False)


@pytest.fixture(autouse=True)
def _cuda_sync_mode_restored():
    """A CUDA test that turns on sync debugging never leaks it into the next test."""
    yield
    if torch.cuda.is_available() and torch.cuda.get_sync_debug_mode() != 0:
        torch.cuda.set_sync_debug_mode(0)


@pytest.fixture
def one_thread():
    """Tiny models: one intra-op thread is fastest, and steady when the CPU is shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_grads(shapes, dtype=torch.float32, seed=0, scale=1.0, noncontig=False):
    """Random gradient tensors of the given shapes (never all zeros)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, s in enumerate(shapes):
        if noncontig and len(s) == 2 and i % 2 == 0:
            t = (torch.randn(s[1], s[0], generator=g) * scale).to(dtype).t()
        elif noncontig and len(s) == 1 and i % 2 == 0:
            t = (torch.randn(s[0] * 2, generator=g) * scale).to(dtype)[::2]
        else:
            t = (torch.randn(*s, generator=g) * scale).to(dtype)
        out.append(t)
    return out


def params_with_grads(shapes, dtype=torch.float32, seed=0, scale=1.0, noncontig=False,
                      none_every=0):
    grads = make_grads(shapes, dtype, seed, scale, noncontig)
    ps = []
    for i, gr in enumerate(grads):
        p = torch.nn.Parameter(torch.zeros(gr.shape, dtype=dtype))
        if not (none_every and i % none_every == none_every - 1):
            p.grad = gr
        ps.append(p)
    return ps
