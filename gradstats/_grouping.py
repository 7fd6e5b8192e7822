"""Collect gradients from what users pass, group them by device, describe them for caches.

Everything here is host-side bookkeeping. It is the only Python work proportional to the
number of tensors on every call, so it is kept to a few C-level ``map`` passes.
"""
from __future__ import annotations

from operator import attrgetter
from typing import Any, Iterable, List, Sequence, Tuple

import torch
from torch import Tensor

from .backends.base import DeviceSlice

_numel = Tensor.numel
_ptr = Tensor.data_ptr
_is_contig = Tensor.is_contiguous
_dtype = attrgetter("dtype")


def _check_grad(t: Any, what: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_sparse or t.layout != torch.strided:
        raise TypeError(f"{what}: sparse or non-strided gradients (layout={t.layout}) are not "
                        "supported; densify them first")
    if t.is_complex():
        raise TypeError(f"{what}: complex gradients (dtype={t.dtype}) are not supported; "
                        "pass torch.view_as_real(grad) instead")
    if not t.is_floating_point():
        raise TypeError(f"{what}: gradients must be floating point, got dtype={t.dtype}")
    return t


def groups_of_params(params_or_groups: Any) -> List[List[Tensor]]:
    """The ``.grad`` tensors of ``params_or_groups``, one list per group.

    Accepts a single tensor, an iterable of tensors/parameters (one group), or an iterable
    of param-group dicts with a ``"params"`` entry (``optimizer.param_groups``).
    Parameters whose ``.grad`` is ``None`` are skipped.

    Raises:
        TypeError: an element is neither a tensor nor a param-group dict.
    """
    if isinstance(params_or_groups, Tensor):
        g = params_or_groups.grad
        return [[] if g is None else [_check_grad(g, "params_or_groups.grad")]]
    items = list(params_or_groups)
    if items and isinstance(items[0], dict):
        out = []
        for i, group in enumerate(items):
            if not isinstance(group, dict) or "params" not in group:
                raise TypeError(f"params_or_groups[{i}] must be a param-group dict with a "
                                f"'params' entry, got {type(group).__name__}")
            ps = group["params"]
            ps = [ps] if isinstance(ps, Tensor) else list(ps)
            out.append(_grads_of(ps, f"params_or_groups[{i}]['params']"))
        return out
    return [_grads_of(items, "params_or_groups")]


def _grads_of(params: Sequence[Any], what: str) -> List[Tensor]:
    grads = []
    for p in params:
        if not isinstance(p, Tensor):
            raise TypeError(f"{what} must contain tensors or parameters, got {type(p).__name__}")
        g = p.grad
        if g is not None:
            grads.append(g)
    return grads


def groups_of_tensors(tensors_or_groups: Any, what: str = "tensors") -> List[List[Tensor]]:
    """Like :func:`groups_of_params` but the tensors *are* the gradients."""
    if isinstance(tensors_or_groups, Tensor):
        return [[tensors_or_groups]]
    items = list(tensors_or_groups)
    if items and all(isinstance(x, (list, tuple)) for x in items):
        return [list(x) for x in items]
    for x in items:
        if not isinstance(x, Tensor):
            raise TypeError(f"{what} must contain tensors, got {type(x).__name__}")
    return [items]


def check_groups(groups: List[List[Tensor]], what: str) -> None:
    """Validate dtypes/layouts once per call (cheap attribute reads)."""
    for grads in groups:
        for g in grads:
            if not (g.is_floating_point() and g.layout == torch.strided) or g.is_complex():
                _check_grad(g, what)


def slices(groups: List[List[Tensor]]) -> Tuple[List[DeviceSlice], List[Tensor]]:
    """Split a call's gradients into one :class:`DeviceSlice` per device.

    Returns:
        (slices in order of first appearance, the flat tensor list in parameter order)
    """
    flat: List[Tensor] = []
    group_of: List[int] = []
    for gi, grads in enumerate(groups):
        flat.extend(grads)
        group_of.extend([gi] * len(grads))
    G = len(groups)
    if not flat:
        return [], flat
    dev0 = flat[0].device
    devices = set(map(attrgetter("device"), flat))
    if len(devices) == 1:
        return [DeviceSlice(dev0, flat, group_of, G, list(range(len(flat))),
                            _key(flat, group_of, dev0))], flat
    order = [dev0] + [d for d in dict.fromkeys(t.device for t in flat) if d != dev0]
    out = []
    for dev in order:
        idx = [i for i, t in enumerate(flat) if t.device == dev]
        ts = [flat[i] for i in idx]
        go = [group_of[i] for i in idx]
        out.append(DeviceSlice(dev, ts, go, G, idx, _key(ts, go, dev)))
    return out, flat


def _key(ts: List[Tensor], group_of: List[int], device: torch.device) -> tuple:
    """Hashable description: equal keys <=> same memory regions, sizes, dtypes, layouts."""
    contig = tuple(map(_is_contig, ts))
    key = (device, tuple(map(_ptr, ts)), tuple(map(_numel, ts)), tuple(map(_dtype, ts)),
           contig, tuple(group_of))
    if not all(contig):
        key += (tuple(t.stride() for t in ts), tuple(t.shape for t in ts))
    return key
