"""``gradstats bench``: gradstats against the eager torch baselines, on the available device.

For each gradient set (shapes of real models, as in benchmarks/shapes.py) and each operation, the torch
way and the gradstats way run on the same gradient tensors in one process; the table gives
the best time of alternating calls (torch and gradstats take turns, so
load from other processes hits both alike; the median is in the JSON), the gradient bytes
divided by that time (GB/s: how fast the operation
gets through the gradients; one read of them is the floor) and the ratio to torch
(< 1: gradstats is faster). Operations:

* ``clip (no-op)``: ``clip_grad_norm_`` with a threshold the gradients never reach
  (torch still multiplies by 1; gradstats skips the scaling pass);
* ``total norm``: ``torch.nn.utils.get_total_norm`` vs ``gradstats.get_total_norm``;
* ``all stats``: per-group norm, max-abs and NaN/Inf count the eager way (foreach norms
  plus a per-tensor ``isfinite`` count) vs one ``gradstats.grad_stats`` pass;
* ``clip (scales)``: ``clip_grad_norm_(max_norm=0)``: every call scales every gradient
  (run last in each set: it zeroes the gradients).

On a CPU the sets are scaled down (element counts divided, tensor counts kept, so host
overhead is still measured). Absolute times only mean something on a GPU.
"""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

import gradstats

Spec = List[Tuple[Tuple[int, ...], int]]  # (shape, group) in parameter order


# =========================================================================== gradient sets
def _grp(shape: Sequence[int]) -> Tuple[Tuple[int, ...], int]:
    return tuple(int(s) for s in shape), (0 if len(shape) >= 2 else 1)


def gpt2_124m() -> Spec:
    """GPT-2 small: 148 tensors, 124M elements."""
    d, L = 768, 12
    s = [_grp((50257, d)), _grp((1024, d))]
    for _ in range(L):
        s += [_grp((d,)), _grp((d,)), _grp((d, 3 * d)), _grp((3 * d,)), _grp((d, d)),
              _grp((d,)), _grp((d,)), _grp((d,)), _grp((d, 4 * d)), _grp((4 * d,)),
              _grp((4 * d, d)), _grp((d,))]
    return s + [_grp((d,)), _grp((d,))]


def llama32_1b() -> Spec:
    """Llama-3.2-1B (tied embedding): 146 tensors, 1.24B elements."""
    d, kv, ffn, L = 2048, 512, 8192, 16
    s = [_grp((128256, d))]
    for _ in range(L):
        s += [_grp((d, d)), _grp((kv, d)), _grp((kv, d)), _grp((d, d)), _grp((ffn, d)),
              _grp((ffn, d)), _grp((d, ffn)), _grp((d,)), _grp((d,))]
    return s + [_grp((d,))]


def resnet50_like() -> Spec:
    """A ResNet-50-like set: 161 tensors, 25.5M elements, most of them tiny."""
    s: Spec = [_grp((64, 3, 7, 7)), _grp((64,)), _grp((64,))]
    cin = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            out = 4 * width
            s += [_grp((width, cin, 1, 1)), _grp((width,)), _grp((width,)),
                  _grp((width, width, 3, 3)), _grp((width,)), _grp((width,)),
                  _grp((out, width, 1, 1)), _grp((out,)), _grp((out,))]
            if b == 0:
                s += [_grp((out, cin, 1, 1))]
            cin = out
    return s + [_grp((1000, 2048)), _grp((1000,))]


def small_2000() -> Spec:
    """2000 small tensors of 32768 elements (host-overhead bound)."""
    return [_grp((128, 256)) for _ in range(2000)]


SETS: Dict[str, Callable[[], Spec]] = {
    "gpt2-124m": gpt2_124m, "llama3.2-1b": llama32_1b, "resnet50-like": resnet50_like,
    "2000-small": small_2000,
}


def scaled(spec: Spec, scale: float) -> Spec:
    """Element counts times ``scale`` (first dimension, at least 1); tensor count kept."""
    if scale >= 1.0:
        return list(spec)
    return [(((max(1, int(round(sh[0] * scale))),) + sh[1:]) if sh else sh, g)
            for sh, g in spec]


