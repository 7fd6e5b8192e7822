"""``WrappedOptimizer``: an ``Optimizer`` that shares its groups and state with an inner one.

The wrapper's ``param_groups``, ``state`` and ``defaults`` *are* the inner optimizer's (like
torchao's ``CPUOffloadOptimizer``), so LR schedulers work whether they are given the wrapper
or the inner optimizer, and ``zero_grad`` / ``state_dict`` behave as usual. Subclasses
(:class:`gradstats.StableOptimizer`, the sweep's torch-clip baseline) add what they do
around the inner ``step()``.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, List

from torch.optim import Optimizer

__all__ = ["WrappedOptimizer"]


class WrappedOptimizer(Optimizer):
    """Base class: an optimizer view over ``optimizer`` (call :meth:`_wrap` first).

    ``Optimizer.__init__`` is not called (it would copy the groups); the optimizer hook
    plumbing it sets up is created here instead.
    """

    optimizer: Optimizer

    def _wrap(self, optimizer: Optimizer) -> None:
        self.optimizer = optimizer
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()

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

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``zero_grad`` of the inner optimizer."""
        self.optimizer.zero_grad(set_to_none=set_to_none)
