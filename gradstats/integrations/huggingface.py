"""gradstats statistics in the transformers ``Trainer``'s logs.

::

    from gradstats.integrations.huggingface import GradStatsCallback

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[GradStatsCallback()])
    trainer.train()
    trainer.state.log_history[-2]["gradstats/total_norm"]

The ``gradstats/...`` keys (listed in :mod:`gradstats.integrations.common`) are added
to the Trainer's logging steps only: the device values are read there and nowhere else
(one read for a plain optimizer; two for a :class:`gradstats.StableOptimizer`).

Where the numbers come from:

* the optimizer (behind accelerate's wrapper) is a :class:`gradstats.StableOptimizer`:
  its ``last_stats`` record (statistics before its clipping, the clip coefficient, the
  clipped/skipped flags) and ``summary()`` (cumulative counts);
* any other optimizer: :func:`gradstats.grad_stats` of its ``param_groups`` in
  ``on_pre_optimizer_step`` (``on_optimizer_step``, before ``zero_grad``, on
  transformers versions without that hook), computed only on the steps that the
  Trainer will log
  (with ``logging_strategy="epoch"`` on every step, since the epoch's last step is not
  known in advance; no device read there). That hook runs *after* the Trainer's own
  clipping (``max_grad_norm``): the norms are those the optimizer sees. The Trainer's
  own ``grad_norm`` entry is the norm before clipping.

Loggers chosen with ``report_to`` (TensorBoard, W&B, ...) are callbacks that the Trainer
places before the ones passed in ``callbacks=``, so they would run before this callback
adds its keys: use :meth:`GradStatsCallback.attach` to put it in front of them (the keys
then reach every logger); a callback passed in ``callbacks=`` while ``report_to`` names
loggers warns once.

Double clipping: when the optimizer is a StableOptimizer that clips and
``TrainingArguments.max_grad_norm > 0`` (the default is 1.0), the gradients are clipped
twice; the callback warns once (:class:`~gradstats.integrations.common.DoubleClippingWarning`)
and says how to turn one off.
"""
from __future__ import annotations

import warnings
from typing import Any, Dict, Optional, Sequence, Tuple

try:
    from transformers import TrainerCallback
    from transformers.trainer_callback import DefaultFlowCallback
except ImportError as e:  # pragma: no cover - depends on the installation
    raise ImportError(
        "gradstats.integrations.huggingface needs the `transformers` package "
        "(pip install transformers); `import gradstats` itself does not.") from e

from ..core.stats import GradStats, check_norm_type, grad_stats
from .common import PREFIX, clips, find_stable, record_logs, stats_logs, \
    warn_double_clipping

__all__ = ["GradStatsCallback"]


def _strategy(value: Any) -> str:
    return str(getattr(value, "value", value))


class GradStatsCallback(TrainerCallback):
    r"""Log gradstats' gradient statistics through the ``Trainer``'s own logging.

    Args:
        norm_type: order of the norms measured for a plain optimizer (a StableOptimizer
            uses its own ``norm_type``). Default: 2.0.
        group_names: names for the parameter groups in the keys (``group<i>`` otherwise),
            e.g. ``["decay", "no_decay"]``; ignored when the count differs.
        prefix: first part of every key. Default: ``"gradstats/"``.

    Raises:
        ValueError: invalid ``norm_type``.

    Example::

        >>> trainer = Trainer(model=model, args=args, train_dataset=ds)
        >>> GradStatsCallback().attach(trainer)   # or Trainer(..., callbacks=[GradStatsCallback()])
        >>> trainer.train()
    """

    def __init__(self, norm_type: float = 2.0, group_names: Optional[Sequence[str]] = None,
                 prefix: str = PREFIX) -> None:
        self.norm_type = check_norm_type(norm_type)
        self.group_names = None if group_names is None else list(group_names)
        self.prefix = str(prefix)
        self._pending: Optional[Tuple[int, GradStats]] = None
        self._measured_for = -1  # the step on_pre_optimizer_step last ran for
        self._emitted: Any = None  # the StableOptimizer record last logged
        self._warned_double = False
        self._warned_order = False
        self._attached = False

    # ------------------------------------------------------------------ placement
    def attach(self, trainer: Any) -> "GradStatsCallback":
        """Add this callback to ``trainer`` right after its ``DefaultFlowCallback``.

        There it runs before the loggers that ``report_to`` created, so they receive the
        ``gradstats/`` keys too. If the callback is already in the trainer, it is moved.

        Returns:
            this callback.
        """
        cbs = trainer.callback_handler.callbacks
        if self in cbs:
            cbs.remove(self)
        pos = next((i + 1 for i, c in enumerate(cbs) if isinstance(c, DefaultFlowCallback)), 0)
        cbs.insert(pos, self)
        self._attached = True
        return self

    # ------------------------------------------------------------------ hooks
    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        stable = find_stable(optimizer)
        mgn = getattr(args, "max_grad_norm", None)
        if (stable is not None and not self._warned_double and clips(stable.policy)
                and mgn is not None and mgn > 0):
            self._warned_double = True
            warn_double_clipping(
                stable, f"TrainingArguments.max_grad_norm={mgn}",
                "TrainingArguments(max_grad_norm=0)")
        report_to = getattr(args, "report_to", None) or []
        if isinstance(report_to, str):
            report_to = [] if report_to == "none" else [report_to]
        if report_to and not self._attached and not self._warned_order:
            self._warned_order = True
            warnings.warn(
                f"gradstats: GradStatsCallback was passed in Trainer(callbacks=...), so the "
                f"report_to loggers {list(report_to)} run before it and do not receive the "
                f"gradstats/ keys (trainer.state.log_history does). Use "
                f"GradStatsCallback().attach(trainer) instead.", UserWarning, stacklevel=2)
        self._pending = None
        self._emitted = None

    def _will_log(self, args, state, step: int) -> bool:
        """Whether ``DefaultFlowCallback`` will log at global step ``step``."""
        if step == 1 and getattr(args, "logging_first_step", False):
            return True
        strategy = _strategy(getattr(args, "logging_strategy", "steps"))
        if strategy == "steps":
            every = getattr(state, "logging_steps", 0) or 0
            return every > 0 and step % every == 0
        return strategy == "epoch"

    def _measure(self, args, state, optimizer) -> None:
        if optimizer is None or find_stable(optimizer) is not None:
            return
        step = state.global_step + 1  # the step being taken
        self._measured_for = step
        if self._will_log(args, state, step):
            self._pending = (step, grad_stats(optimizer.param_groups, self.norm_type))

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self._measure(args, state, optimizer)

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        # transformers versions without on_pre_optimizer_step: measure after the step,
        # before zero_grad (the gradients are still there).
        if self._measured_for != state.global_step + 1:
            self._measure(args, state, optimizer)

    def _values(self, state, optimizer) -> Dict[str, float]:
        stable = find_stable(optimizer)
        if stable is not None:
            rec = stable.last_stats
            if rec is None or rec is self._emitted:
                return {}
            self._emitted = rec
            return record_logs(stable, self.prefix, self.group_names)
        pending, self._pending = self._pending, None
        if pending is None or pending[0] != state.global_step:
            return {}
        return stats_logs(pending[1], self.prefix, self.group_names)

    def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs):
        if logs is None or "loss" not in logs:  # training logs only (not eval/summary)
            return
        vals = self._values(state, optimizer)
        if not vals:
            return
        logs.update(vals)
        hist = state.log_history
        if hist and hist[-1].get("step") == state.global_step and "loss" in hist[-1]:
            hist[-1].update(vals)  # Trainer.log appended a copy of logs before on_log
