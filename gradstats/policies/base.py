"""The policy contract: rules that read statistics, transforms that rewrite gradients.

A policy is a small object with explicit, device-resident state, in the spirit of optax's
``GradientTransformation`` (``init`` creates the state, ``update`` consumes one step). Two
kinds, kept apart:

* :class:`Rule` — reads the step's statistics (norms, the loss, whether the step is already
  being skipped) and its own state; returns a :class:`Decision` (a clip coefficient, a skip
  flag, logging extras). Clipping, skipping on NaN/Inf and on spikes are rules. A built-in
  rule *declares* that it can be fused (:meth:`Rule.fused_spec`: an op name, its numeric
  parameters and its state layout); the longest fusable prefix of a chain becomes one
  program that the finalize kernel of the statistics pass runs
  (:mod:`gradstats.policies.program`).
* :class:`Transform` — rewrites the gradients themselves (e.g. AGC, which needs the weights);
  always runs as torch code, after the fused part.

Every decision is taken on the device with ``torch.where`` / ``clamp``: a policy never reads
a device value on the host, so a step that uses them needs no synchronisation and can be
captured in a CUDA graph. State tensors are updated in place (addresses never change after
``init``), which graph replay needs.

Rule shared by all stateful policies: a step's statistics enter a policy's history only if
they are finite and no earlier rule already decided to skip the step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["Decision", "FusedSpec", "Policy", "Rule", "StepContext", "Transform",
           "check_int", "check_number", "torch_clip_coef"]

F32 = torch.float32
#: floor of a standard deviation used as a divisor
TINY = 1e-12


@dataclass
class StepContext:
    """What a policy sees of one optimizer step (all values on the statistics device).

    Attributes:
        norm: float32 ``[G]``, each parameter group's gradient norm (true scale: already
            divided by the AMP loss scale when one is folded in).
        total_norm: float32 0-dim, the norm over all groups.
        norm_type: order of the norms.
        finite: bool 0-dim, ``True`` when every gradient element, the loss and the AMP
            state are finite.
        skip: bool 0-dim, whether an earlier rule already skips this step. A policy that
            runs after another sees the updated flag.
        params: per group, the parameters that have a gradient.
        grads: per group, their gradients (same order as ``params``).
        grad_factor: float32 0-dim factor that turns ``grads`` into true gradients (the
            inverse AMP loss scale when it is folded into the step), or ``None`` (1).
        loss: float32 0-dim loss of the step, or ``None`` when the caller gave none.
        amp_overflow: bool 0-dim, the AMP scaler found Inf/NaN, or ``None`` without AMP.
        amp_scaled: the gradients still carry an AMP loss scale (then any non-finite value
            is an overflow and must be skipped).
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
    amp_overflow: Optional[Tensor] = None
    amp_scaled: bool = False

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


