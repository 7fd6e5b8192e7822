"""``StableAdamW``: AdamW with per-tensor update clipping (protection at the update).

Wortsman, Dettmers, Zettlemoyer, Morcos, Farhadi, Schmidt — "Stable and low-precision
training for large-scale vision-language models", NeurIPS 2023 (arXiv:2304.13013), the
"StableAdamW" update rule: after the moments are updated, each tensor measures

    rms = sqrt(mean(g**2 / max(v_hat, eps**2)))

— how far the gradient runs ahead of Adam's second-moment estimate (about 1 while
``v_hat`` tracks ``g**2``, large right after a sudden change, when ``v`` lags) — and steps
with ``lr / max(1, rms)`` (the decoupled weight decay too). Gradient clipping cannot do
this for Adam: the update ``m_hat / sqrt(v_hat)`` does not change when the gradient is
scaled, so clipping its norm leaves a blow-up driven by a lagging ``v`` untouched.

On gradstats' stability benchmark (``benchmarks/stability/README.md``) this rule inside
the recommended preset kept 7 of 10 fresh seeds from diverging at a learning rate where
AdamW with torch's clip (or the preset without it) diverged in 10 of 10, and lowered the
final loss at the edge of the stable range without warm-up; alone, without gradient
clipping or skipping, it does not protect against gradient spikes (the momentum carries
them). Use it inside :func:`gradstats.presets.recommended_adamw`.

Cost: no pass besides the optimizer's own loop over its tensors: the clip factor is
computed from the gradient and the second moment while they are read for the update, with
multi-tensor (``foreach``) kernels — about 20 launches per parameter group (most of them
over all the group's tensors at once) instead of the one kernel of ``AdamW(fused=True)``;
host numbers enter only as scalar arguments, so there is no host<->device copy and no
synchronisation.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch.optim import Optimizer

__all__ = ["StableAdamW"]


class StableAdamW(Optimizer):
    r"""AdamW whose step of each tensor is divided by ``max(1, rms)``, ``rms`` being the
    root mean square of ``g / max(sqrt(v_hat), eps)`` (see the module docstring).

    Args:
        params: parameters or parameter groups.
        lr: learning rate. Default: 1e-3.
        betas: moment coefficients. Default: (0.9, 0.999).
        eps: added to the denominator, and the floor of ``sqrt(v_hat)`` in the RMS.
            Default: 1e-8.
        weight_decay: decoupled weight decay (scaled by the clipped learning rate).
            Default: 1e-2.
        update_clip: divide each tensor's step by ``max(1, rms)``; ``False`` gives AdamW.
            Default: True.
        fused, foreach: accepted for drop-in use where AdamW's arguments are passed, and
            ignored (this optimizer always uses multi-tensor kernels).

    Raises:
        ValueError: ``lr``, ``eps`` or ``weight_decay`` negative, or a beta outside [0, 1).

    Example::

        >>> opt = StableAdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95),
        ...                   weight_decay=0.1)
        >>> loss.backward(); opt.step(); opt.zero_grad()
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3,
                 betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, update_clip: bool = True,
                 fused: Optional[bool] = None, foreach: Optional[bool] = None) -> None:
        if not (isinstance(lr, (int, float)) and lr >= 0):
            raise ValueError(f"lr must be a number >= 0, got {lr!r}")
        if not (isinstance(eps, (int, float)) and eps >= 0):
            raise ValueError(f"eps must be a number >= 0, got {eps!r}")
        if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0):
            raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
        betas = tuple(betas)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps,
                                      weight_decay=weight_decay,
                                      update_clip=bool(update_clip)))

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:  # type: ignore[override]
        """One step for every parameter that has a gradient.

        Args:
            closure: re-evaluates the model and returns the loss (optional).

        Returns:
            the closure's return value, or ``None``.

        Raises:
            RuntimeError: a gradient is sparse.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            if ps:
                self._group_step(group, ps)
        return loss

    def _group_step(self, group: Dict[str, Any], ps: List[torch.Tensor]) -> None:
        b1, b2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        gs, ms, vs, bc1, rbc2 = [], [], [], [], []
        for p in ps:
            if p.grad.is_sparse:
                raise RuntimeError("StableAdamW does not support sparse gradients")
            st = self.state[p]
            if not st:
                st["step"] = 0
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["step"] += 1
            t = st["step"]
            gs.append(p.grad)
            ms.append(st["exp_avg"])
            vs.append(st["exp_avg_sq"])
            bc1.append(1.0 - b1 ** t)
            rbc2.append(1.0 / math.sqrt(1.0 - b2 ** t))
        torch._foreach_lerp_(ms, gs, 1.0 - b1)
        torch._foreach_mul_(vs, b2)
        torch._foreach_addcmul_(vs, gs, gs, 1.0 - b2)
        den = torch._foreach_sqrt(vs)               # sqrt(v)
        torch._foreach_mul_(den, rbc2)              # sqrt(v_hat)
        # host numbers enter only as scalar lists: no host<->device copy, no sync
        steps = [-lr / c for c in bc1]
        scale = None
        if group["update_clip"]:
            # rms of g / max(sqrt(v_hat), eps), per tensor
            r = torch._foreach_div(gs, torch._foreach_clamp_min(den, eps))
            rms = torch._foreach_div(torch._foreach_norm(r),
                                     [math.sqrt(p.numel()) for p in ps])
            scale = torch.stack([x.float() for x in rms]).clamp_min(1.0).reciprocal()
            steps = torch._foreach_mul(list(scale.unbind()), steps)  # lr_t / (1 - b1^t)
        torch._foreach_add_(den, eps)
        upd = torch._foreach_div(ms, den)           # m / (sqrt(v_hat) + eps)
        torch._foreach_mul_(upd, steps)
        if wd:
            if scale is None:
                torch._foreach_mul_(ps, 1.0 - lr * wd)
            else:
                torch._foreach_mul_(ps, list((1.0 - (lr * wd) * scale).unbind()))
        torch._foreach_add_(ps, upd)
