"""``StableOptimizer``: wrap any ``torch.optim.Optimizer`` with fused gradient statistics,
clipping policies and lossless step skipping.

How a step runs
===============
1. One fused statistics pass over every gradient of every group (``gradstats.core.stats``):
   per-group norms, max-abs, NaN/Inf counts.
2. On the device: running statistics of each group's norm (EMA mean/variance with a
   warm-up), the skip decision (non-finite gradients or loss when ``skip_nonfinite``; AMP
   overflow; outliers when ``spike`` is set), the clipping policy's coefficient.
3. The inner optimizer's step, in one of two ways:

   * **Folded** (torch's ``fused=True`` Adam, AdamW, SGD, Adagrad and any optimizer that
     declares ``_step_supports_amp_scaling`` and reads ``self.grad_scale`` /
     ``self.found_inf`` like them): the clipping coefficient ``c`` (and the AMP loss scale
     ``S``) become the optimizer's ``grad_scale = S / c`` and the skip flag becomes
     ``found_inf``; the fused kernel unscales/clips the gradients as it reads them and
     leaves everything untouched when ``found_inf`` is 1 (torch also restores the step
     counters). No host synchronisation and no pass over the gradients besides the
     statistics pass and the optimizer's own.
   * **Host decision** (every other optimizer): the skip flag is read on the host — the
     **one scalar device->host read per step**, and only when a skip is possible at all —
     and the inner ``step()`` is simply not called for a skipped step. Otherwise the
     gradients are scaled in place by the coefficient (no pass when it is 1 on backends
     that exit early) and the inner step runs.

   A skipped step never multiplies anything by zero: parameters and every optimizer state
   tensor stay bit-identical. Until the inner optimizer has taken one real step on the
   current set of gradients, the folded path also decides on the host, so a skipped first
   step cannot create (uninitialised) optimizer state.

Exactness: on the host-decision path, ``max_norm=x`` gives bit for bit what
``torch.nn.utils.clip_grads_with_norm_`` at the measured norm followed by the inner step
gives. On the folded path the fused kernel computes ``g / (1/c)`` where torch computes
``g * c``: the same up to one rounding of the clipped gradient, and bit-identical when
nothing is clipped (``grad_scale`` is exactly 1).

AMP
===
* Standard recipe: ``scaler.scale(loss).backward(); scaler.unscale_(opt); scaler.step(opt);
  scaler.update()``. The wrapper declares ``_step_supports_amp_scaling``, so
  ``scaler.step`` hands it the scale and ``found_inf`` instead of reading ``found_inf``
  on the host; without the ``unscale_`` call the division by the scale is folded into the
  step (GradScaler still runs its own inf-check pass).
* Folded mode: ``StableOptimizer(..., grad_scaler=scaler)`` then
  ``scaler.scale(loss).backward(); opt.step(); scaler.update()``. The wrapper divides the
  norms by the scale, folds ``1/S`` into ``grad_scale`` (or into the clipping
  multiplication for non-fused optimizers) and hands its own non-finite flag to the scaler
  as ``found_inf`` for ``update()``: no unscale pass and no separate inf-check pass.
  Calling ``scaler.unscale_(opt)`` before ``opt.step()`` is still allowed.

CUDA graphs
===========
All state (policy state, running statistics, counters) lives in device tensors updated in
place, so a step on the folded path (e.g. ``AdamW(fused=True, capturable=True)``) can be
captured after a few eager warm-up steps. The host-decision path cannot be captured (it
reads a device value). Python-side hooks (step and stats hooks) do not run on replay.

Observability
=============
``opt.last_stats`` is a :class:`StepRecord` of device tensors (``.tensors()`` for loggers,
``.to_dict()`` with one sync); ``opt.summary()`` counts steps, skips by reason, clipped and
non-finite steps with one sync; hooks registered with :meth:`StableOptimizer.register_step_hook`
are called with the record at the end of every step (telemetry is one of them), and
:meth:`StableOptimizer.register_stats_hook` hooks with the statistics after the pass.
"""
from __future__ import annotations

import math

import inspect
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from .. import telemetry
from ..clip import _check_max_norm, scale_grads_
from ..core import grouping
from ..core.stats import GradStats, check_norm_type, compute_groups
from ..policies import Decision, FixedNorm, Policy, SpikeSkip, StepContext, as_policy

__all__ = ["StableOptimizer", "StepRecord"]

_F32 = torch.float32
_COUNTER_NAMES = ("steps", "skipped", "skipped_nonfinite", "skipped_spike", "clipped",
                  "nonfinite")


