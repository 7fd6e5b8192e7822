"""One run of a sweep: :class:`RunConfig` (what the training function receives) and
:func:`execute` (what a worker process does with it).

The training function
=====================
``train(run: RunConfig) -> Optional[dict]``. It builds its model and data from
``run.seed`` (the engine has already seeded torch, numpy and ``random`` with it), builds
its optimizer through the run so that the configuration is applied and every step is
logged, trains ``run.steps`` steps, passing the loss to ``step``, and may return extra
metrics (floats) for the summary::

    def train(run: gradstats.sweep.RunConfig):
        model = MyModel()
        opt = run.optimizer(model.parameters(), weight_decay=0.1)  # AdamW(lr=run.lr), wrapped
        sched = run.warmup_cosine(opt, warmup=20)
        for step in range(run.steps):
            loss = model.loss(next_batch())
            loss.backward()
            opt.step(loss=loss)
            opt.zero_grad()
            sched.step()
        return {"eval_loss": evaluate(model)}

``run.optimizer(params, cls=torch.optim.AdamW, **kwargs)`` builds ``cls(params,
lr=run.lr, **kwargs)`` and wraps it as the configuration says (a StableOptimizer, torch's
clip or nothing, always with the stats log); ``run.wrap(inner)`` wraps an optimizer built
by the training function itself. ``run.options`` holds the task's options.

The function must be importable by worker processes (a module-level function).
"""
from __future__ import annotations

import math
import os
import random
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from .. import telemetry
from ..optim import StableOptimizer
from ..report.sweep import summarize_log
from .arms import Arm
from .baseline import BaselineOptimizer

__all__ = ["RunConfig", "RunStopped", "execute"]


class RunStopped(Exception):
    """Raised inside the training function when its loss stayed non-finite: the run has
    diverged for good and the rest of its steps would only cost time."""


