"""Drop-in replacements for ``torch.nn.utils``'s gradient clipping functions.

Measure and apply are separate (``get_total_norm`` + ``clip_grads_with_norm_``) and
compose into ``clip_grad_norm_``, as in torch. The fused path is: one statistics pass
(norms only), a coefficient computed on the device, and a scale pass that exits at once
when the coefficient is >= 1 — so a step that needs no clipping costs one read of the
gradients and no host synchronisation.
"""
from __future__ import annotations

import math
import types
import warnings
from typing import Any, Iterable, List, Optional, Union

import torch
from torch import Tensor

from .backends import registry
from .core import grouping
from .core.reduce import total_norm_like_torch
from .core.stats import check_norm_type, compute_groups
from .core.traced import is_tracing, scale_traced, stats_traced

_TensorOrTensors = Union[Tensor, Iterable[Tensor]]

_NONFINITE_MSG = (
    "The total norm of order {p} for gradients from `parameters` is non-finite, so it "
    "cannot be clipped. To disable this error and scale the gradients by the non-finite "
    "norm anyway, set `error_if_nonfinite=False`")


def check_max_norm(max_norm: Any) -> float:
    """``float(max_norm)``, validated: a number >= 0.

    Raises:
        ValueError: ``max_norm`` is not a number, is negative or NaN.
    """
    try:
        m = float(max_norm)
    except (TypeError, ValueError):
        raise ValueError(f"max_norm must be a non-negative number, got {max_norm!r}") from None
    if math.isnan(m) or m < 0:
        raise ValueError(f"max_norm must be a non-negative number, got {max_norm!r}")
    return m


def _kernel_norm_type(norm_type) -> Optional[float]:
    """``float(norm_type)`` when the fused path handles it (p > 0 or inf), else ``None``."""
    p = float(norm_type)
    return p if p > 0 else None


def _like_torch(total: Tensor, grads: List[Tensor], p: float) -> Tensor:
    """For DTensor gradients, the total norm as torch returns it (a DTensor on the mesh)."""
    if not grads or type(grads[0]) is Tensor or not grouping.is_dtensor(grads[0]):
        return total
    return total_norm_like_torch(total, grads, p)


def _raise_if_nonfinite(total: Tensor, p: float) -> None:
    if bool(torch.logical_or(total.isnan(), total.isinf())):  # the one documented sync
        raise RuntimeError(_NONFINITE_MSG.format(p=p))


def scale_grads_(groups: List[List[Tensor]], coef: Tensor, backend: Optional[str] = None,
                 norm_type: float = 2.0) -> None:
    """Multiply gradients in place by a device-resident coefficient (internal).

    Args:
        groups: gradient tensors, one list per group.
        coef: float32 0-dim (all groups) or [G] (per group). Gradients of a group whose
            coefficient is >= 1 are not touched (no pass over them); NaN scales.
        backend: as in :func:`gradstats.grad_stats`.
    """
    slices, _ = grouping.slices(groups, "parameters[i].grad")
    for s in slices:
        registry.select(s, norm_type, backend).scale_(s, coef.to(s.device))


