"""Torch backend: foreach ops on any device. The fallback wherever no fused kernel runs.

Bytes moved: norm-only mode (the clipping drop-ins) reads every gradient once (on CUDA with
``torch._foreach_norm``, the pass torch's ``clip_grad_norm_`` makes; on the CPU with a blocked
float32/float64 reduction, because torch's CPU float32 norm is only ~1e-3 accurate on large
tensors). Full mode adds max-abs and NaN/Inf counts: on the CPU one more read (an inf-norm
pass) and per-tensor counting only for tensors that are not finite; on other devices several
eager passes per tensor (correct, slow: the Triton and native backends do it in one read).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ..core.cache import LRU, device_tensor
from .base import Backend, DeviceSlice, Partials, finalize

_F32 = torch.float32


def _group_index(dslice: DeviceSlice) -> Tuple[Tensor, int]:
    """(position of each tensor in a zero-padded [G, width] matrix, width), cached by the
    group layout (structure only)."""
    device, G = dslice.device, dslice.num_groups
    layout = dslice.group_sizes if dslice.group_sizes is not None else tuple(dslice.group_of)
    key = (device, layout, G)
    hit = _INDEX.get(key)
    if hit is not None:
        return hit
    counts = [0] * G
    for g in dslice.group_of:
        counts[g] += 1
    width = max([1] + counts)
    seen = [0] * G
    pos = []
    for g in dslice.group_of:
        pos.append(g * width + seen[g])
        seen[g] += 1
    return _INDEX.put(key, (device_tensor(pos, torch.long, device), width))


_INDEX: "LRU[Tuple[Tensor, int]]" = LRU(32, "group index tensors")


def group_reduce(vals: Tensor, dslice: DeviceSlice, op: str) -> Tensor:
    """Reduce per-tensor values [T] to per-group [G] in a fixed order (no atomics).

    Scatters into a zero-padded [G, width] matrix (unique indices: deterministic) and
    reduces along rows. ``op`` is ``"sum"`` or ``"max"``; values must be >= 0 (or NaN).
    """
    G = dslice.num_groups
    pos, width = _group_index(dslice)
    pad = torch.zeros(G * width, dtype=vals.dtype, device=vals.device)
    pad.index_copy_(0, pos, vals)
    pad = pad.view(G, width)
    return pad.sum(1) if op == "sum" else pad.amax(1)


def _pow_acc(norms: Tensor, p: float) -> Tensor:
    if math.isinf(p) or p == 1.0:
        return norms
    if p == 2.0:
        return norms * norms
    return norms.pow(p)


#: Row length of the blocked CPU reduction (see :func:`_cpu_pow_sums`).
_ROW = 4096
_F64 = torch.float64


def _trusted_range(p: float) -> Tuple[float, float]:
    """Row p-norms ``r`` whose float32 evaluation is trusted: ``r**p`` in ``[2^-100, 2^100]``.

    Outside it the row's ``|x|**p`` terms come near float32's subnormals (values below
    ~1e-19 for p = 2) or its overflow (above ~1e19): such rows are recomputed in float64.
    """
    return 2.0 ** (-100.0 / p), 2.0 ** (100.0 / p)


def _cpu_pow_sums(ts: List[Tensor], p: float) -> Tensor:
    """Per-tensor ``sum |x|**p`` (float64 [T]) accurate to ~1e-7 on the CPU, at any scale.

    torch's CPU float32 norm of a large tensor is off by up to ~3e-3 (measured on GPT-2's
    embedding gradient), and a float64 norm is ~30x slower. Instead each tensor is viewed
    as rows of ``_ROW`` elements: row norms in float32 (short, accurate), then the rows'
    p-th powers summed in float64. Rows whose float32 norm is outside
    :func:`_trusted_range` (tiny or huge values whose powers under- or overflow float32)
    and that are not all zero are recomputed in float64. float64 tensors are reduced in
    float64 throughout. NaN/Inf propagate as in torch.
    """
    lo, hi = _trusted_range(p)
    out = []
    for g in ts:
        x = g.reshape(-1)
        n = x.numel()
        if n == 0:
            out.append(torch.zeros((), dtype=_F64))
            continue
        if x.dtype == _F64:
            out.append(_pow_acc(torch.linalg.vector_norm(x, p), p))
            continue
        m = n - n % _ROW
        rows = x[:m].view(-1, _ROW) if m else x[:0].view(0, _ROW)
        r = torch.linalg.vector_norm(rows, p, dim=1, dtype=_F32)
        tail = x[m:]
        rt = torch.linalg.vector_norm(tail, p, dtype=_F32).reshape(1)
        r = torch.cat([r, rt]).double()
        # reading CPU values is no device sync: find the rows float32 got wrong
        suspect = ((r < lo) | (r > hi)) & (r == r)
        if bool(suspect.any()):
            r = r.clone()
            for i in suspect.nonzero().flatten().tolist():
                row = rows[i] if i < rows.shape[0] else tail
                if row.numel() == 0 or float(row.abs().amax()) == 0.0:
                    continue  # an empty or all-zero row is exact
                r[i] = torch.linalg.vector_norm(row.double(), p)
        out.append(_pow_acc(r, p).sum())
    return torch.stack(out) if out else torch.zeros(0, dtype=_F64)


def _cpu_max_abs(ts: List[Tensor]) -> Tensor:
    """Per-tensor ``max |x|`` (float64 [T], NaN-propagating) in one read each.

    ``torch.aminmax`` is ~15x faster on the CPU than torch's inf-norm; ``max(-min, max)``
    is exact, and NaN/Inf propagate as in the norm.
    """
    out = []
    for g in ts:
        if g.numel() == 0:
            out.append(torch.zeros((), dtype=_F64))
            continue
        lo, hi = torch.aminmax(g)
        out.append(torch.maximum(-lo, hi).to(_F64))
    return torch.stack(out) if out else torch.zeros(0, dtype=_F64)


def _norm_pass(ts: List[Tensor], p: float, device: torch.device) -> Tensor:
    """One read of every tensor: per-tensor raw accumulators (float64 [T], NaN/Inf kept).

    On the CPU the blocked reduction above; elsewhere each tensor's norm is taken with
    float64 accumulation (``vector_norm(..., dtype=float64)``: exact at any scale, one
    launch per tensor — this backend is the fallback of the fused ones).
    """
    T = len(ts)
    if device.type == "cpu":
        return _cpu_max_abs(ts) if math.isinf(p) else _cpu_pow_sums(ts, p)
    if T == 0:
        return torch.zeros(0, dtype=_F64, device=device)
    out = []
    for g in ts:
        if g.numel() == 0:  # zero-size tensors have norm 0 (torch's inf-norm refuses them)
            out.append(torch.zeros((), dtype=_F64, device=device))
        elif math.isinf(p):
            out.append(torch.linalg.vector_norm(g, p).to(_F64))
        else:
            out.append(torch.linalg.vector_norm(g, p, dtype=_F64))
    return _pow_acc(torch.stack(out), p)


def _one_tensor_full(g: Tensor, p: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(acc over finite elements, max |x| finite, #nan, #inf) of one tensor, float64/int64."""
    x = g.reshape(-1)
    a = x.abs()
    fin = a < math.inf  # False for NaN and +-Inf
    n_nan = torch.isnan(x).sum()
    n_inf = (~fin).sum() - n_nan
    af = torch.where(fin, a, torch.zeros((), dtype=a.dtype, device=a.device))
    if x.numel() == 0:
        z = torch.zeros((), dtype=_F64, device=x.device)
        return z, z, n_nan, n_inf
    mx = af.amax().to(_F64)
    if math.isinf(p):
        acc = mx
    elif x.device.type == "cpu":
        acc = _cpu_pow_sums([af], p)[0]
    else:
        acc = _pow_acc(torch.linalg.vector_norm(af, p, dtype=_F64), p)
    return acc, mx, n_nan, n_inf


