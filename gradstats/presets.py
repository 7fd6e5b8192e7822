"""Presets: one line for a StableOptimizer with settings earned on the stability benchmark.

    >>> opt = gradstats.presets.recommended(torch.optim.AdamW(model.parameters(), lr=3e-4,
    ...                                                       fused=True))
    >>> loss.backward(); opt.step(loss=loss); opt.zero_grad()

The settings and the numbers behind each of them are in ``benchmarks/stability/README.md``
(``python benchmarks/stability/run.py``).
"""
from __future__ import annotations

from typing import Any, Dict, Optional

from torch.optim import Optimizer

from . import policies as P
from .optim import StableOptimizer

__all__ = ["recommended", "recommended_kwargs", "recommended_inner", "describe",
           "PRESET_KEYS"]

#: the preset's own knobs (everything else passed to :func:`recommended` goes to
#: :class:`~gradstats.StableOptimizer`)
PRESET_KEYS = ("max_norm", "spike", "spike_warmup", "spike_window", "spike_k")

_DEFAULTS: Dict[str, Any] = {
    "max_norm": 1.0,
    "spike": True,
    "spike_warmup": 16,
    "spike_window": 64,
    "spike_k": 4.0,
}


def recommended_kwargs(*, max_norm: Optional[float] = _DEFAULTS["max_norm"],
                       spike: bool = _DEFAULTS["spike"],
                       spike_warmup: int = _DEFAULTS["spike_warmup"],
                       spike_window: int = _DEFAULTS["spike_window"],
                       spike_k: float = _DEFAULTS["spike_k"]) -> Dict[str, Any]:
    """The recommended :class:`~gradstats.StableOptimizer` keyword arguments (fresh policy
    objects on every call).

    Args:
        max_norm: clip the global gradient norm to this value (torch's rule);
            ``None``: no clipping.
        spike: skip steps whose gradient norm is a spike (:class:`~gradstats.policies.SpikeSkip`).
        spike_warmup: steps recorded before spikes are skipped.
        spike_window: rolling window of the spike rule.
        spike_k: standard deviations above the window mean that make a spike.

    Returns:
        a dict with ``policy``, ``spike`` and ``skip_nonfinite``.

    Raises:
        ValueError: an invalid value (from the policy constructors).
    """
    kw: Dict[str, Any] = {"skip_nonfinite": True}
    kw["policy"] = None if max_norm is None else P.FixedNorm(max_norm)
    kw["spike"] = P.SpikeSkip(window=spike_window, k=spike_k, warmup=spike_warmup) \
        if spike else None
    return kw


def recommended_inner() -> Optional[Any]:
    """The optimizer class the preset replaces AdamW with in a sweep, or ``None`` (the
    preset keeps the user's optimizer)."""
    return None


def describe() -> str:
    """The preset in one line."""
    kw = recommended_kwargs()
    return (f"policy={kw['policy']!r}, spike={kw['spike']!r}, "
            f"skip_nonfinite={kw['skip_nonfinite']}")


def recommended(optimizer: Optimizer, **overrides: Any) -> StableOptimizer:
    """Wrap ``optimizer`` in a :class:`~gradstats.StableOptimizer` with the recommended
    settings.

    Args:
        optimizer: the inner optimizer (any ``torch.optim.Optimizer``).
        overrides: the preset's knobs (:data:`PRESET_KEYS`, see
            :func:`recommended_kwargs`) and any other keyword argument of
            :class:`~gradstats.StableOptimizer` (``param_names``, ``log``,
            ``grad_scaler``, ``policy``/``spike`` to replace the preset's, ...).

    Returns:
        the wrapped optimizer.

    Raises:
        TypeError: ``optimizer`` is not an optimizer (from StableOptimizer).
        ValueError: an invalid override.

    Example::

        >>> opt = gradstats.presets.recommended(torch.optim.AdamW(model.parameters()),
        ...                                     log="run.jsonl")
    """
    preset = {k: overrides.pop(k) for k in list(overrides) if k in PRESET_KEYS}
    kw = recommended_kwargs(**preset)
    kw.update(overrides)
    return StableOptimizer(optimizer, **kw)
