"""Presets: one line for a StableOptimizer with settings earned on the stability benchmark.

    >>> opt = gradstats.presets.recommended_adamw(model.parameters(), lr=3e-4,
    ...                                           betas=(0.9, 0.95), weight_decay=0.1)
    >>> opt = gradstats.presets.recommended(torch.optim.AdamW(model.parameters(), lr=3e-4))
    >>> loss.backward(); opt.step(loss=loss); opt.zero_grad()

* :func:`recommended` wraps *your* optimizer (any ``torch.optim.Optimizer``) with the
  gradient-side settings (:func:`recommended_kwargs`): skip NaN/Inf steps, clip the global
  norm to 1.0 like ``torch.nn.utils.clip_grad_norm_``, skip gradient-norm spikes from the
  17th step on (``SpikeSkip(window=64, k=4, warmup=16)``).
* :func:`recommended_adamw` builds the whole preset for AdamW users: the same wrapper
  around :class:`gradstats.optim_extras.StableAdamW` (AdamW with per-tensor update
  clipping), which on the benchmark also helped at the edge of the stable learning-rate
  range, where gradient-side policies do nothing for Adam.

The numbers behind each setting are in ``benchmarks/stability/README.md``
(``python benchmarks/stability/run.py``).
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, Optional, Tuple

from torch.optim import Optimizer

from . import policies as P
from .optim import StableOptimizer
from .optim_extras import StableAdamW

__all__ = ["recommended", "recommended_adamw", "recommended_kwargs", "recommended_inner",
           "describe", "PRESET_KEYS"]

#: the preset's own knobs (everything else passed to :func:`recommended` goes to
#: :class:`~gradstats.StableOptimizer`)
PRESET_KEYS = ("max_norm", "spike", "spike_warmup", "spike_window", "spike_k")


def recommended_kwargs(*, max_norm: Optional[float] = 1.0, spike: bool = True,
                       spike_warmup: int = 16, spike_window: int = 64,
                       spike_k: float = 4.0) -> Dict[str, Any]:
    """The recommended :class:`~gradstats.StableOptimizer` keyword arguments (fresh policy
    objects on every call).

    Args:
        max_norm: clip the global gradient norm to this value (torch's rule);
            ``None``: no clipping. Default: 1.0.
        spike: skip steps whose gradient norm is a spike
            (:class:`~gradstats.policies.SpikeSkip`). Default: True.
        spike_warmup: steps recorded before spikes are skipped. Default: 16 (the
            policy's own default, 64, let a spike at step 30 through on the benchmark).
        spike_window: rolling window of the spike rule. Default: 64.
        spike_k: standard deviations above the window mean that make a spike. Default: 4
            (6 missed half of the corrupted batches after the first skipped one).

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


def recommended_inner() -> type:
    """The optimizer class the full preset uses in place of AdamW
    (:class:`~gradstats.optim_extras.StableAdamW`)."""
    return StableAdamW


def describe() -> str:
    """The gradient-side preset in one line."""
    kw = recommended_kwargs()
    return (f"policy={kw['policy']!r}, spike={kw['spike']!r}, "
            f"skip_nonfinite={kw['skip_nonfinite']}")


def _split(overrides: Dict[str, Any]) -> Dict[str, Any]:
    preset = {k: overrides.pop(k) for k in list(overrides) if k in PRESET_KEYS}
    kw = recommended_kwargs(**preset)
    kw.update(overrides)
    return kw


def recommended(optimizer: Optimizer, **overrides: Any) -> StableOptimizer:
    """Wrap ``optimizer`` in a :class:`~gradstats.StableOptimizer` with the recommended
    gradient-side settings (:func:`recommended_kwargs`).

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
    return StableOptimizer(optimizer, **_split(dict(overrides)))


def recommended_adamw(params: Iterable[Any], lr: float = 1e-3, *,
                      betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                      weight_decay: float = 1e-2, **overrides: Any) -> StableOptimizer:
    """The full preset for AdamW users: :class:`~gradstats.optim_extras.StableAdamW`
    (AdamW with per-tensor update clipping) wrapped like :func:`recommended`.

    Args:
        params: parameters or parameter groups.
        lr, betas, eps, weight_decay: AdamW's arguments.
        overrides: as in :func:`recommended`.

    Returns:
        the wrapped optimizer (``opt.optimizer`` is the StableAdamW).

    Raises:
        ValueError: an invalid argument.

    Example::

        >>> opt = gradstats.presets.recommended_adamw(model.parameters(), lr=3e-4,
        ...                                           weight_decay=0.1)
    """
    inner = StableAdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    return recommended(inner, **overrides)
