"""The noise scale on a small real model: gradient accumulation vs 2-process gloo DDP
(communication hook) vs the brute force (exact per-example statistics of the data pool,
and many independent batch gradients). CPU, ~20 s.

The parameters stay fixed (SGD with lr=0) so that every method measures the same
quantity; batches are drawn with replacement from a fixed pool, whose per-example
gradient mean and covariance are then the exact truth.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import gradstats
from gradstats.noise_scale import NoiseScaleTracker, register_ddp_noise_hook

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

N, DIN, HID = 4096, 6, 16
LOCAL, WORLD = 16, 2
STEPS = 600
ALPHA = 0.998          # exact mean over the first 500 steps, then a long EMA


def _pool():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, DIN, generator=g)
    Y = torch.sin(X @ torch.randn(DIN, generator=g)) + 0.3 * torch.randn(N, generator=g)
    return X, Y


def _model():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(DIN, HID), torch.nn.Tanh(),
                               torch.nn.Linear(HID, 1))


def _loss(model, X, Y, idx, reduction="mean"):
    per = 0.5 * (model(X[idx]).squeeze(-1) - Y[idx]) ** 2
    return per.mean() if reduction == "mean" else per.sum()


def _index_streams(seed):
    """One generator per rank, so that every rank can rebuild every rank's batches."""
    return [torch.Generator().manual_seed(seed + r) for r in range(WORLD)]


# ------------------------------------------------------------------ DDP worker
def _ddp_run(rank, X, Y, steps, *, seed, reduction="mean", average_ranks=True,
             snapshot_at=None, check_grads=False):
    from torch.nn.parallel import DistributedDataParallel as DDP
    model = _model()
    ddp = DDP(model)
    opt = gradstats.StableOptimizer(torch.optim.SGD(ddp.parameters(), lr=0.0))
    tracker = NoiseScaleTracker(alpha=ALPHA)
    tracker.attach(opt)
    state = register_ddp_noise_hook(ddp, tracker, LOCAL, loss_reduction=reduction,
                                    average_ranks=average_ranks)
    gens = _index_streams(seed)
    out = {}
    for step in range(steps):
        idx = [torch.randint(0, N, (LOCAL,), generator=g) for g in gens]
        _loss(ddp, X, Y, idx[rank], reduction).backward()
        if check_grads and step == 0:
            # the wrapped hook must leave DDP's averaging intact: the gradient is the
            # mean over both ranks' examples
            ref = _model()
            _loss(ref, X, Y, torch.cat(idx)).backward()
            out["grad_err"] = max(float((p.grad - q.grad).abs().max())
                                  for p, q in zip(model.parameters(), ref.parameters()))
        opt.step()
        opt.zero_grad()
        if snapshot_at is not None and step + 1 == snapshot_at:
            out["snapshot"] = tracker.state_dict()["running"].tolist()
    f = opt.last_stats.to_dict()
    out.update(g2=float(tracker.g2), trace=float(tracker.trace),
               b_simple=float(tracker.b_simple), count=float(tracker.count),
               counters=dict(state.counters), logged=f.get("noise_b_simple"),
               b_small=f.get("noise_b_small"), b_big=f.get("noise_b_big"),
               running=tracker.state_dict()["running"].tolist())
    return out


def _worker(rank, world):
    X, Y = _pool()
    return {
        "mean": _ddp_run(rank, X, Y, STEPS, seed=100, snapshot_at=40, check_grads=True),
        "sum": _ddp_run(rank, X, Y, 40, seed=100, reduction="sum"),
        "local": _ddp_run(rank, X, Y, 300, seed=200, average_ranks=False),
    }