@torch.no_grad()
def get_total_norm(tensors: _TensorOrTensors, norm_type: float = 2.0,
                   error_if_nonfinite: bool = False, foreach: Optional[bool] = None,
                   *, pp_group: Any = None) -> Tensor:
    r"""Norm of an iterable of tensors, as if concatenated into one vector.

    Drop-in for :func:`torch.nn.utils.get_total_norm` (same arguments, same results),
    computed in one fused pass without a host sync.

    Args:
        tensors (Iterable[Tensor] or Tensor): the tensors (typically gradients).
        norm_type (float): order of the norm; ``inf`` for the max norm. Default: 2.0.
        error_if_nonfinite (bool): raise if the total norm is NaN or Inf (this reads the
            result on the host: one sync). Default: False.
        foreach (bool): accepted for compatibility; the fused kernels need no foreach.
        pp_group: pipeline parallelism: the process group (or 1-D device mesh) across
            which the stages' norms are combined (every stage must call, one without
            tensors too). DTensor gradients are reduced over their mesh without it.

    Returns:
        Tensor: float32 0-dim on the first tensor's device (``tensor(0.)`` for no tensors).
        Unlike torch, the result is float32 for bf16/fp16 inputs (accumulated in float32).

    Raises:
        RuntimeError: ``error_if_nonfinite=True`` and the norm is NaN or Inf.
        TypeError: an element is not a tensor, or a tensor is sparse/complex/integer.

    Example::

        >>> grads = [p.grad for p in model.parameters() if p.grad is not None]
        >>> total = gradstats.get_total_norm(grads, 2.0)
    """
    ts = [tensors] if isinstance(tensors, Tensor) else list(tensors)
    if pp_group is None and is_tracing():  # torch.compile: custom ops, no caches
        p = _kernel_norm_type(norm_type)
        if p is None or not ts:
            return torch.nn.utils.get_total_norm(ts, norm_type, error_if_nonfinite, foreach)
        total = stats_traced([ts], p, False)[1]
        if error_if_nonfinite:
            _raise_if_nonfinite(total, p)
        return total
    if pp_group is not None:
        p = check_norm_type(norm_type)
    else:
        p = _kernel_norm_type(norm_type)
        if p is None:  # p <= 0 or -inf: not a norm the kernels compute; torch's semantics
            return torch.nn.utils.get_total_norm(ts, norm_type, error_if_nonfinite, foreach)
        if not ts:
            return torch.tensor(0.0)
    groups = grouping.groups_of_tensors(ts) if ts else [[]]
    st, _, _ = compute_groups(groups, p, full=False, pp_group=pp_group)
    if error_if_nonfinite:
        _raise_if_nonfinite(st.total_norm, p)
    return _like_torch(st.total_norm, ts, p)


@torch.no_grad()
def clip_grads_with_norm_(parameters: _TensorOrTensors, max_norm: float, total_norm: Tensor,
                          foreach: Optional[bool] = None) -> None:
    r"""Scale gradients by ``min(max_norm / (total_norm + 1e-6), 1)`` in place.

    Drop-in for :func:`torch.nn.utils.clip_grads_with_norm_`. The coefficient stays on the
    device; gradients are left untouched where it is >= 1 (bit-identical to torch's
    multiplication by 1).

    Args:
        parameters (Iterable[Tensor] or Tensor): parameters whose ``.grad`` is scaled.
        max_norm (float): the largest allowed norm (>= 0).
        total_norm (Tensor): the norm to clip against (e.g. from :func:`get_total_norm`).
        foreach (bool): accepted for compatibility.

    Raises:
        ValueError: ``max_norm`` is negative or NaN.

    Example::

        >>> total = gradstats.get_total_norm([p.grad for p in model.parameters()])
        >>> gradstats.clip_grads_with_norm_(model.parameters(), 1.0, total)
    """
    m = check_max_norm(max_norm)
    params = [parameters] if isinstance(parameters, Tensor) else list(parameters)
    grads = ([q.grad for q in params if q.grad is not None] if is_tracing()
             else grouping.grads_of(params))
    if not grads:
        return
    if type(total_norm) is not Tensor and grouping.is_dtensor(total_norm):
        total_norm = total_norm.full_tensor()  # no communication when it is replicated
    coef = torch.clamp(m / (total_norm + 1e-6), max=1.0)  # float64 for float64 norms
    if is_tracing():
        scale_traced(grads, coef)
        return
    scale_grads_([grads], coef)


