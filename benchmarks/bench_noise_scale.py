"""What the noise scale costs per optimizer step (CPU; GPU figures not measured yet).

Measures, on a small transformer-like MLP wrapped in ``gradstats.StableOptimizer``:

* **step hook** (host time per step): the tracker attached but idle (no small-batch
  measurement: returns at once), and with a measurement (estimate + running update +
  logged fields: about 20 tiny device ops on 0-dim tensors, counted with a dispatch
  mode — the number of kernel launches a GPU would see);
* **gradient accumulation**: ``observe_micro_batch`` = one statistics pass over the
  gradients, once per optimizer step whatever the number of micro-batches (counted);
  its time next to the step's own cost and to a full accumulation step;
* **DDP** (2 gloo processes): the communication hook's added work per bucket (one
  ``vector_norm`` read of the bucket, next to the default hook's own ``div_`` pass),
  collectives per step (one all-reduce of one float), no pass over the parameters; and
  the time of a DDP training step with the default hook and with the noise hook.

    OMP_NUM_THREADS=1 python benchmarks/bench_noise_scale.py [--json out.json] [--quick]

Timings are medians; on a shared 2-core VM expect 10-20% noise. GPU: not measured (the
device op counts above are what a GPU would launch; one launch costs ~3-5 us of host time).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import timedelta

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import gradstats  # noqa: E402
from gradstats.noise_scale import NoiseScaleTracker  # noqa: E402


class CountOps(TorchDispatchMode):
    """Counts the aten ops dispatched that compute (views excluded): a proxy for the
    kernel launches a GPU would see."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.n += 1
        return func(*args, **(kwargs or {}))


def med_us(fn, iters, warmup=5):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e6


def paired_us(fa, fb, iters, warmup=3):
    """Medians of ``fa`` and ``fb`` timed alternately (drift on a shared machine hits
    both alike)."""
    for _ in range(warmup):
        fa()
        fb()
    ta, tb = [], []
    for _ in range(iters):
        for f, ts in ((fa, ta), (fb, tb)):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
    return statistics.median(ta) * 1e6, statistics.median(tb) * 1e6


def build_model(dim=256, layers=4):
    torch.manual_seed(0)
    blocks = []
    for _ in range(layers):
        blocks += [torch.nn.LayerNorm(dim), torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(),
                   torch.nn.Linear(4 * dim, dim)]
    return torch.nn.Sequential(*blocks, torch.nn.Linear(dim, 1))


def single_process(args) -> dict:
    out = {}
    model = build_model(args.dim, args.layers)
    n_params = sum(p.numel() for p in model.parameters())
    out["params"] = n_params
    opt = gradstats.StableOptimizer(torch.optim.SGD(model.parameters(), lr=0.0))
    x = torch.randn(8, args.dim)

    def backward():
        model(x).square().mean().backward()
    backward()
    rec = [None]
    opt.register_step_hook(lambda o, r: rec.__setitem__(0, r))
    opt.step()
    one = torch.tensor(2.0)
    out["one_tiny_op_us"] = med_us(lambda: one * 3.0, 2000)

    # the step hook, called directly on the last record (the step itself excluded)
    tr = NoiseScaleTracker()
    binding = tr.attach(opt, batch_size=64)
    out["hook_idle_us"] = med_us(lambda: binding.on_step(opt, rec[0]), 2000)
    sq = torch.tensor(1.5)

    def busy():
        tr.observe_small(sq, 8, 64)
        binding.on_step(opt, rec[0])
    out["hook_measuring_us"] = med_us(busy, 2000)
    with CountOps() as c:
        busy()
    out["hook_measuring_device_ops"] = c.n
    with CountOps() as c:
        tr.observe_micro_batch(8)
    out["observe_micro_batch_device_ops"] = c.n
    tr.reset()

    # statistics passes: observe_micro_batch vs the step
    out["observe_micro_batch_us"] = med_us(lambda: tr.observe_micro_batch(8), args.iters)
    tr.reset()
    binding.remove()
    out["step_plain_us"] = med_us(opt.step, args.iters)
    out["backward_us"] = med_us(backward, args.iters)

    # a full accumulation step (k micro-batches), with and without the tracker; and the
    # statistics passes the noise scale adds per optimizer step (calls counted)
    import gradstats.noise_scale.binding as nb
    orig = nb.grad_stats
    calls = {"n": 0}

    def counting(*a, **kw):
        calls["n"] += 1
        return orig(*a, **kw)
    rows = []
    for k in ((2, 4, 8) if not args.quick else (4,)):
        def acc_step(track):
            for i in range(k):
                backward()
                if track is not None and i == 0:
                    track.observe_micro_batch(8)
            opt.step()
            opt.zero_grad()
        tr2 = NoiseScaleTracker()
        b2 = tr2.attach(opt, batch_size=8 * k)
        base, withn = paired_us(lambda: acc_step(None), lambda: acc_step(tr2), args.iters)
        nb.grad_stats = counting
        calls["n"] = 0
        for _ in range(3):
            acc_step(tr2)
        nb.grad_stats = orig
        b2.remove()
        rows.append({"micro_batches": k, "step_us": base, "step_with_noise_us": withn,
                     "extra_stats_passes_per_step": calls["n"] / 3})
    out["accumulation"] = rows
    return out


