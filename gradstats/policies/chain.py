"""Composition: :class:`Chain` (policies in order) and :func:`as_policy`."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from torch import Tensor

from .base import Decision, Policy, StepContext

__all__ = ["Chain", "as_policy", "flatten"]


class Chain(Policy):
    """Several policies applied in order: coefficients multiply, skip flags are or-ed.

    Each policy sees the skip flag as decided by the ones before it, so a step skipped by
    an earlier policy does not enter a later policy's statistics.

    Args:
        *policies: the policies, in order.
    """

    def __init__(self, *policies: Policy) -> None:
        super().__init__()
        flat: List[Policy] = []
        for p in policies:
            if isinstance(p, (list, tuple)):
                flat.extend(p)
            else:
                flat.append(p)
        for p in flat:
            if not isinstance(p, Policy):
                raise TypeError(f"Chain takes gradstats.policies.Policy objects, got "
                                f"{type(p).__name__}")
        self.policies = flat
        self.may_skip = any(p.may_skip for p in flat)
        self.needs_loss = any(p.needs_loss for p in flat)

    def config(self) -> Dict[str, Any]:
        return {"policies": [repr(p) for p in self.policies]}

    def init(self, num_groups: int, device: Any = "cpu") -> Dict[str, Tensor]:
        super().init(num_groups, device)
        for p in self.policies:
            p.init(num_groups, device)
        return self.state

    def ensure_state(self, num_groups: int, device: torch.device) -> None:
        super().ensure_state(num_groups, device)
        for p in self.policies:
            p.ensure_state(num_groups, device)

    def to(self, device: Any) -> "Chain":
        super().to(device)
        for p in self.policies:
            p.to(device)
        return self

    def update(self, ctx: StepContext) -> Decision:
        coef: Optional[Tensor] = None
        skip: Optional[Tensor] = None
        clipped: Optional[Tensor] = None
        info: Dict[str, Tensor] = {}
        for p in self.policies:
            d = p.update(ctx)
            if d.coef is not None:
                coef = d.coef if coef is None else coef * d.coef
            if d.skip is not None:
                skip = d.skip if skip is None else skip | d.skip
                ctx.skip = ctx.skip | d.skip
            if d.clipped is not None:
                clipped = d.clipped if clipped is None else clipped | d.clipped
            info.update(d.info)
        return Decision(coef=coef, skip=skip, clipped=clipped, info=info)

    def bind_state(self, state: Dict[str, Tensor], num_groups: int,
                   device: torch.device) -> None:
        raise TypeError("a Chain has no state of its own: bind its policies")

    def state_dict(self) -> Dict[str, Any]:
        return {"type": "Chain", "config": self.config(),
                "policies": [p.state_dict() for p in self.policies]}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        if state_dict.get("type", "Chain") != "Chain":
            raise ValueError(f"state_dict was saved by a {state_dict.get('type')}, cannot "
                             "load it into a Chain")
        subs = state_dict.get("policies", [])
        if len(subs) != len(self.policies):
            raise ValueError(f"state_dict holds {len(subs)} policies, this Chain has "
                             f"{len(self.policies)}")
        for p, sd in zip(self.policies, subs):
            p.load_state_dict(sd)

    def __repr__(self) -> str:
        return "Chain(" + ", ".join(repr(p) for p in self.policies) + ")"


def as_policy(obj: Any, what: str = "policy") -> Optional[Policy]:
    """``None``, a :class:`Policy`, or a list/tuple of them (-> :class:`Chain`).

    Raises:
        TypeError: anything else.
    """
    if obj is None or isinstance(obj, Policy):
        return obj
    if isinstance(obj, (list, tuple)):
        return Chain(*obj)
    raise TypeError(f"{what} must be a gradstats.policies.Policy (e.g. "
                    f"gradstats.policies.ZScoreClip()), a list of them, or None; got "
                    f"{type(obj).__name__}")


def flatten(policy: Optional[Policy]) -> List[Policy]:
    """The policies of ``policy`` in order, nested chains expanded (``[]`` for ``None``)."""
    if policy is None:
        return []
    if isinstance(policy, Chain):
        out: List[Policy] = []
        for p in policy.policies:
            out.extend(flatten(p))
        return out
    return [policy]
