"""Torch backend: foreach ops on any device. The fallback wherever no fused kernel runs.

Bytes moved: norm-only mode (the clipping drop-ins) reads every gradient once with
``torch._foreach_norm`` (the same pass torch's ``clip_grad_norm_`` makes). Full mode
(max-abs and NaN/Inf counts as well) is several eager passes per tensor: correct, slow;
the Triton and native backends do it in one read.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .base import Backend, DeviceSlice, Partials

_F32 = torch.float32


class _IndexCache:
    """Device index tensors for deterministic per-group reductions (small LRU)."""

    def __init__(self, size: int = 32) -> None:
        self._d: "OrderedDict[tuple, Tuple[Tensor, int]]" = OrderedDict()
        self._size = size

    def get(self, dslice: DeviceSlice) -> Tuple[Tensor, int]:
        device, G = dslice.device, dslice.num_groups
        layout = dslice._sizes if dslice._sizes is not None else tuple(dslice.group_of)
        key = (device, layout, G)
        hit = self._d.get(key)
        if hit is not None:
            self._d.move_to_end(key)
            return hit
        group_of = dslice.group_of
        counts = [0] * G
        pos = []
        width = 1
        for g in group_of:
            counts[g] += 1
        width = max([1] + counts)
        seen = [0] * G
        for g in group_of:
            pos.append(g * width + seen[g])
            seen[g] += 1
        val = (torch.tensor(pos, dtype=torch.long, device=device), width)
        self._d[key] = val
        if len(self._d) > self._size:
            self._d.popitem(last=False)
        return val


_INDEX = _IndexCache()


def group_reduce(vals: Tensor, dslice: DeviceSlice, op: str) -> Tensor:
    """Reduce per-tensor values [T] to per-group [G] in a fixed order (no atomics).

    Scatters into a zero-padded [G, width] matrix (unique indices: deterministic) and
    reduces along rows. ``op`` is ``"sum"`` or ``"max"``; values must be >= 0 (or NaN).
    """
    G = dslice.num_groups
    pos, width = _INDEX.get(dslice)
    pad = torch.zeros(G * width, dtype=vals.dtype, device=vals.device)
    pad.index_copy_(0, pos, vals)
    pad = pad.view(G, width)
    return pad.sum(1) if op == "sum" else pad.amax(1)


def _by_dtype(tensors: List[Tensor]) -> Dict[torch.dtype, List[int]]:
    out: Dict[torch.dtype, List[int]] = {}
    for i, t in enumerate(tensors):
        out.setdefault(t.dtype, []).append(i)
    return out


def _reorder(parts: List[Tuple[List[int], Tensor]], T: int, device, dtype) -> Tensor:
    """Scatter per-bucket values back to tensor order (missing entries are 0)."""
    if len(parts) == 1 and len(parts[0][0]) == T:
        return parts[0][1]
    out = torch.zeros(T, dtype=dtype, device=device)
    for idx, v in parts:
        if idx:
            out[torch.tensor(idx, device=device)] = v
    return out


def _pow_acc(norms: Tensor, p: float) -> Tensor:
    if math.isinf(p) or p == 1.0:
        return norms
    if p == 2.0:
        return norms * norms
    return norms.pow(p)


def _one_tensor_full(g: Tensor, p: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(acc over finite elements, max |x| finite, #nan, #inf) of one tensor, float32/int64."""
    x = g.reshape(-1)
    a = x.abs()
    fin = a < math.inf  # False for NaN and +-Inf
    n_nan = torch.isnan(x).sum()
    n_inf = (~fin).sum() - n_nan
    af = torch.where(fin, a, torch.zeros((), dtype=a.dtype, device=a.device))
    if x.numel() == 0:
        z = torch.zeros((), dtype=_F32, device=x.device)
        return z, z, n_nan, n_inf
    mx = af.amax().to(_F32)
    if math.isinf(p):
        acc = mx
    else:
        acc = _pow_acc(torch.linalg.vector_norm(af, p, dtype=_F32), p)
    return acc, mx, n_nan, n_inf


class TorchBackend(Backend):
    """Reference-backed foreach implementation; runs on every device torch supports."""

    name = "torch"

    def unavailable_reason(self) -> Optional[str]:
        return None

    def unsupported_reasons(self, dslice: DeviceSlice, norm_type: float) -> List[str]:
        if not (norm_type > 0):
            return [f"norm_type={norm_type}: only p > 0 and inf are supported"]
        return []

    def compute(self, dslice: DeviceSlice, norm_type: float, per_tensor: bool,
                full: bool, max_norm: Optional[float] = None) -> Partials:
        ts, dev, T = dslice.tensors, dslice.device, len(dslice.tensors)
        p = float(norm_type)
        if not full:
            parts = []
            for dt, idx in _by_dtype(ts).items():
                # zero-size tensors have norm 0 (torch's inf-norm refuses them)
                idx = [i for i in idx if ts[i].numel() > 0]
                if idx:
                    norms = torch._foreach_norm([ts[i] for i in idx], p, dtype=_F32)
                    parts.append((idx, torch.stack(norms)))
            if len(parts) != 1 or len(parts[0][0]) != T:
                parts.append(([], torch.zeros(0, dtype=_F32, device=dev)))
            t_norm = _reorder(parts, T, dev, _F32)
            t_acc = _pow_acc(t_norm, p)
            acc = group_reduce(t_acc, dslice, "max" if math.isinf(p) else "sum")
            return Partials(acc=acc, t_acc=t_acc if per_tensor else None)
        accs, mxs, nans, infs = [], [], [], []
        for g in ts:
            a, m, n1, n2 = _one_tensor_full(g, p)
            accs.append(a)
            mxs.append(m)
            nans.append(n1)
            infs.append(n2)
        t_acc, t_max = torch.stack(accs), torch.stack(mxs)
        t_nan, t_inf = torch.stack(nans), torch.stack(infs)
        red = "max" if math.isinf(p) else "sum"
        return Partials(
            acc=group_reduce(t_acc, dslice, red),
            max_abs=group_reduce(t_max, dslice, "max"),
            n_nan=group_reduce(t_nan, dslice, "sum"),
            n_inf=group_reduce(t_inf, dslice, "sum"),
            t_acc=t_acc if per_tensor else None,
            t_nan=t_nan if per_tensor else None,
            t_inf=t_inf if per_tensor else None,
        )

    def scale_(self, dslice: DeviceSlice, coef: Tensor) -> None:
        coef = torch.clamp(coef.to(device=dslice.device, dtype=_F32), max=1.0)
        on_cpu = dslice.device.type == "cpu"
        if coef.dim() == 0:
            # Reading a CPU tensor is no device sync: skip the pass when nothing is clipped.
            if on_cpu and bool(coef >= 1.0):
                return
            torch._foreach_mul_(dslice.tensors, coef)
            return
        bounds = dslice.group_bounds
        for g in range(dslice.num_groups):
            sub = dslice.tensors[bounds[g]:bounds[g + 1]]
            if not sub:
                continue
            c = coef[g]
            if on_cpu and bool(c >= 1.0):
                continue
            torch._foreach_mul_(sub, c)
