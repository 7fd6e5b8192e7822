"""Distributed benchmark: gradient clipping / statistics on an FSDP2 model, CPU + gloo.

Compares, on the same FSDP2-sharded gradients, per call:

* ``torch.nn.utils.clip_grad_norm_`` (DTensor path: per-tensor partial norms, then
  DTensor redistribution),
* ``gradstats.clip_grad_norm_`` (one fused local pass + one packed all-reduce),
* ``gradstats.grad_stats`` (every statistic: norms, max-abs, NaN/Inf counts, numel),
* a full optimizer step: ``clip_grad_norm_`` + ``AdamW.step()`` vs
  ``StableOptimizer(AdamW, max_norm).step()``,

and reports the number of collectives, the bytes each rank contributes to them (payload of
the tensors handed to ``torch.distributed`` / functional collectives) and the time per call
(median over iterations, slowest rank).

    python benchmarks/bench_distributed.py                 # spawns 2 processes
    python benchmarks/bench_distributed.py --nproc 4 --json out.json
    torchrun --nproc_per_node 2 benchmarks/bench_distributed.py
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist


class CommMeter:
    """Counts collectives and their payload bytes (torch.distributed + funcol)."""

    def __init__(self) -> None:
        self.calls = 0
        self.bytes = 0

    @contextlib.contextmanager
    def __call__(self):
        import torch.distributed._functional_collectives as funcol
        saved = []
        targets = [(dist, n) for n in ("all_reduce", "all_gather_into_tensor",
                                       "reduce_scatter_tensor", "broadcast", "all_gather")]
        targets += [(funcol, n) for n in ("all_reduce", "all_gather_tensor",
                                          "reduce_scatter_tensor", "broadcast")]
        for mod, name in targets:
            if hasattr(mod, name):
                orig = getattr(mod, name)
                saved.append((mod, name, orig))
                setattr(mod, name, self._wrap(orig))
        try:
            yield self
        finally:
            for mod, name, orig in saved:
                setattr(mod, name, orig)

    def _wrap(self, orig):
        def f(*a, **k):
            t = next((x for x in list(a) + list(k.values()) if isinstance(x, torch.Tensor)),
                     None)
            self.calls += 1
            if t is not None:
                self.bytes += t.numel() * t.element_size()
            return orig(*a, **k)
        return f


def build_model(dim: int, layers: int) -> torch.nn.Module:
    blocks = []
    for _ in range(layers):
        blocks += [torch.nn.LayerNorm(dim), torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(),
                   torch.nn.Linear(4 * dim, dim)]
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(dim, dim), *blocks, torch.nn.LayerNorm(dim),
                               torch.nn.Linear(dim, dim))


def timed(fn, iters: int, warmup: int = 3):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(iters):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    med = torch.tensor([statistics.median(ts)], dtype=torch.float64)
    dist.all_reduce(med, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
    return float(med)


def comm_of(fn):
    m = CommMeter()
    with m():
        fn()
    return m.calls, m.bytes


def worker(args) -> dict:
    import gradstats
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    world = dist.get_world_size()
    torch.set_num_threads(args.threads)
    mesh = init_device_mesh("cpu", (world,))
    model = build_model(args.dim, args.layers)
    for m in model:
        if isinstance(m, (torch.nn.Linear, torch.nn.LayerNorm)):
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    params = list(model.parameters())
    n_params = sum(p.numel() for p in params)
    x = torch.randn(16, args.dim)
    model(x).square().mean().backward()
    grads = [p.grad for p in params]
    saved = [g.to_local().clone() for g in grads]

    def restore():
        for g, s in zip(grads, saved):
            g.to_local().copy_(s)

    rows = []

    def bench(name, fn, reset=None):
        if reset:
            reset()
        calls, nbytes = comm_of(fn)
        if reset:
            reset()
        t = timed(fn, args.iters)
        rows.append({"case": name, "collectives": calls, "bytes_per_rank": nbytes,
                     "ms": t * 1e3})

    big, small = 1e9, 1e-3  # never clips / clips on every call
    bench("torch clip_grad_norm_ (no clip)",
          lambda: torch.nn.utils.clip_grad_norm_(params, big), restore)
    bench("gradstats clip_grad_norm_ (no clip)",
          lambda: gradstats.clip_grad_norm_(params, big), restore)
    bench("torch clip_grad_norm_ (clips)",
          lambda: torch.nn.utils.clip_grad_norm_(params, small), restore)
    bench("gradstats clip_grad_norm_ (clips)",
          lambda: gradstats.clip_grad_norm_(params, small), restore)
    restore()
    bench("torch get_total_norm inf",
          lambda: torch.nn.utils.get_total_norm(grads, float("inf")).full_tensor())
    bench("gradstats get_total_norm inf",
          lambda: gradstats.get_total_norm(grads, float("inf")).full_tensor())
    bench("gradstats grad_stats (all statistics)",
          lambda: gradstats.grad_stats(params))

    # full steps: torch clip + AdamW vs StableOptimizer(AdamW)
    opt_t = torch.optim.AdamW(params, lr=1e-6, foreach=True)

    def torch_step():
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt_t.step()

    bench("torch clip_grad_norm_ + AdamW.step", torch_step, restore)
    opt_tf = torch.optim.AdamW(params, lr=1e-6, fused=True)

    def torch_step_fused():
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt_tf.step()

    bench("torch clip_grad_norm_ + AdamW(fused).step", torch_step_fused, restore)
    opt_s = gradstats.StableOptimizer(torch.optim.AdamW(params, lr=1e-6, foreach=True),
                                      max_norm=1.0)
    bench("StableOptimizer(AdamW).step", opt_s.step, restore)
    opt_f = gradstats.StableOptimizer(torch.optim.AdamW(params, lr=1e-6, fused=True),
                                      max_norm=1.0)
    bench("StableOptimizer(AdamW(fused)).step", opt_f.step, restore)
    return {"world": world, "params": n_params, "tensors": len(params),
            "dim": args.dim, "layers": args.layers, "threads": args.threads,
            "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "rows": rows}


def table(res: dict) -> str:
    lines = [f"FSDP2 on {res['world']} CPU processes (gloo), {res['params'] / 1e6:.2f} M "
             f"parameters in {res['tensors']} tensors, torch {res['torch']}, "
             f"{res['threads']} thread(s) per process.", "",
             "| case | collectives | bytes sent per rank | ms per call (slowest rank) |",
             "|---|---:|---:|---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['case']} | {r['collectives']} | {r['bytes_per_rank']} | "
                     f"{r['ms']:.2f} |")
    return "\n".join(lines)


def _entry(rank, world, init, args, out):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
        res = worker(args)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(res, f)
    finally:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description="gradstats vs torch clip_grad_norm_ on FSDP2")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    if "RANK" in os.environ:  # under torchrun
        dist.init_process_group("gloo", timeout=timedelta(seconds=120))
        res = worker(args)
        rank = dist.get_rank()
        dist.destroy_process_group()
        if rank != 0:
            return
    else:
        import torch.multiprocessing as mp
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "res.json")
            mp.spawn(_entry, args=(args.nproc, "file://" + os.path.join(tmp, "store"),
                                   args, out), nprocs=args.nproc, join=True)
            with open(out) as f:
                res = json.load(f)
    print(table(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
