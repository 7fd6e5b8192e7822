"""The path taken while ``torch.compile`` traces a call (Dynamo): custom ops, no caches.

Inside a traced function the host-side machinery of the eager path — structure keys,
C++ helpers that read Python objects, plan caches, host shortcuts that read a CPU value —
cannot be traced. This path computes the same statistics with what Dynamo understands:

* CPU gradients with the compiled extension: the registered custom ops
  ``torch.ops.gradstats.stats`` / ``scale_`` (schemas + fake kernels; one op each);
* everything else: plain torch ops (per-tensor norms accumulated in float32, or float64
  for float64 gradients, as torch's own ``clip_grad_norm_`` compiles).

The results follow the same numerics contract as the eager path (NaN/Inf propagation,
max-abs over finite elements, float32 statistics for 16-bit gradients).
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ..backends import native

__all__ = ["is_tracing", "stats_traced", "scale_traced"]

_F32 = torch.float32


def is_tracing() -> bool:
    """Whether ``torch.compile`` (Dynamo) is tracing the current call."""
    fn = getattr(torch.compiler, "is_compiling", None)
    return bool(fn()) if fn is not None else False


def _native_ok(grads: List[Tensor]) -> bool:
    return (native.extension() is not None and all(g.device.type == "cpu" for g in grads)
            and all(g.dtype in (torch.float32, torch.bfloat16, torch.float16) for g in grads))


def _bounds(groups: List[List[Tensor]]) -> List[int]:
    b = [0]
    for g in groups:
        b.append(b[-1] + len(g))
    return b


def stats_traced(groups: List[List[Tensor]], p: float, per_tensor: bool,
                 max_norm: Optional[float] = None
                 ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """(norm [G], total, max_abs [G], nonfinite [G], per-tensor norms or None, clip coef or
    None) of the gradients, traceable."""
    flat = [g for gs in groups for g in gs]
    if flat and _native_ok(flat):
        (_, max_abs, _, _, _, _, _, norm, total, nonfinite, ptn,
         coef) = torch.ops.gradstats.stats(flat, _bounds(groups), float(p),
                                           None if max_norm is None else float(max_norm))
        return (norm, total, max_abs, nonfinite, ptn if per_tensor else None,
                coef if max_norm is not None else None)
    out_dt = torch.float64 if any(g.dtype == torch.float64 for g in flat) else _F32
    dev = flat[0].device if flat else torch.device("cpu")
    inf = math.isinf(p)
    accs, maxes, nfs, tnorms = [], [], [], []
    for gs in groups:
        a_list, m_list, n_list = [], [], []
        for g in gs:
            x = g.reshape(-1).to(out_dt)
            ax = x.abs()
            fin = ax < math.inf
            fx = torch.where(fin, ax, torch.zeros((), dtype=out_dt, device=dev))
            tn = torch.linalg.vector_norm(x, p) if x.numel() else x.new_zeros(())
            tnorms.append(tn)
            a_list.append(tn if inf else tn.pow(p))
            m_list.append(fx.amax() if x.numel() else x.new_zeros(()))
            n_list.append((~fin).sum())
        if a_list:
            acc = torch.stack(a_list)
            accs.append(acc.amax() if inf else acc.sum())
            maxes.append(torch.stack(m_list).amax())
            nfs.append(torch.stack(n_list).sum())
        else:
            accs.append(torch.zeros((), dtype=out_dt, device=dev))
            maxes.append(torch.zeros((), dtype=out_dt, device=dev))
            nfs.append(torch.zeros((), dtype=torch.int64, device=dev))
    acc = torch.stack(accs)
    norm = acc if inf else acc.pow(1.0 / p)
    tot = acc.amax() if inf else acc.sum().pow(1.0 / p)
    ptn = torch.stack(tnorms) if (per_tensor and tnorms) else None
    coef = None
    if max_norm is not None:
        coef = torch.clamp(max_norm / (tot + 1e-6), max=1.0)
    return norm, tot, torch.stack(maxes), torch.stack(nfs), ptn, coef


def scale_traced(grads: List[Tensor], coef: Tensor) -> None:
    """``g *= min(coef, 1)`` in place for every gradient, traceable (no host read)."""
    if not grads:
        return
    if _native_ok(grads):
        torch.ops.gradstats.scale_(grads, [0, len(grads)], coef.to(_F32))
        return
    torch._foreach_mul_(grads, torch.clamp(coef, max=1.0).to(grads[0].device))