def _out_dtype(ts: List[Tensor]) -> torch.dtype:
    """float64 statistics for float64 gradients (as torch), float32 otherwise."""
    return _F64 if any(t.dtype == _F64 for t in ts) else _F32


def _finalized(parts: Partials, p: float, per_tensor: bool, out: torch.dtype) -> Partials:
    """The partials (float64 accumulators) with their final statistics in ``out``."""
    fin = finalize(parts, p, per_tensor)
    if out != _F64:
        fin.norm = fin.norm.to(out)
        fin.total_norm = fin.total_norm.to(out)
        if fin.max_abs is not None:
            fin.max_abs = fin.max_abs.to(out)
        if fin.per_tensor_norm is not None:
            fin.per_tensor_norm = fin.per_tensor_norm.to(out)
    parts.final = fin
    return parts


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
        out = _out_dtype(ts)
        if not full:
            t_acc = _norm_pass(ts, p, dev)
            acc = group_reduce(t_acc, dslice, "max" if math.isinf(p) else "sum")
            return _finalized(Partials(acc=acc, t_acc=t_acc if per_tensor else None), p,
                              per_tensor, out)
        red = "max" if math.isinf(p) else "sum"
        zeros_i = None
        if dev.type == "cpu":
            # Reading CPU values is free: two foreach passes, and the expensive per-tensor
            # NaN/Inf accounting only for the tensors that are not finite.
            t_acc = _norm_pass(ts, p, dev)
            t_max = _norm_pass(ts, math.inf, dev)
            bad = (~torch.isfinite(t_acc) | ~torch.isfinite(t_max)).nonzero().flatten().tolist()
            zeros_i = torch.zeros(T, dtype=torch.int64)
            t_nan, t_inf = zeros_i, zeros_i.clone()
            if bad:
                t_acc, t_max, t_nan = t_acc.clone(), t_max.clone(), zeros_i.clone()
                for i in bad:
                    a, m, n1, n2 = _one_tensor_full(ts[i], p)
                    t_acc[i], t_max[i], t_nan[i], t_inf[i] = a, m, n1, n2
        else:
            accs, mxs, nans, infs = [], [], [], []
            for g in ts:
                a, m, n1, n2 = _one_tensor_full(g, p)
                accs.append(a)
                mxs.append(m)
                nans.append(n1)
                infs.append(n2)
            t_acc, t_max = torch.stack(accs), torch.stack(mxs)
            t_nan, t_inf = torch.stack(nans), torch.stack(infs)
        return _finalized(Partials(
            acc=group_reduce(t_acc, dslice, red),
            max_abs=group_reduce(t_max, dslice, "max"),
            n_nan=group_reduce(t_nan, dslice, "sum"),
            n_inf=group_reduce(t_inf, dslice, "sum"),
            t_acc=t_acc if per_tensor else None,
            t_nan=t_nan if per_tensor else None,
            t_inf=t_inf if per_tensor else None,
        ), p, per_tensor, out)

    def scale_(self, dslice: DeviceSlice, coef: Tensor) -> None:
        # float64 coefficients (of float64 norms) stay float64, as torch's clip
        dt = _F64 if coef.dtype == _F64 else _F32
        coef = torch.clamp(coef.to(device=dslice.device, dtype=dt), max=1.0)
        on_cpu = dslice.device.type == "cpu"
        if coef.dim() == 0:
            # Reading a CPU tensor is no device sync: skip the pass when nothing is clipped.
            if on_cpu and bool(coef >= 1.0):
                return
            _mul_(dslice.tensors, coef, on_cpu)
            return
        bounds = dslice.group_bounds
        for g in range(dslice.num_groups):
            sub = dslice.tensors[bounds[g]:bounds[g + 1]]
            if not sub:
                continue
            c = coef[g]
            if on_cpu and bool(c >= 1.0):
                continue
            _mul_(sub, c, on_cpu)


def _mul_(ts: List[Tensor], c: Tensor, on_cpu: bool) -> None:
    """``t = t * c`` computed in ``c``'s precision and rounded once to ``t``'s dtype.

    On CUDA, torch's ``_foreach_mul_`` by a float32 0-dim tensor takes its slow route for
    16-bit tensors and rounds the coefficient to the tensor's dtype first (a different
    result from the fused kernels and from the CPU); there the 16-bit gradients are
    multiplied in float32 and rounded once.
    """
    if on_cpu:
        torch._foreach_mul_(ts, c)
        return
    low = [t for t in ts if t.dtype in (torch.float16, torch.bfloat16)]
    if len(low) != len(ts):
        torch._foreach_mul_([t for t in ts if t.dtype not in (torch.float16, torch.bfloat16)],
                            c)
    if low:
        wide = [t.float() for t in low]
        torch._foreach_mul_(wide, c.to(_F32))
        torch._foreach_copy_(low, wide)