def plan(device: str, quick: bool) -> List[Tuple[str, torch.dtype, float]]:
    """(set, dtype, scale) to run on ``device``."""
    if device == "cuda":
        if quick:
            return [("gpt2-124m", torch.float32, 1.0), ("2000-small", torch.float32, 1.0),
                    ("llama3.2-1b", torch.bfloat16, 1.0)]
        return [("gpt2-124m", torch.float32, 1.0), ("llama3.2-1b", torch.bfloat16, 1.0),
                ("llama3.2-1b", torch.float32, 1.0), ("resnet50-like", torch.float32, 1.0),
                ("2000-small", torch.float32, 1.0)]
    if quick:
        return [("gpt2-124m", torch.float32, 1 / 8), ("resnet50-like", torch.float32, 1 / 4),
                ("2000-small", torch.float32, 1 / 16)]
    return [("gpt2-124m", torch.float32, 1.0), ("llama3.2-1b", torch.bfloat16, 1 / 8),
            ("resnet50-like", torch.float32, 1.0), ("2000-small", torch.float32, 1.0)]


def build(spec: Spec, device: str, dtype: torch.dtype, seed: int = 0) -> List[List[Tensor]]:
    """Two groups of parameters (weights, the 1-D rest) with random gradients."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    groups: List[List[Tensor]] = [[], []]
    for shape, grp in spec:
        grad = torch.randn(shape, generator=g, dtype=torch.float32).to(device, dtype)
        p = torch.nn.Parameter(torch.empty_like(grad))  # values never read
        p.grad = grad
        groups[grp].append(p)
    return [gr for gr in groups if gr]


# ============================================================================= baselines
def _torch_stats(groups: List[List[Tensor]]) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-group norm, max-abs and NaN/Inf count, the eager way."""
    norms, maxes, bad = [], [], []
    for ps in groups:
        grads = [p.grad for p in ps]
        norms.append(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0))))
        maxes.append(torch.stack(torch._foreach_norm(grads, math.inf)).max())
        bad.append(torch.stack([(~torch.isfinite(t)).sum() for t in grads]).sum())
    return torch.stack(norms), torch.stack(maxes), torch.stack(bad)


def _torch_total(groups: List[List[Tensor]]) -> Tensor:
    grads = [p.grad for ps in groups for p in ps]
    fn = getattr(torch.nn.utils, "get_total_norm", None)
    if fn is not None:
        return fn(grads, 2.0, foreach=True)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)))


def operations(groups: List[List[Tensor]]) -> List[Tuple[str, str, Callable[[], Any]]]:
    """(operation, method, fn) pairs, torch first for each operation."""
    params = [p for ps in groups for p in ps]
    grads = [p.grad for p in params]
    pg = [{"params": ps} for ps in groups]
    big = 1e30
    return [
        ("clip (no-op)", "torch", lambda: torch.nn.utils.clip_grad_norm_(params, big,
                                                                         foreach=True)),
        ("clip (no-op)", "gradstats", lambda: gradstats.clip_grad_norm_(params, big)),
        ("total norm", "torch", lambda: _torch_total(groups)),
        ("total norm", "gradstats", lambda: gradstats.get_total_norm(grads)),
        ("all stats", "torch", lambda: _torch_stats(groups)),
        ("all stats", "gradstats", lambda: gradstats.grad_stats(pg)),
        # last: max_norm=0 zeroes the gradients (every call is then a full scaling pass)
        ("clip (scales)", "torch", lambda: torch.nn.utils.clip_grad_norm_(params, 0.0,
                                                                          foreach=True)),
        ("clip (scales)", "gradstats", lambda: gradstats.clip_grad_norm_(params, 0.0)),
    ]


