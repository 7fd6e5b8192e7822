"""The two-batch estimator of the gradient noise scale (McCandlish et al., 2018, app. A).

For a gradient estimated over ``B`` examples drawn independently, with true gradient
``G`` and per-example covariance ``Sigma``::

    E |G_B|^2 = |G|^2 + tr(Sigma) / B

so two squared norms measured at two batch sizes ``b_small < b_big`` give unbiased
estimates of both terms::

    |G|^2     ~ (b_big |G_big|^2 - b_small |G_small|^2) / (b_big - b_small)
    tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1 / b_small - 1 / b_big)

and the "simple" noise scale ``B_simple = tr(Sigma) / |G|^2``. The small batch may be part
of the big one (gradient accumulation, data parallelism): each squared norm is unbiased on
its own, which is all the estimator needs.

One step's estimates are noisy (the ``|G|^2`` estimate can even be negative when the noise
dominates); average ``|G|^2`` and ``tr(Sigma)`` over steps *separately* before dividing
(:class:`gradstats.noise_scale.NoiseScaleTracker` does).
"""
from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor

__all__ = ["NoiseScaleEstimate", "estimate", "combine", "check_batch_sizes", "as_scalar_tensor"]

Number = Union[int, float]
TensorOrNumber = Union[Tensor, Number]


class NoiseScaleEstimate(NamedTuple):
    """Estimates of the gradient noise scale, as 0-dim device tensors.

    Attributes:
        g2: ``|G|^2``, the squared norm of the true (full-batch) gradient.
        trace: ``tr(Sigma)``, the trace of the per-example gradient covariance.
        b_simple: ``tr(Sigma) / |G|^2``, the simple noise scale (in examples, the unit
            of ``b_small``/``b_big``). Infinite or negative when ``g2 <= 0``: the noise
            hides the gradient at these batch sizes.
    """

    g2: Tensor
    trace: Tensor
    b_simple: Tensor


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_batch_sizes(b_small: Any, b_big: Any) -> Tuple[TensorOrNumber, TensorOrNumber]:
    """Validate two batch sizes: positive, finite and ``b_small < b_big``.

    Python numbers and CPU tensors are checked; tensors on another device are taken as
    they are (checking them would wait for the device).

    Returns:
        ``(b_small, b_big)`` (numbers as ``float``).

    Raises:
        TypeError: a batch size is not a real number or a tensor.
        ValueError: a batch size is not positive and finite, or ``b_small >= b_big``.
    """
    vals = []
    for name, b in (("b_small", b_small), ("b_big", b_big)):
        if isinstance(b, Tensor):
            if b.numel() != 1:
                raise ValueError(f"{name} must be a single number, got a tensor of shape "
                                 f"{tuple(b.shape)}")
            if b.device.type != "cpu":
                vals.append(None)
                continue
            v = float(b)
        elif _is_number(b):
            v = float(b)
        else:
            raise TypeError(f"{name} must be a positive number (int, float or 1-element "
                            f"tensor), got {type(b).__name__}")
        if not (v > 0 and math.isfinite(v)):
            raise ValueError(f"{name} must be a positive finite number of examples, got {v!r}")
        vals.append(v)
    if vals[0] is not None and vals[1] is not None and not vals[0] < vals[1]:
        raise ValueError(f"b_small must be smaller than b_big (two different batch sizes "
                         f"are needed), got b_small={vals[0]:g}, b_big={vals[1]:g}")
    return (b_small if isinstance(b_small, Tensor) else float(b_small),
            b_big if isinstance(b_big, Tensor) else float(b_big))


def as_scalar_tensor(x: Any, name: str, device: Optional[torch.device], dtype: torch.dtype
                     ) -> Tensor:
    """``x`` (a one-element tensor or a real number) as a 0-dim tensor of ``dtype`` on
    ``device`` (a fill for numbers: no host-to-device copy).

    Raises:
        TypeError: ``x`` is neither a real tensor nor a real number (``name`` says which
            argument).
        ValueError: ``x`` has more than one element.
    """
    if isinstance(x, Tensor):
        if x.numel() != 1:
            raise ValueError(f"{name} must be a single squared norm, got a tensor of shape "
                             f"{tuple(x.shape)}")
        if not (x.is_floating_point() or x.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name} must be a real tensor, got dtype {x.dtype}")
        return x.detach().reshape(()).to(device=device, dtype=dtype)
    if _is_number(x):
        return torch.full((), float(x), dtype=dtype, device=device)  # a fill, no copy
    raise TypeError(f"{name} must be a tensor or a number, got {type(x).__name__}")


