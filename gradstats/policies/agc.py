"""AGC: a transform that rewrites gradients unit by unit (needs the weights: never fused).

Bytes moved: one extra read of every gradient and weight of the groups it clips (the unit
norms), plus a read/write of the gradients — inherent to the method, which compares each
unit's gradient norm with its weight norm.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .base import F32, Decision, StepContext, Transform, check_number

__all__ = ["AdaptiveGradClip"]


class AdaptiveGradClip(Transform):
    r"""AGC: unit-wise clipping by the ratio of gradient norm to weight norm.

    Brock, De, Smith, Simonyan — "High-Performance Large-Scale Image Recognition Without
    Normalization", ICML 2021 (arXiv:2102.06171), section 4.1. For every unit ``i`` (a row
    of a weight matrix, an output channel of a convolution: everything but dim 0 is
    reduced; scalars and vectors are one unit) with weights ``W_i`` and gradient ``G_i``::

        G_i <- G_i * lambda * max(|W_i|, eps) / |G_i|   if |G_i| > lambda * max(|W_i|, eps)

    (Frobenius norms), and unchanged otherwise. The paper recommends not clipping the
    final classifier layer: put it in its own parameter group and list that group in
    ``exclude_groups``.

    This policy scales the gradients itself (one extra read of gradients and weights,
    inherent to the method) and reports per-group ``clipped`` flags; it returns no
    coefficient. The norms are taken of the true gradients (AMP scale divided out).

    Args:
        clipping: lambda, > 0. Default: 0.01.
        eps: floor of the weight norm, >= 0. Default: 1e-3.
        exclude_groups: indices of parameter groups left unclipped. Default: none.
    """

    def __init__(self, clipping: float = 0.01, eps: float = 1e-3, *,
                 exclude_groups: Sequence[int] = ()) -> None:
        super().__init__()
        self.clipping = check_number("clipping", clipping)
        self.eps = check_number("eps", eps, allow_zero=True)
        try:
            self.exclude_groups = tuple(int(i) for i in exclude_groups)
        except (TypeError, ValueError):
            raise ValueError(f"exclude_groups must be a sequence of group indices, got "
                             f"{exclude_groups!r}") from None

    def config(self) -> Dict[str, Any]:
        return {"clipping": self.clipping, "eps": self.eps,
                "exclude_groups": self.exclude_groups}

    @staticmethod
    def _unit_dims(t: Tensor) -> Optional[Tuple[int, ...]]:
        if sum(1 for d in t.shape if d > 1) <= 1:
            return None  # scalars and vectors: one unit
        return tuple(range(1, t.dim()))

    def update(self, ctx: StepContext) -> Decision:
        flags: List[Tensor] = []
        dev = ctx.total_norm.device
        for gi, (ps, gs) in enumerate(zip(ctx.params, ctx.grads)):
            if gi in self.exclude_groups or not gs:
                flags.append(torch.zeros((), dtype=torch.bool, device=dev))
                continue
            anys = []
            for p, g in zip(ps, gs):
                if g.numel() == 0:
                    continue
                dims = self._unit_dims(g)
                if dims is None:
                    w_n = torch.linalg.vector_norm(p.detach(), dtype=F32)
                    g_n = torch.linalg.vector_norm(g, dtype=F32)
                else:
                    w_n = torch.linalg.vector_norm(p.detach(), dim=dims, keepdim=True,
                                                   dtype=F32)
                    g_n = torch.linalg.vector_norm(g, dim=dims, keepdim=True, dtype=F32)
                if ctx.grad_factor is not None:
                    g_n = g_n * ctx.grad_factor.to(g_n.device)
                limit = self.clipping * w_n.clamp_min(self.eps)
                trig = g_n > limit  # False for NaN norms: those are left alone
                factor = torch.where(trig, limit / g_n.clamp_min(1e-6),
                                     torch.ones_like(g_n))
                g.mul_(factor.to(g.dtype) if g.dtype != F32 else factor)
                anys.append(trig.any().to(dev))
            flags.append(torch.stack(anys).any() if anys else
                         torch.zeros((), dtype=torch.bool, device=dev))
        return Decision(clipped=torch.stack(flags))