class _Watch:
    """Stops a run after ``limit`` consecutive steps with a non-finite loss (or gradient
    norm when no loss is given); checked every ``limit`` steps (one host read then)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.buf: List[Tensor] = []

    def __call__(self, loss: Optional[Tensor], total_norm: Tensor) -> None:
        if self.limit <= 0:
            return
        x = loss if loss is not None else total_norm
        self.buf.append(x.detach().reshape(()).float())
        if len(self.buf) >= self.limit:
            bad = not bool(torch.isfinite(torch.stack(self.buf)).any())
            self.buf = []
            if bad:
                raise RunStopped(f"the loss was not finite for {self.limit} steps in a row")


@dataclass
class RunConfig:
    """What a training function gets for one run of a sweep.

    Attributes:
        task: the task's name.
        config: the configuration's name.
        lr: the (peak) learning rate.
        seed: the seed; the same seed gives the same initial weights and batches under
            every configuration and learning rate (paired comparisons).
        steps: optimizer steps to take.
        options: the task's options (model size, scenario switches, ...).
        log_path: where this run's stats log goes.
        arm: the configuration (:class:`gradstats.sweep.Arm`).
        stop_after_nonfinite: stop the run (:class:`RunStopped`) once the loss has been
            NaN/Inf for this many steps in a row (0: never).
        diverge_loss: the task's divergence threshold (see :mod:`gradstats.report.sweep`).
    """

    task: str
    config: str
    lr: float
    seed: int
    steps: int
    options: Dict[str, Any]
    log_path: str
    arm: Arm
    stop_after_nonfinite: int = 10
    diverge_loss: Optional[float] = None
    _optimizers: List[Any] = field(default_factory=list, repr=False)

    # ------------------------------------------------------------------ building
    def optimizer(self, params: Any, cls: Optional[Callable[..., Optimizer]] = None, *,
                  param_names: Any = None, **kwargs: Any) -> Optimizer:
        """Build ``cls(params, lr=self.lr, **kwargs)`` (default ``torch.optim.AdamW``; a
        configuration with an ``inner`` class, e.g. the recommended preset's StableAdamW,
        replaces AdamW — and only AdamW) and wrap it (:meth:`wrap`).

        Args:
            params: parameters or parameter groups.
            cls: the optimizer class. Default: ``torch.optim.AdamW``.
            param_names: ``model.named_parameters()`` for the log.
            kwargs: other optimizer arguments (``betas``, ``weight_decay``, ``fused``...).
        """
        cls = cls or torch.optim.AdamW
        factory = self.arm.inner if (self.arm.inner is not None
                                     and cls is torch.optim.AdamW) else cls
        inner = factory(params, lr=self.lr, **kwargs)
        return self.wrap(inner, param_names=param_names)

    def wrap(self, inner: Optimizer, *, param_names: Any = None) -> Optimizer:
        """Wrap ``inner`` as this run's configuration says, with the stats log.

        Returns:
            a :class:`gradstats.StableOptimizer`, or a :class:`BaselineOptimizer` for the
            torch-clip and no-clipping configurations. Call ``step(loss=loss)``.
        """
        os.makedirs(os.path.dirname(self.log_path) or ".", exist_ok=True)
        path = self.log_path if not self._optimizers else \
            self.log_path.replace(".jsonl", f".{len(self._optimizers)}.jsonl")
        meta = {"run": f"{self.config} lr={self.lr:g} seed={self.seed}", "task": self.task,
                "config": self.config, "lr": self.lr, "seed": self.seed}
        logger = telemetry.StatsLogger(path, groups=inner.param_groups,
                                       param_names=param_names, meta=meta)
        watch = _Watch(self.stop_after_nonfinite)
        arm = self.arm
        if arm.clip == "stable":
            opt: Any = StableOptimizer(inner, param_names=param_names, **arm.stable_kwargs())
            telemetry.attach(opt, logger)
            opt.register_step_hook(lambda o, rec: watch(rec.loss, rec.stats.total_norm))
        else:
            opt = BaselineOptimizer(inner, arm.max_norm if arm.clip == "torch" else None,
                                    log=logger)
            opt.add_step_hook(watch)
        self._optimizers.append((opt, logger))
        return opt

    def warmup_cosine(self, opt: Optimizer, warmup: int = 0, final: float = 0.1
                      ) -> torch.optim.lr_scheduler.LambdaLR:
        """Linear warm-up over ``warmup`` steps to ``lr``, then cosine decay to
        ``final * lr`` at ``steps``."""
        total = max(1, self.steps)

        def f(i: int) -> float:
            if warmup > 0 and i < warmup:
                return (i + 1) / warmup
            t = min(1.0, (i - warmup) / max(1, total - warmup))
            return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * t))
        return torch.optim.lr_scheduler.LambdaLR(opt, f)

    def close(self) -> None:
        """Close every log this run opened."""
        for _, logger in self._optimizers:
            if not logger.closed:
                logger.close()


def _seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


def execute(train: Callable[[RunConfig], Any], run: RunConfig, *, out_dir: str,
            diverge_ratio: float = 1.0) -> Dict[str, Any]:
    """Run ``train(run)`` and return its summary row (see :mod:`gradstats.report.sweep`).

    Exceptions of the training function are caught: the row gets ``status="error"`` and the
    traceback; a run stopped by :class:`RunStopped` gets ``status="stopped"``.
    """
    row: Dict[str, Any] = {"task": run.task, "config": run.config, "lr": run.lr,
                           "seed": run.seed, "status": "ok", "error": None, "metrics": {}}
    _seed_all(run.seed)
    t0 = time.perf_counter()
    try:
        metrics = train(run)
        if not run._optimizers:
            raise RuntimeError("the training function never built its optimizer through "
                               "run.optimizer(...) or run.wrap(...), so nothing was logged")
        if isinstance(metrics, dict):
            row["metrics"] = {str(k): float(v) for k, v in metrics.items()}
    except RunStopped as e:
        row["status"] = "stopped"
        row["error"] = str(e)
    except Exception as e:  # noqa: BLE001 - a failed run is recorded, the sweep goes on
        row["status"] = "error"
        row["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}"
    finally:
        try:
            run.close()
        except Exception as e:  # noqa: BLE001
            row["status"] = "error"
            row["error"] = (row["error"] or "") + f"\nclosing the log failed: {e}"
    row["wall_s"] = time.perf_counter() - t0
    row["log"] = os.path.relpath(run.log_path, out_dir)
    if os.path.exists(run.log_path):
        row.update(summarize_log(run.log_path, diverge_ratio=diverge_ratio,
                                 diverge_loss=run.diverge_loss))
    else:
        row.update({"steps": 0, "diverged": True})
    if row["status"] == "stopped":
        row["diverged"] = True
    return row
