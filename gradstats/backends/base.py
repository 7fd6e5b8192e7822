"""The contract between the dispatcher and a statistics backend.

A backend receives a :class:`DeviceSlice` (the gradients of one call that live on one
device, in parameter order, each tagged with its group) and returns :class:`Partials`:
per-group (and optionally per-tensor) raw accumulators.  ``gradstats.core.stats`` turns those
into norms with :func:`finalize`, unless the backend already produced the final values
itself (``Partials.final``), which the Triton backend does inside its finalize kernel.

Semantics of the raw accumulators, for a norm of order ``p``:

* ``acc``: sum of ``|x|**p`` (finite ``p > 0``) or ``max |x|`` (``p = inf``) in float32.
  When ``n_nan``/``n_inf`` are given, elements they count may be left out of ``acc``
  (the finalize rule below restores torch's NaN/Inf propagation); when they are
  ``None``, ``acc`` must already carry NaN/Inf as torch's norm would.
* ``max_abs``: largest ``|x|`` over *finite* elements, 0 if there is none.
* ``n_nan`` / ``n_inf``: int64 counts of NaN and of +-Inf elements.

Finalize rule: ``norm = NaN if n_nan > 0 else (Inf if n_inf > 0 else acc ** (1/p))``.
Groups are reduced in a fixed order, never with float atomics, so results are
bit-identical from call to call.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Hashable, List, Optional, Tuple

import torch
from torch import Tensor


class DeviceSlice:
    """Gradients of one call that live on one device.

    Attributes:
        device: the device all ``tensors`` live on.
        tensors: gradient tensors, in parameter order (groups are contiguous ranges).
        group_of: group index of each tensor (non-decreasing).
        num_groups: number of groups of the whole call (groups may be empty here).
        index: position of each tensor in the call's flat tensor list.
        key: hashable description of the tensors' *structure* (sizes, dtypes, layouts,
            alignment classes, devices, groups — never addresses); equal keys mean a
            cached kernel plan is still valid, whatever the tensors' addresses.
        ptrs: the tensors' data pointers in this call (bytes of int64, or a tuple).
        group_sizes: tensors per group, when the slice holds the whole call.
    """

    __slots__ = ("device", "tensors", "_group_of", "num_groups", "_index", "key", "_sizes",
                 "_ptrs")

    def __init__(self, device: torch.device, tensors: List[Tensor],
                 group_of: Optional[List[int]], num_groups: int,
                 index: Optional[List[int]], key: Hashable = None,
                 group_sizes: Optional[Tuple[int, ...]] = None, ptrs: Any = None) -> None:
        self.device = device
        self.tensors = tensors
        self._group_of = group_of
        self.num_groups = num_groups
        self._index = index
        self.key = key  # None: not cacheable (never cache by id())
        self._sizes = group_sizes
        self._ptrs = ptrs

    @property
    def ptrs(self) -> Any:
        """This call's data pointers: bytes of int64 (from the C++ describe) or a tuple."""
        if self._ptrs is None:
            self._ptrs = tuple(t.data_ptr() for t in self.tensors)
        return self._ptrs

    @property
    def group_sizes(self) -> Optional[Tuple[int, ...]]:
        """Tensors per group (``None`` for a part of a multi-device call)."""
        return self._sizes

    @property
    def group_of(self) -> List[int]:
        if self._group_of is None:
            self._group_of = [g for g, n in enumerate(self._sizes) for _ in range(n)]
        return self._group_of

    @property
    def index(self) -> List[int]:
        if self._index is None:
            self._index = list(range(len(self.tensors)))
        return self._index

    @property
    def group_bounds(self) -> List[int]:
        """``bounds[g]:bounds[g+1]`` is the tensor range of group ``g`` (length G+1)."""
        bounds = [0] * (self.num_groups + 1)
        if self._sizes is not None:
            for g, n in enumerate(self._sizes):
                bounds[g + 1] = bounds[g] + n
            return bounds
        for g in self.group_of:
            bounds[g + 1] += 1
        for g in range(self.num_groups):
            bounds[g + 1] += bounds[g]
        return bounds

    def __repr__(self) -> str:
        return (f"DeviceSlice(device={self.device}, tensors={len(self.tensors)}, "
                f"groups={self.num_groups})")


@dataclass
class FinalStats:
    """Final per-call values a backend may compute itself (single-device calls)."""

    norm: Tensor  # float32 [G]
    total_norm: Tensor  # float32 0-dim
    max_abs: Optional[Tensor]  # float32 [G]
    nonfinite: Optional[Tensor]  # int64 [G]
    per_tensor_norm: Optional[Tensor]  # float32 [T]
    clip_coef: Optional[Tensor] = None  # float32 0-dim, when compute() got max_norm


@dataclass
class Partials:
    """Raw per-group (and per-tensor) accumulators of one :class:`DeviceSlice`."""

    acc: Tensor  # float32 [G]
    max_abs: Optional[Tensor] = None  # float32 [G]
    n_nan: Optional[Tensor] = None  # int64 [G]
    n_inf: Optional[Tensor] = None  # int64 [G]
    t_acc: Optional[Tensor] = None  # float32 [T]
    t_nan: Optional[Tensor] = None  # int64 [T]
    t_inf: Optional[Tensor] = None  # int64 [T]
    final: Optional[FinalStats] = None


