"""Collect gradients from what users pass, group them by device, describe them for caches.

Everything here is host-side bookkeeping. It is the only Python work proportional to the
number of tensors on every call, so it is kept to a few C-level ``map`` passes.
"""
from __future__ import annotations

import sys
from operator import attrgetter
from typing import Any, List, Tuple

import torch
from torch import Tensor

from ..backends import native
from ..backends.base import DeviceSlice
from .cache import LRU

_numel = Tensor.numel
_ptr = Tensor.data_ptr
_is_contig = Tensor.is_contiguous
_dtype = attrgetter("dtype")


def is_dtensor(t: Any) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (never imports torch.distributed)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def first_is_dtensor(groups: List[List[Tensor]]) -> bool:
    """Whether the first gradient of ``groups`` is a DTensor (one type check on plain ones).

    The whole call is then handled by :mod:`gradstats.core.reduce`, which rejects a mix
    of DTensor and plain gradients; a DTensor behind a plain first gradient is caught by
    :func:`check_groups` when the gradient set is first validated.
    """
    for grads in groups:
        if grads:
            t = grads[0]
            return type(t) is not Tensor and is_dtensor(t)
    return False


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


def groups_of_params(params_or_groups: Any, traced: bool = False) -> List[List[Tensor]]:
    """The ``.grad`` tensors of ``params_or_groups``, one list per group.

    Accepts a single tensor, an iterable of tensors/parameters (one group), an iterable of
    param-group dicts with a ``"params"`` entry (``optimizer.param_groups``), or one such
    dict (one group).
    Parameters whose ``.grad`` is ``None`` are skipped.

    With ``traced=True`` (under ``torch.compile``) the gradients are read in Python only.

    Raises:
        TypeError: an element is neither a tensor nor a param-group dict.
    """
    if isinstance(params_or_groups, Tensor):
        g = params_or_groups.grad
        return [[] if g is None else [_check_grad(g, "params_or_groups.grad")]]
    if isinstance(params_or_groups, dict):  # one param-group dict: one group
        params_or_groups = [params_or_groups]
    items = list(params_or_groups)
    if items and isinstance(items[0], dict):
        out = []
        for i, group in enumerate(items):
            if not isinstance(group, dict) or "params" not in group:
                raise TypeError(f"params_or_groups[{i}] must be a param-group dict with a "
                                f"'params' entry, got {type(group).__name__}")
            ps = group["params"]
            ps = [ps] if isinstance(ps, Tensor) else list(ps)
            out.append(_grads_of(ps, f"params_or_groups[{i}]['params']", traced))
        return out
    return [_grads_of(items, "params_or_groups", traced)]


def _grads_of(params: List[Any], what: str, traced: bool = False) -> List[Tensor]:
    try:
        if traced:
            return [p.grad for p in params if p.grad is not None]
        return grads_of(params)
    except AttributeError:  # an element without .grad: name it
        for p in params:
            if not isinstance(p, Tensor):
                raise TypeError(f"{what} must contain tensors or parameters, "
                                f"got {type(p).__name__}") from None
        raise


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


def local_groups(groups: List[List[Tensor]], what: str = "gradients") -> List[List[Tensor]]:
    """The local shards of DTensor gradients (plain tensors are an error), per group."""
    out = []
    for grads in groups:
        loc = []
        for g in grads:
            if type(g) is Tensor or not is_dtensor(g):
                raise TypeError(f"{what}: got a mix of DTensor and plain torch.Tensor "
                                "gradients; all gradients of one call must be DTensors on "
                                "one device mesh, or all plain tensors")
            loc.append(g._local_tensor if hasattr(g, "_local_tensor") else g.to_local())
        out.append(loc)
    return out


def check_groups(groups: List[List[Tensor]], what: str) -> None:
    """Validate dtypes/layouts (run once per new set of gradients, see :func:`slices`)."""
    for grads in groups:
        for g in grads:
            if not isinstance(g, Tensor) or not g.is_floating_point() or g.is_complex() \
                    or g.layout != torch.strided:
                _check_grad(g, what)
            if type(g) is not Tensor and is_dtensor(g):
                raise TypeError(f"{what}: got a mix of plain torch.Tensor and DTensor "
                                "gradients; all gradients of one call must be DTensors on "
                                "one device mesh, or all plain tensors")


class Key:
    """A hashable description of a call's gradients with its hash computed once.

    Caches (plans, numel tensors, validation) look it up several times per call; a plain
    tuple of ~150-element tuples would be re-hashed every time.
    """

    __slots__ = ("t", "h")

    def __init__(self, t: tuple) -> None:
        self.t = t
        self.h = hash(t)

    def __hash__(self) -> int:
        return self.h

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Key) and self.h == other.h and self.t == other.t

    def __repr__(self) -> str:
        return f"Key(hash={self.h})"


_VALIDATED: "LRU[bool]" = LRU(64, "validated gradient sets")
_DEVICE = attrgetter("device")


_NATIVE: dict = {}


