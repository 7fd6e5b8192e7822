"""The optimizer wrapper: :class:`StableOptimizer` and its :class:`StepRecord`."""
from .stable import StableOptimizer, StepRecord

__all__ = ["StableOptimizer", "StepRecord"]
