"""``NoiseScaleTracker``: the noise scale smoothed over steps, on the device.

One step's two-batch estimate (:func:`gradstats.noise_scale.estimate`) is very noisy; the
tracker averages ``|G|^2`` and ``tr(Sigma)`` *separately* with the running-statistics rule
of :mod:`gradstats.core.running` (exact sample mean during the first ``1/(1-alpha)``
recorded steps, then an exponential moving average) and divides the averages, as
McCandlish et al. (2018) recommend: the ratio of averages is far less biased than the
average of ratios. Steps whose estimate is NaN/Inf (AMP overflow) or that the optimizer
skipped are not recorded. Everything stays on the device: no host synchronisation.

The tracker also holds the *pending* small-batch measurement of the current step:
:meth:`NoiseScaleTracker.observe_small` stores it (gradient accumulation:
:meth:`NoiseScaleTracker.observe_micro_batch`; DDP: the communication hook of
:mod:`gradstats.noise_scale.ddp`) and :meth:`NoiseScaleTracker.observe_big` combines it
with the big batch's squared norm (the optimizer step's statistics pass, through
:meth:`NoiseScaleTracker.attach`).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Union

import torch
from torch import Tensor

from ..core.cache import device_tensor
from ..core.running import update_
from .binding import OptimizerBinding
from .estimate import (NoiseScaleEstimate, TensorOrNumber, as_scalar_tensor, check_batch_sizes,
                       combine)

__all__ = ["NoiseScaleTracker", "FIELD_NAMES"]

_F32 = torch.float32

#: names of the per-step fields :meth:`NoiseScaleTracker.fields` returns (and the
#: optimizer binding adds to ``StepRecord.info``): the step's own estimates of ``|G|^2``
#: and ``tr(Sigma)``, the smoothed ``B_simple``, and the two batch sizes.
FIELD_NAMES = ("noise_g2", "noise_trace", "noise_b_simple", "noise_b_small", "noise_b_big")

SmallNorm = Union[Tensor, Callable[[], Tensor]]


class NoiseScaleTracker:
    r"""Smoothed estimates of ``|G|^2``, ``tr(Sigma)`` and ``B_simple`` over training.

    Args:
        alpha: EMA factor of the running means, in (0, 1). The first ``1/(1-alpha)``
            recorded steps are averaged exactly; afterwards the average covers about
            ``(1+alpha)/(1-alpha)`` steps. Default: 0.99 (exact mean of the first 100
            steps, then an EMA over ~200).
        device: where the state lives; default: the device of the first measurement.

    Three ways to feed it:

    * :meth:`update` with two squared norms you measured yourself;
    * gradient accumulation: :meth:`attach` to a :class:`gradstats.StableOptimizer`, then
      :meth:`observe_micro_batch` after the first micro-batch's backward (one statistics
      pass per optimizer step); the step's own statistics pass provides the big batch;
    * DDP: :meth:`attach`, plus :func:`gradstats.noise_scale.register_ddp_noise_hook`
      (the local gradient norms are measured in the communication hook).

    Example::

        >>> tracker = gradstats.noise_scale.NoiseScaleTracker()
        >>> tracker.attach(opt, batch_size=256)          # 8 micro-batches of 32
        >>> for step, micro_batches in enumerate(loader):
        ...     for i, mb in enumerate(micro_batches):
        ...         (loss_fn(model(mb)) / 8).backward()
        ...         if i == 0:
        ...             tracker.observe_micro_batch(32)
        ...     opt.step(); opt.zero_grad()
        >>> tracker.b_simple           # 0-dim device tensor; float(...) reads it
    """

    def __init__(self, alpha: float = 0.99, *, device: Any = None) -> None:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) \
                or not 0.0 < float(alpha) < 1.0:
            raise ValueError(f"alpha must be a number in (0, 1), got {alpha!r}")
        self.alpha = float(alpha)
        self._running: Optional[Tensor] = None  # float32 [3, 2]: (mean, var, count) x (g2, trace)
        self._views: Any = None
        if device is not None:
            self._running = torch.zeros(3, 2, dtype=_F32, device=torch.device(device))
        self._last_x: Optional[Tensor] = None  # float32 [2]: the last step's (g2, trace)
        self._last_b: Any = None
        self._pending: Any = None
        self._binding: Any = None
        self._consts: Dict[Any, Tensor] = {}  # cached device constants (batch sizes, weights)

    # ------------------------------------------------------------------ state
    def _state(self, device: torch.device) -> Tensor:
        r = self._running
        if r is None or r.device != device:
            r = self._running = (torch.zeros(3, 2, dtype=_F32, device=device) if r is None
                                 else r.to(device))
            self._views = None
        if self._views is None:
            # (mean, var, count) rows and the two means, as views made once
            self._views = (r[0], r[1], r[2], r[0, 0], r[0, 1])
        return r

    @property
    def count(self) -> Tensor:
        """float32 0-dim: number of steps recorded so far."""
        r = self._state(self._device())
        return r[2, 0]

    def _device(self) -> torch.device:
        return self._running.device if self._running is not None else torch.device("cpu")

    @property
    def g2(self) -> Tensor:
        """Smoothed ``|G|^2`` (0-dim float32 device tensor; NaN before the first step)."""
        r = self._state(self._device())
        return torch.where(r[2, 0] > 0, r[0, 0], float("nan"))

    @property
    def trace(self) -> Tensor:
        """Smoothed ``tr(Sigma)`` (0-dim float32 device tensor; NaN before the first step)."""
        r = self._state(self._device())
        return torch.where(r[2, 1] > 0, r[0, 1], float("nan"))

    @property
    def b_simple(self) -> Tensor:
        """``tr(Sigma) / |G|^2`` from the smoothed values (0-dim float32 device tensor).

        NaN before the first recorded step; negative or infinite while the smoothed
        ``|G|^2`` is not positive (the noise still hides the gradient)."""
        return self.trace / self.g2

    def smoothed(self) -> NoiseScaleEstimate:
        """The smoothed ``(g2, trace, b_simple)``."""
        g2, tr = self.g2, self.trace
        return NoiseScaleEstimate(g2=g2, trace=tr, b_simple=tr / g2)

    def reset(self) -> None:
        """Forget every recorded step and the pending measurement."""
        if self._running is not None:
            self._running.zero_()
        self._last_x = None
        self._last_b = None
        self._pending = None

    def state_dict(self) -> Dict[str, Any]:
        """``{"version", "alpha", "running"}``: a copy of the smoothed state (float32
        ``[3, 2]``: mean, variance and count of the per-step ``|G|^2`` and ``tr(Sigma)``
        estimates)."""
        r = self._state(self._device())
        return {"version": 1, "alpha": self.alpha, "running": r.detach().clone()}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a dict from :meth:`state_dict` (checked before anything changes).

        Raises:
            ValueError: not a noise-scale tracker state, or a different ``alpha``.
        """
        if not isinstance(state_dict, dict) or "running" not in state_dict:
            raise ValueError("state_dict must come from NoiseScaleTracker.state_dict() "
                             "(a dict with 'running')")
        run = state_dict["running"]
        if not isinstance(run, Tensor) or tuple(run.shape) != (3, 2):
            raise ValueError(f"state_dict['running'] must be a [3, 2] tensor, got "
                             f"{getattr(run, 'shape', type(run).__name__)}")
        alpha = state_dict.get("alpha", self.alpha)
        if float(alpha) != self.alpha:
            raise ValueError(f"the state was saved with alpha={alpha}, this tracker has "
                             f"alpha={self.alpha}")
        self._state(self._device()).copy_(run.to(self._device(), _F32))
        self._pending = None

    # ------------------------------------------------------------------ recording
    def update(self, sqnorm_small: TensorOrNumber, sqnorm_big: TensorOrNumber,
               b_small: TensorOrNumber, b_big: TensorOrNumber, *,
               valid: Optional[Tensor] = None) -> NoiseScaleEstimate:
        """Record one step's two squared norms (see :func:`gradstats.noise_scale.estimate`).

        Args:
            sqnorm_small, sqnorm_big: squared norms of the mean gradients over
                ``b_small < b_big`` examples (tensors on any device, or numbers).
            b_small, b_big: the batch sizes.
            valid: optional bool 0-dim tensor: record this step only where ``True``.
                Non-finite estimates are never recorded.

        Returns:
            NoiseScaleEstimate: this step's own (unsmoothed) estimates; the smoothed
            ones are :attr:`g2`, :attr:`trace`, :attr:`b_simple`.

        Raises:
            TypeError, ValueError: as :func:`gradstats.noise_scale.estimate`.
        """
        bs, bb = check_batch_sizes(b_small, b_big)
        dev = self._device() if self._running is not None else None
        for x in (sqnorm_small, sqnorm_big):
            if isinstance(x, Tensor):
                dev = x.device
                break
        dev = dev or torch.device("cpu")
        s = as_scalar_tensor(sqnorm_small, "sqnorm_small", dev, _F32)
        b = as_scalar_tensor(sqnorm_big, "sqnorm_big", dev, _F32)
        self._record(s, b, bs, bb, valid)
        return self.last

    def _record(self, s: Tensor, b: Tensor, bs: TensorOrNumber, bb: TensorOrNumber,
                valid: Optional[Tensor], big_scale: float = 1.0) -> Tensor:
        """Estimate (g2, trace) as one [2] tensor, record it; about 17 device ops."""
        if isinstance(bs, Tensor) or isinstance(bb, Tensor):
            est = combine(s, b * big_scale if big_scale != 1.0 else b, bs, bb)
            x = torch.stack((est.g2, est.trace))
        else:
            # [g2, trace] = W @ [s, b]: the estimator as one 2x2 matrix (cached per sizes)
            x = torch.mv(self._weights(bs, bb, big_scale, s.device), torch.stack((s, b)))
        r = self._state(s.device)
        ok = self._const(True, torch.bool, s.device) if valid is None else \
            valid.to(device=s.device, dtype=torch.bool).reshape(())
        # non-finite values are not recorded (update_ checks each; both are non-finite
        # together since each mixes both squared norms)
        mean, var, count = self._views[:3]
        update_(mean, var, count, x, ok.expand(2), self.alpha)
        self._last_x = x
        self._last_b = (bs, bb)
        return x

    def _const(self, v: Any, dtype: torch.dtype, device: torch.device) -> Tensor:
        key = (v, dtype, device)
        t = self._consts.get(key)
        if t is None:
            if len(self._consts) > 64:
                self._consts.clear()
            t = self._consts[key] = device_tensor(v, dtype, device)
        return t

    def _weights(self, bs: float, bb: float, big_scale: float, device: torch.device) -> Tensor:
        d = bb - bs
        k = bs * bb / d
        w = ((-bs / d, bb / d * big_scale), (k, -k * big_scale))
        return self._const(w, _F32, device)

    @property
    def last(self) -> Optional[NoiseScaleEstimate]:
        """The last recorded step's own (unsmoothed) estimate, or ``None``."""
        x = self._last_x
        if x is None:
            return None
        return NoiseScaleEstimate(g2=x[0], trace=x[1], b_simple=x[1] / x[0])

    def observe_small(self, sqnorm_small: SmallNorm, b_small: TensorOrNumber,
                      b_big: TensorOrNumber, *, big_scale: float = 1.0) -> None:
        """Store the small batch's squared norm for the current step; the next
        :meth:`observe_big` combines it with the big batch's.

        A later call before :meth:`observe_big` replaces it.

        Args:
            sqnorm_small: 0-dim tensor, ``|G_small|^2`` of the mean gradient over
                ``b_small`` examples, or a callable returning it (called in
                :meth:`observe_big`: e.g. it waits for an asynchronous all-reduce).
            b_small, b_big: the batch sizes, ``b_small < b_big``.
            big_scale: factor applied to the squared norm given to :meth:`observe_big`
                to make it the mean gradient's (loss-reduction conventions).

        Raises:
            ValueError, TypeError: invalid batch sizes.
        """
        bs, bb = check_batch_sizes(b_small, b_big)
        if not (isinstance(sqnorm_small, Tensor) or callable(sqnorm_small)):
            raise TypeError(f"sqnorm_small must be a tensor or a callable returning one, "
                            f"got {type(sqnorm_small).__name__}")
        self._pending = (sqnorm_small, bs, bb, float(big_scale))

    @property
    def pending(self) -> bool:
        """Whether a small-batch measurement waits for its step."""
        return self._pending is not None

    def observe_big(self, sqnorm_big: Tensor, *, valid: Optional[Tensor] = None) -> bool:
        """Combine the big batch's squared norm with the pending small-batch measurement
        and record the step (no host sync). Does nothing when none is pending.

        Args:
            sqnorm_big: 0-dim tensor, the squared norm of the step's gradient.
            valid: optional bool 0-dim tensor: record only where ``True``.

        Returns:
            whether a measurement was pending (and combined); the step's own estimate is
            then :attr:`last`.
        """
        p = self._pending
        if p is None:
            return False
        self._pending = None
        small, bs, bb, scale = p
        if not isinstance(small, Tensor):
            small = small()
        b = sqnorm_big.detach().reshape(())
        if b.dtype != _F32:
            b = b.to(_F32)
        s = small.detach().reshape(())
        if s.dtype != _F32 or s.device != b.device:
            s = s.to(device=b.device, dtype=_F32)
        self._record(s, b, bs, bb, valid, scale)
        return True

    # ------------------------------------------------------------------ logging
    def _bt(self, v: Any, device: torch.device) -> Tensor:
        if isinstance(v, Tensor):
            return v.reshape(()).to(device=device, dtype=_F32)
        return self._const(float(v), _F32, device)

    def fields(self) -> Dict[str, Tensor]:
        """The last step's values under :data:`FIELD_NAMES` (0-dim device tensors, no
        sync; ``{}`` before the first step): ``noise_g2`` and ``noise_trace`` (the step's
        own estimates), ``noise_b_simple`` (smoothed; NaN until a step was recorded),
        ``noise_b_small`` and ``noise_b_big``."""
        x = self._last_x
        if x is None:
            return {}
        dev = x.device
        bs, bb = self._last_b
        g2, tr = x.unbind()
        m_g2, m_tr = self._views[3:]
        return {"noise_g2": g2, "noise_trace": tr, "noise_b_simple": m_tr / m_g2,
                "noise_b_small": self._bt(bs, dev), "noise_b_big": self._bt(bb, dev)}

    # --------------------------------------------------------------- optimizer binding
    def attach(self, optimizer: Any, batch_size: Optional[TensorOrNumber] = None, *,
               loss_reduction: str = "mean", log: bool = True) -> Any:
        """Feed the tracker from a :class:`gradstats.StableOptimizer`'s steps.

        Every step, the squared total norm the step's statistics pass already measured
        is the big batch, combined with the small-batch measurement made since the
        previous step (:meth:`observe_micro_batch`, or the DDP hook); steps without one
        cost a dictionary lookup. See :class:`gradstats.noise_scale.OptimizerBinding`.

        Args:
            optimizer: a ``StableOptimizer`` with ``norm_type=2``.
            batch_size: examples per optimizer step (the big batch), used by
                :meth:`observe_micro_batch` when it is not given there.
            loss_reduction: how the gradients relate to per-example means:
                ``"mean"`` (default: the accumulated gradient is the mean over the step's
                examples, e.g. each micro-batch loss is its mean divided by the number of
                micro-batches), ``"micro_mean"`` (each micro-batch loss is its own mean,
                not divided: the accumulated gradient is a sum of micro-batch means) or
                ``"sum"`` (losses are sums over examples).
            log: add this step's values to ``StepRecord.info`` (:data:`FIELD_NAMES`)
                for telemetry.

        Returns:
            the :class:`~gradstats.noise_scale.OptimizerBinding` (``remove()`` detaches).

        Raises:
            TypeError: ``optimizer`` has no step hooks (not a ``StableOptimizer``).
            ValueError: ``norm_type`` is not 2, or invalid ``batch_size`` or
                ``loss_reduction``.
        """
        if self._binding is not None:
            self._binding.remove()
        self._binding = OptimizerBinding(self, optimizer, batch_size,
                                         loss_reduction=loss_reduction, log=log)
        return self._binding

    def observe_micro_batch(self, micro_batch_size: TensorOrNumber,
                            batch_size: Optional[TensorOrNumber] = None, *,
                            loss_scale: Any = None) -> None:
        """Gradient accumulation: measure the first micro-batch's gradient (call right
        after its ``backward()``, before the next micro-batch). One statistics pass.

        Args:
            micro_batch_size: examples in this micro-batch (the small batch).
            batch_size: examples in the whole optimizer step (default: :meth:`attach`'s).
            loss_scale: the AMP loss scale the gradients carry now: a tensor, a number or
                a ``torch.amp.GradScaler`` (its scale tensor is read on the device).
                Default: the attached optimizer's ``grad_scaler`` if it has one, else 1.

        Raises:
            RuntimeError: the tracker is not attached to an optimizer.
            ValueError: no batch size, or ``micro_batch_size >= batch_size``.
        """
        if self._binding is None or not self._binding.active:
            raise RuntimeError("observe_micro_batch needs an optimizer: call "
                               "tracker.attach(opt, batch_size=...) first")
        self._binding.observe_micro_batch(micro_batch_size, batch_size, loss_scale=loss_scale)

    def __repr__(self) -> str:
        attached = self._binding is not None and self._binding.active
        return f"NoiseScaleTracker(alpha={self.alpha}, attached={attached})"
