"""The one running-statistics rule: mean and variance of a signal, with a warm-up.

Used for every running statistic gradstats keeps or shows: the optimizer's per-group
gradient-norm statistics (:class:`gradstats.StableOptimizer`), the policies that judge a
norm against its history (:class:`gradstats.policies.ZScoreClip`), the fused finalize
kernels, and the band the report draws (:mod:`gradstats.report.runs`). The float64
re-statement that every implementation is tested against is
:func:`gradstats.core.reference.ref_running_stats`.

The rule (exponentially weighted incremental mean and variance; West 1979, Finch 2009):
for each recorded value ``x`` (skipped steps and non-finite values are not recorded)::

    n    <- n + 1
    w    <- max(1 / n, 1 - alpha)
    d    <- x - mean
    mean <- mean + w * d
    var  <- (1 - w) * (var + w * d * d)

While ``n <= 1 / (1 - alpha)`` (the warm-up) this is exactly the sample mean and the
population variance of the values recorded so far; afterwards it is an exponential moving
average with factor ``alpha``. The same float32 operations in the same order are used on
every backend, so the device implementations agree bit for bit with :func:`update_`.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch
from torch import Tensor

__all__ = ["DEFAULT_ALPHA", "update_", "update_numpy", "weight"]

#: EMA factor used by :class:`gradstats.StableOptimizer` (warm-up of 1/(1-alpha) ~ 33 steps).
DEFAULT_ALPHA = 0.97


def weight(n: Tensor, alpha: float) -> Tensor:
    """``max(1/n, 1 - alpha)`` in float32 for counts ``n >= 1`` (float32 tensor)."""
    return n.clamp_min(1.0).reciprocal().clamp_min(1.0 - alpha)


def update_(mean: Tensor, var: Tensor, count: Tensor, x: Tensor, valid: Tensor,
            alpha: float) -> None:
    """Record ``x`` where ``valid`` (elementwise, in place, float32 state, no host sync).

    Args:
        mean, var: float32 running statistics, updated in place.
        count: float32 number of recorded values, updated in place.
        x: float32 values, same shape.
        valid: bool, same shape: where ``False`` (or where ``x`` is not finite) nothing
            changes.
        alpha: EMA factor in (0, 1).
    """
    valid = valid & (x.abs() < float("inf"))  # False for NaN and +-Inf
    count.add_(valid.to(count.dtype))
    w = weight(count, alpha) * valid
    d = torch.where(valid, x, mean) - mean
    wd = w * d
    var.addcmul_(wd, d).mul_(1.0 - w)
    mean.add_(wd)


def update_numpy(values: np.ndarray, alpha: float = DEFAULT_ALPHA
                 ) -> Tuple[np.ndarray, np.ndarray]:
    """Running mean and variance *before* each value of a sequence (for plots, reports).

    Non-finite values (NaN marks a step that was not recorded) leave the statistics
    unchanged. Computed in float32 with the operations of :func:`update_`, so the band a
    report draws is the one the optimizer used.

    Args:
        values: 1-D array of the signal, one entry per step.
        alpha: EMA factor in (0, 1).

    Returns:
        ``(mean, var)``: float64 arrays, entry ``i`` is the state before value ``i``
        (NaN until a first value has been recorded).
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    mean_out = np.full(v.shape, np.nan)
    var_out = np.full(v.shape, np.nan)
    f32 = np.float32
    mean, var, n = f32(0.0), f32(0.0), f32(0.0)
    one, floor = f32(1.0), f32(1.0 - alpha)
    for i, x in enumerate(v):
        if n > 0:
            mean_out[i], var_out[i] = mean, var
        if not np.isfinite(x):
            continue
        n = f32(n + one)
        w = max(f32(one / n), floor)
        d = f32(f32(x) - mean)
        wd = f32(w * d)
        var = f32(f32(var + f32(wd * d)) * f32(one - w))
        mean = f32(mean + wd)
    return mean_out, var_out
