"""What the framework callbacks share: finding a StableOptimizer, turning statistics into
flat ``gradstats/...`` log entries (one device->host read each), the double-clipping
warning. Imports no framework.

Log keys (``G`` groups, ``<g>`` is ``group<i>`` or the name given in ``group_names``):

* every optimizer: ``gradstats/grad_norm/<g>``, ``gradstats/max_abs/<g>``,
  ``gradstats/nonfinite/<g>`` (count of NaN/Inf elements), ``gradstats/total_norm``;
* a :class:`gradstats.StableOptimizer` also: ``gradstats/clip_coef/<g>`` (the factor
  applied, 1 = untouched), ``gradstats/clipped`` (1 if some group was clipped),
  ``gradstats/skipped`` (1 if the step was skipped), and the totals since the start
  ``gradstats/skipped_steps``, ``gradstats/clipped_steps``, ``gradstats/nonfinite_steps``.
"""
from __future__ import annotations

import warnings
from typing import Any, Dict, Optional, Sequence

from ..core.stats import GradStats
from ..optim import StableOptimizer
from ..policies import Chain, Policy, SpikeSkip

__all__ = ["DoubleClippingWarning", "PREFIX", "clips", "double_clipping_message",
           "find_stable", "record_logs", "stats_logs", "warn_double_clipping"]

PREFIX = "gradstats/"


class DoubleClippingWarning(UserWarning):
    """A StableOptimizer clips and the training framework clips the same gradients too."""


def find_stable(optimizer: Any) -> Optional[StableOptimizer]:
    """The :class:`StableOptimizer` behind framework wrappers, or ``None``.

    Follows ``.optimizer`` (accelerate's ``AcceleratedOptimizer``, Lightning's
    ``LightningOptimizer``) a few levels deep.
    """
    opt = optimizer
    for _ in range(8):
        if opt is None:
            return None
        if isinstance(opt, StableOptimizer):
            return opt
        opt = getattr(opt, "optimizer", None)
    return None


def clips(policy: Optional[Policy]) -> bool:
    """Whether a StableOptimizer policy scales gradients (anything but skip-only policies)."""
    if policy is None or isinstance(policy, SpikeSkip):
        return False
    if isinstance(policy, Chain):
        return any(clips(p) for p in policy.policies)
    return True


def double_clipping_message(stable: StableOptimizer, framework_clip: str,
                            framework_off: str) -> str:
    """The warning text: what clips twice and the two ways to turn one off."""
    return (f"gradstats: gradients are clipped twice: the optimizer is a StableOptimizer "
            f"with policy {stable.policy!r} and the trainer also clips ({framework_clip}). "
            f"Turn one off: {framework_off} to let StableOptimizer clip, or build it as "
            f"StableOptimizer(optimizer, max_norm=None) (no policy) to let the trainer clip.")


def warn_double_clipping(stable: StableOptimizer, framework_clip: str,
                         framework_off: str, stacklevel: int = 3) -> None:
    """Emit :class:`DoubleClippingWarning` (callers make sure it is emitted once)."""
    warnings.warn(double_clipping_message(stable, framework_clip, framework_off),
                  DoubleClippingWarning, stacklevel=stacklevel)


def _group_keys(G: int, group_names: Optional[Sequence[str]]) -> Sequence[str]:
    if group_names is not None and len(group_names) == G:
        return [str(n) for n in group_names]
    return [f"group{i}" for i in range(G)]


def _per_group(out: Dict[str, float], prefix: str, what: str, values: Sequence[Any],
               names: Sequence[str]) -> None:
    for name, v in zip(names, values):
        out[f"{prefix}{what}/{name}"] = float(v)


def stats_logs(stats: GradStats, prefix: str = PREFIX,
               group_names: Optional[Sequence[str]] = None) -> Dict[str, float]:
    """Flat log entries of a :class:`gradstats.GradStats` (one device->host read)."""
    d = stats.to_dict()
    names = _group_keys(len(d["norm"]), group_names)
    out: Dict[str, float] = {}
    _per_group(out, prefix, "grad_norm", d["norm"], names)
    _per_group(out, prefix, "max_abs", d["max_abs"], names)
    _per_group(out, prefix, "nonfinite", d["nonfinite"], names)
    out[f"{prefix}total_norm"] = float(d["total_norm"])
    return out


def record_logs(stable: StableOptimizer, prefix: str = PREFIX,
                group_names: Optional[Sequence[str]] = None) -> Dict[str, float]:
    """Flat log entries of ``stable.last_stats`` and ``stable.summary()``.

    Two device->host reads (``StepRecord.to_dict()`` and ``summary()``); empty when the
    optimizer has not stepped yet.
    """
    rec = stable.last_stats
    if rec is None:
        return {}
    d = rec.to_dict()
    norm = d["norm"] if isinstance(d["norm"], list) else [d["norm"]]
    names = _group_keys(len(norm), group_names)

    def as_list(v: Any) -> list:
        return v if isinstance(v, list) else [v]

    out: Dict[str, float] = {}
    _per_group(out, prefix, "grad_norm", norm, names)
    _per_group(out, prefix, "max_abs", as_list(d["max_abs"]), names)
    _per_group(out, prefix, "nonfinite", as_list(d["nonfinite_count"]), names)
    out[f"{prefix}total_norm"] = float(d["total_norm"])
    _per_group(out, prefix, "clip_coef", as_list(d["clip_coef"]), names)
    out[f"{prefix}clipped"] = float(any(as_list(d["clipped"])))
    out[f"{prefix}skipped"] = float(bool(d["skipped"]))
    s = stable.summary()
    out[f"{prefix}skipped_steps"] = float(s["skipped"])
    out[f"{prefix}clipped_steps"] = float(s["clipped"])
    out[f"{prefix}nonfinite_steps"] = float(s["nonfinite"])
    return out
