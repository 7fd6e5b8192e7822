"""CPU benchmark of the native backend on GPT-2 124M fp32 gradient shapes (148 tensors).

Compares, in one process and on the same tensors:

* ``torch.nn.utils.clip_grad_norm_(foreach=True)`` (norm only + a multiply pass),
* ``torch._foreach_norm`` (torch's fused norm pass alone),
* ``flat.sum()`` over one flat tensor of the same bytes (the one-read floor),
* ``gradstats.grad_stats`` (native: norm, max-abs, NaN/Inf counts, per-group),
  also with ``per_tensor=True``,
* ``gradstats.clip_grad_norm_`` without clipping (max_norm above the norm) and with
  clipping (max_norm below it, so every call scales).

Timing: ``time.perf_counter`` around single calls, warm-up first; candidates are run
interleaved round after round so that load from other processes hits all of them alike;
the figure is the median over rounds. Usage::

    python benchmarks/bench_cpu_native.py [--rounds 30] [--threads N] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch


def gpt2_124m_shapes(vocab=50257, ctx=1024, d=768, layers=12) -> List[tuple]:
    """The 148 gradient shapes of GPT-2 124M (weight-tied head), in parameter order."""
    shapes = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,),                      # ln_1
                   (d, 3 * d), (3 * d,),            # attn.c_attn
                   (d, d), (d,),                    # attn.c_proj
                   (d,), (d,),                      # ln_2
                   (d, 4 * d), (4 * d,),            # mlp.c_fc
                   (4 * d, d), (d,)]                # mlp.c_proj
    shapes += [(d,), (d,)]                          # ln_f
    return shapes


def make_params(shapes, dtype=torch.float32, seed=0) -> List[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    ps = []
    for s in shapes:
        p = torch.nn.Parameter(torch.empty(s, dtype=dtype))
        p.grad = (torch.randn(s, generator=g) * 1e-3).to(dtype)
        ps.append(p)
    return ps


def bench(cands: Dict[str, Tuple[Callable[[], object], Optional[Callable[[], object]]]],
          rounds: int, warmup: int = 3) -> Dict[str, float]:
    """Median ms of each ``(fn, setup)``; ``setup`` runs untimed before every call."""
    for f, setup in cands.values():
        for _ in range(warmup):
            if setup:
                setup()
            f()
    times: Dict[str, List[float]] = {k: [] for k in cands}
    for _ in range(rounds):
        for k, (f, setup) in cands.items():
            if setup:
                setup()
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import gradstats
    from gradstats.backends import native

    why = native.NativeBackend().unavailable_reason()
    if why:
        print(f"native backend unavailable: {why}")
        return 1
    shapes = gpt2_124m_shapes()
    ps = make_params(shapes)
    grads = [p.grad for p in ps]
    numel = sum(g.numel() for g in grads)
    flat = torch.randn(numel)
    # clipping runs: the gradients are restored (untimed) before every call, so every
    # call really scales them by 0.5
    ps_clip = make_params(shapes, seed=1)
    saved = [p.grad.clone() for p in ps_clip]
    clip_grads = [p.grad for p in ps_clip]
    norm_clip = float(torch.nn.utils.get_total_norm(clip_grads))

    def restore():
        torch._foreach_copy_(clip_grads, saved)

    big = 1e9
    cands = {
        "torch clip_grad_norm_ (foreach, no clip)":
            (lambda: torch.nn.utils.clip_grad_norm_(ps, big, foreach=True), None),
        "torch _foreach_norm": (lambda: torch._foreach_norm(grads), None),
        "flat.sum() (one read)": (lambda: flat.sum(), None),
        "gradstats.grad_stats (native)": (lambda: gradstats.grad_stats(ps), None),
        "gradstats.grad_stats per_tensor":
            (lambda: gradstats.grad_stats(ps, per_tensor=True), None),
        "gradstats.clip_grad_norm_ (no clip)":
            (lambda: gradstats.clip_grad_norm_(ps, big), None),
        "torch clip_grad_norm_ (foreach, clips)":
            (lambda: torch.nn.utils.clip_grad_norm_(ps_clip, norm_clip * 0.5, foreach=True),
             restore),
        "gradstats.clip_grad_norm_ (clips)":
            (lambda: gradstats.clip_grad_norm_(ps_clip, norm_clip * 0.5), restore),
    }
    res = bench(cands, args.rounds)
    t_clip = res["torch clip_grad_norm_ (foreach, no clip)"]
    t_sum = res["flat.sum() (one read)"]
    gb = numel * 4 / 1e9
    print(f"GPT-2 124M fp32 gradients: {len(grads)} tensors, {numel} elements, {gb:.3f} GB")
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
          f"threads; torch {torch.__version__}; native CPU kernels "
          f"{native.extension().cpu_capability()}; {args.rounds} rounds, medians")
    print(f"{'case':44s} {'ms':>8s} {'GB/s':>7s} {'vs torch clip':>14s} {'vs flat.sum':>12s}")
    for k, v in res.items():
        print(f"{k:44s} {v:8.2f} {gb / (v / 1e3):7.1f} {t_clip / v:13.2f}x {v / t_sum:11.2f}x")
    checks = {
        "grad_stats >= 2.5x faster than torch clip":
            t_clip / res["gradstats.grad_stats (native)"] >= 2.5,
        "grad_stats within 1.3x of flat.sum":
            res["gradstats.grad_stats (native)"] / t_sum <= 1.3,
        "clip_grad_norm_ (no clip) >= 2x faster than torch's":
            t_clip / res["gradstats.clip_grad_norm_ (no clip)"] >= 2.0,
    }
    for k, ok in checks.items():
        print(f"  {'PASS' if ok else 'MISS'}  {k}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ms": res, "checks": checks, "numel": numel,
                       "threads": torch.get_num_threads(), "torch": torch.__version__,
                       "capability": native.extension().cpu_capability(),
                       "python": sys.version.split()[0]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
