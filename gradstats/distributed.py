"""Public helpers for distributed training: pipeline-parallel statistics and clipping.

The reduction itself lives in :mod:`gradstats.core.reduce`: ``grad_stats``, the clipping
drop-ins and ``StableOptimizer`` use it on their own when the gradients are DTensors
(FSDP2, tensor parallel) or when ``pp_group=`` is given. DDP needs nothing: its gradients
are already all-reduced in ``backward``. This module keeps the names that distributed
users import:

* :func:`grad_stats`, :func:`get_total_norm`, :func:`clip_grad_norm_` — the same as the
  top-level functions, which all take ``pp_group=`` too;
* :func:`set_pp_group` — the older spelling of ``StableOptimizer(..., pp_group=...)``;
* :data:`last_reduction` — what the last reduction sent (for benchmarks);
* :func:`is_dtensor`.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from . import clip
from .core.grouping import is_dtensor
from .core.reduce import last_reduction
from .core.stats import GradStats
from .core.stats import grad_stats as _grad_stats
from .optim import StableOptimizer

__all__ = ["grad_stats", "get_total_norm", "clip_grad_norm_", "set_pp_group",
           "last_reduction", "is_dtensor"]



def grad_stats(params_or_groups: Any, norm_type: float = 2.0, per_tensor: bool = False,
               backend: Optional[str] = None, pp_group: Any = None) -> GradStats:
    """:func:`gradstats.grad_stats` (which takes ``pp_group=`` itself)."""
    return _grad_stats(params_or_groups, norm_type, per_tensor, backend, pp_group=pp_group)


def get_total_norm(tensors: Any, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                   foreach: Optional[bool] = None, pp_group: Any = None) -> Tensor:
    """:func:`gradstats.get_total_norm` (which takes ``pp_group=`` itself)."""
    return clip.get_total_norm(tensors, norm_type, error_if_nonfinite, foreach,
                               pp_group=pp_group)


def clip_grad_norm_(parameters: Any, max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False, foreach: Optional[bool] = None,
                    pp_group: Any = None) -> Tensor:
    """:func:`gradstats.clip_grad_norm_` (which takes ``pp_group=`` itself)."""
    return clip.clip_grad_norm_(parameters, max_norm, norm_type, error_if_nonfinite, foreach,
                                pp_group=pp_group)


def set_pp_group(optimizer: StableOptimizer, pp_group: Any) -> StableOptimizer:
    """Make a :class:`gradstats.StableOptimizer` combine its statistics across pipeline
    stages; the same as ``StableOptimizer(..., pp_group=pp_group)`` or setting
    ``optimizer.pp_group``.

    Args:
        optimizer: the stage's ``StableOptimizer``.
        pp_group: the pipeline process group (or 1-D device mesh); ``None`` undoes it.

    Returns:
        the optimizer.

    Raises:
        TypeError: ``optimizer`` is not a ``StableOptimizer``.
    """
    if not isinstance(optimizer, StableOptimizer):
        raise TypeError(f"optimizer must be a gradstats.StableOptimizer, got "
                        f"{type(optimizer).__name__}")
    optimizer.pp_group = pp_group
    return optimizer
