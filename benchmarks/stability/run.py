"""The stability benchmark: scenarios of natural and injected instability x seeds x an LR
grid x arms (no clipping, torch's clip, each gradstats policy, the recommended preset, an
update-level arm), run with the sweep engine (``gradstats.sweep``).

    python benchmarks/stability/run.py --workers 2 --out /tmp/stability     # the benchmark
    python benchmarks/stability/run.py --study defaults --out /tmp/defaults  # policy settings
    python benchmarks/stability/run.py --study spike-record --out /tmp/spikerec
    python benchmarks/stability/run.py --study confirm --seeds 10 --out /tmp/confirm
    python benchmarks/stability/run.py --quick --out /tmp/stab_quick        # < 1 min slice

Each run writes a stats log; the engine writes ``sweep.json`` and the LR-sensitivity
report (``<out>/report/report.md`` + one PNG per scenario); this script adds
``<out>/verdicts.md``: per scenario and arm, divergences, stable LR range, where runs went
wrong and the seed-paired comparison with torch's clip. The scenarios are the built-in
tasks of :mod:`gradstats.sweep.tasks.lm` (tiny transformers, CPU).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # spike_clamped is imported by name in the worker processes too
    sys.path.insert(0, HERE)

import numpy as np  # noqa: E402

import gradstats  # noqa: E402
from gradstats import policies as P  # noqa: E402
from gradstats import presets  # noqa: E402
from gradstats.report.sweep import (build_sweep_report, cells, load_sweep,  # noqa: E402
                                    lr_label, paired_difference, stable_range)
from gradstats.sweep import Arm, builtin_arms  # noqa: E402
from gradstats.optim_extras import StableAdamW  # noqa: E402
from spike_clamped import SpikeSkipClamped  # noqa: E402

#: scenario -> LR grid (peak learning rates of AdamW)
SCENARIOS: Dict[str, Sequence[float]] = {
    "high-lr": (1e-2, 3e-2, 1e-1, 3e-1),
    "post-ln": (1e-2, 3e-2, 1e-1, 3e-1),
    "fp16": (3e-2, 1e-1, 3e-1, 1.0),
    "label-noise": (1e-2, 3e-2, 1e-1, 3e-1),
    "large-batch": (1e-2, 3e-2, 1e-1, 3e-1),
    "nan-batch": (1e-2, 3e-2, 1e-1, 3e-1),
    "spike": (1e-2, 3e-2, 1e-1, 3e-1),
}


def main_arms() -> List[Arm]:
    """The benchmark's arms. ``recommended`` is the full preset
    (:func:`gradstats.presets.recommended_adamw`: the gradient-side settings around
    StableAdamW); ``recommended-grad`` the gradient side alone around AdamW
    (:func:`gradstats.presets.recommended`); ``update-clip`` StableAdamW alone."""
    b = builtin_arms()
    return [b["none"], b["torch-clip"], b["fixed"], b["zscore"], b["quantile"], b["spike"],
            Arm("recommended-grad", kwargs=presets.recommended_kwargs(),
                description="gradstats.presets.recommended(AdamW): " + presets.describe()),
            Arm("update-clip", clip="none", inner=StableAdamW,
                description="StableAdamW (per-tensor update-RMS clipping, Wortsman et al. "
                            "2023), no gradient clipping"),
            b["recommended"]]


def study_arms() -> List[Arm]:
    """Policy settings compared by ``--study defaults``."""
    b = builtin_arms()
    return [
        b["torch-clip"], b["zscore"],
        Arm("zscore-w10", kwargs={"policy": P.ZScoreClip(warmup=10)}),
        Arm("zscore-w10-z2", kwargs={"policy": P.ZScoreClip(warmup=10, z_thresh=2.0)}),
        b["quantile"],
        Arm("quantile-0.5", kwargs={"policy": P.QuantileClip(quantile=0.5)}),
        b["spike"],
        Arm("spike-w16", kwargs={"spike": P.SpikeSkip(window=64, warmup=16)}),
        Arm("spike-w16-k4", kwargs={"spike": P.SpikeSkip(window=64, warmup=16, k=4.0)}),
        Arm("update-clip", clip="none", inner=StableAdamW,
            description="StableAdamW (update-RMS clipping), no gradient clipping"),
        Arm("update-clip+torch", clip="torch", max_norm=1.0, inner=StableAdamW,
            description="StableAdamW + torch clip 1.0"),
    ]


STUDY_SCENARIOS = {k: (3e-2, 1e-1, 3e-1) for k in
                   ("high-lr", "post-ln", "fp16", "label-noise", "spike")}


def spike_record_arms() -> List[Arm]:
    """``--study spike-record``: SpikeSkip recording skipped outliers raw (as now) or
    clamped to the threshold (spike_clamped.py), k = 6 and 4."""
    b = builtin_arms()
    out = [b["torch-clip"]]
    for k in (6.0, 4.0):
        out.append(Arm(f"spike-w16-k{k:g}",
                       kwargs={"spike": P.SpikeSkip(window=64, warmup=16, k=k)}))
        out.append(Arm(f"clamped-w16-k{k:g}",
                       kwargs={"spike": SpikeSkipClamped(window=64, warmup=16, k=k)},
                       description=f"SpikeSkip(window=64, warmup=16, k={k:g}) recording "
                                   "skipped outliers at the threshold (experimental)"))
    return out


SPIKE_RECORD_SCENARIOS = {"label-noise": (3e-2, 1e-1), "spike": (3e-2, 1e-1)}


def confirm_arms() -> List[Arm]:
    """``--study confirm``: fresh seeds (5..14) for the two effects the main run suggested
    (update clipping at the edge of the stable range; ZScoreClip's warm-up letting early
    corrupted batches through)."""
    b = builtin_arms()
    return [b["torch-clip"],
            Arm("recommended-grad", kwargs=presets.recommended_kwargs(),
                description="gradstats.presets.recommended(AdamW): " + presets.describe()),
            b["recommended"], b["zscore"],
            Arm("zscore-w10", kwargs={"policy": P.ZScoreClip(warmup=10)})]


CONFIRM_SCENARIOS = {"tiny-lm": (2e-1, 3e-1), "high-lr": (1e-1, 2e-1),
                     "label-noise": (3e-2, 1e-1)}


# ============================================================================ verdicts
def verdicts(out: str, baseline: str = "torch-clip") -> str:
    """``verdicts.md``: per scenario and arm, the numbers the README's verdicts rest on."""
    data = load_sweep(out)
    cs = cells(data.rows)
    L: List[str] = ["# Stability benchmark: verdict tables", ""]
    meta = data.meta
    L += [f"{len(data.rows)} runs, {meta.get('elapsed_s', 0):.0f} s wall on "
          f"{meta.get('settings', {}).get('workers')} workers; machine: "
          + ", ".join(f"{k} {v}" for k, v in (meta.get("machine") or {}).items()), ""]
    L += ["Per arm: diverged runs (all LRs and seeds), stable LR range (no seed diverged), "
          "median final loss at each LR, and the seed-paired comparison with "
          f"`{baseline}` over all cells: cells where the arm is better / worse beyond seed "
          "noise (|mean paired difference| > 2 SE over the seeds where neither diverged), "
          "and seeds that diverged only with the arm / only with the baseline.", ""]
    for task in data.tasks:
        lrs = sorted({r["lr"] for r in data.rows if r["task"] == task})
        cfgs = [c for c in data.configs if any(k[0] == task and k[1] == c for k in cs)]
        L += [f"## {task}", "",
              "| arm | diverged | stable LR range | " + " | ".join(
                  f"final @ {lr_label(lr)}" for lr in lrs) +
              f" | better / worse than {baseline} | div only arm / only base | "
              "first bad step (median, n) |",
              "|---|---|---|" + "---|" * len(lrs) + "---|---|---|"]
        for c in cfgs:
            cl = [cs.get((task, c, lr)) for lr in lrs]
            div = sum(x.diverged for x in cl if x)
            n = sum(x.n for x in cl if x)
            rng = stable_range([lr for lr, x in zip(lrs, cl) if x],
                               [x.stable for x in cl if x])
            meds = []
            for x in cl:
                m = x.median() if x else math.nan
                meds.append("-" if x is None else ("inf" if math.isinf(m) else f"{m:.3f}")
                            + (f" ({x.diverged}d)" if x and x.diverged else ""))
            better = worse = oa = ob = 0
            if c != baseline:
                for lr, x in zip(lrs, cl):
                    bcell = cs.get((task, baseline, lr))
                    if x is None or bcell is None:
                        continue
                    md, se, k, a, bb = paired_difference(x, bcell)
                    oa += a
                    ob += bb
                    if k >= 2 and math.isfinite(se) and abs(md) > 2 * se:
                        better += md < 0
                        worse += md > 0
            fb = [r["first_bad_step"] for x in cl if x for r in x.rows
                  if r.get("first_bad_step") is not None]
            L.append(f"| `{c}` | {div}/{n} | "
                     + ("none" if rng is None else f"{lr_label(rng[0])}..{lr_label(rng[1])}")
                     + " | " + " | ".join(meds) + " | "
                     + ("-" if c == baseline else f"{better} / {worse}") + " | "
                     + ("-" if c == baseline else f"{oa} / {ob}") + " | "
                     + (f"{int(np.median(fb))} ({len(fb)})" if fb else "-") + " |")
        L.append("")
    L += pair_tables(data, cs, PAIRS)
    path = os.path.join(out, "verdicts.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(L))
    return path


#: seed-paired comparisons tabulated cell by cell in verdicts.md
PAIRS = (("recommended", "torch-clip"), ("recommended-grad", "torch-clip"),
         ("fixed", "torch-clip"), ("recommended", "recommended-grad"),
         ("update-clip", "none"),
         ("none", "torch-clip"), ("zscore", "torch-clip"), ("zscore-w10", "zscore"),
         ("quantile", "torch-clip"), ("spike", "torch-clip"),
         ("clamped-w16-k6", "spike-w16-k6"))


def pair_tables(data, cs, pairs) -> List[str]:
    """For each pair (a, b) present: per scenario and LR, the mean paired difference of
    final losses a - b ± SE (seeds where neither diverged) and the seeds that diverged
    only with a / only with b."""
    L: List[str] = []
    for a, b in pairs:
        if a not in data.configs or b not in data.configs:
            continue
        L += [f"## Paired: `{a}` minus `{b}`", "",
              "Final loss difference, mean ± standard error over the seeds where neither "
              "diverged (n); **bold**: beyond seed noise (|mean| > 2 SE); div a/b: seeds "
              "that diverged only with a / only with b.", ""]
        tasks = [t for t in data.tasks if (t, a) in {(k[0], k[1]) for k in cs}]
        lrs_all = sorted({k[2] for k in cs if k[0] in tasks})
        L += ["| scenario | " + " | ".join(f"lr {lr_label(x)}" for x in lrs_all) + " |",
              "|---|" + "---|" * len(lrs_all)]
        for t in tasks:
            cells_ = []
            for lr in lrs_all:
                ca, cb = cs.get((t, a, lr)), cs.get((t, b, lr))
                if ca is None or cb is None:
                    cells_.append("")
                    continue
                md, se, k, da, db = paired_difference(ca, cb)
                if k == 0:
                    txt = "-"
                else:
                    txt = f"{md:+.4f} ± {se:.4f} (n={k})" if math.isfinite(se) else \
                        f"{md:+.4f} (n={k})"
                    if k >= 2 and math.isfinite(se) and abs(md) > 2 * se:
                        txt = f"**{txt}**"
                if da or db:
                    txt += f" div {da}/{db}"
                cells_.append(txt)
            L.append(f"| {t} | " + " | ".join(cells_) + " |")
        L.append("")
    return L


# ================================================================================ main
def run(out: str, *, study: str = "main", quick: bool = False, workers: int = 2,
        seeds: Optional[int] = None, scenarios: Optional[Sequence[str]] = None,
        resume: bool = False, progress: bool = True) -> str:
    """Run the benchmark (or a study / the quick slice) into ``out``; returns the path of
    ``verdicts.md``."""
    if study == "main":
        grid, arms = dict(SCENARIOS), main_arms()
    elif study == "defaults":
        grid, arms = dict(STUDY_SCENARIOS), study_arms()
    elif study == "spike-record":
        grid, arms = dict(SPIKE_RECORD_SCENARIOS), spike_record_arms()
    elif study == "confirm":
        grid, arms = dict(CONFIRM_SCENARIOS), confirm_arms()
    else:
        raise ValueError(f"study must be 'main', 'defaults' or 'spike-record', got "
                         f"{study!r}")
    steps = None
    if quick:
        grid = {"spike": (3e-2, 3e-1), "nan-batch": (3e-2,)}
        b = builtin_arms()
        arms = [b["torch-clip"], b["recommended"], b["none"]]
        seeds = seeds or 2
        steps = 40
    if scenarios:
        unknown = set(scenarios) - set(grid)
        if unknown:
            raise ValueError(f"unknown scenarios {sorted(unknown)}; known: {sorted(grid)}")
        grid = {k: grid[k] for k in scenarios}
    seeds = seeds or (3 if study == "defaults" else 5)
    seed_list: Any = list(range(5, 5 + seeds)) if study == "confirm" else seeds
    t0 = time.perf_counter()
    # one sweep per distinct LR grid (the engine takes one grid per call)
    by_grid: Dict[Sequence[float], List[str]] = {}
    for name, lrs in grid.items():
        by_grid.setdefault(tuple(lrs), []).append(name)
    os.makedirs(out, exist_ok=True)
    first = True
    for lrs, names in by_grid.items():
        gradstats.sweep(task=names, lrs=list(lrs), seeds=seed_list, configs=arms, out=out,
                        workers=workers, report=False, progress=progress,
                        resume=resume or not first, steps=steps)
        first = False
    # one summary and one report over every scenario
    _merge_summary(out, list(grid), arms, time.perf_counter() - t0)
    rep = build_sweep_report(
        out, os.path.join(out, "report"), baseline="torch-clip",
        title=f"gradstats stability benchmark ({study}{', quick' if quick else ''})")
    v = verdicts(out)
    print(f"stability benchmark: {time.perf_counter() - t0:.0f} s; report {rep.markdown}; "
          f"verdicts {v}")
    return v


def _merge_summary(out: str, order: List[str], arms: List[Arm], elapsed: float) -> None:
    """Rebuild ``sweep.json`` from ``runs.jsonl`` (all the grids' runs), keeping the last
    sweep's machine/settings and every task's description."""
    import json
    from gradstats.report.sweep import RUNS_FILE, SWEEP_FILE
    from gradstats.sweep.tasks import get_task
    with open(os.path.join(out, SWEEP_FILE), encoding="utf-8") as f:
        meta = json.load(f)
    rows = []
    with open(os.path.join(out, RUNS_FILE), encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
    tasks = {}
    for name in order:
        t = get_task(name)
        lrs = sorted({r["lr"] for r in rows if r["task"] == name})
        tasks[name] = {"description": t.description, "lrs": lrs, "steps": t.steps,
                       "diverge_loss": t.diverge_loss}
    meta["tasks"] = tasks
    meta["configs"] = {a.name: a.description for a in arms}
    if len(set(map(tuple, (t["lrs"] for t in tasks.values())))) > 1 or \
            meta.get("elapsed_s", 0) < elapsed * 0.5:
        meta["elapsed_s"] = elapsed  # several sweeps: the whole benchmark's wall time
    meta["runs"] = rows
    with open(os.path.join(out, SWEEP_FILE), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(HERE, "out"), help="output directory")
    ap.add_argument("--study", choices=["main", "defaults", "spike-record", "confirm"],
                    default="main")
    ap.add_argument("--quick", action="store_true", help="a slice that runs in < 1 min")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--scenarios", nargs="+", default=None)
    ap.add_argument("--resume", action="store_true", help="keep runs already in --out")
    args = ap.parse_args(argv)
    run(args.out, study=args.study, quick=args.quick, workers=args.workers,
        seeds=args.seeds, scenarios=args.scenarios, resume=args.resume)
    return 0


if __name__ == "__main__":
    sys.exit(main())
