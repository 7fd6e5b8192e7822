"""The ``gradstats`` command (also ``python -m gradstats``): info, demo, bench, report, sweep."""
from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
from typing import List, Optional

from ..sweep.cli import add_arguments as sweep_arguments


def _version(mod: str) -> str:
    try:
        return importlib.import_module(mod).__version__
    except Exception as e:
        return f"not available ({type(e).__name__}: {e})"


def info_lines() -> List[str]:
    """Versions, devices and backend availability, one line each."""
    import torch

    from ..backends import registry as _dispatch
    from ..version import __version__

    lines = [
        f"gradstats {__version__}",
        f"python {platform.python_version()} ({sys.executable})",
        f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})",
        f"triton {_version('triton')}",
        f"numpy {_version('numpy')}",
        f"cpu: {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}",
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, "
                         f"sm_{p.major}{p.minor}")
    else:
        lines.append("cuda: no CUDA device visible")
    lines.append(f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r} "
                 f"GRADSTATS_BACKEND={os.environ.get('GRADSTATS_BACKEND', '')!r}")
    lines.append("backends:")
    for name, why in _dispatch.backend_table():
        detail = ""
        if why is None and name == "native":
            from ..backends import native
            detail = f" ({native.describe()})"
        elif why is None and name == "triton" and not torch.cuda.is_available():
            detail = (" (no CUDA device: runs on CPU tensors only with TRITON_INTERPRET=1)"
                      if os.environ.get("TRITON_INTERPRET") != "1" else " (interpreter)")
        lines.append(f"  {name:7s} {'available' if why is None else 'unavailable because ' + why}"
                     f"{detail}")
    lines.append("default choice: cuda -> triton, native, torch (first available); "
                 "cpu -> native, torch")
    return lines


def _cmd_info(args) -> int:
    print("\n".join(info_lines()))
    return 0


def _delegate(module: str, args) -> int:
    mod = importlib.import_module(module)
    return int(mod.main(args) or 0)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="gradstats", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("info", help="versions, devices and which backends can run")
    p.set_defaults(fn=_cmd_info)
    p = sub.add_parser("demo", help="train a small model with and without gradstats")
    p.add_argument("--out", default="demo_out", help="output folder")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 400)")
    p.add_argument("--seed", type=int, default=0, help="random seed of both runs")
    p.set_defaults(fn=lambda a: _delegate("gradstats.cli.demo", a))
    p = sub.add_parser("report", help="plots and a diagnosis from stats logs",
                       description="Read stats logs (written by StableOptimizer(log=...) or "
                       "gradstats.telemetry.StatsLogger), write PNG plots and report.md with "
                       "a plain-language diagnosis. Several logs are treated as seeds of one "
                       "configuration unless --compare is given.")
    p.add_argument("logs", nargs="+", metavar="LOG", help="stats log (.jsonl or .csv)")
    p.add_argument("--out", default="gradstats_out", help="output folder (default: "
                   "gradstats_out)")
    p.add_argument("--k", type=float, default=3.0, help="band width in running standard "
                   "deviations (default 3)")
    p.add_argument("--window", type=int, default=50, help="moving window of the clip "
                   "activation rate, in steps (default 50)")
    p.add_argument("--compare", action="store_true", help="the logs are different "
                   "configurations, not seeds: overlay them, no seed-spread diagnosis")
    p.set_defaults(fn=lambda a: _delegate("gradstats.report.build", a))
    p = sub.add_parser("bench", help="benchmark gradstats against the torch baselines")
    p.add_argument("--quick", action="store_true", help="a short run (< 2 min on a CPU)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda when available, else cpu")
    p.add_argument("--reps", type=int, default=None, help="timed calls per case")
    p.add_argument("--sets", nargs="+", default=None, help="gradient sets to run "
                   "(gpt2-124m, llama3.2-1b, resnet50-like, 2000-small)")
    p.add_argument("--out", default="bench_out", help="folder of bench.json")
    p.add_argument("--json", default=None, help="JSON output path (overrides --out)")
    p.set_defaults(fn=lambda a: _delegate("gradstats.cli.bench", a))
    p = sub.add_parser("sweep", help="learning rates x seeds x configurations, with an "
                       "LR-sensitivity report",
                       description="Run a training task over learning rates x seeds x "
                       "configurations (StableOptimizer settings, torch's clip, no "
                       "clipping) in parallel worker processes; write a stats log per run, "
                       "sweep.json and the report (OUT/report).")
    sweep_arguments(p)
    p.set_defaults(fn=lambda a: _delegate("gradstats.sweep.cli", a))
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