@dataclass(frozen=True)
class FusedSpec:
    """How a built-in rule runs inside the finalize kernel.

    Attributes:
        op: the op name the kernels implement (``"fixed_norm"``, ``"zscore"``,
            ``"quantile"``, ``"spike"``, ``"skip_nonfinite"``).
        params: the rule's numeric parameters, in the order the kernels read them.
        fstate: float32 state entries ``(name, numel)`` in layout order.
        istate: int64 state entries ``(name, numel)`` in layout order.
        info: logging extras the kernel writes ``(name, numel)``, in layout order.
        skips: the op may set the skip flag.
    """

    op: str
    params: Tuple[float, ...]
    fstate: Tuple[Tuple[str, int], ...] = ()
    istate: Tuple[Tuple[str, int], ...] = ()
    info: Tuple[Tuple[str, int], ...] = ()
    skips: bool = False


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
    @property
    def device(self) -> Optional[torch.device]:
        """Where the state lives (``None`` before :meth:`init`)."""
        return self._device

    @property
    def num_groups(self) -> int:
        """The group count the state was made for."""
        return self._num_groups

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

    def bind_state(self, state: Dict[str, Tensor], num_groups: int,
                   device: torch.device) -> None:
        """Adopt ``state`` (views into a fused program's packed buffers), copying the
        current values into it when the policy already had state of the same shapes."""
        old = self.state if self._device is not None else {}
        for k, v in state.items():
            cur = old.get(k)
            if cur is not None and cur.numel() == v.numel():
                v.copy_(cur.reshape(v.shape).to(device=v.device, dtype=v.dtype))
        self.state = state
        self._device = torch.device(device)
        self._num_groups = int(num_groups)

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
            ValueError: the dict was saved by a different policy type, or by one whose
                configuration differs in a way that changes the meaning or the shape of
                the state (the message names the field).
        """
        t = state_dict.get("type")
        if t is not None and t != type(self).__name__:
            raise ValueError(f"state_dict was saved by a {t}, cannot load it into a "
                             f"{type(self).__name__}")
        saved_cfg = state_dict.get("config")
        if isinstance(saved_cfg, dict):
            mine = self.config()
            for name in self.state_config_fields():
                if name in saved_cfg and _differs(saved_cfg[name], mine.get(name)):
                    raise ValueError(
                        f"state_dict of a {type(self).__name__} was saved with "
                        f"{name}={saved_cfg[name]!r}, this one has {name}="
                        f"{mine.get(name)!r}: its state does not fit; construct the "
                        f"policy with {name}={saved_cfg[name]!r} or start it fresh")
        saved = state_dict.get("state", {})
        if self._device is None:
            first = next(iter(saved.values()), None)
            dev = first.device if isinstance(first, Tensor) else torch.device("cpu")
            self.init(self._num_groups or 1, dev)
        for k, v in saved.items():
            cur = self.state.get(k)
            if cur is None:
                continue
            if cur.shape != v.shape:
                raise ValueError(f"state_dict entry {k!r} of a {type(self).__name__} has "
                                 f"shape {tuple(v.shape)}, expected {tuple(cur.shape)}")
            cur.copy_(v.to(device=cur.device, dtype=cur.dtype))
        self._after_load()

    def state_config_fields(self) -> Tuple[str, ...]:
        """Config fields whose value must match for saved state to be loadable."""
        return ()

    def _after_load(self) -> None:
        pass

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


def _differs(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return tuple(a) != tuple(b)
    if isinstance(a, float) or isinstance(b, float):
        try:
            return not (float(a) == float(b))
        except (TypeError, ValueError):
            return a != b
    return a != b


class Rule(Policy):
    """A policy that reads statistics and its own state (never the gradients)."""

    def fused_spec(self) -> Optional[FusedSpec]:
        """How the finalize kernel runs this rule, or ``None`` (torch only)."""
        return None


class Transform(Policy):
    """A policy that rewrites the gradients itself (runs as torch code, never fused)."""


# ------------------------------------------------------------------------------ helpers
def check_number(name: str, v: Any, *, allow_zero: bool = False) -> float:
    """``float(v)``, finite and ``> 0`` (``>= 0`` with ``allow_zero``).

    Raises:
        ValueError: naming ``name`` and the accepted values.
    """
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {v!r}") from None
    ok = f >= 0 if allow_zero else f > 0
    if not ok or math.isnan(f) or math.isinf(f):
        cond = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {cond}, got {v!r}")
    return f


def check_int(name: str, v: Any, lo: int) -> int:
    """``v`` as an int ``>= lo`` (bools refused).

    Raises:
        ValueError: naming ``name`` and the accepted values.
    """
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    return v


def torch_clip_coef(max_norm: Any, norm: Tensor) -> Tensor:
    """``clamp(max_norm / (norm + 1e-6), max=1)``: torch's ``clip_grad_norm_`` coefficient.

    The same float32 operations as torch, so the same bits for the same norm; NaN stays
    NaN.
    """
    return torch.clamp(max_norm / (norm + 1e-6), max=1.0)