def _native(name: str):
    """``gradstats._C.<name>`` when the extension is built and allowed, else ``None``.

    The extension is loaded by :func:`gradstats.backends.native.extension`, which honours
    ``GRADSTATS_NO_EXT=1``; the lookup is done once per name.
    """
    if name not in _NATIVE:
        ext = native.extension()
        _NATIVE[name] = None if ext is None else getattr(ext, name, None)
    return _NATIVE[name]


def _native_describe():
    """``gradstats._C.describe`` (C++: structure key + pointers, ~20 ns per tensor) or
    ``None``."""
    return _native("describe")


_GRAD = attrgetter("grad")


def grads_of(params: List[Any]) -> List[Tensor]:
    """The non-``None`` ``.grad`` of ``params`` (a list), in order.

    Read in C++ when the extension is built and every element is a plain tensor or
    ``nn.Parameter`` (~15 ns each instead of ~70 ns); otherwise in Python.
    """
    fn = _native("grads_of")
    if fn is not None:
        out = fn(params)
        if out is not None:
            return out
    return [g for g in map(_GRAD, params) if g is not None]


def params_and_grads(params: Any) -> Tuple[List[Tensor], List[Tensor]]:
    """(the parameters of ``params`` that have a ``.grad``, their gradients), in order.

    One C++ pass when the extension is built and every element is a plain tensor or
    ``nn.Parameter``; otherwise Python.
    """
    fn = _native("params_and_grads")
    if fn is not None and type(params) is list:
        out = fn(params)
        if out is not None:
            return out
    ps = [p for p in params if p.grad is not None]
    return ps, [p.grad for p in ps]


def _describe(flat: List[Tensor], sizes: tuple) -> Tuple[tuple, tuple, tuple]:
    """(devices, structure key tuple, data pointers) of the flat tensor list: a few C-level
    passes, no Python loop. The key holds everything a kernel plan depends on except the
    addresses (their alignment class, ``address % 16``, is in it)."""
    devs = tuple(map(_DEVICE, flat))
    ptrs = tuple(map(_ptr, flat))
    contig = tuple(map(_is_contig, flat))
    t = (sizes, devs, tuple(map(_numel, flat)), tuple(map(_dtype, flat)), contig,
         tuple(p & 15 for p in ptrs))
    if not all(contig):
        t += (tuple(g.stride() for g in flat), tuple(g.shape for g in flat))
    return devs, t, ptrs


def slices(groups: List[List[Tensor]], what: str = "gradients"
           ) -> Tuple[List[DeviceSlice], List[Tensor]]:
    """Split a call's gradients into one :class:`DeviceSlice` per device.

    Validates the gradients the first time a given set is seen (cached by key).
    DTensor gradients stand for their local shards here (for the scale passes; the
    statistics of DTensors go through :mod:`gradstats.core.reduce`, which reduces them).

    Returns:
        (slices in order of first appearance, the flat tensor list in parameter order)

    Raises:
        TypeError: a gradient is not a floating-point strided tensor.
    """
    G = len(groups)
    flat: List[Tensor] = groups[0] if G == 1 else [g for grads in groups for g in grads]
    if not flat:
        return [], flat
    if type(flat[0]) is not Tensor and is_dtensor(flat[0]):
        groups = local_groups(groups, what)
        flat = groups[0] if G == 1 else [g for grads in groups for g in grads]
    sizes = tuple(map(len, groups))
    fn = _native_describe()
    fast = fn(flat if type(flat) is list else list(flat)) if fn is not None else None
    if fast is not None and fast[2]:  # one device: the packed bytes are the whole key
        devs = None
        key = Key((sizes, fast[0]))
        ptrs: Any = fast[1]
    else:
        try:
            devs, t, ptrs = _describe(flat, sizes)
        except Exception:
            check_groups(groups, what)  # raises the precise error (e.g. sparse tensors)
            raise
        key = Key(t)
    if _VALIDATED.get(key) is None:
        check_groups(groups, what)
        _VALIDATED.put(key, True)
    if devs is None or devs.count(devs[0]) == len(devs):
        return [DeviceSlice(flat[0].device, flat, None, G, None, key, sizes, ptrs)], flat
    if any(d.type == "meta" for d in devs):
        raise NotImplementedError(
            f"{what}: gradients on the meta device mixed with gradients on other devices "
            f"({', '.join(sorted({str(d) for d in devs}))}); a meta tensor has no data to "
            "combine with the others (torch raises for this too): compute the statistics "
            "of the meta gradients in a call of their own")
    group_of = [gi for gi, n in enumerate(sizes) for _ in range(n)]
    if isinstance(ptrs, (bytes, bytearray)):
        import numpy as np
        ptrs = tuple(np.frombuffer(ptrs, dtype=np.int64).tolist())
    out = []
    for dev in dict.fromkeys(devs):
        idx = [i for i, d in enumerate(devs) if d == dev]
        ts = [flat[i] for i in idx]
        out.append(DeviceSlice(ts[0].device, ts, [group_of[i] for i in idx], G, idx,
                               Key((key.t, dev)), None, tuple(ptrs[i] for i in idx)))
    return out, flat