@dataclass
class StepRecord:
    """What the last :meth:`StableOptimizer.step` measured and did, as device tensors.

    Attributes:
        stats: the step's :class:`gradstats.GradStats` (true scale: AMP scale divided out).
        clip_coef: float32 ``[G]``, factor applied to each group's gradients (1: untouched).
        clipped: bool ``[G]``, groups whose gradients were clipped.
        skipped: bool 0-dim, the optimizer step was skipped.
        skipped_nonfinite: bool 0-dim, skipped for non-finite gradients/loss/AMP overflow.
        skipped_spike: bool 0-dim, skipped by a policy (spike), gradients finite.
        nonfinite: bool 0-dim, some gradient (or the loss) was NaN/Inf this step.
        running_mean: float32 ``[G]``, running mean of each group's norm (before this
            step; computed on access from ``running``).
        running_std: float32 ``[G]``, running standard deviation (before this step).
        zscore: float32 ``[G]``, ``(norm - running_mean) / running_std`` (0 until a group
            has two recorded steps).
        running: float32 ``[3, G]``, (mean, variance, count) before this step.
        step: int64 0-dim, number of ``step()`` calls so far, this one included.
        loss: the loss given to ``step`` (0-dim float32) or ``None``.
        loss_scale: the AMP loss scale of the step, or ``None``.
        info: policy extras (``zscore``, ``zclip_target``, ``quantile_threshold``, ...).
        params: per group, the parameters that had a gradient (host objects, in the
            order of ``stats.per_tensor_norm``).
    """

    stats: GradStats
    clip_coef: Tensor
    clipped: Tensor
    skipped: Tensor
    skipped_nonfinite: Tensor
    skipped_spike: Tensor
    nonfinite: Tensor
    running: Tensor
    step: Tensor
    loss: Optional[Tensor] = None
    loss_scale: Optional[Tensor] = None
    info: Dict[str, Tensor] = field(default_factory=dict)
    params: List[List[Tensor]] = field(default_factory=list, repr=False)

    @property
    def running_mean(self) -> Tensor:
        return self.running[0]

    @property
    def running_std(self) -> Tensor:
        return self.running[1].clamp_min(0).sqrt()

    @property
    def zscore(self) -> Tensor:
        mean, var, n = self.running[0], self.running[1], self.running[2]
        z = (self.stats.norm - mean) / var.clamp_min(0).sqrt().clamp_min(1e-12)
        return torch.where(n >= 2, z, torch.zeros_like(z))

    def tensors(self) -> Dict[str, Tensor]:
        """Every device tensor of the record by name (for loggers; no sync)."""
        out = {
            "norm": self.stats.norm, "total_norm": self.stats.total_norm,
            "max_abs": self.stats.max_abs, "nonfinite_count": self.stats.nonfinite,
            "numel": self.stats.numel, "clip_coef": self.clip_coef, "clipped": self.clipped,
            "skipped": self.skipped, "skipped_nonfinite": self.skipped_nonfinite,
            "skipped_spike": self.skipped_spike, "nonfinite": self.nonfinite,
            "running_mean": self.running_mean, "running_std": self.running_std,
            "zscore": self.zscore, "step": self.step,
        }
        if self.stats.per_tensor_norm is not None:
            out["per_tensor_norm"] = self.stats.per_tensor_norm
        if self.loss is not None:
            out["loss"] = self.loss
        if self.loss_scale is not None:
            out["loss_scale"] = self.loss_scale
        for k, v in self.info.items():
            out.setdefault(k, v)
        return out

    def to_dict(self) -> Dict[str, Any]:
        """Everything as plain Python values, with one device->host transfer."""
        ts = {k: v for k, v in self.tensors().items() if isinstance(v, Tensor)}
        dev = self.stats.norm.device
        flat = [v.detach().reshape(-1).to(dev, torch.float64) for v in ts.values()]
        vals = torch.cat(flat).cpu().tolist() if flat else []
        out: Dict[str, Any] = {}
        off = 0
        for (k, v) in ts.items():
            n = v.numel()
            chunk = vals[off:off + n]
            off += n
            if v.dtype == torch.bool:
                chunk = [bool(x) for x in chunk]
            elif not v.is_floating_point():
                chunk = [int(x) for x in chunk]
            out[k] = chunk[0] if v.dim() == 0 else chunk
        out["norm_type"] = self.stats.norm_type
        return out


