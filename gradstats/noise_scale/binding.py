"""A noise-scale tracker fed by a :class:`gradstats.StableOptimizer`'s steps.

The optimizer's statistics pass already measures the squared norm of the step's gradient
(the big batch); :class:`OptimizerBinding` reads it in a step hook (a device tensor: no
sync, no pass) and combines it with the small-batch measurement made since the previous
step: the first micro-batch's gradient under gradient accumulation
(:meth:`OptimizerBinding.observe_micro_batch`: one statistics pass per optimizer step), or
the local gradients of a DDP rank (:mod:`gradstats.noise_scale.ddp`: measured inside the
communication hook). The hook is registered with ``prepend=True`` so that the values it
adds to ``StepRecord.info`` are there when telemetry records the step.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor

from ..core.stats import grad_stats
from .estimate import TensorOrNumber, check_batch_sizes

__all__ = ["OptimizerBinding", "LOSS_REDUCTIONS", "reduction_scales"]

#: accepted ``loss_reduction`` values (see :func:`reduction_scales`).
LOSS_REDUCTIONS = ("mean", "micro_mean", "sum")


def reduction_scales(loss_reduction: str, b_small: float, b_big: float):
    """Factors ``(small, big)`` that turn the *norms* of the measured gradients into the
    norms of the per-example mean gradients over ``b_small`` and ``b_big`` examples.

    * ``"mean"``: the big gradient is the mean over its ``b_big`` examples, and the small
      one was normalised the same way (its examples' sum divided by ``b_big``, e.g. a
      micro-batch mean divided by the number of micro-batches): ``(b_big/b_small, 1)``;
    * ``"micro_mean"``: the small gradient is its own mean, the big one a sum of
      ``b_big/b_small`` such means: ``(1, b_small/b_big)``;
    * ``"sum"``: both are sums over their examples: ``(1/b_small, 1/b_big)``.

    Raises:
        ValueError: unknown ``loss_reduction``.
    """
    if loss_reduction == "mean":
        return b_big / b_small, 1.0
    if loss_reduction == "micro_mean":
        return 1.0, b_small / b_big
    if loss_reduction == "sum":
        return 1.0 / b_small, 1.0 / b_big
    raise ValueError(f"loss_reduction must be one of {', '.join(map(repr, LOSS_REDUCTIONS))}, "
                     f"got {loss_reduction!r}")


def _loss_scale_tensor(loss_scale: Any) -> Any:
    """The scale tensor of a GradScaler (read on the device), else ``loss_scale``."""
    if loss_scale is None or isinstance(loss_scale, (Tensor, int, float)):
        return loss_scale
    if hasattr(loss_scale, "is_enabled") and hasattr(loss_scale, "get_scale"):
        if not loss_scale.is_enabled():
            return None
        scale = getattr(loss_scale, "_scale", None)  # torch keeps it as a device tensor
        if scale is None:
            raise RuntimeError("loss_scale: the GradScaler has no scale yet (call "
                               "scaler.scale(loss).backward() first)")
        return scale
    raise TypeError(f"loss_scale must be a tensor, a number or a torch.amp.GradScaler, got "
                    f"{type(loss_scale).__name__}")


class OptimizerBinding:
    """Connects a :class:`~gradstats.noise_scale.NoiseScaleTracker` to a
    :class:`gradstats.StableOptimizer` (made by :meth:`NoiseScaleTracker.attach`).

    Cost per optimizer step: without a pending small-batch measurement, one Python call
    that returns at once; with one, 21 tiny device operations on 0-dim tensors
    (the estimate, the running update, the logged fields) and no host synchronisation.

    Attributes:
        tracker: the tracker.
        optimizer: the optimizer.
        batch_size: default big-batch size of :meth:`observe_micro_batch`.
        loss_reduction: see :func:`reduction_scales`.
    """

    def __init__(self, tracker: Any, optimizer: Any, batch_size: Optional[TensorOrNumber],
                 *, loss_reduction: str = "mean", log: bool = True) -> None:
        if not callable(getattr(optimizer, "register_step_hook", None)):
            raise TypeError(f"optimizer must be a gradstats.StableOptimizer (it provides the "
                            f"big-batch norm through its step hook), got "
                            f"{type(optimizer).__name__}")
        p = float(getattr(optimizer, "norm_type", 2.0))
        if p != 2.0:
            raise ValueError(f"the noise scale needs squared L2 norms: the optimizer's "
                             f"norm_type must be 2, got {p:g}")
        reduction_scales(loss_reduction, 1.0, 2.0)  # validates the name
        if batch_size is not None:
            _check_positive(batch_size, "batch_size")
        self.tracker = tracker
        self.optimizer = optimizer
        self.batch_size = batch_size
        self.loss_reduction = loss_reduction
        self.log = bool(log)
        self._handle = optimizer.register_step_hook(self.on_step, prepend=True)

    def remove(self) -> None:
        """Stop feeding the tracker (its step hook is unregistered)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    @property
    def active(self) -> bool:
        """Whether the step hook is registered."""
        return self._handle is not None

    # ------------------------------------------------------------------ small batch
    def observe_micro_batch(self, micro_batch_size: TensorOrNumber,
                            batch_size: Optional[TensorOrNumber] = None, *,
                            loss_scale: Any = None) -> None:
        """Measure the gradients the parameters hold now as the small batch of the
        coming step (see :meth:`NoiseScaleTracker.observe_micro_batch`)."""
        bb = self.batch_size if batch_size is None else batch_size
        if bb is None:
            raise ValueError("observe_micro_batch: give batch_size (examples per optimizer "
                             "step) here or to tracker.attach(opt, batch_size=...)")
        bs, bb = check_batch_sizes(micro_batch_size, bb)
        if isinstance(bs, Tensor) or isinstance(bb, Tensor):
            if self.loss_reduction != "mean":
                raise ValueError("tensor batch sizes need loss_reduction='mean'")
            s_small, s_big = None, 1.0
        else:
            s_small, s_big = reduction_scales(self.loss_reduction, bs, bb)
        opt = self.optimizer
        st = grad_stats(opt.param_groups, 2.0, backend=getattr(opt, "backend", None),
                        pp_group=getattr(opt, "pp_group", None))
        sq = st.total_norm.to(torch.float32).square()
        if s_small is None:
            sq = sq * (bb / bs).to(sq).square()
        elif s_small != 1.0:
            sq = sq * (s_small * s_small)
        scale = _loss_scale_tensor(loss_scale if loss_scale is not None
                                   else getattr(opt, "grad_scaler", None))
        if isinstance(scale, Tensor):
            sq = sq / scale.detach().to(sq.device, torch.float32).reshape(()).square()
        elif scale is not None and scale != 1:
            sq = sq / float(scale) ** 2
        self.tracker.observe_small(sq, bs, bb, big_scale=s_big * s_big)

    # ------------------------------------------------------------------ big batch
    def on_step(self, opt: Any, record: Any) -> None:
        """The step hook: combine the pending small-batch measurement (if any) with the
        step's squared total norm; skipped steps are not recorded; add the fields to
        ``record.info`` when ``log``."""
        tr = self.tracker
        if not tr.pending:
            return
        total = record.stats.total_norm
        if tr.observe_big(total.square(), valid=~record.skipped) and self.log:
            for k, v in tr.fields().items():
                record.add_info(k, v)

    def __repr__(self) -> str:
        return (f"OptimizerBinding(optimizer={type(self.optimizer).__name__}, "
                f"batch_size={self.batch_size!r}, loss_reduction={self.loss_reduction!r})")


def _check_positive(b: Any, name: str) -> None:
    if isinstance(b, Tensor):
        if b.numel() != 1:
            raise ValueError(f"{name} must be a single number, got shape {tuple(b.shape)}")
        return
    if isinstance(b, bool) or not isinstance(b, (int, float)) or not (b > 0) \
            or not math.isfinite(b):
        raise ValueError(f"{name} must be a positive number of examples, got {b!r}")
