"""``gradstats sweep``: the command-line face of :func:`gradstats.sweep.sweep`.

    gradstats sweep --quick --out sweep_out                     # tiny task, < 2 min on a CPU
    gradstats sweep --task tiny-lm --lrs 1e-3 1e-2 1e-1 --seeds 3 \\
        --configs torch-clip recommended 'zs=ZScoreClip(warmup=10)+SpikeSkip(warmup=16)'
    gradstats sweep --task mypkg.train:train --lrs 3e-4 1e-3 --option d_model=256
    gradstats sweep --list                                      # tasks and configurations
"""
from __future__ import annotations

import ast
import sys
from typing import Any, Dict, List

from .arms import DEFAULT_ARMS, builtin_arms
from .engine import sweep
from .tasks import list_tasks


def add_arguments(p: Any) -> None:
    """The options of ``gradstats sweep`` (added to the CLI's subparser)."""
    p.add_argument("--task", nargs="+", default=None, metavar="NAME",
                   help="built-in task(s) (see --list) or your training function as "
                        "'package.module:function' (default: tiny-lm)")
    p.add_argument("--lrs", nargs="+", type=float, default=None, metavar="LR",
                   help="learning-rate grid (default: the task's)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per cell (default 3; "
                   "--quick: the task's quick setting)")
    p.add_argument("--configs", nargs="+", default=None, metavar="CONFIG",
                   help="configurations: built-in names or NAME=SPEC such as "
                        "'zs=ZScoreClip(warmup=10)+SpikeSkip(warmup=16)' (default: "
                        f"{' '.join(DEFAULT_ARMS)}; --quick: none torch-clip recommended)")
    p.add_argument("--steps", type=int, default=None, help="steps per run (default: the "
                   "task's)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="task option (a Python literal), repeatable: --option layers=4")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes (default: CPU cores; 1: in this process)")
    p.add_argument("--out", default="sweep_out", help="output directory (default "
                   "sweep_out); the report goes to OUT/report")
    p.add_argument("--quick", action="store_true", help="the tasks' quick settings: a "
                   "tiny sweep (under two minutes on a CPU)")
    p.add_argument("--baseline", default=None, help="configuration the report compares "
                   "the others with, seed by seed (default: torch-clip when present)")
    p.add_argument("--resume", action="store_true", help="keep the runs already in OUT")
    p.add_argument("--no-report", action="store_true", help="do not write the report")
    p.add_argument("--list", action="store_true", help="list tasks and configurations")


def _options(items: List[str]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for it in items:
        k, eq, v = it.partition("=")
        if not eq or not k.strip():
            raise ValueError(f"--option must be KEY=VALUE, got {it!r}")
        try:
            out[k.strip()] = ast.literal_eval(v.strip())
        except (ValueError, SyntaxError):
            out[k.strip()] = v.strip()  # a plain string
    return out


def main(args: Any) -> int:
    """Entry point (``args`` from the CLI parser)."""
    if args.list:
        print("tasks:")
        for t in list_tasks():
            print(f"  {t.name:12s} {t.description} [lrs {' '.join(f'{x:g}' for x in t.lrs)}, "
                  f"{t.steps} steps]")
        print("configurations:")
        for name, a in builtin_arms().items():
            print(f"  {name:12s} {a.description}")
        print("  NAME=SPEC    e.g. 'zs=ZScoreClip(warmup=10)+SpikeSkip(warmup=16)', "
              "'tc=TorchClip(0.5)' (gradstats.sweep.arms)")
        return 0
    configs = args.configs
    if configs is None and args.quick:
        configs = ["none", "torch-clip", "recommended"]
    try:
        res = sweep(task=args.task, lrs=args.lrs, seeds=args.seeds, configs=configs,
                    steps=args.steps, options=_options(args.option) or None, out=args.out,
                    workers=args.workers, quick=args.quick, report=not args.no_report,
                    resume=args.resume, baseline=args.baseline)
    except (ValueError, TypeError, ImportError) as e:
        print(f"gradstats sweep: {e}", file=sys.stderr)
        return 2
    n = len(res.rows)
    div = sum(bool(r.get("diverged")) for r in res.rows)
    err = sum(r.get("status") == "error" for r in res.rows)
    print(f"{n} runs in {res.elapsed_s:.0f} s: {div} diverged"
          + (f", {err} failed (see the report)" if err else "") + f". Summary: "
          f"{res.out_dir}/sweep.json")
    if res.report is not None:
        print(f"report: {res.report.markdown}")
        print(f"plots:  {', '.join(res.report.plots)}")
        for task, ranges in res.report.stable.items():
            for cfg, rng in ranges.items():
                s = "no stable LR" if rng is None else \
                    f"stable LR {rng[0]:g} .. {rng[1]:g} ({rng[2]} grid LRs)"
                print(f"  {task} / {cfg}: {s}")
    return 1 if err == n and n else 0
