"""The sweep engine: every (task, configuration, learning rate, seed) run in worker
processes, one stats log per run, a summary and the LR-sensitivity report.

Workers are ``multiprocessing`` processes started with ``spawn`` (safe with torch), one
torch thread each (``OMP_NUM_THREADS=1``): tiny models run fastest single-threaded, and
several runs in parallel use the cores. ``workers=1`` runs everything in this process.
"""
from __future__ import annotations

import datetime
import json
import math
import multiprocessing as mp
import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from ..report.sweep import (RUNS_FILE, SWEEP_FILE, SWEEP_FORMAT, SWEEP_VERSION, SweepReport,
                            build_sweep_report, lr_label)
from ..version import __version__
from .arms import Arm, resolve_arms
from .run import RunConfig, execute
from .tasks import Task, get_task

__all__ = ["sweep", "SweepResult", "Progress"]


# ================================================================================ progress
class Progress:
    """A plain-text progress bar on stderr (no dependency): runs done, diverged, elapsed
    time and an estimate of the time left. On a terminal it redraws one line; otherwise
    it prints a line at every 10% (and at least every 30 s)."""

    def __init__(self, total: int, stream: Any = None, width: int = 28,
                 enabled: bool = True) -> None:
        self.total, self.width, self.enabled = total, width, enabled
        self.stream = stream or sys.stderr
        self.done = self.diverged = self.errors = 0
        self.t0 = time.perf_counter()
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_print = self.t0
        self._last_frac = -1.0

    def _line(self, last: str) -> str:
        el = time.perf_counter() - self.t0
        frac = self.done / max(1, self.total)
        eta = el / self.done * (self.total - self.done) if self.done else math.nan
        fill = int(self.width * frac)
        bar = "#" * fill + "." * (self.width - fill)
        eta_s = "?" if math.isnan(eta) else _hms(eta)
        err = f", {self.errors} failed" if self.errors else ""
        return (f"[{bar}] {self.done}/{self.total} runs, {self.diverged} diverged{err} | "
                f"{_hms(el)} elapsed, ~{eta_s} left | {last}")

    def update(self, row: Dict[str, Any]) -> None:
        self.done += 1
        self.diverged += bool(row.get("diverged"))
        self.errors += row.get("status") == "error"
        if not self.enabled:
            return
        fl = row.get("final_loss")
        fl_s = f"{fl:.3f}" if isinstance(fl, float) and math.isfinite(fl) else str(fl)
        last = (f"{row['task']}/{row['config']} lr={lr_label(row['lr'])} s{row['seed']}: "
                f"final {fl_s}{' DIVERGED' if row.get('diverged') else ''}")
        now = time.perf_counter()
        frac = self.done / max(1, self.total)
        if self._tty:
            self.stream.write("\r" + self._line(last)[:160].ljust(160))
            if self.done == self.total:
                self.stream.write("\n")
        elif (frac - self._last_frac >= 0.1 or now - self._last_print >= 30
              or self.done == self.total):
            self.stream.write(self._line(last) + "\n")
            self._last_print, self._last_frac = now, frac
        self.stream.flush()


def _hms(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else \
        f"{s // 60}:{s % 60:02d}"


# ================================================================================ workers
def _init_worker() -> None:
    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process
        pass


def _work(job: Tuple[Callable[..., Any], RunConfig, str, float]) -> Dict[str, Any]:
    train, run, out_dir, ratio = job
    return execute(train, run, out_dir=out_dir, diverge_ratio=ratio)


# ================================================================================== API
@dataclass
class SweepResult:
    """What :func:`sweep` ran and wrote.

    Attributes:
        out_dir: the sweep directory.
        rows: one summary dict per run (see :mod:`gradstats.report.sweep`).
        report: the report written (``None`` with ``report=False``).
        elapsed_s: wall time.
    """

    out_dir: str
    rows: List[Dict[str, Any]]
    report: Optional[SweepReport]
    elapsed_s: float

    def cell(self, task: str, config: str, lr: float) -> List[Dict[str, Any]]:
        """The rows of one (task, configuration, learning rate)."""
        return [r for r in self.rows if r["task"] == task and r["config"] == config
                and math.isclose(r["lr"], lr)]


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (str, int, bool)) or v is None:
        return v
    if isinstance(v, float):
        return v
    return repr(v)


