"""The built-in rules: skip on NaN/Inf, fixed-norm clipping, ZClip, AutoClip, spike skipping.

Each rule has a torch implementation (:meth:`update`, the one user code and the fallback
backends run) and declares a :class:`~gradstats.policies.base.FusedSpec` so that the
finalize kernel can run the same rule without torch ops. The float64 re-statement of every
rule, which both are tested against, is in :mod:`gradstats.core.reference`.

Sources:

* :class:`SkipNonFinite` — optax's ``apply_if_finite``; AMP ``GradScaler``'s ``found_inf``;
* :class:`FixedNorm` — ``torch.nn.utils.clip_grad_norm_`` (Pascanu et al., ICML 2013);
* :class:`ZScoreClip` — ZClip, Kumar et al. 2025, arXiv:2504.02507;
* :class:`QuantileClip` — AutoClip, Seetharaman et al., MLSP 2020, arXiv:2007.14469;
* :class:`SpikeSkip` — the idea of OLMo-core's ``SkipStepOptimizer`` (rolling mean + k sigma).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..core import running
from .base import (F32, TINY, Decision, FusedSpec, Rule, StepContext, check_int, check_number,
                   torch_clip_coef)

__all__ = ["FixedNorm", "QuantileClip", "SkipNonFinite", "SpikeSkip", "ZScoreClip"]


class SkipNonFinite(Rule):
    r"""Skip a step whose gradients (or loss, or AMP state) are not finite.

    ``StableOptimizer(skip_nonfinite=True)`` (the default) puts this rule first in its chain.
    With ``any_nonfinite=False`` only an AMP overflow (the scaler's ``found_inf``, or any
    NaN/Inf while a loss scale is still in the gradients) is skipped: AMP overflow must never
    reach the weights.

    Args:
        any_nonfinite: skip on any NaN/Inf in gradients or loss. Default: True.
    """

    may_skip = True

    def __init__(self, any_nonfinite: bool = True) -> None:
        super().__init__()
        self.any_nonfinite = bool(any_nonfinite)

    def config(self) -> Dict[str, Any]:
        return {"any_nonfinite": self.any_nonfinite}

    def fused_spec(self) -> FusedSpec:
        return FusedSpec("skip_nonfinite", (1.0 if self.any_nonfinite else 0.0,), skips=True)

    def update(self, ctx: StepContext) -> Decision:
        if self.any_nonfinite or ctx.amp_scaled:
            bad = ~ctx.finite
        elif ctx.amp_overflow is not None:
            bad = ctx.amp_overflow
        else:
            bad = torch.zeros((), dtype=torch.bool, device=ctx.total_norm.device)
        return Decision(skip=bad)


class FixedNorm(Rule):
    r"""Clip to a fixed norm: exactly ``torch.nn.utils.clip_grad_norm_``.

    Global (default): every gradient is multiplied by
    ``clamp(max_norm / (total_norm + 1e-6), max=1)`` — torch's coefficient, computed with the
    same float32 operations, so the same bits for the same total norm. With
    ``per_group=True`` each parameter group is clipped to ``max_norm`` on its own norm.

    Gradient clipping by norm: Pascanu, Mikolov, Bengio, "On the difficulty of training
    recurrent neural networks", ICML 2013.

    Args:
        max_norm: largest allowed norm, a number ``>= 0``.
        per_group: clip each parameter group separately. Default: False.

    Raises:
        ValueError: ``max_norm`` is negative, NaN or infinite.
    """

    def __init__(self, max_norm: float, per_group: bool = False) -> None:
        super().__init__()
        self.max_norm = check_number("max_norm", max_norm, allow_zero=True)
        self.per_group = bool(per_group)

    def config(self) -> Dict[str, Any]:
        return {"max_norm": self.max_norm, "per_group": self.per_group}

    def fused_spec(self) -> FusedSpec:
        return FusedSpec("fixed_norm", (self.max_norm, 1.0 if self.per_group else 0.0))

    def update(self, ctx: StepContext) -> Decision:
        norm = ctx.norm if self.per_group else ctx.total_norm
        return Decision(coef=torch_clip_coef(self.max_norm, norm))


class ZScoreClip(Rule):
    r"""ZClip: adaptive clipping on the z-score of the gradient norm.

    Kumar, Owen, Roy Chowdhury, Güra — "ZClip: Adaptive Spike Mitigation for LLM
    Pre-Training", 2025 (arXiv:2504.02507). The rules:

    1. Warm-up: for the first ``warmup`` recorded steps nothing is clipped (except by
       ``max_norm``); the statistics of the total norm are collected.
    2. Afterwards, each step's norm ``g`` gets the z-score ``z = (g - mu) / sigma`` against
       the statistics of the *previous* steps. If ``z > z_thresh`` the gradients are
       scaled to the norm ``mu + z_thresh**2 * sigma / z`` (the paper's reciprocal rule:
       the larger the spike, the harder it is pulled back, never below ``mu``).
    3. ``mu`` and ``sigma**2`` follow gradstats' one running-statistics rule
       (:mod:`gradstats.core.running`: exact sample statistics for the first
       ``1/(1-alpha)`` values, then an EMA with factor ``alpha``), fed with the *clipped*
       norm so that a spike does not inflate the statistics that judge the next one. (The
       paper's EMA variance weighs the newest deviation by ``1 - alpha`` against the updated
       mean; the rule here weighs it by ``alpha (1 - alpha)`` against the previous mean —
       West's exponentially weighted variance. Both converge to the same band.)

    Measured on the stability benchmark (``benchmarks/stability/README.md``): with AdamW it
    never acted in the scenarios of natural instability (their blow-ups come in the first
    few steps, before any statistics exist), and with corrupted batches it was slightly
    worse than a fixed ceiling; it is not a substitute for ``FixedNorm`` — combine them
    (``max_norm=``) rather than replace one with the other.

    ``max_norm``, when given, is an absolute ceiling applied on top (also during warm-up),
    like the paper's optional fallback ``max_grad_norm``. Steps skipped by an earlier rule
    and non-finite norms are not recorded.

    Args:
        alpha: EMA factor in (0, 1). Default: 0.97.
        z_thresh: z-score above which a step is clipped, > 0. Default: 2.5.
        warmup: recorded steps before clipping starts, >= 1. Default: 25.
        max_norm: optional absolute ceiling on the total norm.

    ``Decision.info``: ``zclip_z`` (the z-score, 0 during warm-up), ``zclip_mean``,
    ``zclip_std`` (statistics before this step), ``zclip_target`` (norm after clipping).
    """

    def __init__(self, alpha: float = 0.97, z_thresh: float = 2.5, warmup: int = 25,
                 max_norm: Optional[float] = None) -> None:
        super().__init__()
        a = check_number("alpha", alpha)
        if not a < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
        self.alpha = a
        self.z_thresh = check_number("z_thresh", z_thresh)
        self.warmup = check_int("warmup", warmup, 1)
        self.max_norm = None if max_norm is None else check_number("max_norm", max_norm,
                                                                   allow_zero=True)

    def config(self) -> Dict[str, Any]:
        return {"alpha": self.alpha, "z_thresh": self.z_thresh, "warmup": self.warmup,
                "max_norm": self.max_norm}

    def state_config_fields(self) -> Tuple[str, ...]:
        return ("alpha",)

    def fused_spec(self) -> FusedSpec:
        return FusedSpec("zscore", (self.alpha, self.z_thresh, float(self.warmup),
                                    -1.0 if self.max_norm is None else self.max_norm,
                                    self.z_thresh * self.z_thresh, 1.0 - self.alpha),
                         fstate=(("mean", 1), ("var", 1), ("count", 1)),
                         info=(("zclip_z", 1), ("zclip_mean", 1), ("zclip_std", 1),
                               ("zclip_target", 1)))

    def _init_state(self, num_groups: int, device: torch.device) -> Dict[str, Tensor]:
        buf = torch.zeros(3, dtype=F32, device=device)
        return {"mean": buf[0], "var": buf[1], "count": buf[2]}

    def update(self, ctx: StepContext) -> Decision:
        s = self.state
        g = ctx.total_norm
        mean, var, count = s["mean"], s["var"], s["count"]
        std = var.clamp_min(0).sqrt()
        active = count >= self.warmup
        z = torch.where(active, (g - mean) / std.clamp_min(TINY), torch.zeros_like(g))
        over = active & (z > self.z_thresh)
        safe_z = torch.where(over, z, torch.full_like(z, self.z_thresh))
        target = mean + (self.z_thresh * self.z_thresh) * std / safe_z
        clipped_norm = torch.where(over, target, g)
        coef = torch.where(over, torch_clip_coef(target, g), torch.ones_like(g))
        if self.max_norm is not None:
            coef = torch.minimum(coef, torch_clip_coef(self.max_norm, g))
        info = {"zclip_z": z, "zclip_mean": mean.clone(), "zclip_std": std,
                "zclip_target": clipped_norm}
        running.update_(mean, var, count, clipped_norm, ~ctx.skip, self.alpha)
        return Decision(coef=coef, info=info)


class QuantileClip(Rule):
    r"""AutoClip: clip to a quantile of the history of gradient norms.

    Seetharaman, Wichern, Pardo, Le Roux — "AutoClip: Adaptive Gradient Clipping for
    Source Separation Networks", MLSP 2020 (arXiv:2007.14469). Each step the total norm
    is appended to the history, then the gradients are clipped to the ``quantile`` of
    the history (the paper's p-th percentile with ``p = 100 * quantile``; the paper
    recommends p = 10, i.e. ``quantile=0.1``). The quantile interpolates linearly between
    order statistics, like ``numpy.percentile`` and ``torch.quantile``.

    The paper keeps every norm since the start; here the history is an on-device ring
    buffer of the last ``history`` norms. Non-finite norms and skipped steps are not
    recorded.

    Args:
        quantile: in (0, 1]. Default: 0.9.
        history: ring buffer length, 1 <= history <= 4096. Default: 1024.

    ``Decision.info``: ``quantile_threshold``.
    """

    #: longest history the finalize kernels sort in one block
    MAX_HISTORY = 4096

    def __init__(self, quantile: float = 0.9, history: int = 1024) -> None:
        super().__init__()
        q = check_number("quantile", quantile)
        if q > 1:
            raise ValueError(f"quantile must be in (0, 1] (a fraction, not a percentage), "
                             f"got {quantile!r}")
        self.quantile = q
        self.history = check_int("history", history, 1)
        if self.history > self.MAX_HISTORY:
            raise ValueError(f"history must be <= {self.MAX_HISTORY}, got {history!r}")

    def config(self) -> Dict[str, Any]:
        return {"quantile": self.quantile, "history": self.history}

    def state_config_fields(self) -> Tuple[str, ...]:
        return ("history",)

    def fused_spec(self) -> FusedSpec:
        return FusedSpec("quantile", (self.quantile, float(self.history)),
                         fstate=(("buffer", self.history),), istate=(("count", 1),),
                         info=(("quantile_threshold", 1),))

    def _init_state(self, num_groups: int, device: torch.device) -> Dict[str, Tensor]:
        return {"buffer": torch.full((self.history,), math.inf, dtype=F32, device=device),
                "count": torch.zeros((), dtype=torch.int64, device=device)}

    def update(self, ctx: StepContext) -> Decision:
        buf, count = self.state["buffer"], self.state["count"]
        g = ctx.total_norm
        H = self.history
        valid = (~ctx.skip) & (g < math.inf)
        slot = torch.remainder(count, H).reshape(1)
        old = buf.gather(0, slot)
        buf.scatter_(0, slot, torch.where(valid, g.reshape(1), old))
        count.add_(valid.to(count.dtype))
        n = count.clamp(max=H)
        # unfilled slots hold +inf, so they sort after every recorded norm
        srt = torch.sort(buf).values
        last = (n - 1).clamp_min(0)
        pos = self.quantile * last.to(F32)
        lo = pos.floor().to(torch.int64).clamp(max=H - 1)
        hi = torch.minimum(lo + 1, last)
        frac = pos - lo.to(F32)
        v_lo = srt.gather(0, lo.reshape(1)).reshape(())
        v_hi = srt.gather(0, hi.reshape(1)).reshape(())
        thr = torch.where(frac > 0, v_lo + frac * (v_hi - v_lo), v_lo)
        coef = torch.where(n > 0, torch_clip_coef(thr, g), torch.ones_like(g))
        return Decision(coef=coef, info={"quantile_threshold": thr})


class SpikeSkip(Rule):
    r"""Skip a step whose gradient norm (and/or loss) is an outlier.

    The idea of OLMo-core's ``SkipStepOptimizer`` (Allen Institute for AI): keep a rolling
    window of the last ``window`` values of each signal; once ``warmup`` values have been
    recorded, a step is skipped when a signal exceeds the window's mean by more than ``k``
    standard deviations (sample std) of the *previous* values. Only upward outliers count.
    The window lives on the device and is saved in ``state_dict``.

    Every finite value is recorded, including the outlier that was skipped (as OLMo-core
    does, so a lasting change of scale is learnt instead of locking the run out), unless
    an earlier rule (non-finite gradients, AMP overflow) already skips the step.

    Args:
        window: number of past values kept, 2 <= window <= 4096. Default: 64.
        k: number of standard deviations, > 0. Default: 4.0.
        warmup: values needed before skipping starts, >= 2. Default: 16.

    The defaults were chosen on the stability benchmark (``benchmarks/stability/README.md``):
    blow-ups and spikes came within the first 30 steps, where the former 64-step warm-up
    let them through; with raw recording of a skipped value, ``k = 4`` caught 20 of 24
    corrupted-batch outliers (``k = 6``: 12) with no false skip on healthy runs.
        on: signals, any of ``"grad_norm"`` (total gradient norm) and ``"loss"`` (needs
            ``StableOptimizer.step(loss=...)`` or a closure). Default: ``("grad_norm",)``.

    ``Decision.info``: ``spike_mean``, ``spike_std``, ``spike_flags`` (one per signal).
    """

    may_skip = True
    SIGNALS = ("grad_norm", "loss")
    MAX_WINDOW = 4096

    def __init__(self, window: int = 64, k: float = 4.0, warmup: int = 16,
                 on: Sequence[str] = ("grad_norm",)) -> None:
        super().__init__()
        self.window = check_int("window", window, 2)
        if self.window > self.MAX_WINDOW:
            raise ValueError(f"window must be <= {self.MAX_WINDOW}, got {window!r}")
        self.k = check_number("k", k)
        self.warmup = check_int("warmup", warmup, 2)
        if isinstance(on, str):
            on = (on,)
        on = tuple(on)
        if not on or any(s not in self.SIGNALS for s in on) or len(set(on)) != len(on):
            raise ValueError(f"on must be a non-empty tuple of distinct signals from "
                             f"{self.SIGNALS}, got {on!r}")
        self.on = on
        self.needs_loss = "loss" in on

    def config(self) -> Dict[str, Any]:
        return {"window": self.window, "k": self.k, "warmup": self.warmup, "on": self.on}

    def state_config_fields(self) -> Tuple[str, ...]:
        return ("window", "on")

    def fused_spec(self) -> FusedSpec:
        S = len(self.on)
        return FusedSpec("spike", (float(self.window), self.k, float(self.warmup),
                                   1.0 if "grad_norm" in self.on else 0.0,
                                   1.0 if "loss" in self.on else 0.0,
                                   1.0 if self.on[0] == "loss" else 0.0),
                         fstate=(("buffer", S * self.window),), istate=(("count", S),),
                         info=(("spike_mean", S), ("spike_std", S), ("spike_flags", S)),
                         skips=True)

    def _init_state(self, num_groups: int, device: torch.device) -> Dict[str, Tensor]:
        S = len(self.on)
        return {"buffer": torch.zeros((S, self.window), dtype=F32, device=device),
                "count": torch.zeros((S,), dtype=torch.int64, device=device)}

    def bind_state(self, state: Dict[str, Tensor], num_groups: int,
                   device: torch.device) -> None:
        state = dict(state)
        state["buffer"] = state["buffer"].view(len(self.on), self.window)
        super().bind_state(state, num_groups, device)

    def update(self, ctx: StepContext) -> Decision:
        buf, count = self.state["buffer"], self.state["count"]
        dev = buf.device
        xs = []
        for sig in self.on:
            if sig == "grad_norm":
                xs.append(ctx.total_norm.to(dev, F32))
            else:
                if ctx.loss is None:
                    raise ValueError("SpikeSkip(on=('loss', ...)) needs the loss: call "
                                     "step(loss=loss) or step(closure)")
                xs.append(ctx.loss.detach().to(dev, F32).reshape(()))
        x = torch.stack(xs)  # [S]
        W = self.window
        n = count.clamp(max=W)
        mask = torch.arange(W, device=dev).unsqueeze(0) < n.unsqueeze(1)
        nf = n.to(F32)
        mean = torch.where(mask, buf, 0.0).sum(1) / nf.clamp_min(1.0)
        dev2 = torch.where(mask, (buf - mean.unsqueeze(1)) ** 2, 0.0).sum(1)
        std = (dev2 / (nf - 1.0).clamp_min(1.0)).sqrt()
        active = count >= self.warmup
        flags = active & (x > mean + self.k * std)
        skip = flags.any()
        valid = (~ctx.skip) & (x.abs() < math.inf)
        slot = torch.remainder(count, W).unsqueeze(1)
        old = buf.gather(1, slot)
        buf.scatter_(1, slot, torch.where(valid.unsqueeze(1), x.unsqueeze(1), old))
        count.add_(valid.to(count.dtype))
        return Decision(skip=skip, info={"spike_mean": mean, "spike_std": std,
                                         "spike_flags": flags})
