"""Clipping and step-skipping policies for :class:`gradstats.StableOptimizer`.

A policy is a small object with explicit, device-resident state, in the spirit of optax's
``GradientTransformation`` (an ``init`` that creates the state, an ``update`` that consumes
one step's statistics). Every decision is taken on the device with ``torch.where`` /
``clamp``: no policy ever reads a device value on the host, so a step that uses them needs
no synchronisation and can be captured in a CUDA graph. State tensors are updated in place
(their addresses never change after ``init``), which is what graph replay needs.

Each step, :class:`gradstats.StableOptimizer` builds a :class:`StepContext` (the step's
norms, whether it is already being skipped, the parameters and gradients) and calls
``policy.update(ctx)``, which returns a :class:`Decision`:

* ``coef``: a float32 factor ``<= 1`` for the gradients, 0-dim (all groups) or ``[G]``
  (one per parameter group), or ``None`` for "leave the gradients alone";
* ``skip``: a bool 0-dim tensor, ``True`` to skip the optimizer step, or ``None``;
* ``clipped``: bool ``[G]`` for policies that scale gradients themselves (AGC);
* ``info``: extra device tensors worth logging (z-score, threshold, ...).

Rule shared by all stateful policies: a step's statistics enter a policy's history only if
they are finite and no earlier rule (non-finite gradients, AMP overflow, an earlier policy)
already decided to skip the step. :class:`SpikeSkip` also records the outlier it skips, as
OLMo-core's SkipStep optimizers do, so a lasting change of scale is learnt instead of
locking the run out.

Policies compose: pass a list to ``StableOptimizer(policy=[...])`` or build a
:class:`Chain`; coefficients multiply, skip flags are or-ed, in order.

Sources:

* :class:`FixedNorm` — ``torch.nn.utils.clip_grad_norm_`` (Pascanu et al., ICML 2013);
* :class:`ZScoreClip` — ZClip, Kumar et al. 2025, arXiv:2504.02507;
* :class:`QuantileClip` — AutoClip, Seetharaman et al., MLSP 2020, arXiv:2007.14469;
* :class:`AdaptiveGradClip` — AGC, Brock et al., ICML 2021 (NFNets), arXiv:2102.06171;
* :class:`SpikeSkip` — the idea of OLMo-core's ``SkipStepOptimizer`` (rolling mean + k sigma).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = [
    "AdaptiveGradClip",
    "Chain",
    "Decision",
    "FixedNorm",
    "Policy",
    "QuantileClip",
    "SpikeSkip",
    "StepContext",
    "ZScoreClip",
]

_F32 = torch.float32
_TINY = 1e-12  # floor of a standard deviation used as a divisor


# ----------------------------------------------------------------------------- contract
@dataclass
class StepContext:
    """What a policy sees of one optimizer step (all values on the statistics device).

    Attributes:
        norm: float32 ``[G]``, each parameter group's gradient norm (true scale: already
            divided by the AMP loss scale when one is folded in).
        total_norm: float32 0-dim, the norm over all groups.
        norm_type: order of the norms.
        finite: bool 0-dim, ``True`` when every gradient element and the norm are finite.
        skip: bool 0-dim, whether an earlier rule already skips this step. A policy that
            runs after another sees the updated flag.
        params: per group, the parameters that have a gradient.
        grads: per group, their gradients (same order as ``params``).
        grad_factor: float32 0-dim factor that turns ``grads`` into true gradients (the
            inverse AMP loss scale when it is folded into the step), or ``None`` (1).
        loss: float32 0-dim loss of the step, or ``None`` when the caller gave none.
        num_groups: ``G``.
    """

    norm: Tensor
    total_norm: Tensor
    norm_type: float
    finite: Tensor
    skip: Tensor
    params: List[List[Tensor]]
    grads: List[List[Tensor]]
    grad_factor: Optional[Tensor] = None
    loss: Optional[Tensor] = None

    @property
    def num_groups(self) -> int:
        return len(self.grads)


@dataclass
class Decision:
    """What a policy decided for one step (device tensors; ``None`` means "no opinion").

    Attributes:
        coef: float32 factor ``<= 1`` to multiply the gradients by: 0-dim (every group)
            or ``[G]`` (per group). Torch's clipping convention: 1 leaves them unchanged.
        skip: bool 0-dim, skip the optimizer step.
        clipped: bool ``[G]``, groups whose gradients the policy scaled itself.
        info: extra device tensors for logging, by name.
    """

    coef: Optional[Tensor] = None
    skip: Optional[Tensor] = None
    clipped: Optional[Tensor] = None
    info: Dict[str, Tensor] = field(default_factory=dict)


class Policy:
    """Base class: explicit device-resident state, ``init`` then ``update`` every step.

    Subclasses set :attr:`may_skip` when they can ask for a step to be skipped (the
    optimizer then knows on the host, without reading any device value, whether a skip
    is possible this step), implement :meth:`_init_state` and :meth:`update`, and list
    their constructor arguments in :meth:`config`.
    """

    #: whether :meth:`update` may return a ``skip`` flag.
    may_skip: bool = False
    #: whether :meth:`update` needs ``StepContext.loss``.
    needs_loss: bool = False

    def __init__(self) -> None:
        self.state: Dict[str, Tensor] = {}
        self._device: Optional[torch.device] = None
        self._num_groups = 0

    # -- state ------------------------------------------------------------------------
    def init(self, num_groups: int, device: Any = "cpu") -> Dict[str, Tensor]:
        """Create fresh state for ``num_groups`` parameter groups on ``device``.

        Returns:
            the state dict (also kept as :attr:`state`).
        """
        self._device = torch.device(device)
        self._num_groups = int(num_groups)
        self.state = self._init_state(self._num_groups, self._device)
        return self.state

    def _init_state(self, num_groups: int, device: torch.device) -> Dict[str, Tensor]:
        return {}

    def ensure_state(self, num_groups: int, device: torch.device) -> None:
        """Initialise on first use; follow the device if the gradients moved.

        Host-side checks only (device and group count are Python metadata).
        """
        if self._device is None:
            self.init(num_groups, device)
            return
        if self._device != device:
            self.to(device)
        if num_groups != self._num_groups:
            self._resize(num_groups)

    def _resize(self, num_groups: int) -> None:
        """Adapt per-group state to a new group count (global state: nothing to do)."""
        self._num_groups = num_groups

    def to(self, device: Any) -> "Policy":
        """Move the state to ``device``."""
        device = torch.device(device)
        self.state = {k: v.to(device) for k, v in self.state.items()}
        self._device = device
        return self

    def update(self, ctx: StepContext) -> Decision:
        """Consume one step's statistics, update the state in place, decide."""
        raise NotImplementedError

    def config(self) -> Dict[str, Any]:
        """Constructor arguments, for ``repr`` and ``state_dict``."""
        return {}

    def state_dict(self) -> Dict[str, Any]:
        """``{"type", "config", "state"}``; state tensors are copies."""
        return {"type": type(self).__name__, "config": self.config(),
                "state": {k: v.detach().clone() for k, v in self.state.items()}}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore the state saved by :meth:`state_dict`.

        Tensors are copied into the existing state when shapes match (addresses kept, so
        a captured CUDA graph keeps working), else replaced.

        Raises:
            ValueError: the dict was saved by a different policy type.
        """
        t = state_dict.get("type")
        if t is not None and t != type(self).__name__:
            raise ValueError(f"state_dict was saved by a {t}, cannot load it into a "
                             f"{type(self).__name__}")
        saved = state_dict.get("state", {})
        if self._device is None:
            first = next(iter(saved.values()), None)
            dev = first.device if isinstance(first, Tensor) else torch.device("cpu")
            self._device = dev
        new = {}
        for k, v in saved.items():
            cur = self.state.get(k)
            v = v.to(self._device)
            if cur is not None and cur.shape == v.shape and cur.dtype == v.dtype:
                cur.copy_(v)
                new[k] = cur
            else:
                new[k] = v.clone()
        self.state.update(new)
        self._after_load()

    def _after_load(self) -> None:
        pass

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


# ------------------------------------------------------------------------------ helpers
def _check_pos(name: str, v: Any, allow_zero: bool = False) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {v!r}") from None
    ok = f >= 0 if allow_zero else f > 0
    if not ok or math.isnan(f) or math.isinf(f):
        cond = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {cond}, got {v!r}")
    return f


def _check_int(name: str, v: Any, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    return v


def torch_clip_coef(max_norm, norm: Tensor) -> Tensor:
    """``clamp(max_norm / (norm + 1e-6), max=1)``: torch's ``clip_grad_norm_`` coefficient.

    The same float32 operations as torch, so the same bits for the same norm.
    """
    return torch.clamp(max_norm / (norm + 1e-6), max=1.0)


def ema_update_(mean: Tensor, var: Tensor, count: Tensor, x: Tensor, valid: Tensor,
                alpha: float, warmup: int) -> None:
    """Running mean/variance of ``x`` with a warm-up, in place, elementwise.

    While ``count <= warmup`` (counting this sample) the statistics are the exact sample
    mean and population variance of the values seen so far (Welford's update); after
    that they are exponential moving averages (the EMA form of ZClip, Kumar et al.
    2025)::

        mean_t = alpha * mean + (1 - alpha) * x
        var_t  = alpha * var  + (1 - alpha) * (x - mean_t) ** 2

    Elements where ``valid`` is False (or ``x`` is not finite) are left unchanged.
    """
    valid = valid & torch.isfinite(x)
    n = count + valid.to(count.dtype)
    xs = torch.where(valid, x, mean)
    d = xs - mean
    w = 1.0 / n.to(_F32).clamp_min(1.0)
    warm = n <= warmup
    m_warm = mean + w * d
    v_warm = (1.0 - w) * (var + w * d * d)
    m_ema = alpha * mean + (1.0 - alpha) * xs
    v_ema = alpha * var + (1.0 - alpha) * (xs - m_ema) ** 2
    new_m = torch.where(warm, m_warm, m_ema)
    new_v = torch.where(warm, v_warm, v_ema)
    mean.copy_(torch.where(valid, new_m, mean))
    var.copy_(torch.where(valid, new_v, var))
    count.copy_(n)


# ----------------------------------------------------------------------------- policies
class FixedNorm(Policy):
    r"""Clip to a fixed norm: exactly ``torch.nn.utils.clip_grad_norm_``.

    Global (default): every gradient is multiplied by
    ``clamp(max_norm / (total_norm + 1e-6), max=1)`` — torch's coefficient, bit for bit
    for the same total norm. With ``per_group=True`` each parameter group is clipped to
    ``max_norm`` on its own norm (one threshold per group, useful when groups have very
    different scales, e.g. embeddings vs. the rest).

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
        self.max_norm = _check_pos("max_norm", max_norm, allow_zero=True)
        self.per_group = bool(per_group)

    def config(self) -> Dict[str, Any]:
        return {"max_norm": self.max_norm, "per_group": self.per_group}

    def update(self, ctx: StepContext) -> Decision:
        norm = ctx.norm if self.per_group else ctx.total_norm
        return Decision(coef=torch_clip_coef(self.max_norm, norm))


class ZScoreClip(Policy):
    r"""ZClip: adaptive clipping on the z-score of the gradient norm.

    Kumar, Owen, Roy Chowdhury, Güra — "ZClip: Adaptive Spike Mitigation for LLM
    Pre-Training", 2025 (arXiv:2504.02507). The rules, as in the paper:

    1. Warm-up: for the first ``warmup`` steps nothing is clipped (except by ``max_norm``)
       and the mean ``mu`` and standard deviation ``sigma`` of the total gradient norm
       are the plain statistics of the norms seen so far.
    2. Afterwards, each step's norm ``g`` gets the z-score ``z = (g - mu) / sigma`` against
       the statistics of the *previous* steps. If ``z > z_thresh`` the gradients are
       scaled to the norm ``mu + z_thresh**2 * sigma / z`` (the paper's reciprocal rule:
       the larger the spike, the harder it is pulled back, never below ``mu``).
    3. ``mu`` and ``sigma**2`` are EMAs with factor ``alpha``, fed with the *clipped*
       norm so that a spike does not inflate the statistics that judge the next one.

    ``max_norm``, when given, is an absolute ceiling applied on top (also during warm-up),
    like the paper's optional fallback ``max_grad_norm``. Steps skipped by an earlier rule
    and non-finite norms are not fed to the statistics.

    Args:
        alpha: EMA factor in (0, 1). Default: 0.97.
        z_thresh: z-score above which a step is clipped, > 0. Default: 2.5.
        warmup: number of steps used to initialise the statistics, >= 1. Default: 25.
        max_norm: optional absolute ceiling on the total norm.

    ``Decision.info``: ``zclip_z`` (the z-score, 0 during warm-up), ``zclip_mean``, ``zclip_std``
    (statistics before this step), ``zclip_target`` (norm after clipping).
    """

    def __init__(self, alpha: float = 0.97, z_thresh: float = 2.5, warmup: int = 25,
                 max_norm: Optional[float] = None) -> None:
        super().__init__()
        a = _check_pos("alpha", alpha)
        if not a < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
        self.alpha = a
        self.z_thresh = _check_pos("z_thresh", z_thresh)
        self.warmup = _check_int("warmup", warmup, 1)
        self.max_norm = None if max_norm is None else _check_pos("max_norm", max_norm, True)

    def config(self) -> Dict[str, Any]:
        return {"alpha": self.alpha, "z_thresh": self.z_thresh, "warmup": self.warmup,
                "max_norm": self.max_norm}

    def _init_state(self, num_groups: int, device: torch.device) -> Dict[str, Tensor]:
        return {"mean": torch.zeros((), dtype=_F32, device=device),
                "var": torch.zeros((), dtype=_F32, device=device),
                "count": torch.zeros((), dtype=torch.int64, device=device)}

    def update(self, ctx: StepContext) -> Decision:
        s = self.state
        g = ctx.total_norm
        mean, var, count = s["mean"], s["var"], s["count"]
        std = var.clamp_min(0).sqrt()
        active = count >= self.warmup
        z = torch.where(active, (g - mean) / std.clamp_min(_TINY), torch.zeros_like(g))
        over = active & (z > self.z_thresh)
        safe_z = torch.where(over, z, torch.full_like(z, self.z_thresh))
        target = mean + (self.z_thresh * self.z_thresh) * std / safe_z
        clipped_norm = torch.where(over, target, g)
        coef = torch.where(over, torch_clip_coef(target, g), torch.ones_like(g))
        if self.max_norm is not None:
            coef = torch.minimum(coef, torch_clip_coef(self.max_norm, g))
        info = {"zclip_z": z, "zclip_mean": mean.clone(), "zclip_std": std,
                "zclip_target": clipped_norm}
        valid = (~ctx.skip) & torch.isfinite(g)
        ema_update_(mean, var, count, clipped_norm, valid, self.alpha, self.warmup)
        return Decision(coef=coef, info=info)


class QuantileClip(Policy):
    r"""AutoClip: clip to a quantile of the history of gradient norms.

    Seetharaman, Wichern, Pardo, Le Roux — "AutoClip: Adaptive Gradient Clipping for
    Source Separation Networks", MLSP 2020 (arXiv:2007.14469). Each step the total norm
    is appended to the history, then the gradients are clipped to the ``quantile`` of
    the history (the paper's p-th percentile with ``p = 100 * quantile``; the paper
    recommends p = 10, i.e. ``quantile=0.1``). The quantile interpolates linearly between
    order statistics, like ``numpy.percentile`` and ``torch.quantile``.

    The paper keeps every norm since the start; here the history is an on-device ring
    buffer of the last ``history`` norms (set it large to approximate the full history).
    Non-finite norms and skipped steps are not recorded.

    Args:
        quantile: in (0, 1]. Default: 0.9.
        history: ring buffer length, >= 1. Default: 1024.

    ``Decision.info``: ``quantile_threshold``.
    """

    def __init__(self, quantile: float = 0.9, history: int = 1024) -> None:
        super().__init__()
        q = _check_pos("quantile", quantile)
        if q > 1:
            raise ValueError(f"quantile must be in (0, 1] (a fraction, not a percentage), "
                             f"got {quantile!r}")
        self.quantile = q
        self.history = _check_int("history", history, 1)

    def config(self) -> Dict[str, Any]:
        return {"quantile": self.quantile, "history": self.history}

    def _init_state(self, num_groups: int, device: torch.device) -> Dict[str, Tensor]:
        return {"buffer": torch.full((self.history,), math.inf, dtype=_F32, device=device),
                "count": torch.zeros((), dtype=torch.int64, device=device)}

    def update(self, ctx: StepContext) -> Decision:
        buf, count = self.state["buffer"], self.state["count"]
        g = ctx.total_norm
        H = self.history
        valid = (~ctx.skip) & torch.isfinite(g)
        slot = torch.remainder(count, H).reshape(1)
        old = buf.gather(0, slot)
        buf.scatter_(0, slot, torch.where(valid, g.reshape(1), old))
        count.add_(valid.to(count.dtype))
        n = count.clamp(max=H)
        # unfilled slots hold +inf, so they sort after every recorded norm
        srt = torch.sort(buf).values
        last = (n - 1).clamp_min(0)
        pos = self.quantile * last.to(_F32)
        lo = pos.floor().to(torch.int64).clamp(max=H - 1)
        hi = torch.minimum(lo + 1, last)
        frac = pos - lo.to(_F32)
        v_lo = srt.gather(0, lo.reshape(1)).reshape(())
        v_hi = srt.gather(0, hi.reshape(1)).reshape(())
        thr = v_lo + frac * (v_hi - v_lo)
        thr = torch.where(frac > 0, thr, v_lo)  # avoid inf-inf when frac == 0
        coef = torch.where(n > 0, torch_clip_coef(thr, g), torch.ones_like(g))
        return Decision(coef=coef, info={"quantile_threshold": thr})


class AdaptiveGradClip(Policy):
    r"""AGC: unit-wise clipping by the ratio of gradient norm to weight norm.

    Brock, De, Smith, Simonyan — "High-Performance Large-Scale Image Recognition Without
    Normalization", ICML 2021 (arXiv:2102.06171), section 4.1. For every unit ``i`` (a row
    of a weight matrix, an output channel of a convolution: everything but dim 0 is
    reduced; scalars and vectors are one unit) with weights ``W_i`` and gradient ``G_i``::

        G_i <- G_i * lambda * max(|W_i|, eps) / |G_i|   if |G_i| > lambda * max(|W_i|, eps)

    (Frobenius norms), and unchanged otherwise. The paper recommends not clipping the
    final classifier layer: put it in its own parameter group and list that group in
    ``exclude_groups``.

    This policy scales the gradients itself (one extra read of gradients and weights,
    inherent to the method) and reports per-group ``clipped`` flags; it returns no
    coefficient. The norms are taken of the true gradients (AMP scale divided out).

    Args:
        clipping: lambda, > 0. Default: 0.01.
        eps: floor of the weight norm, >= 0. Default: 1e-3.
        exclude_groups: indices of parameter groups left unclipped. Default: none.
    """

    def __init__(self, clipping: float = 0.01, eps: float = 1e-3, *,
                 exclude_groups: Sequence[int] = ()) -> None:
        super().__init__()
        self.clipping = _check_pos("clipping", clipping)
        self.eps = _check_pos("eps", eps, allow_zero=True)
        try:
            self.exclude_groups = tuple(int(i) for i in exclude_groups)
        except (TypeError, ValueError):
            raise ValueError(f"exclude_groups must be a sequence of group indices, got "
                             f"{exclude_groups!r}") from None

    def config(self) -> Dict[str, Any]:
        return {"clipping": self.clipping, "eps": self.eps,
                "exclude_groups": self.exclude_groups}

    @staticmethod
    def _unit_dims(t: Tensor) -> Optional[Tuple[int, ...]]:
        if sum(1 for d in t.shape if d > 1) <= 1:
            return None  # scalars and vectors: one unit
        return tuple(range(1, t.dim()))

    def update(self, ctx: StepContext) -> Decision:
        flags: List[Tensor] = []
        dev = ctx.total_norm.device
        for gi, (ps, gs) in enumerate(zip(ctx.params, ctx.grads)):
            if gi in self.exclude_groups or not gs:
                flags.append(torch.zeros((), dtype=torch.bool, device=dev))
                continue
            anys = []
            for p, g in zip(ps, gs):
                if g.numel() == 0:
                    continue
                dims = self._unit_dims(g)
                if dims is None:
                    w_n = torch.linalg.vector_norm(p.detach(), dtype=_F32)
                    g_n = torch.linalg.vector_norm(g, dtype=_F32)
                else:
                    w_n = torch.linalg.vector_norm(p.detach(), dim=dims, keepdim=True,
                                                   dtype=_F32)
                    g_n = torch.linalg.vector_norm(g, dim=dims, keepdim=True, dtype=_F32)
                if ctx.grad_factor is not None:
                    g_n = g_n * ctx.grad_factor.to(g_n.device)
                limit = self.clipping * w_n.clamp_min(self.eps)
                trig = g_n > limit  # False for NaN norms: those are left alone
                factor = torch.where(trig, limit / g_n.clamp_min(1e-6),
                                     torch.ones_like(g_n))
                g.mul_(factor.to(g.dtype) if g.dtype != _F32 else factor)
                anys.append(trig.any().to(dev))
            flags.append(torch.stack(anys).any() if anys else
                         torch.zeros((), dtype=torch.bool, device=dev))
        return Decision(clipped=torch.stack(flags))


class SpikeSkip(Policy):
    r"""Skip a step whose gradient norm (and/or loss) is an outlier.

    The idea of OLMo-core's ``SkipStepOptimizer`` (Allen Institute for AI): keep a rolling
    window of the last ``window`` values of each signal; once ``warmup`` values have been
    recorded, a step is skipped when a signal exceeds the window's mean by more than ``k``
    standard deviations (sample std) of the *previous* values. Only upward outliers count.
    The window lives on the device and is saved in ``state_dict``.

    Every finite value is recorded, including the outlier that was skipped (as OLMo-core
    does), unless an earlier rule (non-finite gradients, AMP overflow) already skips the
    step.

    Args:
        window: number of past values kept, >= 2. Default: 128.
        k: number of standard deviations, > 0. Default: 6.0.
        warmup: values needed before skipping starts, >= 2. Default: 64.
        on: signals, any of ``"grad_norm"`` (total gradient norm) and ``"loss"`` (needs
            ``StableOptimizer.step(loss=...)`` or a closure). Default: ``("grad_norm",)``.

    ``Decision.info``: ``spike_mean``, ``spike_std``, ``spike_flags`` (one per signal).
    """

    may_skip = True
    _SIGNALS = ("grad_norm", "loss")

    def __init__(self, window: int = 128, k: float = 6.0, warmup: int = 64,
                 on: Sequence[str] = ("grad_norm",)) -> None:
        super().__init__()
        self.window = _check_int("window", window, 2)
        self.k = _check_pos("k", k)
        self.warmup = _check_int("warmup", warmup, 2)
        if isinstance(on, str):
            on = (on,)
        on = tuple(on)
        if not on or any(s not in self._SIGNALS for s in on) or len(set(on)) != len(on):
            raise ValueError(f"on must be a non-empty tuple of distinct signals from "
                             f"{self._SIGNALS}, got {on!r}")
        self.on = on
        self.needs_loss = "loss" in on

    def config(self) -> Dict[str, Any]:
        return {"window": self.window, "k": self.k, "warmup": self.warmup, "on": self.on}

    def _init_state(self, num_groups: int, device: torch.device) -> Dict[str, Tensor]:
        S = len(self.on)
        return {"buffer": torch.zeros((S, self.window), dtype=_F32, device=device),
                "count": torch.zeros((S,), dtype=torch.int64, device=device)}

    def update(self, ctx: StepContext) -> Decision:
        buf, count = self.state["buffer"], self.state["count"]
        dev = buf.device
        xs = []
        for sig in self.on:
            if sig == "grad_norm":
                xs.append(ctx.total_norm.to(dev, _F32))
            else:
                if ctx.loss is None:
                    raise ValueError("SpikeSkip(on=('loss', ...)) needs the loss: call "
                                     "step(loss=loss) or step(closure)")
                xs.append(ctx.loss.detach().to(dev, _F32).reshape(()))
        x = torch.stack(xs)  # [S]
        W = self.window
        n = count.clamp(max=W)
        mask = torch.arange(W, device=dev).unsqueeze(0) < n.unsqueeze(1)
        nf = n.to(_F32)
        mean = torch.where(mask, buf, 0.0).sum(1) / nf.clamp_min(1.0)
        dev2 = torch.where(mask, (buf - mean.unsqueeze(1)) ** 2, 0.0).sum(1)
        std = (dev2 / (nf - 1.0).clamp_min(1.0)).sqrt()
        active = count >= self.warmup
        flags = active & (x > mean + self.k * std)
        skip = flags.any()
        valid = (~ctx.skip) & torch.isfinite(x)
        slot = torch.remainder(count, W).unsqueeze(1)
        old = buf.gather(1, slot)
        buf.scatter_(1, slot, torch.where(valid.unsqueeze(1), x.unsqueeze(1), old))
        count.add_(valid.to(count.dtype))
        return Decision(skip=skip, info={"spike_mean": mean, "spike_std": std,
                                         "spike_flags": flags})


class Chain(Policy):
    """Several policies applied in order: coefficients multiply, skip flags are or-ed.

    Each policy sees the skip flag as decided by the ones before it, so a step skipped by
    an earlier policy does not enter a later policy's statistics.

    Args:
        *policies: the policies, in order.
    """

    def __init__(self, *policies: Policy) -> None:
        super().__init__()
        flat: List[Policy] = []
        for p in policies:
            if isinstance(p, (list, tuple)):
                flat.extend(p)
            else:
                flat.append(p)
        for p in flat:
            if not isinstance(p, Policy):
                raise TypeError(f"Chain takes gradstats.policies.Policy objects, got "
                                f"{type(p).__name__}")
        self.policies = flat
        self.may_skip = any(p.may_skip for p in flat)
        self.needs_loss = any(p.needs_loss for p in flat)

    def config(self) -> Dict[str, Any]:
        return {"policies": [repr(p) for p in self.policies]}

    def init(self, num_groups: int, device: Any = "cpu") -> Dict[str, Tensor]:
        super().init(num_groups, device)
        for p in self.policies:
            p.init(num_groups, device)
        return self.state

    def ensure_state(self, num_groups: int, device: torch.device) -> None:
        super().ensure_state(num_groups, device)
        for p in self.policies:
            p.ensure_state(num_groups, device)

    def to(self, device: Any) -> "Chain":
        super().to(device)
        for p in self.policies:
            p.to(device)
        return self

    def update(self, ctx: StepContext) -> Decision:
        coef: Optional[Tensor] = None
        skip: Optional[Tensor] = None
        clipped: Optional[Tensor] = None
        info: Dict[str, Tensor] = {}
        for p in self.policies:
            d = p.update(ctx)
            if d.coef is not None:
                coef = d.coef if coef is None else coef * d.coef
            if d.skip is not None:
                skip = d.skip if skip is None else skip | d.skip
                ctx.skip = ctx.skip | d.skip
            if d.clipped is not None:
                clipped = d.clipped if clipped is None else clipped | d.clipped
            info.update(d.info)
        return Decision(coef=coef, skip=skip, clipped=clipped, info=info)

    def state_dict(self) -> Dict[str, Any]:
        return {"type": "Chain", "config": self.config(),
                "policies": [p.state_dict() for p in self.policies]}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        if state_dict.get("type", "Chain") != "Chain":
            raise ValueError(f"state_dict was saved by a {state_dict.get('type')}, cannot "
                             "load it into a Chain")
        subs = state_dict.get("policies", [])
        if len(subs) != len(self.policies):
            raise ValueError(f"state_dict holds {len(subs)} policies, this Chain has "
                             f"{len(self.policies)}")
        for p, sd in zip(self.policies, subs):
            p.load_state_dict(sd)

    def __repr__(self) -> str:
        return "Chain(" + ", ".join(repr(p) for p in self.policies) + ")"


def as_policy(obj: Any, what: str = "policy") -> Optional[Policy]:
    """``None``, a :class:`Policy`, or a list/tuple of them (-> :class:`Chain`).

    Raises:
        TypeError: anything else.
    """
    if obj is None or isinstance(obj, Policy):
        return obj
    if isinstance(obj, (list, tuple)):
        return Chain(*obj)
    raise TypeError(f"{what} must be a gradstats.policies.Policy (e.g. "
                    f"gradstats.policies.ZScoreClip()), a list of them, or None; got "
                    f"{type(obj).__name__}")
