"""``gradstats.sweep``: learning rates x seeds x configurations, in parallel, with a stats
log per run, a summary and an LR-sensitivity report.

* :func:`sweep` (also ``gradstats.sweep(...)`` and ``gradstats sweep``) — the engine
  (:mod:`gradstats.sweep.engine`);
* :class:`RunConfig` — what your training function ``train(run)`` receives; it builds the
  optimizer with the run's configuration and log (:mod:`gradstats.sweep.run`);
* :class:`Arm`, :func:`builtin_arms`, :func:`parse_arm` — configurations
  (:mod:`gradstats.sweep.arms`);
* :class:`Task`, :func:`register_task`, :func:`get_task`, :func:`list_tasks` — named
  training functions with their defaults; the built-in tiny transformers and stability
  scenarios are in :mod:`gradstats.sweep.tasks.lm`.

The sweep directory format and the report are in :mod:`gradstats.report.sweep`.
"""
from .arms import DEFAULT_ARMS, Arm, builtin_arms, parse_arm, resolve_arms
from .baseline import BaselineOptimizer
from .engine import Progress, SweepResult, machine_info, sweep
from .run import RunConfig, RunStopped
from .tasks import Task, get_task, list_tasks, register_task

__all__ = ["Arm", "BaselineOptimizer", "DEFAULT_ARMS", "Progress", "RunConfig", "RunStopped",
           "SweepResult", "Task", "builtin_arms", "get_task", "list_tasks", "machine_info",
           "parse_arm", "register_task", "resolve_arms", "sweep"]


class _CallableModule(__import__("types").ModuleType):
    """``gradstats.sweep(...)`` calls :func:`sweep`; ``gradstats.sweep.X`` is this package."""

    def __call__(self, *args, **kwargs) -> SweepResult:
        return sweep(*args, **kwargs)


__import__("sys").modules[__name__].__class__ = _CallableModule
