"""``StableOptimizer``: wrap any ``torch.optim.Optimizer`` with fused gradient statistics,
clipping policies and lossless step skipping.

How a step runs: gather -> measure -> decide -> record -> apply
===============================================================
1. *gather*: the parameters that have gradients, per group; the AMP state; the loss.
2. *measure*: one fused statistics pass over every gradient of every group
   (:mod:`gradstats.core.stats`): per-group norms, max-abs, NaN/Inf counts.
3. *decide*, on the device: the decision program (:mod:`gradstats.policies.program`) —
   skip on NaN/Inf (AMP overflow included), the spike rule, the clipping policy, the
   running statistics of each group's norm (:mod:`gradstats.core.running`), the step
   counters. Built-in rules run inside the finalize kernel of the statistics pass where the
   backend can (one launch); the rest runs as torch code (:mod:`gradstats.optim.measure`).
4. *record*: a :class:`StepRecord` of device tensors (no copies) and the step hooks.
5. *apply*: the inner optimizer's step (:mod:`gradstats.optim.apply`), in one of two ways:

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
   tensor stay bit-identical. The folded path also decides on the host (one read) whenever
   some parameter with a gradient has never been stepped by the inner optimizer (decided
   by parameter identity: new parameters, a different subset with gradients as in MoE or
   partly frozen models, after ``load_state_dict``), so a skipped step can never create
   optimizer state (fused SGD would store an uninitialised momentum buffer, fused Adam
   zero moments).

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
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from .. import telemetry
from ..clip import check_max_norm
from ..core import grouping
from ..core.cache import device_tensor
from ..core.running import DEFAULT_ALPHA
from ..core.stats import GradStats, check_norm_type
from ..policies import FixedNorm, Policy, SkipNonFinite, SpikeSkip, as_policy
from ..policies.chain import flatten
from ..policies.program import COUNTER_NAMES, Program
from . import amp
from .apply import folded_step, host_step, needs_closure, takes_grad_scale
from .measure import StepResult, measure_decide
from .record import StepRecord
from .wrapper import WrappedOptimizer

__all__ = ["StableOptimizer", "StepRecord"]

_F32 = torch.float32


class StableOptimizer(WrappedOptimizer):
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
    (``torch.optim.Adam/AdamW/SGD/Adagrad(fused=True)``) once every parameter with a
    gradient has been stepped. For every other optimizer exactly one scalar device->host
    read per step, and only when a step can be skipped (``skip_nonfinite=True``, a
    skipping policy or AMP); with ``skip_nonfinite=False`` and a clipping-only policy
    there is none.

    Args:
        optimizer: the optimizer to wrap. Optimizers whose ``step`` needs a closure to
            re-evaluate the model several times (``torch.optim.LBFGS``) are refused.
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
            logger; call ``opt.log.close()`` at the end. An existing log is appended to (a
            new segment; pass ``StatsLogger(..., overwrite=True)`` to truncate); under
            ``torch.distributed`` only rank 0 writes unless the path holds ``{rank}``. See
            :mod:`gradstats.telemetry`.
        grad_scaler: a ``torch.amp.GradScaler`` whose loss-scale division is folded into
            the step (see "AMP" in the module docstring).
        pp_group: pipeline parallelism: the process group (or 1-D device mesh) across
            which the stages' statistics are combined (every stage must step on every
            iteration, with the same number of parameter groups). DTensor gradients need
            nothing: they are reduced across their mesh anyway.
        backend: force a statistics backend (``"triton"``, ``"native"``, ``"torch"``);
            default: the best one that can run (see :func:`gradstats.grad_stats`).

    Raises:
        TypeError: ``optimizer`` is not a ``torch.optim.Optimizer`` (or is already a
            ``StableOptimizer``, or needs a closure), or ``policy``/``spike`` is not a
            policy.
        ValueError: both ``max_norm`` and ``policy``; invalid ``max_norm`` or
            ``norm_type``.

    Example::

        >>> opt = gradstats.StableOptimizer(torch.optim.AdamW(model.parameters(), fused=True),
        ...                                 max_norm=1.0)
        >>> loss.backward(); opt.step(); opt.zero_grad()
        >>> opt.last_stats.stats.total_norm, opt.last_stats.skipped
        >>> opt.summary()   # one sync
    """

    #: EMA factor of the running statistics of each group's norm (the one rule of
    #: :mod:`gradstats.core.running`: exact sample statistics during the first
    #: ``1/(1-alpha)`` recorded steps, then an EMA).
    running_alpha: float = DEFAULT_ALPHA

    def __init__(self, optimizer: Optimizer, max_norm: Optional[float] = None, *,
                 norm_type: float = 2.0, policy: Any = None, skip_nonfinite: bool = True,
                 spike: Any = None, param_names: Any = None, log: Any = None,
                 grad_scaler: Any = None, pp_group: Any = None,
                 backend: Optional[str] = None) -> None:
        if isinstance(optimizer, StableOptimizer):
            raise TypeError("optimizer is already a StableOptimizer; wrap the inner "
                            "optimizer once")
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got "
                            f"{type(optimizer).__name__}")
        if needs_closure(optimizer):
            raise TypeError(
                f"optimizer: {type(optimizer).__name__}.step(closure) re-evaluates the model "
                "several times inside one step, so its gradients cannot be measured, "
                "clipped or skipped before the step; StableOptimizer cannot wrap it (use "
                "gradstats.grad_stats / clip_grad_norm_ inside your closure instead)")
        if max_norm is not None and policy is not None:
            raise ValueError("pass either max_norm or policy, not both (max_norm=x is "
                             "policy=gradstats.policies.FixedNorm(x))")
        if max_norm is not None:
            policy = FixedNorm(check_max_norm(max_norm))
        self._wrap(optimizer)  # param_groups/state/defaults are the inner optimizer's
        if spike is True:
            spike = SpikeSkip()
        elif spike is False:
            spike = None
        self.norm_type = check_norm_type(norm_type)
        self.policy: Optional[Policy] = as_policy(policy, "policy")
        self.spike: Optional[Policy] = as_policy(spike, "spike")
        self.skip_nonfinite = bool(skip_nonfinite)
        self.log = log
        self.param_names: Dict[int, str] = self._names(param_names)
        self.grad_scaler = amp.check_grad_scaler(grad_scaler)
        #: pipeline parallelism: the process group (or 1-D device mesh) across which the
        #: stages' statistics are combined, so every stage takes the same decision.
        self.pp_group = pp_group
        self.backend = backend
        #: collect per-tensor norms in the statistics pass (also on while a step hook
        #: registered with ``needs_per_tensor=True`` is present).
        self.per_tensor = False
        self._step_hooks: "OrderedDict[int, Tuple[Callable, bool]]" = OrderedDict()
        self._stats_hooks: "OrderedDict[int, Callable]" = OrderedDict()
        self.last_stats: Optional[StepRecord] = None
        # parameter identities the inner optimizer has really stepped (see _apply)
        self._stepped: set = set()
        self._ready_ids: Optional[Tuple[int, ...]] = None
        self._fold_capable = takes_grad_scale(optimizer)
        self._program: Optional[Program] = None
        self._program_key: Any = None
        self._has_grads: Dict[Tuple[int, ...], Optional[Tensor]] = {}

        # GradScaler.step() hands us grad_scale/found_inf instead of syncing on found_inf.
        self._step_supports_amp_scaling = True

        self._program_for(len(self.param_groups), self._param_device())
        if log is not None:
            self.log = telemetry.attach(self, log)

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

    def _param_device(self) -> torch.device:
        for g in self.param_groups:
            for p in g["params"]:
                return p.device
        return torch.device("cpu")

    def _chain(self) -> List[Policy]:
        """The decision chain: skip on NaN/Inf first, then ``spike``, then ``policy``."""
        return ([SkipNonFinite(any_nonfinite=self.skip_nonfinite)] + flatten(self.spike)
                + flatten(self.policy))

    def _program_for(self, G: int, device: torch.device) -> Program:
        """The compiled decision program for ``G`` groups on ``device`` (rebuilt only when
        the group count, the device or the policies change: host metadata checks)."""
        key = (G, device, id(self.spike), id(self.policy), self.skip_nonfinite)
        prog = self._program
        if prog is not None and self._program_key == key:
            return prog
        chain = self._chain()
        if prog is not None and self._program_key[2:] == key[2:]:
            chain[0] = prog.policies[0]  # keep the SkipNonFinite object
        self._program = Program(chain, G, device, self.running_alpha, old=prog)
        self._program_key = key
        self._has_grads = {}
        return self._program

    @property
    def _counters(self) -> Tensor:
        """int64 [6] step counters (``COUNTER_NAMES``), on the state device."""
        return self._program.counters

    @property
    def _running(self) -> Tensor:
        """float32 [3, G] running (mean, variance, count) of each group's norm."""
        return self._program.running

    # ----------------------------------------------------------------- optimizer API
    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a group to the inner optimizer; per-group statistics grow with it."""
        self.optimizer.add_param_group(param_group)
        self._fold_capable = takes_grad_scale(self.optimizer)
        self._ready_ids = None
        self._program_for(len(self.param_groups), self._program.device)

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

        Everything is checked before anything is changed.

        Raises:
            ValueError: the saved wrapper state does not fit this wrapper's policies (the
                message names the policy and the field).
        """
        sd = dict(state_dict)
        own = sd.pop("stable_optimizer", None)
        if own is not None:
            for name in ("policy", "spike"):
                saved = own.get(name)
                if saved is not None and getattr(self, name) is None:
                    raise ValueError(f"the state dict holds {name} state "
                                     f"({saved.get('type')}) but this StableOptimizer has no "
                                     f"{name}")
            self._check_policy_state(own)
        self.optimizer.load_state_dict(sd)
        self._ready_ids = None
        self._stepped = set()
        if own is None:
            return
        prog = self._program
        run = own["running"].to(prog.device)
        k = min(run.shape[1], prog.G)
        prog.running[:, :k].copy_(run[:, :k])
        prog.counters.copy_(own["counters"].to(prog.device))
        for name in ("policy", "spike"):
            saved = own.get(name)
            if saved is not None:
                getattr(self, name).load_state_dict(saved)

    def _check_policy_state(self, own: Dict[str, Any]) -> None:
        """Load each saved policy state into a throw-away copy first: raises before any
        state of this optimizer changes."""
        import copy
        for name in ("policy", "spike"):
            saved = own.get(name)
            mine = getattr(self, name)
            if saved is None or mine is None:
                continue
            probe = copy.deepcopy(mine)
            probe.load_state_dict(saved)

    # ----------------------------------------------------------------------- hooks
    def register_step_hook(self, hook: Callable[["StableOptimizer", StepRecord], Any], *,
                           needs_per_tensor: bool = False,
                           prepend: bool = False) -> RemovableHandle:
        """Call ``hook(optimizer, record)`` at the end of every :meth:`step`.

        ``record`` is the step's :class:`StepRecord` (device tensors: a hook that does not
        read them on the host costs no sync). Hooks run in registration order, on the host,
        after the inner optimizer's step; they do not run on CUDA-graph replay.

        Args:
            hook: the callable.
            needs_per_tensor: the hook reads ``record.stats.per_tensor_norm``; the
                statistics pass then computes per-tensor norms while it is registered.
            prepend: run this hook before the hooks already registered (e.g. one that
                adds ``record.info`` entries before telemetry records the step).

        Returns:
            a handle whose ``remove()`` unregisters the hook.

        Raises:
            TypeError: ``hook`` is not callable.

        Example::

            >>> seen = []
            >>> h = opt.register_step_hook(lambda o, rec: seen.append(rec.skipped))
            >>> h.remove()
        """
        if not callable(hook):
            raise TypeError(f"hook must be callable, got {type(hook).__name__}")
        handle = RemovableHandle(self._step_hooks)
        self._step_hooks[handle.id] = (hook, bool(needs_per_tensor))
        if prepend:
            self._step_hooks.move_to_end(handle.id, last=False)
        return handle

    def register_stats_hook(self, hook: Callable[["StableOptimizer", GradStats], Any]
                            ) -> RemovableHandle:
        """Call ``hook(optimizer, stats)`` after the statistics pass of every :meth:`step`.

        ``stats`` is the step's :class:`gradstats.GradStats` as measured (before the AMP
        loss scale is divided out), seen before any policy acts. Hooks run in registration
        order. While a stats hook is registered the decision runs after the statistics
        pass instead of inside its finalize kernel.

        Returns:
            a handle whose ``remove()`` unregisters the hook.

        Raises:
            TypeError: ``hook`` is not callable.
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
        c = dict(zip(COUNTER_NAMES, self._counters.tolist()))
        return {"steps": c["steps"], "skipped": c["skipped"],
                "skipped_by_reason": {"nonfinite": c["skipped_nonfinite"],
                                      "spike": c["skipped_spike"]},
                "clipped": c["clipped"], "nonfinite": c["nonfinite"]}

    # ------------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None, *,  # type: ignore[override]
             loss: Optional[Any] = None) -> Any:
        """One optimizer step: gather -> measure -> decide -> record -> apply.

        Args:
            closure: re-evaluates the model and returns the loss (run with grad enabled,
                once, before the statistics are measured).
            loss: the step's loss, a 0-dim tensor (or float), for ``SpikeSkip(on=("loss",))``
                and the non-finite check; defaults to the closure's return value.

        Returns:
            the closure's return value, or ``None``.

        Raises:
            ValueError: a policy watches the loss and none was given (raised before any
                state changes).
        """
        prog = self._program
        if loss is None and closure is None and prog.needs_loss:
            raise ValueError("a policy watches the loss (SpikeSkip(on=('loss', ...))): call "
                             "step(loss=loss) or step(closure)")
        ret = None
        if closure is not None:
            with torch.enable_grad():
                ret = closure()
            if loss is None and isinstance(ret, Tensor):
                loss = ret
            if loss is None and prog.needs_loss:
                raise ValueError("a policy watches the loss (SpikeSkip(on=('loss', ...))): "
                                 "the closure must return the loss tensor")
        # ---- gather
        amp_scale, amp_found, scaler_state = amp.amp_inputs(self, self.grad_scaler)
        params, grads, n_grads = self._gather()
        if not any(n_grads):  # nothing to measure: behave like the inner optimizer
            self._counters[0].add_(1)
            self.optimizer.step()
            return ret
        dev = grads[next(i for i, n in enumerate(n_grads) if n)][0].device
        prog = self._program_for(len(grads), dev)
        loss_t = self._loss_tensor(loss, dev)
        amp_scale = None if amp_scale is None else amp_scale.to(dev)
        # ---- measure + decide
        res = measure_decide(
            prog, params, grads, norm_type=self.norm_type,
            per_tensor=self.per_tensor or any(pt for _, pt in self._step_hooks.values()),
            loss=loss_t, amp_scale=amp_scale, amp_found=amp_found,
            has_grads=self._has_grads_mask(n_grads, dev), pp_group=self.pp_group,
            backend=self.backend, stats_hooks=tuple(self._stats_hooks.values()), opt=self)
        # ---- record
        record = StepRecord(res.fields, res.stats_src, loss=loss_t, loss_scale=amp_scale,
                            params=params, norm_type=self.norm_type,
                            info_names=prog.info_names, info=res.info)
        self.last_stats = record
        # ---- apply
        if scaler_state is not None:
            amp.report_to_scaler(scaler_state,
                                 res.fields.get("nonfinite") if amp_scale is not None else None)
        self._apply(prog, res, params, grads, amp_scale, amp_found)
        for hook, _ in tuple(self._step_hooks.values()):
            hook(self, record)
        return ret

    # ------------------------------------------------------------------ stages
    def _gather(self) -> Tuple[List[List[Tensor]], List[List[Tensor]], Tuple[int, ...]]:
        """(params with a gradient, their gradients, count per group) — one C++ pass per
        group when the extension is built."""
        params, grads = [], []
        for group in self.param_groups:
            ps, gs = grouping.params_and_grads(group["params"])
            params.append(ps)
            grads.append(gs)
        return params, grads, tuple(map(len, grads))

    @staticmethod
    def _loss_tensor(loss: Any, dev: torch.device) -> Optional[Tensor]:
        if loss is None:
            return None
        if isinstance(loss, Tensor):
            return loss.detach().to(dev, _F32).reshape(())
        return torch.full((), float(loss), dtype=_F32, device=dev)  # a fill, no copy

    def _has_grads_mask(self, n_grads: Tuple[int, ...], dev: torch.device) -> Optional[Tensor]:
        """bool [G]: which groups have gradients (``None`` when all do; cached)."""
        if 0 not in n_grads:
            return None
        m = self._has_grads.get(n_grads)
        if m is None:
            m = device_tensor([k > 0 for k in n_grads], torch.bool, dev)
            self._has_grads[n_grads] = m
        return m

    def _fold_ok(self) -> bool:
        if not self._fold_capable:
            return False
        return all(g.get("fused", True) for g in self.param_groups)

    def _ready(self, params: List[List[Tensor]]) -> bool:
        """Whether the inner optimizer has already stepped every parameter that has a
        gradient now — by parameter identity, never by counts."""
        ids = tuple(map(id, params[0])) if len(params) == 1 else \
            tuple(map(id, [p for ps in params for p in ps]))
        if ids == self._ready_ids:
            return True
        if self._stepped.issuperset(ids):
            self._ready_ids = ids
            return True
        return False

    def _apply(self, prog: Program, res: StepResult, params: List[List[Tensor]],
               grads: List[List[Tensor]], amp_scale: Optional[Tensor],
               amp_found: Optional[Tensor]) -> None:
        f = res.fields
        may_skip = (self.skip_nonfinite or amp_found is not None or amp_scale is not None
                    or prog.may_skip_beyond_nonfinite)
        fold = self._fold_ok()
        decide_on_host = may_skip and (not fold or not self._ready(params))
        if decide_on_host and bool(f.get("skipped")):  # the one documented device read
            return
        per_group = prog.per_group_coef or bool(prog.rest)
        coef = f.get("clip_coef") if ((per_group or not fold) and prog.has_clip) else None
        if fold:
            # one global coefficient rides on grad_scale (= S / c, with the AMP scale S)
            gs = f.get("grad_scale") if (prog.has_clip and not per_group) else amp_scale
            folded_step(self.optimizer, grads, coef, per_group, gs,
                        f.get("found_inf") if (may_skip and not decide_on_host) else None)
        else:
            inv = None
            if amp_scale is not None:
                inv = amp_scale.double().reciprocal().float()
            host_step(self.optimizer, grads, coef, inv)
        if not may_skip or decide_on_host:  # the inner step really ran on these params
            for ps in params:
                self._stepped.update(map(id, ps))
