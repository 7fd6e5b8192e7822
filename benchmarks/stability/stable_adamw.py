"""Update-level protection for the benchmark's extra arm: AdamW with per-tensor update
clipping, the rule of StableAdamW (Wortsman et al., "Stable and low-precision training
for large-scale vision-language models", NeurIPS 2023, arXiv:2304.13013).

For each tensor, after the moments are updated, ``rms = sqrt(mean(g**2 / max(v_hat,
eps**2)))`` measures how far the gradient is ahead of the second-moment estimate (1 when
``v_hat`` tracks ``g**2``; large right after a sudden change, when ``v`` lags). The step of
that tensor (and its weight decay) uses ``lr / max(1, rms)``. Everything stays on the
device (foreach ops, no host reads); the clip factor is computed in the same loop as the
update, from tensors the step reads anyway.

This file is the evaluated implementation; see README.md for whether it earned a place in
``gradstats``.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Tuple

import torch
from torch.optim import Optimizer


class StableAdamW(Optimizer):
    """AdamW with per-tensor update-RMS clipping (see the module docstring).

    Args:
        params: parameters or groups.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW``.
        clip: update clipping on (``False`` gives plain AdamW, for checks).
        fused: accepted and ignored (for drop-in use where callers pass it).
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3,
                 betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, clip: bool = True, fused: Any = None) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps,
                                      weight_decay=weight_decay, clip=clip))

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            if not ps:
                continue
            b1, b2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            gs = [p.grad for p in ps]
            ms, vs = [], []
            for p in ps:
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = torch.zeros_like(p)
                st["step"] += 1
                ms.append(st["exp_avg"])
                vs.append(st["exp_avg_sq"])
            t = self.state[ps[0]]["step"]
            bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
            torch._foreach_lerp_(ms, gs, 1 - b1)
            torch._foreach_mul_(vs, b2)
            torch._foreach_addcmul_(vs, gs, gs, 1 - b2)
            # sqrt(v_hat)
            den = torch._foreach_sqrt(vs)
            torch._foreach_mul_(den, 1.0 / math.sqrt(bc2))
            if group["clip"]:
                # rms of g / max(sqrt(v_hat), eps) per tensor
                r = torch._foreach_div(gs, torch._foreach_clamp_min(den, eps))
                norms = torch.stack(torch._foreach_norm(r))
                numel = torch.tensor([p.numel() for p in ps], dtype=norms.dtype,
                                     device=norms.device)
                rms = norms / numel.sqrt()
                scale = 1.0 / rms.clamp_min(1.0)  # [T], on the device
                scale = torch.where(torch.isfinite(scale), scale, torch.zeros_like(scale))
            else:
                scale = torch.ones(len(ps), dtype=ps[0].dtype, device=ps[0].device)
            torch._foreach_add_(den, eps)
            upd = torch._foreach_div(ms, den)
            torch._foreach_mul_(upd, list((scale * (-lr / bc1)).unbind()))
            if wd:
                torch._foreach_mul_(ps, list((1 - lr * wd * scale).unbind()))
            torch._foreach_add_(ps, upd)
        return loss