def _entry(rank, world, init, outdir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        out = _worker(rank, world)
    except BaseException:
        dist.destroy_process_group()
        raise
    with open(os.path.join(outdir, f"{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.barrier()
    # gloo teardown can abort at interpreter exit (torch 2.13): results are on disk
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _spawn(timeout=150.0):
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:
        init = "file://" + os.path.join(tmp, "store")
        ctx = mp.start_processes(_entry, args=(WORLD, init, tmp), nprocs=WORLD, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=5):
                if time.monotonic() > deadline:
                    pytest.fail(f"DDP noise-scale workers did not finish in {timeout:.0f} s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                    p.join(5)
        out = []
        for r in range(WORLD):
            with open(os.path.join(tmp, f"{r}.json")) as f:
                out.append(json.load(f))
        return out


# ------------------------------------------------------------------ references
def _per_example_grads(X, Y):
    from torch.func import functional_call, grad, vmap
    model = _model()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, x, y):
        return 0.5 * (functional_call(model, p, (x[None],)).squeeze() - y) ** 2
    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, X, Y)
    return torch.cat([v.reshape(N, -1) for v in g.values()], 1).double()


def _exact(flat):
    G = flat.mean(0)
    g2 = float(G.pow(2).sum())
    trace = float(((flat - G) ** 2).sum(1).mean())  # sampling with replacement
    return g2, trace


def _brute_force_batches(flat, b=LOCAL, n=4000, seed=7):
    """Many independent batch gradients: tr(Sigma) = b * their total variance,
    |G|^2 = |their mean|^2 - tr(Sigma) / (b n)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, N, (n, b), generator=g)
    batches = flat[idx].mean(1)                    # [n, P] batch gradients
    m = batches.mean(0)
    var = ((batches - m) ** 2).sum(1).sum() / (n - 1)
    trace = float(b * var)
    return float(m.pow(2).sum()) - trace / (b * n), trace


def _accumulation(X, Y, steps=STEPS, seed=100):
    model = _model()
    opt = gradstats.StableOptimizer(torch.optim.SGD(model.parameters(), lr=0.0))
    tracker = NoiseScaleTracker(alpha=ALPHA)
    tracker.attach(opt, batch_size=LOCAL * WORLD)
    gens = _index_streams(seed)
    for _ in range(steps):
        for i, g in enumerate(gens):  # micro-batch i = what rank i would see
            idx = torch.randint(0, N, (LOCAL,), generator=g)
            (_loss(model, X, Y, idx) / WORLD).backward()
            if i == 0:
                tracker.observe_micro_batch(LOCAL)
        opt.step()
        opt.zero_grad()
    return tracker


@pytest.fixture(scope="module")
def results():
    X, Y = _pool()
    flat = _per_example_grads(X, Y)
    return {"ddp": _spawn(), "exact": _exact(flat), "batches": _brute_force_batches(flat),
            "accum": _accumulation(X, Y)}


def test_ddp_agrees_with_accumulation_and_brute_force(results):
    ddp0, ddp1 = (r["mean"] for r in results["ddp"])
    acc = results["accum"]
    g2, trace = results["exact"]
    b_true = trace / g2
    bg2, btr = results["batches"]
    print(f"\nexact: |G|^2={g2:.4g} tr={trace:.4g} B={b_true:.4g}; batches: |G|^2={bg2:.4g} "
          f"tr={btr:.4g} B={btr / bg2:.4g}; accumulation: B={float(acc.b_simple):.4g} "
          f"(|G|^2={float(acc.g2):.4g} tr={float(acc.trace):.4g}); DDP: "
          f"B={ddp0['b_simple']:.4g} (|G|^2={ddp0['g2']:.4g} tr={ddp0['trace']:.4g})")
    # the two ranks hold the same (rank-averaged) estimate
    assert ddp0["running"] == ddp1["running"]
    assert ddp0["count"] == STEPS
    # the criterion: accumulation and DDP within 25% of each other
    assert abs(ddp0["b_simple"] - float(acc.b_simple)) / float(acc.b_simple) < 0.25
    # ... and both near the truth, and the batch brute force near the exact value
    for name, b in (("ddp", ddp0["b_simple"]), ("accumulation", float(acc.b_simple)),
                    ("batches", btr / bg2)):
        assert abs(b - b_true) / b_true < 0.20, (name, b, b_true)
    assert abs(ddp0["trace"] - trace) / trace < 0.10
    assert abs(ddp0["g2"] - g2) / g2 < 0.15
    # the logged fields
    assert ddp0["b_small"] == LOCAL and ddp0["b_big"] == LOCAL * WORLD
    assert ddp0["logged"] == pytest.approx(ddp0["b_simple"], rel=1e-6)


def test_ddp_hook_keeps_gradients_and_costs_one_tiny_collective(results):
    for r in results["ddp"]:
        m = r["mean"]
        assert m["grad_err"] < 1e-6
        # one extra collective (1 float) per step, a norm per bucket, nothing else
        assert m["counters"]["steps"] == STEPS
        assert m["counters"]["collectives"] == STEPS
        assert m["counters"]["buckets"] >= STEPS
        assert r["local"]["counters"]["collectives"] == 0


def test_ddp_sum_reduction_matches_mean(results):
    for r in results["ddp"]:
        snap = torch.tensor(r["mean"]["snapshot"])
        got = torch.tensor(r["sum"]["running"])
        assert torch.allclose(snap[0], got[0], rtol=1e-4, atol=0)


def test_ddp_without_rank_average(results):
    g2, trace = results["exact"]
    r0, r1 = (r["local"] for r in results["ddp"])
    assert r0["running"] != r1["running"]       # each rank its own estimate
    for r in (r0, r1):
        assert abs(r["b_simple"] - trace / g2) / (trace / g2) < 0.30


def test_register_validates():
    class NotDDP:
        pass
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        register_ddp_noise_hook(NotDDP(), NoiseScaleTracker(), 16)
