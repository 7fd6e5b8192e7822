"""Optimizers beyond the wrapper: :class:`StableAdamW` (AdamW with per-tensor update
clipping, protection at the update for Adam-family training).

Imports only torch (it sits beside :mod:`gradstats.optim`, below the presets that use it).
"""
from .stable_adamw import StableAdamW

__all__ = ["StableAdamW"]
