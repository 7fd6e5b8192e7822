"""``grad_stats``: every gradient statistic in one fused pass; results stay on the device."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Union

import torch
from torch import Tensor

from ..backends import registry
from ..backends.base import DeviceSlice, FinalStats, Partials, finalize
from . import grouping, reduce
from .cache import LRU, device_tensor
from .traced import is_tracing, stats_traced

_ParamsOrGroups = Union[Tensor, Iterable[Tensor], Iterable[Dict[str, Any]]]


@dataclass
class GradStats:
    """Statistics of one call, as device tensors (no host sync until you ask).

    Attributes:
        norm: float32 [G], per-group norm of order ``norm_type``.
        total_norm: float32 0-dim, the norm over all groups.
        max_abs: float32 [G], largest ``|g|`` among the group's finite elements (0 if none).
        nonfinite: int64 [G], number of NaN or +-Inf elements.
        numel: int64 [G], number of gradient elements.
        per_tensor_norm: float32 [T] in parameter order, or ``None`` unless requested.
        norm_type: the order of the norms.
    """

    norm: Tensor
    total_norm: Tensor
    max_abs: Tensor
    nonfinite: Tensor
    numel: Tensor
    per_tensor_norm: Optional[Tensor] = None
    norm_type: float = 2.0

    @property
    def num_groups(self) -> int:
        return int(self.norm.numel())

    def to_dict(self) -> Dict[str, Any]:
        """All statistics as plain Python values, with one device->host transfer.

        Returns:
            dict with ``norm``, ``max_abs``, ``nonfinite``, ``numel`` (lists, one entry
            per group), ``total_norm`` (float), ``per_tensor_norm`` (list or None) and
            ``norm_type``.
        """
        f32 = [self.norm, self.max_abs, self.total_norm.reshape(1)]
        if self.per_tensor_norm is not None:
            f32.append(self.per_tensor_norm)
        ints = torch.cat([self.nonfinite, self.numel]).to(torch.float64)
        # one packed float64 buffer: counts up to 2**53 are exact.
        packed = torch.cat([t.to(torch.float64) for t in f32] + [ints]).cpu().tolist()
        G = self.num_groups
        out: Dict[str, Any] = {
            "norm": packed[0:G],
            "max_abs": packed[G:2 * G],
            "total_norm": packed[2 * G],
            "norm_type": self.norm_type,
        }
        off = 2 * G + 1
        if self.per_tensor_norm is not None:
            T = self.per_tensor_norm.numel()
            out["per_tensor_norm"] = packed[off:off + T]
            off += T
        else:
            out["per_tensor_norm"] = None
        out["nonfinite"] = [int(v) for v in packed[off:off + G]]
        out["numel"] = [int(v) for v in packed[off + G:off + 2 * G]]
        return out


def check_norm_type(norm_type: Any) -> float:
    """``float(norm_type)``, validated: p > 0 or ``inf``.

    Raises:
        ValueError: ``norm_type`` is not a number > 0 (``'inf'`` strings are accepted).
    """
    try:
        p = float(norm_type)
    except (TypeError, ValueError):
        raise ValueError(f"norm_type must be a number > 0 or inf, got {norm_type!r}") from None
    if not (p > 0):  # also rejects NaN
        raise ValueError(f"norm_type must be > 0 or inf, got {norm_type!r}")
    return p


_NUMEL_CACHE: "LRU[Tensor]" = LRU(64, "element counts")


def numel_tensor(groups: List[List[Tensor]], slices: List[DeviceSlice],
                 device: torch.device) -> Tensor:
    """int64 [G] element counts of ``groups`` on ``device``, cached by structure (made
    without a host sync)."""
    key = (device, slices[0].key if len(slices) == 1 else tuple(s.key for s in slices))
    t = _NUMEL_CACHE.get(key)
    if t is None:
        vals = [sum(g.numel() for g in grads) for grads in groups]
        t = _NUMEL_CACHE.put(key, device_tensor(vals, torch.int64, device))
    return t


def _empty_stats(G: int, norm_type: float, per_tensor: bool) -> GradStats:
    z = torch.zeros(G, dtype=torch.float32)
    return GradStats(norm=z, total_norm=torch.tensor(0.0), max_abs=z.clone(),
                     nonfinite=torch.zeros(G, dtype=torch.int64),
                     numel=torch.zeros(G, dtype=torch.int64),
                     per_tensor_norm=torch.zeros(0) if per_tensor else None,
                     norm_type=norm_type)


def compute_groups(groups: List[List[Tensor]], norm_type: float = 2.0, per_tensor: bool = False,
                   backend: Optional[str] = None, full: bool = True,
                   max_norm: Optional[float] = None, pp_group: Any = None):
    """Statistics of gradient tensors given as groups (internal entry point).

    DTensor gradients (FSDP2, tensor parallel) and calls with a ``pp_group`` (pipeline
    parallel) are reduced across ranks by :mod:`gradstats.core.reduce`; the results are
    the global statistics, identical on every rank.

    Returns:
        ``(GradStats, clip_coef or None, device slices)``. With ``full=False`` the
        ``max_abs``/``nonfinite`` fields may be ``None`` (norms only: the clipping path).
    """
    G = len(groups)
    if pp_group is not None or grouping.first_is_dtensor(groups):
        fin, numel, slices = reduce.reduce_groups(groups, norm_type, per_tensor, backend,
                                                  full, pp_group)
        fin = FinalStats(norm=fin.norm.to(torch.float32),
                         total_norm=fin.total_norm.to(torch.float32),
                         max_abs=None if fin.max_abs is None else fin.max_abs.to(torch.float32),
                         nonfinite=fin.nonfinite,
                         per_tensor_norm=(None if fin.per_tensor_norm is None
                                          else fin.per_tensor_norm.to(torch.float32)))
        return _result(fin, numel, per_tensor, norm_type, max_norm, slices)
    slices, flat = grouping.slices(groups)
    if not slices:
        return _empty_stats(G, norm_type, per_tensor), None, slices
    if len(slices) == 1:
        s = slices[0]
        parts = registry.select(s, norm_type, backend).compute(s, norm_type, per_tensor, full,
                                                                max_norm)
        fin = parts.final or finalize(parts, norm_type, per_tensor)
        numel = numel_tensor(groups, slices, s.device)
    else:
        fin = _multi_device(slices, len(flat), norm_type, per_tensor, backend, full)
        numel = numel_tensor(groups, slices, slices[0].device)
    return _result(fin, numel, per_tensor, norm_type, max_norm, slices)


def _result(fin: FinalStats, numel: Tensor, per_tensor: bool, norm_type: float,
            max_norm: Optional[float], slices: List[DeviceSlice]):
    coef = None
    if max_norm is not None:
        coef = fin.clip_coef
        if coef is None:
            coef = torch.clamp(max_norm / (fin.total_norm + 1e-6), max=1.0)
    st = GradStats(norm=fin.norm, total_norm=fin.total_norm, max_abs=fin.max_abs,
                   nonfinite=fin.nonfinite, numel=numel,
                   per_tensor_norm=fin.per_tensor_norm if per_tensor else None,
                   norm_type=norm_type)
    return st, coef, slices


def _multi_device(slices: List[DeviceSlice], T: int, norm_type: float, per_tensor: bool,
                  backend: Optional[str], full: bool) -> FinalStats:
    """Combine per-device partials on the first device (as torch does for its norms)."""
    dev0 = slices[0].device
    parts: List[Partials] = []
    for s in slices:
        parts.append(registry.select(s, norm_type, backend).compute(s, norm_type, per_tensor,
                                                                     full, None))
    inf = math.isinf(norm_type)
    accs = torch.stack([p.acc.to(dev0) for p in parts])
    acc = accs.amax(0) if inf else accs.sum(0)
    comb = Partials(acc=acc)
    if full and all(p.n_nan is not None for p in parts):
        comb.max_abs = torch.stack([p.max_abs.to(dev0) for p in parts]).amax(0)
        comb.n_nan = torch.stack([p.n_nan.to(dev0) for p in parts]).sum(0)
        comb.n_inf = torch.stack([p.n_inf.to(dev0) for p in parts]).sum(0)
    if per_tensor:
        t_acc = torch.empty(T, dtype=torch.float32, device=dev0)
        t_nan = torch.zeros(T, dtype=torch.int64, device=dev0)
        t_inf = torch.zeros(T, dtype=torch.int64, device=dev0)
        for s, p in zip(slices, parts):
            idx = torch.tensor(s.index, device=dev0)
            if p.t_acc is not None:
                t_acc[idx] = p.t_acc.to(dev0)
                if p.t_nan is not None:
                    t_nan[idx] = p.t_nan.to(dev0)
                    t_inf[idx] = p.t_inf.to(dev0)
            else:  # backend finalized itself: per-tensor norms -> raw accumulators
                ptn = p.final.per_tensor_norm.to(dev0)
                t_acc[idx] = ptn if (inf or norm_type == 1.0) else ptn.pow(norm_type)
        comb.t_acc, comb.t_nan, comb.t_inf = t_acc, t_nan, t_inf
    return finalize(comb, norm_type, per_tensor)


def grad_stats(params_or_groups: _ParamsOrGroups, norm_type: float = 2.0,
               per_tensor: bool = False, backend: Optional[str] = None,
               pp_group: Any = None) -> GradStats:
    r"""Per-group gradient statistics in one fused pass over all gradients.

    Computes, for each parameter group, the norm of order ``norm_type``, the largest
    absolute finite value, the number of NaN/Inf elements and the element count, plus the
    norm over all groups and (optionally) each tensor's norm. Nothing waits for the
    device: the results are device tensors; call :meth:`GradStats.to_dict` to read them.

    Args:
        params_or_groups: a tensor, an iterable of tensors/parameters (one group), or a
            list of param-group dicts such as ``optimizer.param_groups`` (one group each).
            The ``.grad`` of each parameter is used; parameters without one are ignored.
        norm_type: order ``p`` of the norms, ``> 0`` or ``inf``. Default: 2.0.
        per_tensor: also return each gradient's norm, in parameter order.
        backend: ``"triton"``, ``"native"``, ``"torch"`` or ``None`` (best available;
            the ``GRADSTATS_BACKEND`` environment variable also forces one).
        pp_group: pipeline parallelism: the process group (or 1-D device mesh) across
            which each stage's statistics are combined. DTensor gradients (FSDP2, tensor
            parallel) are reduced across their mesh without it; DDP needs nothing.

    Returns:
        GradStats: norms and counts as device tensors on the first gradient's device
        (for DTensor gradients: plain tensors holding the global values, on every rank).

    Raises:
        ValueError: invalid ``norm_type`` or ``backend``.
        TypeError: an element is not a tensor/parameter/param-group dict, or a gradient is
            sparse, complex or not floating point.
        gradstats.BackendUnavailableError: the forced backend cannot run on these gradients.

    Example::

        >>> model = torch.nn.Linear(4, 2)
        >>> model(torch.randn(8, 4)).sum().backward()
        >>> st = gradstats.grad_stats(model.parameters())
        >>> st.norm.shape, st.nonfinite.dtype
        (torch.Size([1]), torch.int64)
    """
    p = check_norm_type(norm_type)
    if pp_group is None and is_tracing():  # torch.compile: custom ops, no caches
        groups = grouping.groups_of_params(params_or_groups, traced=True)
        with torch.no_grad():
            norm, total, max_abs, nonfinite, ptn, _ = stats_traced(groups, p, per_tensor)
        numel = torch.tensor([sum(g.numel() for g in gs) for gs in groups],
                             dtype=torch.int64, device=norm.device)
        return GradStats(norm=norm, total_norm=total, max_abs=max_abs, nonfinite=nonfinite,
                         numel=numel, per_tensor_norm=ptn, norm_type=p)
    groups = grouping.groups_of_params(params_or_groups)
    with torch.no_grad():
        st, _, _ = compute_groups(groups, p, per_tensor, backend, full=True,
                                  pp_group=pp_group)
    return st
