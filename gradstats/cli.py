"""The ``gradstats`` command (also ``python -m gradstats``): info, demo, bench, report."""
from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
from typing import List, Optional


def _version(mod: str) -> str:
    try:
        return importlib.import_module(mod).__version__
    except Exception as e:
        return f"not available ({type(e).__name__}: {e})"


def info_lines() -> List[str]:
    """Versions, devices and backend availability, one line each."""
    import torch

    from . import __version__, _dispatch

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
        lines.append(f"  {name:7s} {'available' if why is None else 'unavailable because ' + why}")
    lines.append("default choice: cuda -> triton, native, torch (first available); "
                 "cpu -> native, torch")
    return lines


def _cmd_info(args) -> int:
    print("\n".join(info_lines()))
    return 0


def _delegate(module: str, args) -> int:
    mod = importlib.import_module(f"gradstats.{module}")
    return int(mod.main(args) or 0)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="gradstats", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("info", help="versions, devices and which backends can run")
    p.set_defaults(fn=_cmd_info)
    p = sub.add_parser("demo", help="train a small model with and without gradstats")
    p.add_argument("--out", default="demo_out", help="output folder")
    p.add_argument("--steps", type=int, default=None, help="training steps")
    p.set_defaults(fn=lambda a: _delegate("demo", a))
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
