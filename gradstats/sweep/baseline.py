"""The baselines of a sweep: the plain optimizer, with or without
``torch.nn.utils.clip_grad_norm_``, recording every step in the same stats log as
:class:`gradstats.StableOptimizer`.

The log's statistics come from one extra :func:`gradstats.grad_stats` pass that only
measures (it changes nothing): the training trajectory is exactly torch's.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from .. import telemetry
from ..optim.wrapper import WrappedOptimizer
from ..core.stats import grad_stats

__all__ = ["BaselineOptimizer"]


class BaselineOptimizer(WrappedOptimizer):
    """The inner optimizer alone (``max_norm=None``) or after torch's clip, with a stats log.

    Shares ``param_groups`` and ``state`` with the inner optimizer, like StableOptimizer,
    so LR schedulers can be given either.

    Args:
        optimizer: the inner optimizer.
        max_norm: ``torch.nn.utils.clip_grad_norm_(params, max_norm)`` before every step;
            ``None``: no clipping.
        log: a path or :class:`gradstats.telemetry.StatsLogger` (optional).
        param_names: ``model.named_parameters()`` for the log.

    Raises:
        TypeError: ``optimizer`` is not a ``torch.optim.Optimizer``.
    """

    def __init__(self, optimizer: Optimizer, max_norm: Optional[float] = None, *,
                 log: Any = None, param_names: Any = None) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got "
                            f"{type(optimizer).__name__}")
        self._wrap(optimizer)
        self.max_norm = None if max_norm is None else float(max_norm)
        self.log = None
        if log is not None:
            self.log = log if isinstance(log, telemetry.StatsLogger) else \
                telemetry.StatsLogger(log, groups=optimizer.param_groups,
                                      param_names=param_names)
        self._hooks: "OrderedDict[int, Callable]" = OrderedDict()
        self._counts: Dict[str, Any] = {}

    def state_dict(self) -> Dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)

    def add_step_hook(self, hook: Callable[[Optional[Tensor], Tensor], Any]) -> None:
        """Call ``hook(loss, total_norm)`` (device tensors) after every step."""
        self._hooks[len(self._hooks)] = hook

    def _count(self, name: str, flag: Tensor) -> None:
        c = self._counts.get(name)
        if c is None:
            c = self._counts[name] = torch.zeros((), dtype=torch.int64, device=flag.device)
        c.add_(flag.to(torch.int64))

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None, *,  # type: ignore[override]
             loss: Optional[Any] = None) -> Any:
        """Measure (for the log), clip with torch when ``max_norm`` is set, step.

        Args:
            closure: re-evaluates the model and returns the loss (run once, first).
            loss: the step's loss, for the log.
        """
        ret = None
        if closure is not None:
            with torch.enable_grad():
                ret = closure()
            if loss is None and isinstance(ret, Tensor):
                loss = ret
        st = grad_stats(self.optimizer.param_groups, per_tensor=self.log is not None)
        coef = clipped = None
        if self.max_norm is not None:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            total = torch.nn.utils.clip_grad_norm_(params, self.max_norm)
            coef = torch.clamp(self.max_norm / (total + 1e-6), max=1.0)
            clipped = coef < 1
            self._count("clipped", clipped)
        loss_t = None
        if loss is not None:
            loss_t = loss.detach().float().reshape(()) if isinstance(loss, Tensor) else \
                torch.tensor(float(loss))
        nf = ~(st.total_norm < float("inf"))
        if loss_t is not None:
            nf = nf | ~torch.isfinite(loss_t.to(nf.device))
        self._count("nonfinite", nf)
        self._count("steps", torch.ones((), dtype=torch.bool, device=nf.device))
        self.optimizer.step()
        if self.log is not None:
            self.log.log_stats(st, loss=loss_t, clip_coef=coef, clipped=clipped,
                               skipped=False)
        for hook in tuple(self._hooks.values()):
            hook(loss_t, st.total_norm)
        return ret

    def summary(self) -> Dict[str, Any]:
        """Counts since construction (one sync), with the keys of
        :meth:`gradstats.StableOptimizer.summary`."""
        c = {k: int(v) for k, v in self._counts.items()}
        return {"steps": c.get("steps", 0), "skipped": 0,
                "skipped_by_reason": {"nonfinite": 0, "spike": 0},
                "clipped": c.get("clipped", 0), "nonfinite": c.get("nonfinite", 0)}

    def __repr__(self) -> str:
        clip = f"max_norm={self.max_norm:g}" if self.max_norm is not None else "no clipping"
        return f"BaselineOptimizer({clip}, {self.optimizer.__class__.__name__})"