def machine_info() -> Dict[str, Any]:
    """Host, CPU, versions: recorded in ``sweep.json`` and the report."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu or "unknown", "cores": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__,
            "gradstats": __version__, "platform": platform.platform(terse=True)}


def _seeds(seeds: Union[int, Sequence[int]]) -> List[int]:
    if isinstance(seeds, bool):
        raise TypeError("seeds must be an int or a sequence of ints")
    if isinstance(seeds, int):
        if seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {seeds}")
        return list(range(seeds))
    out = [int(s) for s in seeds]
    if not out or len(set(out)) != len(out):
        raise ValueError(f"seeds must be distinct and non-empty, got {seeds!r}")
    return out


def _check_lrs(lrs: Iterable[float]) -> Tuple[float, ...]:
    out = tuple(float(x) for x in lrs)
    if not out or any(not (x > 0 and math.isfinite(x)) for x in out):
        raise ValueError(f"lrs must be positive finite numbers, got {out!r}")
    return tuple(sorted(set(out)))


def _log_path(out_dir: str, task: str, config: str, lr: float, seed: int) -> str:
    safe = lambda s: "".join(c if c.isalnum() or c in "-_." else "_" for c in s)  # noqa
    return os.path.join(out_dir, "logs", safe(task), safe(config),
                        f"lr{lr_label(lr)}_s{seed}.jsonl")


def sweep(train: Union[None, str, Callable[..., Any]] = None, *,
          task: Union[None, str, Sequence[str]] = None,
          lrs: Optional[Sequence[float]] = None,
          seeds: Union[None, int, Sequence[int]] = None,
          configs: Union[None, Sequence[Union[str, Arm]], Mapping[str, Any]] = None,
          steps: Optional[int] = None, options: Optional[Dict[str, Any]] = None,
          out: str = "sweep_out", workers: Optional[int] = None, quick: bool = False,
          report: bool = True, progress: bool = True, diverge_ratio: float = 1.0,
          stop_after_nonfinite: int = 10, resume: bool = False,
          baseline: Optional[str] = None) -> SweepResult:
    """Run a training function over learning rates x seeds x configurations.

    Args:
        train: your training function ``train(run: RunConfig)`` (module level, so that
            worker processes can import it) or its name ``"package.module:function"``;
            see :mod:`gradstats.sweep.run`. Mutually exclusive with ``task``.
        task: a built-in or registered task name, or a list of them (default ``tiny-lm``
            when ``train`` is not given); ``gradstats.sweep.tasks.list_tasks()``.
        lrs: learning-rate grid (default: each task's own).
        seeds: number of seeds (0..n-1) or the seeds themselves. Default: 3 (under
            ``quick``, the task's quick setting).
        configs: configuration names / spec strings / :class:`Arm` objects, or a dict
            ``{name: Arm | spec | StableOptimizer kwargs}`` (see
            :mod:`gradstats.sweep.arms`). Default: ``none, torch-clip, zscore, spike,
            recommended``.
        steps: steps per run (default: the task's).
        options: task options, merged over the task's (``run.options``).
        out: output directory (created).
        workers: worker processes (default: the number of CPU cores; 1: in this process).
        quick: the tasks' ``quick`` settings (fewer steps, LRs, seeds) where not given.
        report: write the report into ``<out>/report`` at the end.
        progress: show the progress bar.
        diverge_ratio: a run diverged when its final loss is not below this times its
            initial loss (or not finite).
        stop_after_nonfinite: stop a run after this many consecutive non-finite losses.
        resume: skip runs already recorded in ``<out>/runs.jsonl``.
        baseline: configuration the report compares the others with (default
            ``torch-clip`` when present).

    Returns:
        a :class:`SweepResult`.

    Raises:
        ValueError: invalid grid, seeds, task or configuration (before anything runs).
        TypeError: both or neither of ``train`` and a usable ``task``.

    Example::

        >>> res = gradstats.sweep(task="tiny-lm", lrs=[1e-3, 1e-2, 1e-1], seeds=3,
        ...                       configs=["torch-clip", "recommended"], out="sweep_out")
        >>> res.report.markdown
        'sweep_out/report/report.md'
    """
    if train is not None and task is not None:
        raise TypeError("pass either train (your function) or task (a registered task)")
    if train is not None:
        ref = train if isinstance(train, str) else \
            f"{getattr(train, '__module__', '?')}:{getattr(train, '__qualname__', '?')}"
        fn = get_task(ref).train if isinstance(train, str) else train
        if not callable(fn):
            raise TypeError(f"train must be callable or 'module:function', got {train!r}")
        tasks: List[Task] = [Task(name=ref.rsplit(":", 1)[-1].split(".")[-1], train=fn,
                                  lrs=(1e-3, 3e-3, 1e-2), steps=200,
                                  description=f"user function {ref}")]
    else:
        names = [task] if isinstance(task, str) or task is None else list(task)
        tasks = [get_task(n or "tiny-lm") for n in names]
    if len({t.name for t in tasks}) != len(tasks):
        raise ValueError("tasks: duplicate names")
    arms = resolve_arms(configs)
    if not isinstance(diverge_ratio, (int, float)) or not diverge_ratio > 0:
        raise ValueError(f"diverge_ratio must be > 0, got {diverge_ratio!r}")
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    n_workers = (os.cpu_count() or 1) if workers is None else int(workers)
    if n_workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers!r}")

    # ---- the grid
    out_dir = os.path.abspath(out)
    os.makedirs(out_dir, exist_ok=True)
    task_info: Dict[str, Dict[str, Any]] = {}
    jobs: List[Tuple[float, Tuple[Callable[..., Any], RunConfig, str, float]]] = []
    for t in tasks:
        q = t.quick if quick else {}
        t_lrs = _check_lrs(lrs if lrs is not None else q.get("lrs", t.lrs))
        t_steps = steps or q.get("steps", t.steps)
        t_seeds = _seeds(seeds if seeds is not None else q.get("seeds", 3))
        opts = dict(t.options)
        opts.update(q.get("options", {}))
        opts.update(options or {})
        task_info[t.name] = {"description": t.description, "lrs": list(t_lrs),
                             "steps": t_steps, "seeds": t_seeds, "options": opts,
                             "diverge_loss": t.diverge_loss}
        for a in arms:
            for lr in t_lrs:
                for s in t_seeds:
                    rc = RunConfig(task=t.name, config=a.name, lr=lr, seed=s, steps=t_steps,
                                   options=dict(opts), arm=a,
                                   log_path=_log_path(out_dir, t.name, a.name, lr, s),
                                   stop_after_nonfinite=stop_after_nonfinite,
                                   diverge_loss=t.diverge_loss)
                    jobs.append((t.cost * t_steps, (t.train, rc, out_dir, float(diverge_ratio))))
    runs_path = os.path.join(out_dir, RUNS_FILE)
    rows: List[Dict[str, Any]] = []
    if resume and os.path.exists(runs_path):
        with open(runs_path, encoding="utf-8") as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        done = {(r["task"], r["config"], float(r["lr"]), int(r["seed"])) for r in rows}
        jobs = [j for j in jobs if (j[1][1].task, j[1][1].config, j[1][1].lr, j[1][1].seed)
                not in done]
    elif os.path.exists(runs_path):
        os.remove(runs_path)
    # costly runs first (better packing of the last runs onto the workers)
    jobs.sort(key=lambda j: -j[0])
    todo = [j[1] for j in jobs]

    # ---- run
    t0 = time.perf_counter()
    bar = Progress(len(todo), enabled=progress)
    if progress:
        sys.stderr.write(f"gradstats sweep: {len(todo)} runs ({len(tasks)} task(s) x "
                         f"{len(arms)} configs x LRs x seeds) on {n_workers} worker(s) "
                         f"-> {out_dir}\n")
    with open(runs_path, "a", encoding="utf-8") as rf:
        def record(row: Dict[str, Any]) -> None:
            rows.append(row)
            rf.write(json.dumps(_jsonable(row)) + "\n")
            rf.flush()
            bar.update(row)
        if n_workers == 1 or len(todo) <= 1:
            n_threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                for job in todo:
                    record(_work(job))
            finally:
                torch.set_num_threads(n_threads)
        else:
            ctx = mp.get_context("spawn")
            old = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
            os.environ.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
            try:
                with ctx.Pool(min(n_workers, len(todo)), initializer=_init_worker) as pool:
                    for row in pool.imap_unordered(_work, todo, chunksize=1):
                        record(row)
            finally:
                for k, v in old.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
    elapsed = time.perf_counter() - t0

    # ---- summary
    order = {a.name: i for i, a in enumerate(arms)}
    torder = {t.name: i for i, t in enumerate(tasks)}
    rows.sort(key=lambda r: (torder.get(r["task"], 99), order.get(r["config"], 99),
                             float(r["lr"]), int(r["seed"])))
    summary = {
        "format": SWEEP_FORMAT, "version": SWEEP_VERSION,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "elapsed_s": elapsed, "machine": machine_info(),
        "settings": {"workers": n_workers, "quick": quick, "diverge_ratio": diverge_ratio,
                     "stop_after_nonfinite": stop_after_nonfinite},
        "tasks": task_info,
        "configs": {a.name: a.description for a in arms},
        "runs": rows,
    }
    with open(os.path.join(out_dir, SWEEP_FILE), "w", encoding="utf-8") as f:
        json.dump(_jsonable(summary), f, indent=1)
    rep = build_sweep_report(out_dir, os.path.join(out_dir, "report"),
                             baseline=baseline) if report else None
    return SweepResult(out_dir=out_dir, rows=rows, report=rep, elapsed_s=elapsed)
