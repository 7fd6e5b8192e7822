"""AMP plumbing of :class:`gradstats.StableOptimizer`: what a ``GradScaler`` hands the step.

Two recipes are supported (see the module docstring of :mod:`gradstats.optim.stable`):

* ``GradScaler.step(opt)``: the scaler sets ``opt.grad_scale`` / ``opt.found_inf`` (because
  the wrapper declares ``_step_supports_amp_scaling``) and reads nothing on the host;
* ``StableOptimizer(..., grad_scaler=scaler)``: the wrapper reads the scaler's scale itself,
  divides it out of the statistics, folds ``1/S`` into the step and reports its own
  non-finite flag to the scaler as ``found_inf`` for ``update()``.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor
from torch.amp.grad_scaler import OptState

__all__ = ["AmpInputs", "amp_inputs", "check_grad_scaler", "report_to_scaler"]

AmpInputs = Tuple[Optional[Tensor], Optional[Tensor], Optional[Dict[str, Any]]]


def check_grad_scaler(grad_scaler: Any) -> Any:
    """``grad_scaler`` if it is a ``torch.amp.GradScaler`` (or ``None``).

    Raises:
        TypeError: anything else.
    """
    if grad_scaler is not None and not isinstance(grad_scaler, torch.amp.GradScaler):
        raise TypeError(f"grad_scaler must be a torch.amp.GradScaler, got "
                        f"{type(grad_scaler).__name__}")
    return grad_scaler


def amp_inputs(opt: Any, scaler: Any) -> AmpInputs:
    """(loss scale to divide out or None, found_inf or None, scaler state to fill).

    Raises:
        RuntimeError: the scaler is in a state where ``step()`` must not run.
    """
    d = opt.__dict__
    if "grad_scale" in d or "found_inf" in d:  # set by GradScaler.step(opt)
        return d.get("grad_scale"), d.get("found_inf"), None
    if scaler is None or not scaler.is_enabled():
        return None, None, None
    st = scaler._per_optimizer_states[id(opt)]
    if st["stage"] is OptState.STEPPED:
        raise RuntimeError("step() has already been called since the last "
                           "grad_scaler.update()")
    if st["stage"] is OptState.UNSCALED:  # the user called scaler.unscale_(opt)
        fis = list(st["found_inf_per_device"].values())
        return None, (sum(f.to(fis[0].device) for f in fis) if fis else None), st
    if getattr(scaler, "_scale", None) is None:
        raise RuntimeError("grad_scaler has no scale yet: call grad_scaler.scale(loss)"
                           ".backward() before step()")
    return scaler._scale, None, st


def report_to_scaler(st: Dict[str, Any], found: Optional[Tensor]) -> None:
    """Hand the step's non-finite flag to the scaler (folded mode) and mark it stepped."""
    if found is not None:
        f = found.to(torch.float32)
        st["found_inf_per_device"] = {f.device: f}
    st["stage"] = OptState.STEPPED
