"""Tasks a sweep can run: a training function plus its default learning-rate grid, step
count and options. ``gradstats sweep --task NAME`` picks a registered task; ``--task
module:function`` runs your own training function (see :mod:`gradstats.sweep.run`).

Built-in tasks (:mod:`gradstats.sweep.tasks.lm`, tiny causal transformers on generated
data, CPU-friendly): ``tiny-lm`` (the ``--quick`` task) and the scenarios of the stability
benchmark (``high-lr``, ``post-ln``, ``fp16``, ``label-noise``, ``large-batch``,
``nan-batch``, ``spike``). ``gradstats sweep --list`` prints them.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

__all__ = ["Task", "register_task", "get_task", "list_tasks", "load_train"]


@dataclass(frozen=True)
class Task:
    """A named training function with its defaults.

    Attributes:
        name: the task's name (``--task NAME``).
        train: ``train(run: RunConfig) -> Optional[dict]``, importable by name.
        lrs: default learning-rate grid.
        steps: default number of steps.
        options: passed as ``run.options`` (overridable per sweep).
        description: one line for the report.
        quick: overrides of ``lrs``/``steps``/``seeds``/``options`` under ``--quick``.
        cost: relative cost of one step (runs of costly tasks are started first).
        diverge_loss: a run diverged when its final loss is above this (or not finite);
            ``None``: when it is not below ``diverge_ratio`` x its initial loss.
    """

    name: str
    train: Callable[..., Any]
    lrs: Tuple[float, ...]
    steps: int
    options: Dict[str, Any] = field(default_factory=dict)
    description: str = ""
    quick: Dict[str, Any] = field(default_factory=dict)
    cost: float = 1.0
    diverge_loss: Optional[float] = None


_REGISTRY: Dict[str, Task] = {}


def register_task(task: Task, *, replace: bool = False) -> Task:
    """Add ``task`` to the registry.

    Raises:
        ValueError: a task of that name exists (and ``replace`` is False).
    """
    if task.name in _REGISTRY and not replace:
        raise ValueError(f"a task named {task.name!r} is already registered")
    _REGISTRY[task.name] = task
    return task


def load_train(ref: str) -> Callable[..., Any]:
    """The training function named ``"package.module:function"``.

    Raises:
        ValueError: ``ref`` is not of that form, or the module has no such function.
        ImportError: the module cannot be imported.
    """
    mod, sep, fn = ref.partition(":")
    if not sep or not mod or not fn:
        raise ValueError(f"a training function is named 'package.module:function', got "
                         f"{ref!r}")
    obj: Any = importlib.import_module(mod)
    for part in fn.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{ref!r}: module {mod!r} has no {fn!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{ref!r} is not callable")
    return obj


def get_task(name: str) -> Task:
    """The registered task ``name``, or a task around the function ``module:function``.

    Raises:
        ValueError: unknown name (the message lists the registered ones).
    """
    _builtins()
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" in name:
        fn = load_train(name)
        return Task(name=name.rsplit(":", 1)[1], train=fn, lrs=(1e-3, 3e-3, 1e-2),
                    steps=200, description=f"user function {name}")
    raise ValueError(f"unknown task {name!r}; built-in tasks: "
                     f"{', '.join(sorted(_REGISTRY))}, or 'package.module:function'")


def list_tasks() -> List[Task]:
    """The registered tasks."""
    _builtins()
    return list(_REGISTRY.values())


def _builtins() -> None:
    from . import lm  # noqa: F401  (registers the built-in tasks on import)


def resolve(tasks: Optional[Sequence[str]]) -> List[Task]:
    """Tasks from names (default: ``tiny-lm``)."""
    return [get_task(t) for t in (tasks or ["tiny-lm"])]
