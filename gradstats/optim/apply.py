"""The *apply* stage of the step: the inner optimizer's step, with the decision folded in.

* **Folded** (torch's ``fused=True`` Adam, AdamW, SGD, Adagrad and any optimizer that
  declares ``_step_supports_amp_scaling`` and reads ``self.grad_scale`` / ``self.found_inf``
  like them): the clip coefficient ``c`` and the AMP loss scale ``S`` become the optimizer's
  ``grad_scale = S / c`` and the skip flag becomes ``found_inf``; the fused kernel unscales /
  clips the gradients as it reads them and leaves everything untouched when ``found_inf``
  is 1. No host synchronisation and no extra pass over the gradients.
* **Host** (every other optimizer): the gradients are scaled in place by the coefficient (no
  pass where it is 1, on backends that exit early) and the inner step runs; the caller
  decided on the host whether to run it at all.
"""
from __future__ import annotations

import inspect
from typing import Any, List, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..clip import scale_grads_
from ..core import grouping

__all__ = ["folded_step", "host_step", "mul_grads_", "takes_grad_scale", "needs_closure"]

_F32 = torch.float32


def takes_grad_scale(opt: Optimizer) -> bool:
    """Whether ``opt.step()`` reads ``grad_scale`` / ``found_inf`` attributes (torch's fused
    optimizers' AMP contract)."""
    if not getattr(opt, "_step_supports_amp_scaling", False):
        return False
    try:
        sig = inspect.signature(opt.step)
    except (TypeError, ValueError):
        return False
    # old contract: step(grad_scaler=...) — not the grad_scale/found_inf attributes
    return "grad_scaler" not in sig.parameters


def needs_closure(opt: Optimizer) -> bool:
    """Whether ``opt.step`` requires a closure (e.g. ``torch.optim.LBFGS``)."""
    if isinstance(opt, torch.optim.LBFGS):
        return True
    try:
        p = inspect.signature(opt.step).parameters.get("closure")
    except (TypeError, ValueError):
        return False
    return p is not None and p.default is inspect.Parameter.empty


def folded_step(inner: Optimizer, grads: List[List[Tensor]], coef: Optional[Tensor],
                per_group: bool, grad_scale: Optional[Tensor],
                found_inf: Optional[Tensor]) -> None:
    """Run ``inner.step()`` with ``grad_scale`` / ``found_inf`` set for its duration.

    Args:
        coef: the clip coefficients ``[G]`` (only read when ``per_group``: one coefficient
            per group cannot ride on the single ``grad_scale``, so the gradients are scaled
            in place first).
        grad_scale: ``S / c`` (or ``1 / c``, or ``S``), or ``None`` for none.
        found_inf: float32 0-dim skip flag, or ``None`` when no skip is possible.
    """
    if per_group and coef is not None:
        scale_grads_(grads, coef)
    had = {k: inner.__dict__[k] for k in ("grad_scale", "found_inf") if k in inner.__dict__}
    if grad_scale is None and found_inf is None:
        inner.step()
        return
    inner.grad_scale = grad_scale
    inner.found_inf = found_inf
    try:
        inner.step()
    finally:
        for k in ("grad_scale", "found_inf"):
            inner.__dict__.pop(k, None)
        inner.__dict__.update(had)


def host_step(inner: Optimizer, grads: List[List[Tensor]], coef: Optional[Tensor],
              inv_scale: Optional[Tensor]) -> None:
    """Scale gradients in place (clip and/or unscale), then the plain inner step."""
    if inv_scale is not None:
        factor = inv_scale if coef is None else coef.to(_F32) * inv_scale
        mul_grads_(grads, factor)
    elif coef is not None:
        scale_grads_(grads, coef.to(_F32))
    inner.step()


def mul_grads_(grads: List[List[Tensor]], factor: Tensor) -> None:
    """``g *= factor`` for every gradient (factor 0-dim or [G], may exceed 1)."""
    slices, _ = grouping.slices(grads)
    for s in slices:
        f = factor.to(s.device)
        if f.dim() == 0:
            torch._foreach_mul_(s.tensors, f)
            continue
        bounds = s.group_bounds
        for g in range(s.num_groups):
            sub = s.tensors[bounds[g]:bounds[g + 1]]
            if sub:
                torch._foreach_mul_(sub, f[g])
