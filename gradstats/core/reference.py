"""THE SPEC: gradient statistics in plain PyTorch, float64, one tensor at a time.

Every backend is tested against these functions. They are slow on purpose: no fusion,
no caching, nothing clever, so that they are easy to read and to trust.

Semantics (DESIGN.md §4):

* ``norm[g]``: the p-norm of all gradient elements of group ``g`` viewed as one vector;
  NaN if any element is NaN, else +Inf if any is +-Inf (torch's propagation).
* ``max_abs[g]``: the largest ``|x|`` among the *finite* elements (0 if there is none).
* ``nonfinite[g]``: number of NaN or +-Inf elements. ``numel[g]``: number of elements.
* ``total_norm``: the p-norm over all groups.
* ``per_tensor_norm``: the p-norm of each gradient, in parameter order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import Tensor


@dataclass
class RefStats:
    """Reference results as float64 / int64 CPU tensors."""

    norm: Tensor
    total_norm: Tensor
    max_abs: Tensor
    nonfinite: Tensor
    numel: Tensor
    per_tensor_norm: Tensor


def ref_tensor_norm(g: Tensor, norm_type: float) -> Tensor:
    """p-norm of one tensor in float64 (``torch.linalg.vector_norm`` semantics)."""
    x = g.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
    if x.numel() == 0:
        return torch.zeros((), dtype=torch.float64)
    return torch.linalg.vector_norm(x, norm_type)


def _norm_of_norms(norms: List[Tensor], norm_type: float) -> Tensor:
    if not norms:
        return torch.zeros((), dtype=torch.float64)
    return torch.linalg.vector_norm(torch.stack(norms), norm_type)


def ref_grad_stats(groups: List[List[Tensor]], norm_type: float = 2.0) -> RefStats:
    """Reference statistics of gradient tensors given as a list of groups.

    Args:
        groups: one list of gradient tensors per group (any device, floating dtype).
        norm_type: order ``p`` of the norm (``inf`` allowed).

    Returns:
        :class:`RefStats` with float64/int64 CPU tensors.
    """
    norm_type = float(norm_type)
    norms, maxes, nonfin, numels, per_tensor, group_norms = [], [], [], [], [], []
    for grads in groups:
        tn = [ref_tensor_norm(g, norm_type) for g in grads]
        per_tensor.extend(tn)
        group_norms.append(_norm_of_norms(tn, norm_type))
        m, nf, n = 0.0, 0, 0
        for g in grads:
            x = g.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
            fin = torch.isfinite(x)
            nf += int((~fin).sum())
            n += x.numel()
            if bool(fin.any()):
                m = max(m, float(x[fin].abs().max()))
        maxes.append(m)
        nonfin.append(nf)
        numels.append(n)
    norms = group_norms
    total = _norm_of_norms(norms, norm_type)
    return RefStats(
        norm=torch.stack(norms) if norms else torch.zeros(0, dtype=torch.float64),
        total_norm=total,
        max_abs=torch.tensor(maxes, dtype=torch.float64),
        nonfinite=torch.tensor(nonfin, dtype=torch.int64),
        numel=torch.tensor(numels, dtype=torch.int64),
        per_tensor_norm=(torch.stack(per_tensor) if per_tensor
                         else torch.zeros(0, dtype=torch.float64)),
    )


def ref_clip_coef(total_norm: Tensor, max_norm: float) -> Tensor:
    """torch's clipping coefficient ``min(max_norm / (total + 1e-6), 1)`` (NaN stays NaN)."""
    return torch.clamp(max_norm / (total_norm.double() + 1e-6), max=1.0)


def rel_err(a: Tensor, b: Tensor) -> float:
    """Largest relative error of ``a`` against ``b`` (NaN/Inf must match exactly)."""
    a = a.detach().double().cpu().reshape(-1)
    b = b.detach().double().cpu().reshape(-1)
    if a.shape != b.shape:
        return math.inf
    if not torch.equal(torch.isnan(a), torch.isnan(b)):
        return math.inf
    fa, fb = torch.isfinite(a), torch.isfinite(b)
    if not torch.equal(fa, fb) or not torch.equal(a[~fa & ~torch.isnan(a)], b[~fb & ~torch.isnan(b)]):
        return math.inf
    if not bool(fa.any()):
        return 0.0
    a, b = a[fa], b[fb]
    denom = b.abs().clamp_min(1e-300)
    err = ((a - b).abs() / denom)
    err = torch.where(b == 0, (a - b).abs(), err)
    return float(err.max())


def max_abs_ok(got: Tensor, ref: Tensor, dtype: Optional[torch.dtype] = None) -> bool:
    """max-abs is an exact element of the input: it must match exactly."""
    return torch.equal(got.detach().double().cpu(), ref.double())
