"""The sweep section of ``gradstats report``: learning-rate sensitivity of configurations.

A *sweep directory* (written by :func:`gradstats.sweep.sweep`, ``gradstats sweep``) holds
one stats log per run (task x configuration x learning rate x seed) and a summary of every
run. This module defines that directory format, turns one run's log into its summary
(:func:`summarize_log`, used by the sweep engine too, so the engine and the report apply
the same rules) and writes the report: tables in ``report.md`` and one PNG per task.

Sweep directory (format ``gradstats-sweep``, version 1)
========================================================
``sweep.json``
    ``{"format", "version", "created", "elapsed_s", "machine": {...}, "settings": {...},
    "tasks": {name: {"description", "lrs", "steps"}}, "configs": {name: description},
    "runs": [row, ...]}``.
``runs.jsonl``
    the same rows, one per line, appended as runs finish (a sweep that was stopped keeps
    what it ran; the report reads it when ``sweep.json`` is missing).
``logs/<task>/<config>/lr<lr>_s<seed>.jsonl``
    the stats log of each run (:mod:`gradstats.telemetry`).

A row: ``task, config, lr, seed, status`` (``"ok"``, ``"stopped"``: stopped early after
non-finite losses, ``"error"``), ``error``, ``steps`` (steps logged), ``initial_loss``,
``final_loss``, ``best_loss``, ``max_loss``, ``diverged``, ``first_bad_step``,
``clipped``, ``skipped``, ``skipped_nonfinite``, ``skipped_spike``, ``nonfinite``
(counts of steps), ``clip_rate``, ``skip_rate``, ``wall_s``, ``log`` (path relative to
the directory) and ``metrics`` (what the training function returned).

Rules (:func:`summarize_losses`)
================================
* ``initial_loss``: mean of the first 3 finite losses; ``final_loss``: median of the last
  ``max(5, 10%)`` losses (NaN/Inf counted as +inf; inf when the last loss is not finite) —
  a median, so that a bad batch or two near the end does not decide; ``best_loss``: the
  lowest moving average over 5 steps.
* **diverged**: the final loss is not finite, or it is above the task's ``diverge_loss``
  when the task sets one (the built-in tasks: 2.5 nats, halfway between a model that has
  learned nothing and a healthy run), else not below ``diverge_ratio`` (default 1.0) times
  the initial loss: the run ended no better than where it started.
* ``first_bad_step``: the first step whose loss is not finite or above ``1.5 x`` the
  initial loss (``None`` if none): where the run went wrong, diverged or not.
* A cell (task, configuration, learning rate) is **stable** when none of its seeds
  diverged. The **stable LR range** of a configuration is the longest run of consecutive
  stable grid learning rates; the **near-best range** is the set of learning rates whose
  median final loss is within ``near`` (default 5%) of the best median final loss of any
  configuration of the task.
* Paired comparison with a baseline configuration (same task, learning rate and seed: the
  same initial weights and batches): the mean difference of final losses over the seeds
  where neither run diverged, and its standard error; a difference counts as beyond seed
  noise when ``|mean| > 2 SE``.

Python use: ``build_sweep_report(sweep_dir, out_dir)``; :func:`is_sweep_dir` tells a sweep
directory from a log.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from ..telemetry.reader import read_log

__all__ = ["SWEEP_FORMAT", "SWEEP_VERSION", "SWEEP_FILE", "RUNS_FILE", "SweepData",
           "SweepReport", "Cell", "summarize_losses", "summarize_log", "is_sweep_dir",
           "load_sweep", "cells", "stable_range", "paired_difference",
           "build_sweep_report", "lr_label"]

SWEEP_FORMAT = "gradstats-sweep"
SWEEP_VERSION = 1
SWEEP_FILE = "sweep.json"
RUNS_FILE = "runs.jsonl"

#: defaults of the rules above
DIVERGE_RATIO = 1.0
BAD_RATIO = 1.5
NEAR_BEST = 0.05
BEST_WINDOW = 5


# ============================================================================ one run
def summarize_losses(losses: Sequence[float], *, diverge_ratio: float = DIVERGE_RATIO,
                     diverge_loss: Optional[float] = None) -> Dict[str, Any]:
    """Initial, final, best and largest loss, the divergence flag and the first bad step
    of one run's loss curve (step numbers from 1).

    Args:
        losses: the loss of every logged step, in order (NaN/Inf allowed).
        diverge_ratio: a run has diverged when its final loss is not finite or not below
            ``diverge_ratio`` x its initial loss.
        diverge_loss: instead of the ratio, an absolute threshold: the run diverged when
            its final loss is not finite or above this value.

    Returns:
        ``{"initial_loss", "final_loss", "best_loss", "max_loss", "diverged",
        "first_bad_step"}`` (``None`` for what an empty curve does not have).
    """
    x = np.asarray([float("nan") if v is None else float(v) for v in losses], dtype=float)
    out: Dict[str, Any] = {"initial_loss": None, "final_loss": None, "best_loss": None,
                           "max_loss": None, "diverged": True, "first_bad_step": None}
    if len(x) == 0:
        return out
    fin = np.isfinite(x)
    init = float(np.mean(x[fin][:3])) if fin.any() else math.nan
    k = max(5, len(x) // 10)
    tail = np.where(fin[-k:], x[-k:], np.inf)
    final = float(np.median(tail)) if math.isfinite(x[-1]) else math.inf
    if len(x) >= BEST_WINDOW:
        ma = np.convolve(np.where(fin, x, np.inf), np.ones(BEST_WINDOW) / BEST_WINDOW,
                         mode="valid")
    else:
        ma = np.where(fin, x, np.inf)
    best = float(np.min(ma)) if np.isfinite(ma).any() else math.inf
    bad = ~fin
    if math.isfinite(init):
        bad = bad | (np.where(fin, x, 0.0) > BAD_RATIO * init)
    first_bad = int(np.argmax(bad)) + 1 if bad.any() else None
    out.update(initial_loss=init if math.isfinite(init) else None,
               final_loss=final, best_loss=best,
               max_loss=float(np.max(x[fin])) if fin.any() else None,
               diverged=bool(not math.isfinite(final) or (
                   final > diverge_loss if diverge_loss is not None else
                   (not math.isfinite(init) or final >= diverge_ratio * init))),
               first_bad_step=first_bad)
    return out


def summarize_log(path: str, *, diverge_ratio: float = DIVERGE_RATIO,
                  diverge_loss: Optional[float] = None) -> Dict[str, Any]:
    """The summary of one run from its stats log: :func:`summarize_losses` of the logged
    losses plus counts of clipped, skipped (by reason) and non-finite steps.

    Raises:
        FileNotFoundError: ``path`` does not exist.
    """
    lg = read_log(path)
    recs = lg.records
    losses = [r.get("loss") for r in recs]
    out = summarize_losses(losses, diverge_ratio=diverge_ratio, diverge_loss=diverge_loss)
    n = len(recs)
    skipped = [bool(r.get("skipped")) for r in recs]
    clipped = sum(1 for r, s in zip(recs, skipped) if not s and any(r.get("clipped") or []))
    out.update(
        steps=n, clipped=clipped, skipped=sum(skipped),
        skipped_nonfinite=sum(1 for r in recs if r.get("skip_reason") == "nonfinite"),
        skipped_spike=sum(1 for r in recs if r.get("skip_reason") == "spike"),
        nonfinite=sum(1 for r in recs if r.get("nonfinite")),
        clip_rate=clipped / n if n else 0.0, skip_rate=sum(skipped) / n if n else 0.0,
        log_problems=len(lg.problems))
    return out


# ========================================================================= directory
@dataclass
class SweepData:
    """A sweep directory read back: ``rows`` (one dict per run) and the settings."""

    path: str
    rows: List[Dict[str, Any]]
    meta: Dict[str, Any] = field(default_factory=dict)
    problems: List[str] = field(default_factory=list)

    @property
    def tasks(self) -> List[str]:
        order = list((self.meta.get("tasks") or {}).keys())
        return order + sorted({r["task"] for r in self.rows} - set(order))

    @property
    def configs(self) -> List[str]:
        order = list((self.meta.get("configs") or {}).keys())
        return order + sorted({r["config"] for r in self.rows} - set(order))


def is_sweep_dir(path: str) -> bool:
    """Whether ``path`` is a sweep directory (holds ``sweep.json`` or ``runs.jsonl``)."""
    return os.path.isdir(path) and (os.path.exists(os.path.join(path, SWEEP_FILE))
                                    or os.path.exists(os.path.join(path, RUNS_FILE)))


def _num(v: Any) -> float:
    if v is None:
        return math.nan
    if isinstance(v, str):  # "NaN" / "Infinity" written by the engine's JSON encoder
        try:
            return float(v)
        except ValueError:
            return math.nan
    return float(v)


def _clean_row(r: Dict[str, Any]) -> Dict[str, Any]:
    r = dict(r)
    for k in ("lr", "initial_loss", "final_loss", "best_loss", "max_loss"):
        r[k] = _num(r.get(k))
    r["seed"] = int(r.get("seed", 0))
    r["diverged"] = bool(r.get("diverged", True))
    for k in ("steps", "clipped", "skipped", "skipped_nonfinite", "skipped_spike",
              "nonfinite"):
        r[k] = int(r.get(k) or 0)
    for k in ("clip_rate", "skip_rate"):
        r[k] = _num(r.get(k, 0.0))
    return r


def load_sweep(path: str) -> SweepData:
    """Read a sweep directory (``sweep.json``, else ``runs.jsonl``).

    Raises:
        FileNotFoundError: ``path`` is not a sweep directory.
    """
    if not is_sweep_dir(path):
        raise FileNotFoundError(f"{path!r} is not a sweep directory (no {SWEEP_FILE} or "
                                f"{RUNS_FILE})")
    problems: List[str] = []
    meta: Dict[str, Any] = {}
    rows: List[Dict[str, Any]] = []
    sj = os.path.join(path, SWEEP_FILE)
    if os.path.exists(sj):
        with open(sj, encoding="utf-8") as f:
            meta = json.load(f)
        rows = list(meta.pop("runs", []))
    else:
        with open(os.path.join(path, RUNS_FILE), encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    problems.append(f"{RUNS_FILE} line {i}: {e}")
        problems.append(f"no {SWEEP_FILE}: the sweep did not finish; {len(rows)} runs read "
                        f"from {RUNS_FILE}")
    good = []
    for r in rows:
        if not all(k in r for k in ("task", "config", "lr", "seed")):
            problems.append(f"a row without task/config/lr/seed: {str(r)[:80]}")
            continue
        good.append(_clean_row(r))
    return SweepData(path=path, rows=good, meta=meta, problems=problems)


# ============================================================================ cells
@dataclass
class Cell:
    """The seeds of one (task, configuration, learning rate)."""

    task: str
    config: str
    lr: float
    rows: List[Dict[str, Any]]

    def _arr(self, key: str) -> np.ndarray:
        v = np.array([r[key] for r in self.rows if r.get("status") != "error"], dtype=float)
        return np.where(np.isnan(v), np.inf, v)  # a NaN loss ranks as the worst

    @property
    def n(self) -> int:
        return sum(1 for r in self.rows if r.get("status") != "error")

    @property
    def errors(self) -> int:
        return sum(1 for r in self.rows if r.get("status") == "error")

    @property
    def diverged(self) -> int:
        return sum(1 for r in self.rows if r.get("status") != "error" and r["diverged"])

    @property
    def stable(self) -> bool:
        return self.n > 0 and self.diverged == 0

    def median(self, key: str = "final_loss") -> float:
        v = self._arr(key)
        return float(np.median(v)) if len(v) else math.nan

    def band(self, key: str = "final_loss") -> Tuple[float, float]:
        v = self._arr(key)
        return (float(v.min()), float(v.max())) if len(v) else (math.nan, math.nan)

    def seed_std(self, key: str = "final_loss") -> float:
        """Standard deviation over the seeds that did not diverge (NaN with fewer than 2)."""
        v = np.array([r[key] for r in self.rows
                      if r.get("status") != "error" and not r["diverged"]], dtype=float)
        v = v[np.isfinite(v)]
        return float(np.std(v, ddof=1)) if len(v) >= 2 else math.nan

    def mean(self, key: str) -> float:
        v = np.array([r[key] for r in self.rows if r.get("status") != "error"], dtype=float)
        return float(np.mean(v)) if len(v) else math.nan

    def by_seed(self) -> Dict[int, Dict[str, Any]]:
        return {r["seed"]: r for r in self.rows if r.get("status") != "error"}


def cells(rows: Iterable[Dict[str, Any]]) -> Dict[Tuple[str, str, float], Cell]:
    """Rows grouped by (task, configuration, learning rate)."""
    out: Dict[Tuple[str, str, float], Cell] = {}
    for r in rows:
        key = (r["task"], r["config"], float(r["lr"]))
        c = out.get(key)
        if c is None:
            c = out[key] = Cell(key[0], key[1], key[2], [])
        c.rows.append(r)
    return out


def stable_range(lrs: Sequence[float], stable: Sequence[bool]
                 ) -> Optional[Tuple[float, float, int]]:
    """Longest run of consecutive stable learning rates (sorted grid): ``(lowest,
    highest, count)``, the higher one on a tie; ``None`` when no LR is stable."""
    order = np.argsort(np.asarray(lrs, dtype=float))
    lr_s = [float(lrs[i]) for i in order]
    st = [bool(stable[i]) for i in order]
    best: Optional[Tuple[int, int]] = None
    i = 0
    while i < len(st):
        if not st[i]:
            i += 1
            continue
        j = i
        while j + 1 < len(st) and st[j + 1]:
            j += 1
        if best is None or (j - i) >= (best[1] - best[0]):
            best = (i, j)
        i = j + 1
    if best is None:
        return None
    return lr_s[best[0]], lr_s[best[1]], best[1] - best[0] + 1


def paired_difference(a: Cell, b: Cell, key: str = "final_loss"
                      ) -> Tuple[float, float, int, int, int]:
    """``a - b`` over seeds both ran: (mean difference, standard error, seeds compared,
    seeds where only ``a`` diverged, seeds where only ``b`` diverged). The difference is
    over seeds where neither diverged (NaN with none)."""
    ra, rb = a.by_seed(), b.by_seed()
    d: List[float] = []
    only_a = only_b = 0
    for s in sorted(set(ra) & set(rb)):
        da, db = ra[s]["diverged"], rb[s]["diverged"]
        if da and not db:
            only_a += 1
        elif db and not da:
            only_b += 1
        elif not da and not db:
            x, y = ra[s][key], rb[s][key]
            if math.isfinite(x) and math.isfinite(y):
                d.append(x - y)
    if not d:
        return math.nan, math.nan, 0, only_a, only_b
    arr = np.asarray(d)
    se = float(np.std(arr, ddof=1) / math.sqrt(len(arr))) if len(arr) >= 2 else math.nan
    return float(arr.mean()), se, len(arr), only_a, only_b


# ========================================================================== formatting
def lr_label(lr: float) -> str:
    """A short label of a learning rate (``3e-03`` -> ``3e-3``)."""
    s = f"{lr:.3g}"
    if "e" in s:
        m, e = s.split("e")
        s = f"{m}e{int(e)}"
    return s


def _f(v: float, nd: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if math.isinf(v):
        return "inf"
    return f"{v:.{nd}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    L = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    L += ["| " + " | ".join(r) + " |" for r in rows]
    return L


# ============================================================================ report
@dataclass
class SweepReport:
    """What :func:`build_sweep_report` wrote: ``markdown`` path, ``plots``, and per task
    the stable LR range of each configuration (``None``: no stable LR)."""

    out_dir: str
    markdown: str
    plots: List[str]
    stable: Dict[str, Dict[str, Optional[Tuple[float, float, int]]]]
    problems: List[str]


def _task_lrs(data: SweepData, task: str) -> List[float]:
    return sorted({float(r["lr"]) for r in data.rows if r["task"] == task})


def _task_configs(data: SweepData, task: str) -> List[str]:
    present = {r["config"] for r in data.rows if r["task"] == task}
    return [c for c in data.configs if c in present]


def task_section(data: SweepData, task: str, cs: Dict[Tuple[str, str, float], Cell], *,
                 near: float = NEAR_BEST, baseline: Optional[str] = None
                 ) -> Tuple[List[str], Dict[str, Optional[Tuple[float, float, int]]]]:
    """The markdown of one task and the stable LR range of each configuration."""
    lrs = _task_lrs(data, task)
    cfgs = _task_configs(data, task)
    info = (data.meta.get("tasks") or {}).get(task) or {}
    L: List[str] = [f"### Task `{task}`", ""]
    if info.get("description"):
        L += [str(info["description"]), ""]
    if info.get("diverge_loss") is not None:
        L += [f"Diverged: final loss not finite or above {info['diverge_loss']:g}.", ""]
    nseeds = max((c.n for k, c in cs.items() if k[0] == task), default=0)
    L += [f"{len(cfgs)} configurations x {len(lrs)} learning rates x {nseeds} seeds.", ""]
    get = lambda c, lr: cs.get((task, c, lr))  # noqa: E731
    hdr = ["config"] + [f"lr {lr_label(lr)}" for lr in lrs]

    def grid(fn) -> List[List[str]]:
        return [[f"`{c}`"] + [fn(get(c, lr)) if get(c, lr) else "" for lr in lrs]
                for c in cfgs]

    def med_band(key: str):
        def fn(cell: Cell) -> str:
            lo, hi = cell.band(key)
            s = f"{_f(cell.median(key))} [{_f(lo)}, {_f(hi)}]"
            return s + (f" **{cell.diverged}/{cell.n} div**" if cell.diverged else "")
        return fn
    L += ["#### LR sensitivity: final loss", "",
          "Median over seeds [min, max]; **k/n div**: k of n seeds diverged.", ""]
    L += _table(hdr, grid(med_band("final_loss"))) + [""]
    L += ["#### LR sensitivity: best loss", "", "Median over seeds [min, max] of the "
          f"lowest {BEST_WINDOW}-step moving average of the loss.", ""]
    L += _table(hdr, grid(med_band("best_loss"))) + [""]
    L += ["#### Divergences per cell", ""]
    L += _table(hdr, grid(lambda c: f"{c.diverged}/{c.n}" + (f" ({c.errors} err)"
                                                             if c.errors else ""))) + [""]
    # stable ranges
    best_med = min((get(c, lr).median() for c in cfgs for lr in lrs if get(c, lr)),
                   default=math.nan)
    ranges: Dict[str, Optional[Tuple[float, float, int]]] = {}
    rows = []
    for c in cfgs:
        present = [lr for lr in lrs if get(c, lr)]
        rng = stable_range(present, [get(c, lr).stable for lr in present])
        ranges[c] = rng
        nearl = [lr for lr in present if math.isfinite(best_med) and
                 get(c, lr).median() <= best_med + near * abs(best_med)]
        tot = sum(get(c, lr).diverged for lr in present)
        runs = sum(get(c, lr).n for lr in present)
        first_bad = [r["first_bad_step"] for lr in present for r in get(c, lr).rows
                     if r.get("first_bad_step") is not None]
        rows.append([f"`{c}`",
                     "none" if rng is None else f"{lr_label(rng[0])} .. {lr_label(rng[1])}",
                     "0" if rng is None else str(rng[2]),
                     ", ".join(lr_label(x) for x in nearl) or "none",
                     f"{tot}/{runs}",
                     (f"{int(np.median(first_bad))} ({len(first_bad)} runs)"
                      if first_bad else "-")])
    L += ["#### Stable LR range", "",
          "Stable: no seed diverged. Near-best: median final loss within "
          f"{100 * near:.0f}% of the best median of any configuration of this task "
          f"({_f(best_med)}). First bad step: median over runs whose loss became "
          f"non-finite or exceeded {BAD_RATIO:g}x its initial value.", ""]
    L += _table(["config", "stable LR range", "stable LRs", "near-best LRs",
                 "diverged runs", "first bad step"], rows) + [""]
    L += ["#### Seed variance", "", "Standard deviation of the final loss over the seeds "
          "that did not diverge.", ""]
    L += _table(hdr, grid(lambda c: _f(c.seed_std(), 4))) + [""]
    L += ["#### Clip and skip rates", "", "Mean share of the steps that were clipped / "
          "skipped (all seeds).", ""]
    L += _table(hdr, grid(lambda c: f"{100 * c.mean('clip_rate'):.0f}% / "
                                    f"{100 * c.mean('skip_rate'):.0f}%")) + [""]
    if baseline and baseline in cfgs:
        def pd(c: str):
            def fn(cell: Cell) -> str:
                b = get(baseline, cell.lr)
                if b is None:
                    return ""
                m, se, n, oa, ob = paired_difference(cell, b)
                s = "-" if n == 0 else (f"{m:+.3f} ± {se:.3f}" if math.isfinite(se)
                                        else f"{m:+.3f}")
                if n >= 2 and math.isfinite(se) and abs(m) > 2 * se:
                    s = f"**{s}**"
                if oa or ob:
                    s += f" (div: +{oa}/-{ob})"
                return s
            return fn
        others = [c for c in cfgs if c != baseline]
        L += [f"#### Paired difference with `{baseline}`", "",
              f"Final loss minus `{baseline}`'s, same learning rate and seed (same initial "
              "weights and batches): mean ± standard error over the seeds where neither "
              "diverged; **bold**: beyond seed noise (|mean| > 2 SE). (div: +a/-b): seeds "
              f"where only this configuration (a) or only `{baseline}` (b) diverged.", ""]
        L += _table(hdr, [[f"`{c}`"] + [pd(c)(get(c, lr)) if get(c, lr) else ""
                                         for lr in lrs] for c in others]) + [""]
    return L, ranges


def _plt():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def plot_task(data: SweepData, task: str, cs: Dict[Tuple[str, str, float], Cell],
              path: str) -> str:
    """One PNG per task: final and best loss against LR (median, min-max seed band,
    diverged cells marked), divergences per cell, clip and skip rates against LR."""
    plt = _plt()
    lrs = _task_lrs(data, task)
    cfgs = _task_configs(data, task)
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    colors = plt.get_cmap("tab10")
    inits = [r["initial_loss"] for r in data.rows if r["task"] == task
             and math.isfinite(r["initial_loss"])]
    ceiling = 1.15 * max(inits) if inits else None
    markers = "osD^vP<>hd"
    dodge = 1.04
    thr = ((data.meta.get("tasks") or {}).get(task) or {}).get("diverge_loss")
    for ax, key, title in ((axes[0, 0], "final_loss", "final loss"),
                           (axes[0, 1], "best_loss", "best loss")):
        lows = []
        for i, c in enumerate(cfgs):
            xs, med, lo, hi, div = [], [], [], [], []
            for lr in lrs:
                cell = cs.get((task, c, lr))
                if cell is None or cell.n == 0:
                    continue
                b = cell.band(key)
                xs.append(lr)
                med.append(cell.median(key))
                lo.append(b[0])
                hi.append(b[1])
                div.append(cell.diverged)
            if not xs:
                continue
            cap = ceiling
            if cap is None:
                fin = [v for v in hi if math.isfinite(v)]
                cap = 1.1 * max(fin) if fin else 1.0
            clip = lambda v: np.minimum(np.where(np.isfinite(v), v, cap), cap)  # noqa: E731
            col = colors(i % 10)
            # configurations side by side around each LR, so equal curves stay visible
            xs = [x * dodge ** (i - (len(cfgs) - 1) / 2) for x in xs]
            ax.plot(xs, clip(np.array(med)), "-", marker=markers[i % len(markers)],
                    color=col, ms=4, lw=1.5, label=c, alpha=0.9)
            ax.fill_between(xs, clip(np.array(lo)), clip(np.array(hi)), color=col,
                            alpha=0.12, lw=0)
            ax.vlines(xs, clip(np.array(lo)), clip(np.array(hi)), color=col, lw=0.8,
                      alpha=0.6)
            for x, m, d in zip(xs, clip(np.array(med)), div):
                if d:
                    ax.plot([x], [m], marker="x", color=col, ms=9, mew=2)
            lows += [v for v in lo if math.isfinite(v)]
        ax.set_xscale("log")
        if thr is not None:
            ax.axhline(float(thr), color="#d62728", ls="--", lw=0.8,
                       label="divergence threshold" if key == "final_loss" else None)
        if ceiling is not None:
            ax.axhline(ceiling / 1.15, color="grey", ls=":", lw=1)
            bottom = min(lows) if lows else None
            if bottom is not None and bottom < ceiling:
                pad = 0.05 * (ceiling - bottom)
                ax.set_ylim(bottom - pad, ceiling + pad)
        ax.set_xlabel("peak learning rate")
        ax.set_ylabel(title)
        ax.set_title(f"{title} vs LR (median, min-max over seeds; x: some seed diverged)",
                     fontsize=9)
        ax.grid(alpha=0.3, which="both")
    if axes[0, 0].get_legend_handles_labels()[0]:
        axes[0, 0].legend(fontsize=7, loc="best")
    # divergences
    ax = axes[1, 0]
    m = np.full((len(cfgs), len(lrs)), np.nan)
    n = np.zeros((len(cfgs), len(lrs)), dtype=int)
    for i, c in enumerate(cfgs):
        for j, lr in enumerate(lrs):
            cell = cs.get((task, c, lr))
            if cell is not None and cell.n:
                m[i, j] = cell.diverged / cell.n
                n[i, j] = cell.diverged
    ax.imshow(np.nan_to_num(m, nan=0.0), cmap="Reds", vmin=0, vmax=1, aspect="auto")
    for i in range(len(cfgs)):
        for j in range(len(lrs)):
            cell = cs.get((task, cfgs[i], lrs[j]))
            if cell is not None and cell.n:
                ax.text(j, i, f"{n[i, j]}/{cell.n}", ha="center", va="center", fontsize=7,
                        color="white" if m[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(lrs)))
    ax.set_xticklabels([lr_label(x) for x in lrs], fontsize=7)
    ax.set_yticks(range(len(cfgs)))
    ax.set_yticklabels(cfgs, fontsize=7)
    ax.set_title("diverged seeds per cell", fontsize=9)
    ax.set_xlabel("peak learning rate")
    # clip / skip rates
    ax = axes[1, 1]
    for i, c in enumerate(cfgs):
        xs = [lr for lr in lrs if cs.get((task, c, lr))]
        if not xs:
            continue
        col = colors(i % 10)
        ax.plot(xs, [100 * cs[(task, c, lr)].mean("clip_rate") for lr in xs], "-o",
                color=col, ms=3, label=f"{c} clipped")
        sk = [100 * cs[(task, c, lr)].mean("skip_rate") for lr in xs]
        if any(v > 0 for v in sk):
            ax.plot(xs, sk, "--s", color=col, ms=3, label=f"{c} skipped")
    ax.set_xscale("log")
    ax.set_ylabel("% of steps")
    ax.set_xlabel("peak learning rate")
    ax.set_title("clipped (solid) and skipped (dashed) steps, mean over seeds",
                 fontsize=9)
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6, loc="best", ncol=2)
    fig.suptitle(f"LR sensitivity: task {task}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name) or "task"


def build_sweep_report(sweep_dir: str, out_dir: Optional[str] = None, *,
                       plots: bool = True, near: float = NEAR_BEST,
                       baseline: Optional[str] = None,
                       title: str = "gradstats sweep report") -> SweepReport:
    """Write ``report.md`` (LR-sensitivity tables per task) and one PNG per task.

    Args:
        sweep_dir: a sweep directory (see the module docstring).
        out_dir: output folder (default: ``<sweep_dir>/report``).
        plots: write the PNG plots (needs matplotlib).
        near: tolerance of the near-best LR range, relative to the best median.
        baseline: configuration the others are compared with seed by seed (default:
            ``torch-clip`` when present).

    Raises:
        FileNotFoundError: ``sweep_dir`` is not a sweep directory.
    """
    data = load_sweep(sweep_dir)
    out_dir = out_dir or os.path.join(sweep_dir, "report")
    os.makedirs(out_dir, exist_ok=True)
    cs = cells(data.rows)
    if baseline is None and "torch-clip" in data.configs:
        baseline = "torch-clip"
    L: List[str] = [f"# {title}", ""]
    meta = data.meta
    if meta:
        mach = meta.get("machine") or {}
        L += [f"Sweep `{sweep_dir}`: {len(data.rows)} runs"
              + (f", {meta['elapsed_s']:.0f} s wall time" if meta.get("elapsed_s") else "")
              + (f" with {meta.get('settings', {}).get('workers')} workers" if
                 meta.get("settings", {}).get("workers") else "")
              + (f", created {meta.get('created')}" if meta.get("created") else "") + ".",
              ""]
        if mach:
            L += ["Machine: " + ", ".join(f"{k} {v}" for k, v in mach.items()) + ".", ""]
    cfg_desc = meta.get("configs") or {}
    if cfg_desc:
        L += ["## Configurations", ""]
        L += _table(["config", "what"], [[f"`{c}`", str(cfg_desc.get(c, ""))]
                                         for c in data.configs]) + [""]
    L += ["## LR sensitivity", ""]
    written: List[str] = []
    stable: Dict[str, Dict[str, Optional[Tuple[float, float, int]]]] = {}
    for task in data.tasks:
        sec, ranges = task_section(data, task, cs, near=near, baseline=baseline)
        stable[task] = ranges
        L += sec
        if plots:
            p = plot_task(data, task, cs, os.path.join(out_dir, f"sweep_{_safe(task)}.png"))
            written.append(p)
            rel = os.path.relpath(p, out_dir)
            L += [f"![{rel}]({rel})", ""]
    errors = [r for r in data.rows if r.get("status") == "error"]
    if errors or data.problems:
        L += ["## Problems", ""]
        L += [f"- {p}" for p in data.problems]
        L += [f"- run {r['task']}/{r['config']} lr={lr_label(r['lr'])} seed={r['seed']} "
              f"failed: {str(r.get('error', ''))[:300]}" for r in errors[:20]]
        if len(errors) > 20:
            L.append(f"- ... and {len(errors) - 20} more failed runs")
        L.append("")
    L += ["## How to read this", "",
          f"- Final loss: median of the last max(5, 10%) logged losses (inf when the last "
          f"one is NaN/Inf). Best loss: lowest {BEST_WINDOW}-step moving average. A run diverged "
          f"when its final loss is not finite or above the task's threshold (the "
          f"`diverge_loss` of the task, listed with it), or, for tasks without one, not "
          f"below its initial loss (mean of the first 3 steps).",
          "- Plots: solid line = median over seeds, shaded band and vertical bar = min-max "
          "over seeds (configurations are drawn slightly apart around each LR so that equal "
          "curves stay visible); values above the dotted line (the initial loss) are drawn "
          "at the top edge; the red dashed line is the task's divergence threshold; a cross "
          "marks a cell where some seed diverged.", ""]
    md = os.path.join(out_dir, "report.md")
    with open(md, "w", encoding="utf-8") as f:
        f.write("\n".join(L))
    return SweepReport(out_dir=out_dir, markdown=md, plots=written, stable=stable,
                       problems=data.problems)