class StableOptimizer(Optimizer):
    r"""Wrap any optimizer: fused gradient statistics, clipping policies, lossless skips.

    The wrapper shares ``param_groups``, ``state`` and ``defaults`` with the inner
    optimizer (like torchao's ``CPUOffloadOptimizer``), so LR schedulers work whether they
    are given the wrapper or the inner optimizer, and ``zero_grad``, ``add_param_group``,
    ``state_dict``/``load_state_dict`` behave as usual (the wrapper's own state — policy
    state, running statistics, counters — is saved under the key ``"stable_optimizer"``).

    ``step()`` makes one fused statistics pass over all gradients, updates the running
    statistics of every group's norm, decides on the device whether to skip the step
    (non-finite gradients or loss when ``skip_nonfinite``; outliers when ``spike`` is
    set) and how much to clip (``max_norm`` or ``policy``), then runs the inner step. See
    the module docstring for how skipping works per optimizer kind and for AMP.

    Host synchronisation: none for optimizers that take ``grad_scale``/``found_inf``
    (``torch.optim.Adam/AdamW/SGD/Adagrad(fused=True)``), after the first step. For every
    other optimizer exactly one scalar device->host read per step, and only when a step
    can be skipped (``skip_nonfinite=True``, a skipping policy or AMP); with
    ``skip_nonfinite=False`` and a clipping-only policy there is none.

    Args:
        optimizer: the optimizer to wrap.
        max_norm: clip the global norm exactly like
            ``torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)``
            (shorthand for ``policy=FixedNorm(max_norm)``).
        norm_type: order of the norms, > 0 or ``inf``. Default: 2.0.
        policy: a :mod:`gradstats.policies` object (or a list of them) that clips and/or
            skips. Mutually exclusive with ``max_norm``.
        skip_nonfinite: skip steps whose gradients (or loss, when given) contain NaN/Inf.
            Default: True.
        spike: a skipping policy applied before ``policy``, e.g.
            ``gradstats.policies.SpikeSkip()``; ``True`` means ``SpikeSkip()``.
        param_names: ``model.named_parameters()`` (or a ``{name: param}`` dict), used by
            telemetry and diagnosis.
        log: record every step in a stats log: a path (JSON Lines; ``.csv`` for CSV), a
            writer or a :class:`gradstats.telemetry.StatsLogger`. :attr:`log` is then the
            logger (per-tensor norms are turned on to name non-finite tensors); call
            ``opt.log.close()`` at the end. See :mod:`gradstats.telemetry`.
        grad_scaler: a ``torch.amp.GradScaler`` whose loss-scale division is folded into
            the step (see "AMP" in the module docstring).
        pp_group: pipeline parallelism: the process group (or 1-D device mesh) across
            which the stages' statistics are combined (every stage must step on every
            iteration, with the same number of parameter groups). DTensor gradients need
            nothing: they are reduced across their mesh anyway.

    Raises:
        TypeError: ``optimizer`` is not a ``torch.optim.Optimizer`` (or is already a
            ``StableOptimizer``), or ``policy``/``spike`` is not a policy.
        ValueError: both ``max_norm`` and ``policy``; invalid ``max_norm`` or
            ``norm_type``.

    Example::

        >>> opt = gradstats.StableOptimizer(torch.optim.AdamW(model.parameters(), fused=True),
        ...                                 max_norm=1.0)
        >>> loss.backward(); opt.step(); opt.zero_grad()
        >>> opt.last_stats.stats.total_norm, opt.last_stats.skipped
        >>> opt.summary()   # one sync
    """

    #: EMA factor of the running statistics of each group's norm. They are the plain
    #: sample mean/variance of the norms seen so far during the first ``1/(1-alpha)``
    #: recorded steps (the warm-up), then exponential moving averages.
    running_alpha: float = 0.97

    def __init__(self, optimizer: Optimizer, max_norm: Optional[float] = None, *,
                 norm_type: float = 2.0, policy: Any = None, skip_nonfinite: bool = True,
                 spike: Any = None, param_names: Any = None, log: Any = None,
                 grad_scaler: Any = None, pp_group: Any = None) -> None:
        if isinstance(optimizer, StableOptimizer):
            raise TypeError("optimizer is already a StableOptimizer; wrap the inner "
                            "optimizer once")
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got "
                            f"{type(optimizer).__name__}")
        if max_norm is not None and policy is not None:
            raise ValueError("pass either max_norm or policy, not both (max_norm=x is "
                             "policy=gradstats.policies.FixedNorm(x))")
        if max_norm is not None:
            policy = FixedNorm(_check_max_norm(max_norm))
        if spike is True:
            spike = SpikeSkip()
        elif spike is False:
            spike = None
        self.optimizer = optimizer
        self.norm_type = check_norm_type(norm_type)
        self.policy: Optional[Policy] = as_policy(policy, "policy")
        self.spike: Optional[Policy] = as_policy(spike, "spike")
        self.skip_nonfinite = bool(skip_nonfinite)
        self.log = log
        self.param_names: Dict[int, str] = self._names(param_names)
        if grad_scaler is not None and not hasattr(grad_scaler, "_per_optimizer_states"):
            raise TypeError(f"grad_scaler must be a torch.amp.GradScaler, got "
                            f"{type(grad_scaler).__name__}")
        self.grad_scaler = grad_scaler
        #: pipeline parallelism: the process group (or 1-D device mesh) across which the
        #: stages' statistics are combined, so every stage takes the same decision.
        self.pp_group = pp_group
        #: collect per-tensor norms in the statistics pass (also on while a step hook
        #: registered with ``needs_per_tensor=True`` is present).
        self.per_tensor = False
        self._step_hooks: "OrderedDict[int, Tuple[Callable, bool]]" = OrderedDict()
        self._stats_hooks: "OrderedDict[int, Callable]" = OrderedDict()
        self.last_stats: Optional[StepRecord] = None
        self._ready_key: Optional[Tuple[int, ...]] = None
        self._fold_capable = self._inner_takes_grad_scale(optimizer)

        # Optimizer plumbing, without Optimizer.__init__ (it would copy the groups).
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()
        # GradScaler.step() hands us grad_scale/found_inf instead of syncing on found_inf.
        self._step_supports_amp_scaling = True

        self._device = self._param_device()
        self._init_own_state(len(self.param_groups), self._device)
        if log is not None:
            self.log = telemetry.attach(self, log)

    # ------------------------------------------------------------ shared optimizer views
    @property
    def param_groups(self) -> List[Dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: List[Dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self):  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> Dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: Dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def __getstate__(self) -> Dict[str, Any]:
        return dict(self.__dict__)

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._patch_step_function()

    def __repr__(self) -> str:
        parts = [f"optimizer={self.optimizer.__class__.__name__}"]
        if self.policy is not None:
            parts.append(f"policy={self.policy!r}")
        if self.spike is not None:
            parts.append(f"spike={self.spike!r}")
        parts.append(f"skip_nonfinite={self.skip_nonfinite}")
        if self.norm_type != 2.0:
            parts.append(f"norm_type={self.norm_type}")
        inner = "\n    ".join(repr(self.optimizer).splitlines())
        return f"StableOptimizer({', '.join(parts)},\n    {inner})"

    # ------------------------------------------------------------------------ setup
    @staticmethod
    def _names(param_names: Any) -> Dict[int, str]:
        if param_names is None:
            return {}
        items = param_names.items() if isinstance(param_names, dict) else param_names
        out: Dict[int, str] = {}
        for item in items:
            try:
                name, p = item
            except (TypeError, ValueError):
                raise TypeError("param_names must be model.named_parameters() or a "
                                "{name: parameter} dict") from None
            if not isinstance(name, str) or not isinstance(p, Tensor):
                raise TypeError("param_names must yield (str, Tensor) pairs, got "
                                f"({type(name).__name__}, {type(p).__name__})")
            out[id(p)] = name
        return out

    def param_name(self, p: Tensor) -> Optional[str]:
        """The name given for ``p`` in ``param_names`` (``None`` if unknown)."""
        return self.param_names.get(id(p))

    @staticmethod
    def _inner_takes_grad_scale(opt: Optimizer) -> bool:
        if not getattr(opt, "_step_supports_amp_scaling", False):
            return False
        try:
            sig = inspect.signature(opt.step)
        except (TypeError, ValueError):
            return False
        # old contract: step(grad_scaler=...) — not the grad_scale/found_inf attributes
        return "grad_scaler" not in sig.parameters

    def _param_device(self) -> torch.device:
        for g in self.param_groups:
            for p in g["params"]:
                return p.device
        return torch.device("cpu")

    def _init_own_state(self, G: int, device: torch.device) -> None:
        self._counters = torch.zeros(len(_COUNTER_NAMES), dtype=torch.int64, device=device)
        # running statistics of each group's norm: rows mean, variance, count
        self._running = torch.zeros(3, G, dtype=_F32, device=device)
        self._consts: Dict[Any, Tensor] = {}
        for p in (self.spike, self.policy):
            if p is not None:
                p.ensure_state(G, device)

    def _follow(self, G: int, device: torch.device) -> None:
        """Move/resize the wrapper's state (host-side metadata checks only)."""
        if device != self._device:
            self._counters = self._counters.to(device)
            self._running = self._running.to(device)
            self._consts = {}
            self._device = device
        if G != self._running.shape[1]:
            new = torch.zeros(3, G, dtype=_F32, device=device)
            k = min(G, self._running.shape[1])
            new[:, :k] = self._running[:, :k]
            self._running = new
        for p in (self.spike, self.policy):
            if p is not None:
                p.ensure_state(G, device)

    # ----------------------------------------------------------------- optimizer API
    def zero_grad(self, set_to_none: bool = True) -> None:
        """``zero_grad`` of the inner optimizer."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a group to the inner optimizer; per-group statistics grow with it."""
        self.optimizer.add_param_group(param_group)
        self._fold_capable = self._inner_takes_grad_scale(self.optimizer)
        self._ready_key = None
        self._follow(len(self.param_groups), self._device)

    def state_dict(self) -> Dict[str, Any]:
        """The inner optimizer's state dict plus ``"stable_optimizer"``: the wrapper's state
        (policy and spike state, running statistics, counters), as copies."""
        sd = self.optimizer.state_dict()
        sd["stable_optimizer"] = {
            "version": 1,
            "counters": self._counters.clone(),
            "running": self._running.clone(),
            "policy": None if self.policy is None else self.policy.state_dict(),
            "spike": None if self.spike is None else self.spike.state_dict(),
        }
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a dict from :meth:`state_dict` (or a plain inner-optimizer state dict).

        Raises:
            ValueError: the saved wrapper state does not fit this wrapper's policies.
        """
        sd = dict(state_dict)
        own = sd.pop("stable_optimizer", None)
        self.optimizer.load_state_dict(sd)
        self._ready_key = None
        if own is None:
            return
        dev = self._device

        def put(cur: Tensor, new: Tensor) -> Tensor:
            new = new.to(dev)
            if cur.shape == new.shape and cur.dtype == new.dtype:
                cur.copy_(new)
                return cur
            return new.clone()
        self._counters = put(self._counters, own["counters"])
        self._running = put(self._running, own["running"])
        for name in ("policy", "spike"):
            mine: Optional[Policy] = getattr(self, name)
            saved = own.get(name)
            if saved is None:
                continue
            if mine is None:
                raise ValueError(f"the state dict holds {name} state "
                                 f"({saved.get('type')}) but this StableOptimizer has no "
                                 f"{name}")
            mine.load_state_dict(saved)

    # ----------------------------------------------------------------------- hooks
    def register_step_hook(self, hook: Callable[["StableOptimizer", StepRecord], Any], *,
                           needs_per_tensor: bool = False) -> RemovableHandle:
        """Call ``hook(optimizer, record)`` at the end of every :meth:`step`.

        ``record`` is the step's :class:`StepRecord` (device tensors: a hook that does not
        read them on the host costs no sync). Hooks run in registration order, on the host,
        after the inner optimizer's step; they do not run on CUDA-graph replay.

        Args:
            hook: the callable.
            needs_per_tensor: the hook reads ``record.stats.per_tensor_norm``; the
                statistics pass then computes per-tensor norms while it is registered.

        Returns:
            a handle whose ``remove()`` unregisters the hook.

        Example::

            >>> seen = []
            >>> h = opt.register_step_hook(lambda o, rec: seen.append(rec.skipped))
            >>> h.remove()
        """
        if not callable(hook):
            raise TypeError(f"hook must be callable, got {type(hook).__name__}")
        handle = RemovableHandle(self._step_hooks)
        self._step_hooks[handle.id] = (hook, bool(needs_per_tensor))
        return handle

    def register_stats_hook(self, hook: Callable[["StableOptimizer", GradStats], Any]
                            ) -> RemovableHandle:
        """Call ``hook(optimizer, stats)`` after the statistics pass of every :meth:`step`.

        ``stats`` is the step's :class:`gradstats.GradStats` (before the AMP loss scale is
        divided out), seen before any policy acts. Hooks run in registration order.

        Returns:
            a handle whose ``remove()`` unregisters the hook.
        """
        if not callable(hook):
            raise TypeError(f"hook must be callable, got {type(hook).__name__}")
        handle = RemovableHandle(self._stats_hooks)
        self._stats_hooks[handle.id] = hook
        return handle

    # ----------------------------------------------------------------------- stats
    def summary(self) -> Dict[str, Any]:
        """Counts since construction (or the loaded checkpoint), with one device sync.

        Returns:
            ``{"steps", "skipped", "skipped_by_reason": {"nonfinite", "spike"},
            "clipped", "nonfinite"}``: ``clipped`` counts steps taken with some group
            clipped; ``nonfinite`` counts steps that saw NaN/Inf (skipped or not).
        """
        c = dict(zip(_COUNTER_NAMES, self._counters.tolist()))
        return {"steps": c["steps"], "skipped": c["skipped"],
                "skipped_by_reason": {"nonfinite": c["skipped_nonfinite"],
                                      "spike": c["skipped_spike"]},
                "clipped": c["clipped"], "nonfinite": c["nonfinite"]}

    # ------------------------------------------------------------------------ step
    def _collect(self) -> Tuple[List[List[Tensor]], List[List[Tensor]]]:
        params, grads = [], []
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            params.append(ps)
            grads.append([p.grad for p in ps])
        return params, grads

    def _amp_inputs(self) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[dict]]:
        """(loss scale to divide out or None, found_inf or None, scaler state to fill)."""
        d = self.__dict__
        if "grad_scale" in d or "found_inf" in d:  # set by GradScaler.step(self)
            return d.get("grad_scale"), d.get("found_inf"), None
        sc = self.grad_scaler
        if sc is None or not sc.is_enabled():
            return None, None, None
        from torch.amp.grad_scaler import OptState
        st = sc._per_optimizer_states[id(self)]
        if st["stage"] is OptState.STEPPED:
            raise RuntimeError("step() has already been called since the last "
                               "grad_scaler.update()")
        if st["stage"] is OptState.UNSCALED:  # the user called scaler.unscale_(opt)
            fis = list(st["found_inf_per_device"].values())
            return None, (sum(f.to(fis[0].device) for f in fis) if fis else None), st
        if getattr(sc, "_scale", None) is None:
            raise RuntimeError("grad_scaler has no scale yet: call grad_scaler.scale(loss)"
                               ".backward() before step()")
        return sc._scale, None, st

    def _measure(self, grads: List[List[Tensor]],
                 max_norm: Optional[float]) -> Tuple[GradStats, Optional[Tensor]]:
        """The statistics pass: ``(GradStats, torch's clip coefficient or None)``.

        The single place where gradients are measured, so that sharded/distributed
        training can substitute a version that reduces the statistics across ranks.
        """
        per_tensor = self.per_tensor or any(pt for _, pt in self._step_hooks.values())
        st, coef, _ = compute_groups(grads, self.norm_type, per_tensor=per_tensor,
                                     full=True, max_norm=max_norm, pp_group=self.pp_group)
        for hook in tuple(self._stats_hooks.values()):
            hook(self, st)
        return st, coef

    def _fold_ok(self) -> bool:
        if not self._fold_capable:
            return False
        return all(g.get("fused", True) for g in self.param_groups)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None, *,  # type: ignore[override]
             loss: Optional[Any] = None) -> Any:
        """One optimizer step: statistics, policies, skip decision, inner step.

        Args:
            closure: re-evaluates the model and returns the loss (run with grad enabled).
            loss: the step's loss, a 0-dim tensor (or float), for ``SpikeSkip(on=("loss",))``
                and the non-finite check; defaults to the closure's return value.

        Returns:
            the closure's return value, or ``None``.
        """
        ret = None
        if closure is not None:
            with torch.enable_grad():
                ret = closure()
            if loss is None and isinstance(ret, Tensor):
                loss = ret
        if loss is None and any(p is not None and p.needs_loss
                                for p in (self.spike, self.policy)):
            raise ValueError("a policy watches the loss (SpikeSkip(on=('loss', ...))): call "
                             "step(loss=loss) or step(closure)")
        amp_scale, amp_found, scaler_state = self._amp_inputs()
        params, grads = self._collect()
        n_grads = tuple(len(g) for g in grads)
        G = len(grads)
        if sum(n_grads) == 0:  # nothing to measure: behave like the inner optimizer
            self._counters[0].add_(1)
            self.optimizer.step()
            return ret

        # a global FixedNorm's coefficient comes out of the statistics pass itself
        pol = self.policy
        fixed = type(pol) is FixedNorm and not pol.per_group and amp_scale is None
        st, coef = self._measure(grads, pol.max_norm if fixed else None)
        dev = st.norm.device
        self._follow(G, dev)

        # true-scale statistics when the AMP loss scale is still in the gradients
        inv_scale = None
        if amp_scale is not None:
            amp_scale = amp_scale.to(dev)
            inv_scale = amp_scale.double().reciprocal().float()
            st = GradStats(norm=st.norm * inv_scale, total_norm=st.total_norm * inv_scale,
                           max_abs=None if st.max_abs is None else st.max_abs * inv_scale,
                           nonfinite=st.nonfinite, numel=st.numel,
                           per_tensor_norm=(None if st.per_tensor_norm is None
                                            else st.per_tensor_norm * inv_scale),
                           norm_type=st.norm_type)
        loss_t = None
        if loss is not None:
            if isinstance(loss, Tensor):
                loss_t = loss.detach().to(dev, _F32).reshape(())
            else:  # a Python number: a fill kernel, no host->device copy
                loss_t = torch.full((), float(loss), dtype=_F32, device=dev)

        # ---- skip decision (device) --------------------------------------------------
        # The total norm is NaN/Inf exactly when some gradient element is (the
        # statistics' propagation rule) or the sum overflows: one test covers all.
        finite = st.total_norm < math.inf  # a norm is >= 0 or NaN: one kernel, not isfinite's 4
        if loss_t is not None:
            finite = finite & torch.isfinite(loss_t)
        amp_bad = None
        if amp_found is not None:
            amp_bad = amp_found.to(dev) > 0
            finite = finite & ~amp_bad
        nonfinite = ~finite
        if self.skip_nonfinite or amp_scale is not None:
            # with a loss scale still in the gradients, NaN/Inf means overflow: always skip
            skip_nf = nonfinite
        elif amp_bad is not None:  # AMP overflow must never reach the weights
            skip_nf = amp_bad
        else:
            skip_nf = self._const("false", torch.bool, ())
        may_skip = (self.skip_nonfinite or amp_bad is not None or amp_scale is not None
                    or any(p is not None and p.may_skip for p in (self.spike, pol)))

        ctx = StepContext(norm=st.norm, total_norm=st.total_norm, norm_type=self.norm_type,
                          finite=finite, skip=skip_nf, params=params, grads=grads,
                          grad_factor=inv_scale, loss=loss_t)
        clipped_g: Optional[Tensor] = None
        info: Dict[str, Tensor] = {}
        policy_skip: Optional[Tensor] = None
        for p in (self.spike, None if fixed else pol):
            if p is None:
                continue
            d: Decision = p.update(ctx)
            if d.skip is not None:
                policy_skip = d.skip if policy_skip is None else policy_skip | d.skip
                ctx.skip = ctx.skip | d.skip
            if d.coef is not None:
                coef = d.coef if coef is None else coef * d.coef
            if d.clipped is not None:
                clipped_g = d.clipped if clipped_g is None else clipped_g | d.clipped
            info.update(d.info)
        skip = ctx.skip
        taken = ~skip
        skip_spike = (policy_skip & ~skip_nf) if policy_skip is not None \
            else self._const("false", torch.bool, ())

        # ---- running statistics of each group's norm ----------------------------------
        run_before = self._running.clone()
        self._update_running(st.norm, taken, n_grads)

        # ---- bookkeeping -----------------------------------------------------------
        if coef is None:
            coef_g = self._const("ones", _F32, (G,))
            clipped = self._const("false", torch.bool, (G,))
        else:
            coef_g = coef.expand(G)
            clipped = (coef_g < 1) & taken
        if clipped_g is not None:
            clipped = clipped | (clipped_g & taken)
        clipped_any = clipped.any() if G > 1 else clipped.reshape(())
        self._counters.add_(torch.stack([
            self._const("true", torch.bool, ()), skip, skip_nf, skip_spike, clipped_any,
            nonfinite]))
        record = StepRecord(stats=st, clip_coef=coef_g, clipped=clipped, skipped=skip,
                            skipped_nonfinite=skip_nf, skipped_spike=skip_spike,
                            nonfinite=nonfinite, running=run_before,
                            step=self._counters[0].clone(), loss=loss_t,
                            loss_scale=amp_scale, info=info, params=params)
        self.last_stats = record

        # ---- the inner step ------------------------------------------------------------
        fold = self._fold_ok()
        decide_on_host = may_skip and (not fold or self._ready_key != n_grads)
        if decide_on_host:
            skipped_host = bool(skip)  # the one documented device->host read
        else:
            skipped_host = False
        if scaler_state is not None:
            self._report_to_scaler(scaler_state, nonfinite if amp_scale is not None else None)
        if not skipped_host:
            if fold:
                self._folded_step(grads, coef, amp_scale,
                                  skip if (may_skip and not decide_on_host) else None)
            else:
                self._host_step(grads, coef, inv_scale)
            if not may_skip or decide_on_host:
                self._ready_key = n_grads  # the inner step really ran on these grads
        for hook, _ in tuple(self._step_hooks.values()):
            hook(self, record)
        return ret

    def _const(self, kind: str, dtype: torch.dtype, shape: Tuple[int, ...]) -> Tensor:
        """Cached read-only constants on the state device (never written to)."""
        key = (kind, dtype, shape)
        t = self._consts.get(key)
        if t is None:
            val = {"false": 0, "true": 1, "ones": 1}[kind]
            t = torch.full(shape, val, dtype=dtype, device=self._device)
            self._consts[key] = t
        return t

    def _update_running(self, norm: Tensor, taken: Tensor, n_grads: Tuple[int, ...]) -> None:
        """Running mean/variance of each group's norm, in place (few small kernels).

        Exponentially weighted incremental form (West 1979; Finch 2009) with weight
        ``w = max(1/n, 1 - alpha)``: the exact sample mean and (population) variance while
        ``n < 1/(1-alpha)``, an EMA with factor ``alpha`` afterwards. Groups without
        gradients, skipped steps and non-finite norms are not recorded.
        """
        R = self._running
        mean, var, n = R[0], R[1], R[2]
        valid = taken & (norm < math.inf)  # norms are >= 0 or NaN
        if 0 in n_grads:
            key = ("has_grads", n_grads)
            m = self._consts.get(key)
            if m is None:
                m = torch.zeros(len(n_grads), dtype=torch.bool, device=self._device)
                for g, k in enumerate(n_grads):
                    if k:
                        m[g] = True  # a fill kernel: no host->device copy
                self._consts[key] = m
            valid = valid & m
        n.add_(valid)
        w = n.clamp_min(1.0).reciprocal().clamp_min_(1.0 - self.running_alpha)
        w.mul_(valid)
        d = torch.where(valid, norm, mean).sub_(mean)
        wd = w * d
        var.addcmul_(wd, d).mul_(1.0 - w)
        mean.add_(wd)

    def _report_to_scaler(self, st: dict, found: Optional[Tensor]) -> None:
        from torch.amp.grad_scaler import OptState
        if found is not None:  # folded mode: our non-finite flag is the scaler's found_inf
            f = found.to(_F32)
            st["found_inf_per_device"] = {f.device: f}
        st["stage"] = OptState.STEPPED

    def _folded_step(self, grads: List[List[Tensor]], coef: Optional[Tensor],
                     amp_scale: Optional[Tensor], skip: Optional[Tensor]) -> None:
        """Clip/unscale/skip inside the inner fused step: grad_scale and found_inf."""
        if coef is not None and coef.dim() > 0:
            # one coefficient per group cannot ride on the single grad_scale
            scale_grads_(grads, coef)
            coef = None
        gs: Optional[Tensor] = None
        if coef is not None:
            gs = coef.reciprocal() if amp_scale is None else amp_scale / coef
        elif amp_scale is not None:
            gs = amp_scale
        fi = None if skip is None else skip.to(_F32)
        inner = self.optimizer
        if gs is None and fi is None:
            inner.step()
            return
        had = {k: inner.__dict__[k] for k in ("grad_scale", "found_inf") if k in inner.__dict__}
        inner.grad_scale = gs
        inner.found_inf = fi
        try:
            inner.step()
        finally:
            for k in ("grad_scale", "found_inf"):
                inner.__dict__.pop(k, None)
            inner.__dict__.update(had)

    def _host_step(self, grads: List[List[Tensor]], coef: Optional[Tensor],
                   inv_scale: Optional[Tensor]) -> None:
        """Scale gradients in place (clip and/or unscale), then the plain inner step."""
        if inv_scale is not None:
            factor = inv_scale if coef is None else coef.to(_F32) * inv_scale
            _mul_grads_(grads, factor)
        elif coef is not None:
            scale_grads_(grads, coef.to(_F32))
        self.optimizer.step()


def _mul_grads_(grads: List[List[Tensor]], factor: Tensor) -> None:
    """``g *= factor`` for every gradient (factor 0-dim or [G], may exceed 1)."""
    slices, _ = grouping.slices(grads)
    for s in slices:
        f = factor.to(s.device)
        if f.dim() == 0:
            torch._foreach_mul_(s.tensors, f)
            continue
        bounds = s.group_bounds
        for g in range(s.num_groups):
            sub = s.tensors[bounds[g]:bounds[g + 1]]
            if sub:
                torch._foreach_mul_(sub, f[g])