def _dtype_of(*xs: Any) -> torch.dtype:
    dt = torch.float32
    for x in xs:
        if isinstance(x, Tensor) and x.dtype == torch.float64:
            dt = torch.float64
    return dt


def estimate(sqnorm_small: TensorOrNumber, sqnorm_big: TensorOrNumber,
             b_small: TensorOrNumber, b_big: TensorOrNumber) -> NoiseScaleEstimate:
    r"""Unbiased estimates of ``|G|^2`` and ``tr(Sigma)``, and ``B_simple``, from the
    squared norms of two gradient estimates over ``b_small < b_big`` examples.

    Implements appendix A of McCandlish et al., "An Empirical Model of Large-Batch
    Training" (2018)::

        |G|^2     = (b_big * sqnorm_big - b_small * sqnorm_small) / (b_big - b_small)
        tr(Sigma) = (sqnorm_small - sqnorm_big) / (1 / b_small - 1 / b_big)
        B_simple  = tr(Sigma) / |G|^2

    Each gradient must be the *mean* over its examples (divide a sum-reduced gradient by
    its batch size, and undo any loss scaling, before squaring its norm). No host
    synchronisation: the results are computed where the tensors live.

    Args:
        sqnorm_small: ``|G_small|^2``, tensor (any device, one element) or number.
        sqnorm_big: ``|G_big|^2``, tensor or number.
        b_small: examples in the small batch (number, or one-element tensor).
        b_big: examples in the big batch, ``> b_small``.

    Returns:
        NoiseScaleEstimate: ``g2``, ``trace`` and ``b_simple`` as 0-dim tensors on the
        device of the first tensor argument (CPU if none), float32 (float64 if an input
        is float64).

    Raises:
        TypeError: an argument is not a tensor or a real number.
        ValueError: a batch size is not positive and finite, ``b_small >= b_big``, or a
            squared norm has more than one element.

    Example::

        >>> est = gradstats.noise_scale.estimate(torch.tensor(1.25), torch.tensor(1.0625),
        ...                                      b_small=8, b_big=32)
        >>> est.g2, est.trace, est.b_simple
        (tensor(1.), tensor(2.), tensor(2.))
    """
    bs, bb = check_batch_sizes(b_small, b_big)
    device = None
    for x in (sqnorm_small, sqnorm_big, b_small, b_big):
        if isinstance(x, Tensor):
            device = x.device
            break
    dt = _dtype_of(sqnorm_small, sqnorm_big, b_small, b_big)
    s = as_scalar_tensor(sqnorm_small, "sqnorm_small", device, dt)
    b = as_scalar_tensor(sqnorm_big, "sqnorm_big", device, dt)
    return combine(s, b, bs, bb)


def combine(s: Tensor, b: Tensor, bs: TensorOrNumber, bb: TensorOrNumber) -> NoiseScaleEstimate:
    """:func:`estimate` on already validated inputs: 0-dim tensors ``s``, ``b`` (same
    device and dtype) and batch sizes ``bs < bb`` (numbers, or tensors on that device).
    Python-number batch sizes cost no device tensor (hot path of the tracker)."""
    if isinstance(bs, Tensor) or isinstance(bb, Tensor):
        bs_t = bs.to(s) if isinstance(bs, Tensor) else bs
        bb_t = bb.to(s) if isinstance(bb, Tensor) else bb
        g2 = (bb_t * b - bs_t * s) / (bb_t - bs_t)
        trace = (s - b) * (bs_t * bb_t / (bb_t - bs_t))
    else:
        d = bb - bs
        g2 = b * (bb / d) - s * (bs / d)
        trace = (s - b) * (bs * bb / d)
    return NoiseScaleEstimate(g2=g2, trace=trace, b_simple=trace / g2)