# ------------------------------------------------------------------ DDP, 2 processes
def ddp_worker(rank, world, init, outdir, args_d):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from gradstats.noise_scale import register_ddp_noise_hook
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    res = {}
    dim, layers, iters = args_d["dim"], args_d["layers"], args_d["iters"]
    x = torch.randn(8, dim)
    for mode in ("default", "python_allreduce_hook", "noise", "noise_local", "default2"):
        model = build_model(dim, layers)
        ddp = DDP(model, bucket_cap_mb=1)
        opt = gradstats.StableOptimizer(torch.optim.SGD(ddp.parameters(), lr=0.0))
        state = None
        if mode == "python_allreduce_hook":
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import \
                allreduce_hook
            ddp.register_comm_hook(None, allreduce_hook)
        if mode.startswith("noise"):
            tr = NoiseScaleTracker()
            tr.attach(opt)
            state = register_ddp_noise_hook(ddp, tr, 8, average_ranks=(mode == "noise"))

        def step():
            ddp(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
        for _ in range(5):
            step()
        ts = []
        for _ in range(iters):
            dist.barrier()
            t0 = time.perf_counter()
            step()
            ts.append(time.perf_counter() - t0)
        res[mode + "_step_ms"] = statistics.median(ts) * 1e3
        if mode == "noise":
            c = dict(state.counters)
            res["buckets_per_step"] = c["buckets"] / c["steps"]
            res["extra_collectives_per_step"] = c["collectives"] / c["steps"]
    # the hook's own work on one bucket-sized buffer: vector_norm vs the default div_
    buf = torch.randn(args_d["bucket_elems"])
    res["bucket_elems"] = buf.numel()
    res["bucket_norm_us"] = med_us(lambda: torch.linalg.vector_norm(buf, dtype=torch.float32),
                                   50)
    res["bucket_div_us"] = med_us(lambda: buf.div_(1.0), 50)
    with open(os.path.join(outdir, f"{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)  # gloo teardown can abort at exit (torch 2.13); results are on disk


def ddp_bench(args) -> dict:
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:
        init = "file://" + os.path.join(tmp, "store")
        a = {"dim": args.dim, "layers": args.layers, "iters": args.iters,
             "bucket_elems": 262144}
        ctx = mp.start_processes(ddp_worker, args=(2, init, tmp, a), nprocs=2, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + 300
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                raise RuntimeError("DDP benchmark timed out")
        with open(os.path.join(tmp, "0.json")) as f:
            return json.load(f)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-ddp", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.quick:
        args.iters = 10
    torch.set_num_threads(1)
    res = {"machine": f"{platform.processor() or platform.machine()}, "
                      f"{os.cpu_count()} cores, torch {torch.__version__}",
           "single": single_process(args)}
    if not args.no_ddp:
        res["ddp"] = ddp_bench(args)
    s = res["single"]
    print(f"machine: {res['machine']}; model {s['params']:,} params (CPU, fp32)")
    print(f"one tiny torch op (0-dim mul): {s['one_tiny_op_us']:.1f} us")
    print(f"step hook, tracker idle:       {s['hook_idle_us']:.1f} us")
    print(f"step hook, measuring:          {s['hook_measuring_us']:.1f} us "
          f"({s['hook_measuring_device_ops']} device ops on 0-dim tensors)")
    print(f"observe_micro_batch:           {s['observe_micro_batch_us']:.0f} us "
          f"({s['observe_micro_batch_device_ops']} device ops incl. one statistics pass); "
          f"StableOptimizer.step {s['step_plain_us']:.0f} us, backward {s['backward_us']:.0f} us")
    print("| micro-batches | step (us) | with noise scale (us) | extra statistics passes |")
    print("|---|---|---|---|")
    for r in s["accumulation"]:
        print(f"| {r['micro_batches']} | {r['step_us']:.0f} | {r['step_with_noise_us']:.0f} | "
              f"{r['extra_stats_passes_per_step']:g} |")
    if "ddp" in res:
        d = res["ddp"]
        print(f"DDP (2 gloo ranks, 1 MB buckets, {d['buckets_per_step']:.0f} buckets/step), "
              f"step: {d['default_step_ms']:.1f} ms (no hook: DDP's C++ all-reduce; again "
              f"{d['default2_step_ms']:.1f}), {d['python_allreduce_hook_step_ms']:.1f} ms "
              f"(torch's Python allreduce_hook), {d['noise_step_ms']:.1f} ms (noise hook), "
              f"{d['noise_local_step_ms']:.1f} ms (noise hook, average_ranks=False); "
              f"extra collectives/step: "
              f"{d['extra_collectives_per_step']:.0f} (4 bytes); per {d['bucket_elems']:,}-"
              f"element bucket: norm {d['bucket_norm_us']:.0f} us vs the default hook's "
              f"div_ {d['bucket_div_us']:.0f} us")
    print("GPU: not measured")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
