"""Clipping and step-skipping policies for :class:`gradstats.StableOptimizer`.

* :mod:`~gradstats.policies.base` — the contract: :class:`Rule` (reads statistics and its
  own state), :class:`Transform` (rewrites gradients), :class:`StepContext`,
  :class:`Decision`, :class:`FusedSpec`;
* :mod:`~gradstats.policies.rules` — the built-in rules: :class:`SkipNonFinite`,
  :class:`FixedNorm`, :class:`ZScoreClip`, :class:`QuantileClip`, :class:`SpikeSkip`
  (each declares how the finalize kernel runs it);
* :mod:`~gradstats.policies.agc` — :class:`AdaptiveGradClip`, a transform;
* :mod:`~gradstats.policies.chain` — :class:`Chain` and :func:`as_policy`;
* :mod:`~gradstats.policies.program` — a chain compiled into one program for the finalize
  kernel, and its torch executor.

Policies compose: pass a list to ``StableOptimizer(policy=[...])`` or build a
:class:`Chain`; coefficients multiply, skip flags are or-ed, in order.
"""
from .agc import AdaptiveGradClip
from .base import Decision, FusedSpec, Policy, Rule, StepContext, Transform, torch_clip_coef
from .chain import Chain, as_policy
from .rules import FixedNorm, QuantileClip, SkipNonFinite, SpikeSkip, ZScoreClip

__all__ = [
    "AdaptiveGradClip",
    "Chain",
    "Decision",
    "FixedNorm",
    "FusedSpec",
    "Policy",
    "QuantileClip",
    "Rule",
    "SkipNonFinite",
    "SpikeSkip",
    "StepContext",
    "Transform",
    "ZScoreClip",
    "as_policy",
    "torch_clip_coef",
]
