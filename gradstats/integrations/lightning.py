"""gradstats statistics in Lightning's logs (``self.log`` of the LightningModule).

::

    from gradstats.integrations.lightning import GradStatsCallback

    trainer = lightning.pytorch.Trainer(callbacks=[GradStatsCallback()], log_every_n_steps=10)
    trainer.fit(module, loader)
    trainer.logged_metrics["gradstats/total_norm"]

The ``gradstats/...`` keys (listed in :mod:`gradstats.integrations.common`) are logged
with ``pl_module.log_dict(on_step=True, on_epoch=False)`` on Lightning's logging steps
only (``log_every_n_steps``), so they reach every logger the Trainer has (CSV,
TensorBoard, W&B, ...), ``trainer.logged_metrics`` and ``trainer.callback_metrics``.
Device values are read there and nowhere else (one read for a plain optimizer; two for a
:class:`gradstats.StableOptimizer`). With several optimizers (manual optimization) the
keys of optimizer ``i > 0`` start with ``gradstats/opt<i>/``.

Where the numbers come from:

* the optimizer returned by ``configure_optimizers`` is a
  :class:`gradstats.StableOptimizer`: its ``last_stats`` record and ``summary()``, read
  in ``on_train_batch_end``;
* any other optimizer: :func:`gradstats.grad_stats` of its ``param_groups`` in
  ``on_before_optimizer_step``, which Lightning calls after ``backward`` and *before*
  its own gradient clipping (``gradient_clip_val``), only on logging steps; read in
  ``on_train_batch_end``.

Double clipping: when a StableOptimizer that clips is used with
``Trainer(gradient_clip_val=...)``, the gradients are clipped twice; the callback warns
once (:class:`~gradstats.integrations.common.DoubleClippingWarning`) and says how to turn
one off.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

try:
    from lightning.pytorch import Callback
    from lightning.pytorch.core.optimizer import LightningOptimizer
except ImportError as e:  # pragma: no cover - depends on the installation
    raise ImportError(
        "gradstats.integrations.lightning needs the `lightning` package "
        "(pip install lightning); `import gradstats` itself does not.") from e

from ..core.stats import GradStats, check_norm_type, grad_stats
from .common import PREFIX, clips, find_stable, record_logs, stats_logs, \
    warn_double_clipping

__all__ = ["GradStatsCallback"]


def _should_log(trainer: Any) -> bool:
    """Whether Lightning sends this batch's step metrics to its loggers.

    Lightning's own rule (``LoggerConnector.should_update_logs``, which its
    ``LearningRateMonitor`` reads too); when that is not reachable, the same rule from
    public attributes: every ``log_every_n_steps`` optimizer steps, and when stopping.
    """
    conn = getattr(trainer, "_logger_connector", None)
    rule = getattr(conn, "should_update_logs", None)
    if isinstance(rule, bool):
        return rule
    every = getattr(trainer, "log_every_n_steps", 50) or 0
    if every <= 0:
        return False
    return (trainer.global_step + 1) % every == 0 or bool(trainer.should_stop)


class GradStatsCallback(Callback):
    r"""Log gradstats' gradient statistics through Lightning's logging.

    Args:
        norm_type: order of the norms measured for a plain optimizer (a StableOptimizer
            uses its own ``norm_type``). Default: 2.0.
        group_names: names for the parameter groups in the keys (``group<i>`` otherwise);
            ignored when the count differs.
        prefix: first part of every key. Default: ``"gradstats/"``.

    Raises:
        ValueError: invalid ``norm_type``.

    Example::

        >>> trainer = lightning.pytorch.Trainer(max_steps=100, callbacks=[GradStatsCallback()])
        >>> trainer.fit(module, loader)
        >>> trainer.logged_metrics["gradstats/grad_norm/group0"]
    """

    def __init__(self, norm_type: float = 2.0, group_names: Optional[Sequence[str]] = None,
                 prefix: str = PREFIX) -> None:
        super().__init__()
        self.norm_type = check_norm_type(norm_type)
        self.group_names = None if group_names is None else list(group_names)
        self.prefix = str(prefix)
        self._pending: Dict[int, GradStats] = {}  # id(optimizer) -> statistics
        self._emitted: Dict[int, Any] = {}  # id(optimizer) -> StableOptimizer record logged
        self._warned_double = False

    def _prefix(self, i: int, n: int) -> str:
        return self.prefix if n == 1 or i == 0 else f"{self.prefix}opt{i}/"

    def on_train_start(self, trainer, pl_module) -> None:
        self._pending.clear()
        self._emitted.clear()
        clip = getattr(trainer, "gradient_clip_val", None)
        if self._warned_double or clip is None or clip <= 0:
            return
        for opt in trainer.optimizers:
            stable = find_stable(opt)
            if stable is not None and clips(stable.policy):
                self._warned_double = True
                algo = getattr(trainer, "gradient_clip_algorithm", None)
                algo = getattr(algo, "value", algo) or "norm"
                warn_double_clipping(
                    stable, f"Trainer(gradient_clip_val={clip}, "
                    f"gradient_clip_algorithm={algo!r})",
                    "Trainer(gradient_clip_val=None)")
                return

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if find_stable(optimizer) is not None or not _should_log(trainer):
            return
        self._pending[id(_raw(optimizer))] = grad_stats(optimizer.param_groups,
                                                        self.norm_type)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not _should_log(trainer):
            self._pending.clear()
            return
        opts: List[Any] = list(trainer.optimizers)
        vals: Dict[str, float] = {}
        for i, opt in enumerate(opts):
            prefix = self._prefix(i, len(opts))
            stable = find_stable(opt)
            if stable is not None:
                rec = stable.last_stats
                if rec is None or self._emitted.get(id(stable)) is rec:
                    continue
                self._emitted[id(stable)] = rec
                vals.update(record_logs(stable, prefix, self.group_names))
            else:
                st = self._pending.pop(id(_raw(opt)), None)
                if st is not None:
                    vals.update(stats_logs(st, prefix, self.group_names))
        if vals:
            pl_module.log_dict(vals, on_step=True, on_epoch=False, batch_size=1)


def _raw(optimizer: Any) -> Any:
    """The optimizer inside Lightning's ``LightningOptimizer`` (itself otherwise)."""
    return optimizer.optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