@torch.no_grad()
def clip_grad_norm_(parameters: _TensorOrTensors, max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False, foreach: Optional[bool] = None,
                    *, pp_group: Any = None) -> Tensor:
    r"""Clip the gradient norm of an iterable of parameters, in place.

    Drop-in for :func:`torch.nn.utils.clip_grad_norm_`: the norm is computed over all
    gradients as if concatenated into one vector, and every gradient is multiplied by
    ``min(max_norm / (total_norm + 1e-6), 1)``. Done as one fused read of the gradients
    plus, only when clipping is needed, one scale pass; no host synchronisation (unless
    ``error_if_nonfinite=True``), capturable in a CUDA graph.

    Args:
        parameters (Iterable[Tensor] or Tensor): parameters (or a single one) whose
            ``.grad`` is clipped; parameters without a gradient are ignored.
        max_norm (float): the largest allowed norm (>= 0).
        norm_type (float): order of the norm; ``inf`` for the max norm. Default: 2.0.
        error_if_nonfinite (bool): raise if the total norm is NaN or Inf. Default: False.
        foreach (bool): accepted for compatibility; the fused kernels need no foreach.
        pp_group: pipeline parallelism: the process group (or 1-D device mesh) across
            which the stages' norms are combined, as torchtitan's ``pp_mesh``; every stage
            must call it and every stage clips with the same coefficient.

    Returns:
        Tensor: the total norm before clipping, float32 0-dim on the first gradient's
        device (``tensor(0.)`` when no parameter has a gradient).

    Raises:
        ValueError: ``max_norm`` is negative or NaN.
        RuntimeError: ``error_if_nonfinite=True`` and the norm is NaN or Inf.

    Example::

        >>> loss.backward()
        >>> total = gradstats.clip_grad_norm_(model.parameters(), max_norm=1.0)
        >>> optimizer.step()
    """
    m = check_max_norm(max_norm)
    if isinstance(parameters, Tensor):
        params = [parameters]
    else:
        is_gen = isinstance(parameters, types.GeneratorType)
        params = list(parameters)
        if is_gen and not params:
            warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.",
                          stacklevel=3)
    if pp_group is None and is_tracing():  # torch.compile: custom ops, no caches
        p = _kernel_norm_type(norm_type)
        grads = [q.grad for q in params if q.grad is not None]
        if p is None or not grads:
            return torch.nn.utils.clip_grad_norm_(params, m, norm_type, error_if_nonfinite,
                                                  foreach)
        _, total, _, _, _, coef = stats_traced([grads], p, False, max_norm=m)
        if error_if_nonfinite:
            _raise_if_nonfinite(total, p)
        scale_traced(grads, coef)
        return total
    if pp_group is not None:
        p = check_norm_type(norm_type)
    else:
        p = _kernel_norm_type(norm_type)
        if p is None:  # torch's exact semantics for p <= 0 / -inf
            return torch.nn.utils.clip_grad_norm_(params, m, norm_type, error_if_nonfinite,
                                                  foreach)
    grads = grouping.grads_of(params)
    if not grads and pp_group is None:
        return torch.tensor(0.0)
    st, coef, slices = compute_groups([grads], p, full=False, max_norm=m, pp_group=pp_group)
    if error_if_nonfinite:
        _raise_if_nonfinite(st.total_norm, p)
    for s in slices:
        registry.select(s, p, None).scale_(s, coef.to(s.device))
    return _like_torch(st.total_norm, grads, p)


@torch.no_grad()
def clip_grad_value_(parameters: _TensorOrTensors, clip_value: float,
                     foreach: Optional[bool] = None) -> None:
    r"""Clamp every gradient element to ``[-clip_value, clip_value]``, in place.

    Drop-in for :func:`torch.nn.utils.clip_grad_value_`: same inputs, bit-identical
    gradients. ``clip_value`` is converted with ``float()`` as torch does; a negative
    value behaves as in torch (``clamp_min(-v)`` then ``clamp_max(v)``: every element
    that is not NaN becomes ``v``); NaN gradients stay NaN. No host synchronisation;
    the backend chosen for each device clamps each dtype in one foreach pass (or one
    fused pass where it has one).

    Args:
        parameters (Iterable[Tensor] or Tensor): parameters (or a single one) whose
            ``.grad`` is clamped; parameters without a gradient are ignored.
        clip_value (float): the largest allowed absolute value.
        foreach (bool): ``False`` clamps tensor by tensor (torch's slow path, same
            result); ``None`` or ``True`` uses the backend. Unlike torch, ``True`` never
            raises for a device without foreach kernels.

    Raises:
        TypeError, ValueError: ``float(clip_value)`` fails (as in torch).
        TypeError: a gradient is not a floating-point strided tensor.

    Example::

        >>> loss.backward()
        >>> gradstats.clip_grad_value_(model.parameters(), clip_value=0.5)
        >>> optimizer.step()
    """
    params = [parameters] if isinstance(parameters, Tensor) else parameters
    v = float(clip_value)
    grads = grouping.grads_of(list(params))
    if not grads:
        return
    if foreach is False:
        for g in grads:
            g.clamp_(min=-v, max=v)
        return
    slices, _ = grouping.slices([grads], "parameters[i].grad")
    for s in slices:
        registry.select(s, 2.0, None).clamp_(s, v)