class Backend:
    """Interface every statistics backend implements."""

    name: str = "?"

    def unavailable_reason(self) -> Optional[str]:
        """Why this backend cannot run at all in this process, or ``None``."""
        raise NotImplementedError

    def unsupported_reasons(self, dslice: DeviceSlice, norm_type: float) -> List[str]:
        """Why this backend cannot handle this slice (empty list: it can)."""
        raise NotImplementedError

    def compute(self, dslice: DeviceSlice, norm_type: float, per_tensor: bool,
                full: bool, max_norm: Optional[float] = None) -> Partials:
        """One pass over the gradients.

        Args:
            dslice: the gradients.
            norm_type: ``p`` (finite, > 0) or ``inf``.
            per_tensor: also fill ``t_acc``/``t_nan``/``t_inf`` (or ``final.per_tensor_norm``).
            full: ``max_abs``/``n_nan``/``n_inf`` are wanted; with ``False`` a backend may
                return only ``acc`` (with NaN/Inf propagated).
            max_norm: when given, a backend that fills ``final`` also fills
                ``final.clip_coef = clamp(max_norm / (total_norm + 1e-6), max=1)`` with
                NaN propagated (torch's clipping coefficient). Others may ignore it.
        """
        raise NotImplementedError

    def supports_program(self, dslice: DeviceSlice, norm_type: float, prog: Any) -> bool:
        """Whether this backend's ``compute_step`` can run the decision program ``prog``
        (a :class:`gradstats.policies.program.Program`) inside its finalize kernel.

        Backends that can define ``compute_step(dslice, norm_type, per_tensor, prog, *,
        loss, amp_scale, amp_found, has_grads)`` returning an object with ``outf``,
        ``outi`` (the program's output layouts), ``nonfinite`` (int64 [G]) and
        ``per_tensor_norm``. The default: no.
        """
        return False

    def scale_(self, dslice: DeviceSlice, coef: Tensor) -> None:
        """Multiply gradients in place by ``coef`` (float32, 0-dim or [G] per group).

        Where the coefficient is ``>= 1`` the gradients are left untouched (the result is
        bit-identical to multiplying by 1); a NaN coefficient scales (gives NaN), as torch.
        Never synchronises with the device.
        """
        raise NotImplementedError

    def clamp_(self, dslice: DeviceSlice, clip_value: float) -> None:
        """Clamp gradients in place to ``[-clip_value, clip_value]`` (``clip_grad_value_``).

        The result is torch's ``clamp_min_(-clip_value)`` followed by
        ``clamp_max_(clip_value)``, bit for bit: NaN stays NaN, and a negative
        ``clip_value`` sets every other element to ``clip_value``. Never synchronises with
        the device. This default uses torch's foreach kernels once per dtype (two passes);
        a backend may override it with one fused pass.

        Args:
            dslice: the gradients.
            clip_value: the bound, a Python float.
        """
        ts = dslice.tensors
        if len({t.dtype for t in ts}) <= 1:
            runs = [ts] if ts else []
        else:
            by_dtype: dict = {}
            for t in ts:
                by_dtype.setdefault(t.dtype, []).append(t)
            runs = list(by_dtype.values())
        for run in runs:
            torch._foreach_clamp_min_(run, -clip_value)
            torch._foreach_clamp_max_(run, clip_value)


def norm_from_acc(acc: Tensor, norm_type: float) -> Tensor:
    """``acc ** (1/p)`` for the raw accumulator (identity for p = 1 and p = inf)."""
    if math.isinf(norm_type) or norm_type == 1.0:
        return acc
    if norm_type == 2.0:
        return acc.sqrt()
    return acc.pow(1.0 / norm_type)


def apply_nonfinite(norm: Tensor, n_nan: Optional[Tensor], n_inf: Optional[Tensor]) -> Tensor:
    """NaN if any NaN was seen, else +Inf if any Inf, else ``norm`` (torch's propagation)."""
    if n_nan is None:
        return norm
    nan = torch.full_like(norm, float("nan"))
    inf = torch.full_like(norm, float("inf"))
    return torch.where(n_nan > 0, nan, torch.where(n_inf > 0, inf, norm))


def combine_groups(acc: Tensor, norm_type: float) -> Tensor:
    """Reduce [G] raw accumulators to one (sum, or max for p = inf), fixed order."""
    if acc.numel() == 0:
        return torch.zeros((), dtype=acc.dtype, device=acc.device)
    if math.isinf(norm_type):
        return acc.amax()
    return acc.sum()


def finalize(parts: Partials, norm_type: float, per_tensor: bool) -> FinalStats:
    """Turn raw accumulators into final statistics (torch ops on the partials' device)."""
    norm = apply_nonfinite(norm_from_acc(parts.acc, norm_type), parts.n_nan, parts.n_inf)
    total_acc = combine_groups(parts.acc, norm_type)
    if parts.n_nan is not None:
        total = apply_nonfinite(norm_from_acc(total_acc, norm_type),
                                parts.n_nan.sum(), parts.n_inf.sum())
    else:
        total = norm_from_acc(total_acc, norm_type)
    nonfinite = None
    if parts.n_nan is not None:
        nonfinite = parts.n_nan + parts.n_inf
    ptn = None
    if per_tensor and parts.t_acc is not None:
        ptn = apply_nonfinite(norm_from_acc(parts.t_acc, norm_type), parts.t_nan, parts.t_inf)
    return FinalStats(norm=norm, total_norm=total, max_abs=parts.max_abs,
                      nonfinite=nonfinite, per_tensor_norm=ptn)


def dense_span_ok(t: Tensor) -> bool:
    """True when ``t``'s elements are exactly the ``numel`` elements from ``data_ptr``.

    Such a tensor can be read as one flat run of memory (order does not matter for
    sums and maxima). Others need a contiguous copy first (the slower path).
    """
    return t.is_contiguous()