# ================================================================================ timing
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_pair(fns: Sequence[Callable[[], Any]], device: str, reps: int, warmup: int = 1,
              budget_s: float = 2.0) -> List[Tuple[float, float]]:
    """(min, median) seconds per call of each function, timed in alternation (so that load
    from other processes hits all of them alike); at most ``budget_s`` of measuring, at
    least 3 rounds. The minimum is the least disturbed estimate and the one reported."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    _sync(device)
    times: List[List[float]] = [[] for _ in fns]
    t_start = time.perf_counter()
    for i in range(reps):
        for j, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[j].append(time.perf_counter() - t0)
        if i >= 2 and time.perf_counter() - t_start > budget_s:
            break
    return [(min(t), statistics.median(t)) for t in times]


class _Bar:
    def __init__(self, total: int) -> None:
        self.n, self.total = 0, total
        try:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc="bench", unit="case", file=sys.stderr,
                            dynamic_ncols=True)
        except Exception:
            self.bar = None

    def update(self, what: str) -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.set_postfix_str(what, refresh=False)
            self.bar.update(1)
        else:
            sys.stderr.write(f"\rbench: {self.n}/{self.total} {what:50s}")
            sys.stderr.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            sys.stderr.write("\n")


def run(device: Optional[str] = None, quick: bool = False, reps: Optional[int] = None,
        progress: bool = True, sets: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Run the suite; returns ``{"env": ..., "rows": [...]}`` (what the JSON holds)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    reps = reps or (10 if quick else 30)
    cases = plan(device, quick)
    if sets:
        unknown = [s for s in sets if s not in SETS]
        if unknown:
            raise ValueError(f"unknown gradient set(s) {unknown}; choose from {list(SETS)}")
        cases = [c for c in cases if c[0] in sets] or \
            [(s, torch.float32, 1.0 if device == "cuda" else 1 / 8) for s in sets]
    n_ops = 8
    bar = _Bar(len(cases) * n_ops) if progress else None
    rows: List[Dict[str, Any]] = []
    for name, dtype, scale in cases:
        spec = scaled(SETS[name](), scale)
        groups = build(spec, device, dtype)
        nbytes = sum(p.grad.numel() * p.grad.element_size() for ps in groups for p in ps)
        ntensors = sum(len(ps) for ps in groups)
        label = name + ("" if scale >= 1 else f" (x{scale:g})")
        ops = operations(groups)
        for k in range(0, len(ops), 2):  # (torch, gradstats) of one operation
            pair = ops[k:k + 2]
            res = time_pair([fn for _, _, fn in pair], device, reps,
                            budget_s=2.0 if quick else 6.0)
            t_torch = res[0][0]
            for (op, method, _), (t, med) in zip(pair, res):
                rows.append({
                    "set": label, "dtype": str(dtype).replace("torch.", ""),
                    "tensors": ntensors, "bytes": nbytes, "op": op, "method": method,
                    "time_s": t, "median_s": med, "gb_s": nbytes / t / 1e9,
                    "ratio_to_torch": t / t_torch,
                })
                if bar is not None:
                    bar.update(f"{label} {op} {method}")
        del groups
    if bar is not None:
        bar.close()
    from ..backends import registry as _dispatch
    env = {
        "device": (torch.cuda.get_device_name(0) if device == "cuda" else
                   f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads, "
                   f"{platform.machine()})"),
        "torch": torch.__version__, "gradstats": gradstats.__version__,
        "python": platform.python_version(), "quick": quick, "reps": reps,
        "backends": {n: (why or "available") for n, why in _dispatch.backend_table()},
    }
    return {"env": env, "rows": rows}


def _fmt_time(t: float) -> str:
    if t >= 1:
        return f"{t:.2f} s"
    if t >= 1e-3:
        return f"{t * 1e3:.2f} ms"
    return f"{t * 1e6:.0f} µs"


def markdown(result: Dict[str, Any]) -> str:
    env = result["env"]
    L = [f"gradstats bench on {env['device']}, torch {env['torch']}"
         f"{' (quick)' if env.get('quick') else ''}", "",
         "| set | dtype | tensors | MB | operation | method | time | GB/s | ratio to torch |",
         "|---|---|---:|---:|---|---|---:|---:|---:|"]
    for r in result["rows"]:
        x = r["ratio_to_torch"]
        ratio = "" if x is None else (f"{x:.2f}" if x >= 0.1 else f"{x:.3f}")
        L.append(f"| {r['set']} | {r['dtype']} | {r['tensors']} | {r['bytes'] / 1e6:.0f} | "
                 f"{r['op']} | {r['method']} | {_fmt_time(r['time_s'])} | {r['gb_s']:.1f} | "
                 f"{ratio} |")
    L += ["", "time: best of alternating calls. GB/s: gradient bytes / time (one read of the "
          "gradients is the floor). Ratio < 1: gradstats is faster than torch on the same "
          "tensors."]
    return "\n".join(L)


def main(args: Any) -> int:
    """``gradstats bench`` entry point."""
    device = getattr(args, "device", None)
    if device == "cuda" and not torch.cuda.is_available():
        print("gradstats bench: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    res = run(device=device, quick=bool(getattr(args, "quick", False)),
              reps=getattr(args, "reps", None), sets=getattr(args, "sets", None))
    print(markdown(res))
    path = getattr(args, "json", None) or os.path.join(getattr(args, "out", None) or
                                                       "bench_out", "bench.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(res, f, indent=1)
    print(f"\nJSON: {path}")
    return 0
