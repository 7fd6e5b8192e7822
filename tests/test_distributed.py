"""Distributed statistics on CPU with gloo: DDP, FSDP2, hand-built DTensors, pipeline.

Each test spawns 2 or 4 processes that run a batch of checks and report back; every
spawned job has a deadline (the processes are killed past it) and every process group a
60 s timeout, so nothing can hang. Every statistic is compared on every rank with the
single-process reference (``gradstats.core.reference``) on the unsharded gradients.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import gradstats
import gradstats.distributed
from gradstats.core.reference import max_abs_ok, ref_grad_stats, rel_err

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NORMS = (1.0, 2.0, 3.0, math.inf)
TOL = 1e-6


# ------------------------------------------------------------------ process harness
def _entry(rank, fn_name, world, init, outdir, kwargs):
    torch.set_num_threads(1)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        out = globals()[fn_name](rank, world, **kwargs)
    except BaseException:
        if dist.is_initialized():
            dist.destroy_process_group()
        raise  # the spawn harness reports it
    with open(os.path.join(outdir, f"{rank}.json"), "w") as f:
        json.dump(out or {}, f)
    if dist.is_initialized():
        dist.barrier()  # every rank has written its results
    # Skip C++ teardown: torch's gloo/FSDP threads occasionally abort the process at exit
    # ("terminate called without an active exception", ~1 run in 10 on 2 shared cores),
    # after all results are on disk. The results, not the teardown, are under test.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(fn, world, timeout=150.0, **kwargs):
    """Run ``fn(rank, world, **kwargs)`` on ``world`` processes; their results per rank."""
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:
        init = "file://" + os.path.join(tmp, "store")
        ctx = mp.start_processes(_entry, args=(fn.__name__, world, init, tmp, kwargs),
                                 nprocs=world, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=5):
                if time.monotonic() > deadline:
                    pytest.fail(f"{fn.__name__} on {world} processes did not finish in "
                                f"{timeout:.0f} s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                    p.join(5)
        out = []
        for r in range(world):
            with open(os.path.join(tmp, f"{r}.json")) as f:
                out.append(json.load(f))
        return out


# ------------------------------------------------------------------ worker helpers
class CountCollectives:
    """Count collectives issued through torch.distributed and functional collectives."""

    NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
             "broadcast", "reduce", "all_to_all_single", "send", "recv")

    def __init__(self):
        self.calls = []

    @contextlib.contextmanager
    def __call__(self):
        import torch.distributed._functional_collectives as funcol
        saved = []
        for mod, names in ((dist, self.NAMES),
                           (funcol, ("all_reduce", "all_gather_tensor",
                                     "reduce_scatter_tensor", "broadcast"))):
            for n in names:
                if hasattr(mod, n):
                    orig = getattr(mod, n)
                    saved.append((mod, n, orig))
                    setattr(mod, n, self._wrap(f"{mod.__name__}.{n}", orig))
        try:
            yield self
        finally:
            for mod, n, orig in saved:
                setattr(mod, n, orig)

    def _wrap(self, name, orig):
        def f(*a, **k):
            self.calls.append(name)
            return orig(*a, **k)
        return f


def dtensor(full, mesh, placements):
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(full, mesh, placements, src_data_rank=None)


def full_grads(seed, shapes, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g) * scale for s in shapes]


def check_stats(st, groups_full, p, per_tensor=False, label=""):
    ref = ref_grad_stats(groups_full, p)
    tag = f"{label} p={p} rank={dist.get_rank() if dist.is_initialized() else '-'}"
    assert rel_err(st.norm, ref.norm) <= TOL, (tag, st.norm, ref.norm)
    assert rel_err(st.total_norm, ref.total_norm) <= TOL, (tag, st.total_norm, ref.total_norm)
    if st.max_abs is not None:
        assert max_abs_ok(st.max_abs, ref.max_abs), (tag, st.max_abs, ref.max_abs)
        assert torch.equal(st.nonfinite.cpu(), ref.nonfinite), (tag, st.nonfinite)
    assert torch.equal(st.numel.cpu(), ref.numel), (tag, st.numel, ref.numel)
    if per_tensor:
        assert rel_err(st.per_tensor_norm, ref.per_tensor_norm) <= TOL, (
            tag, st.per_tensor_norm, ref.per_tensor_norm)


def params_from(grads_dt):
    ps = []
    for g in grads_dt:
        p = torch.nn.Parameter(torch.zeros_like(g))
        p.grad = g
        ps.append(p)
    return ps


def same_everywhere(t):
    """Bit-identical on every rank (all-gather of the local values)."""
    t = t.detach().reshape(-1).double().cpu()
    outs = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(outs, t)
    return all(torch.equal(torch.nan_to_num(o, nan=7.0), torch.nan_to_num(outs[0], nan=7.0))
               for o in outs)


# ------------------------------------------------------------------ 2-process job
def _hand_dtensor_checks(mesh, shapes_pl, seed, label):
    """grad_stats / drop-ins on hand-built DTensors vs the reference and vs torch."""
    from torch.distributed.tensor import DTensor
    groups_full = [full_grads(seed + gi, [s for s, _ in grp]) for gi, grp in
                   enumerate(shapes_pl)]
    groups_dt = [[dtensor(f, mesh, pl) for f, (_, pl) in zip(fulls, grp)]
                 for fulls, grp in zip(groups_full, shapes_pl)]
    for backend in (None, "torch"):
        for p in NORMS:
            st = gradstats.grad_stats([{"params": params_from(g)} for g in groups_dt], p,
                                      per_tensor=True, backend=backend)
            check_stats(st, groups_full, p, True, f"{label}/{backend}")
            assert same_everywhere(st.norm) and same_everywhere(st.total_norm)
    # drop-ins vs torch (finite p; torch's inf-norm refuses empty local shards)
    flat_full = [g for grp in groups_full for g in grp]
    flat_dt = [g for grp in groups_dt for g in grp]
    for p in (2.0, math.inf):
        ours = gradstats.get_total_norm(flat_dt, p)
        ref = ref_grad_stats([flat_full], p).total_norm
        assert isinstance(ours, DTensor)
        assert rel_err(ours.full_tensor(), ref) <= TOL, (label, p)
        if p != math.inf or _no_empty_shard(flat_dt):
            theirs = torch.nn.utils.get_total_norm([t.clone() for t in flat_dt], p)
            assert tuple(ours.placements) == tuple(theirs.placements), (
                label, p, ours.placements, theirs.placements)
            assert rel_err(ours.full_tensor(), theirs.full_tensor().double()) <= 1e-5
    # clip_grad_norm_: returns torch's DTensor, scales the local shards like torch
    ps_ours = params_from([t.clone() for t in flat_dt])
    ps_torch = params_from([t.clone() for t in flat_dt])
    total_ref = float(ref_grad_stats([flat_full], 2.0).total_norm)
    max_norm = total_ref / 3
    tn = gradstats.clip_grad_norm_(ps_ours, max_norm)
    tt = torch.nn.utils.clip_grad_norm_(ps_torch, max_norm)
    assert isinstance(tn, DTensor) and tuple(tn.placements) == tuple(tt.placements)
    assert rel_err(tn.to_local(), torch.tensor(total_ref)) <= TOL
    for a, b in zip(ps_ours, ps_torch):
        assert torch.allclose(a.grad.to_local(), b.grad.to_local(), rtol=1e-6, atol=0)
    # clip_grads_with_norm_ with torch's DTensor total
    ps2 = params_from([t.clone() for t in flat_dt])
    gradstats.clip_grads_with_norm_(ps2, max_norm, tt)
    for a, b in zip(ps2, ps_torch):
        assert torch.allclose(a.grad.to_local(), b.grad.to_local(), rtol=1e-6, atol=0)
    return groups_full, groups_dt


def _no_empty_shard(dts):
    """No rank holds an empty local shard (torch's inf-norm refuses those)."""
    n = torch.tensor([min(t.to_local().numel() for t in dts)], dtype=torch.float64)
    dist.all_reduce(n, op=dist.ReduceOp.MIN)
    return bool(n.item() > 0)


def _collectives_of(fn):
    c = CountCollectives()
    with c():
        out = fn()
    return out, list(c.calls)


def job_two(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard
    assert world == 2
    res = {}
    mesh = init_device_mesh("cpu", (world,))
    # Shard(0) even/uneven (7 rows: 4 + 3), Shard(1) uneven, Replicate, 1-element shard
    layout = [
        [((8, 6), [Shard(0)]), ((7, 3), [Shard(0)]), ((5,), [Replicate()])],
        [((4, 5), [Shard(1)]), ((3, 3), [Replicate()]), ((1,), [Shard(0)])],
    ]
    groups_full, groups_dt = _hand_dtensor_checks(mesh, layout, 10, "1d")

    # one SUM collective for the clipping path (finite p), SUM + MAX for full stats
    flat_dt = [g for grp in groups_dt for g in grp]
    _, calls = _collectives_of(lambda: gradstats.clip_grad_norm_(
        params_from([t.clone() for t in flat_dt]), 1.0))
    assert calls == ["torch.distributed.all_reduce"], calls
    _, calls = _collectives_of(lambda: gradstats.clip_grad_norm_(
        params_from([t.clone() for t in flat_dt]), 1.0, norm_type=math.inf))
    assert calls == ["torch.distributed.all_reduce"], calls  # one MAX
    _, calls = _collectives_of(lambda: gradstats.grad_stats(params_from(flat_dt)))
    assert calls == ["torch.distributed.all_reduce"] * 2, calls
    res["clip_collectives"] = 1
    res["bytes"] = gradstats.distributed.last_reduction["bytes"]

    # NaN / Inf on one rank only: every rank sees them
    g_nan = [t.clone() for t in flat_dt]
    if rank == 1:
        g_nan[0].to_local()[0, 0] = float("nan")
        g_nan[1].to_local()[-1, -1] = float("inf")
    full_nan = [t.full_tensor() for t in g_nan]
    for p in NORMS:
        st = gradstats.grad_stats(params_from(g_nan), p)
        check_stats(st, [full_nan], p, label="nan")
        assert int(st.nonfinite.sum()) == 2 and math.isnan(float(st.total_norm))
        tn = gradstats.get_total_norm(g_nan, p)
        assert math.isnan(float(tn.full_tensor())), (p, tn)

    # mixing DTensors and plain tensors: a clear error on every rank, before any collective
    with pytest.raises(TypeError, match="mix"):
        gradstats.grad_stats(params_from([flat_dt[0], torch.ones(3)]))
    with pytest.raises(TypeError, match="mix"):
        gradstats.clip_grad_norm_(params_from([torch.ones(3), flat_dt[0]]), 1.0)

    # pipeline over 2 stages of plain tensors (pp_group = the world): per-stage stats add
    stage_full = [full_grads(100 + s, [(6, 4), (5,)]) for s in range(2)]
    mine = [t.clone() for t in stage_full[rank]]
    for p in NORMS:
        st = gradstats.grad_stats(params_from(mine), p, pp_group=dist.group.WORLD)
        check_stats(st, [stage_full[0] + stage_full[1]], p, label="pp-plain")
    st = gradstats.distributed.grad_stats(params_from(mine), 2.0, per_tensor=True,
                                          pp_group=dist.group.WORLD)
    assert rel_err(st.per_tensor_norm, ref_grad_stats([stage_full[rank]]).per_tensor_norm) \
        <= TOL  # per-tensor norms stay per stage
    ps = params_from([t.clone() for t in mine])
    total_all = float(ref_grad_stats([stage_full[0] + stage_full[1]]).total_norm)
    tn = gradstats.distributed.clip_grad_norm_(ps, total_all / 2, pp_group=dist.group.WORLD)
    assert rel_err(tn, torch.tensor(total_all)) <= TOL
    coef = (total_all / 2) / (total_all + 1e-6)
    for a, b in zip(ps, mine):
        assert torch.allclose(a.grad, b * coef, rtol=1e-6)

    res.update(_ddp_checks(rank, world))
    res.update(_fsdp2_checks(rank, world, mesh))

    # a DTensor (or a pp_group) whose process group is gone: a clear error, not a hang
    world_pg = dist.group.WORLD
    dist.destroy_process_group()
    with pytest.raises(RuntimeError, match="not initialised"):
        gradstats.grad_stats(params_from(flat_dt))
    with pytest.raises(RuntimeError, match="not initialised"):
        gradstats.grad_stats(params_from(mine), pp_group=world_pg)
    return res


def _mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, 4))


def _batch(step, n=8):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(n, 8, generator=g), torch.randn(n, 4, generator=g)


def _ddp_checks(rank, world):
    """DDP: gradients are all-reduced in backward, so no communication is needed."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    model = DDP(_mlp())
    ref = _mlp()
    x, y = _batch(0, 4 * world)
    lx = x.chunk(world)[rank]
    ly = y.chunk(world)[rank]
    torch.nn.functional.mse_loss(model(lx), ly).backward()
    torch.nn.functional.mse_loss(ref(x), y).backward()
    ref_grads = [p.grad for p in ref.parameters()]
    for p in NORMS:
        st, calls = _collectives_of(lambda: gradstats.grad_stats(model.parameters(), p,
                                                                 per_tensor=True))
        assert calls == [], calls
        # DDP averages in float32 in another order: compare at float32 level here
        r = ref_grad_stats([ref_grads], p)
        assert rel_err(st.total_norm, r.total_norm) <= 1e-5
        assert same_everywhere(st.norm)
    return {"ddp_collectives": 0}


def _fsdp2_checks(rank, world, mesh):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    model = _mlp()
    for m in model:
        if isinstance(m, torch.nn.Linear):
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    x, y = _batch(0, 4 * world)
    torch.nn.functional.mse_loss(model(x.chunk(world)[rank]), y.chunk(world)[rank]).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(isinstance(g, DTensor) for g in grads)
    full = [g.full_tensor() for g in grads]
    for p in NORMS:
        st = gradstats.grad_stats([{"params": list(model[0].parameters())},
                                   {"params": list(model[2].parameters()) +
                                    list(model[4].parameters())}], p, per_tensor=True)
        check_stats(st, [full[:2], full[2:]], p, True, "fsdp2")
    # clip_grad_norm_ returns exactly what torch returns (a replicated DTensor)
    saved = [g.to_local().clone() for g in grads]
    tn = gradstats.clip_grad_norm_(model.parameters(), 0.01)
    ours = [g.to_local().clone() for g in grads]
    for g, s in zip(grads, saved):
        g.to_local().copy_(s)
    tt = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
    assert isinstance(tn, DTensor) and tn.placements == tt.placements
    assert rel_err(tn.to_local(), tt.to_local().double()) <= 1e-6
    for a, g in zip(ours, grads):
        assert torch.allclose(a, g.to_local(), rtol=1e-6, atol=1e-12)
    return {"fsdp2_placements": [repr(pl) for pl in tn.placements]}


# ------------------------------------------------------------------ 4-process job
def job_four(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard
    assert world == 4
    mesh1 = init_device_mesh("cpu", (4,))
    # 1-D mesh of 4: uneven Shard(0) with an empty shard (6 rows: 2, 2, 2, 0), Shard(1)
    _hand_dtensor_checks(mesh1, [[((6, 3), [Shard(0)]), ((3, 9), [Shard(1)]),
                                  ((2, 2), [Replicate()])]], 20, "1d-4")
    # 2-D mesh 2 x 2: every combination of Shard/Replicate
    mesh2 = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    from torch.distributed.tensor.placement_types import _StridedShard
    layout = [
        [((8, 6), [Shard(0), Shard(1)]), ((7, 5), [Replicate(), Shard(0)]),
         ((8, 3), [_StridedShard(0, split_factor=2), Shard(0)])],  # FSDP2 + TP layout
        [((5, 4), [Shard(1), Replicate()]), ((3, 3), [Replicate(), Replicate()]),
         ((9,), [Shard(0), Shard(0)])],
    ]
    groups_full, groups_dt = _hand_dtensor_checks(mesh2, layout, 30, "2d")
    flat_dt = [g for grp in groups_dt for g in grp]
    _, calls = _collectives_of(lambda: gradstats.grad_stats(params_from(flat_dt)))
    assert len(calls) == 2, calls
    # Partial placements: redistributed first (a sum of partial gradients)
    from torch.distributed.tensor import DTensor, Partial
    base = full_grads(40, [(4, 4)])[0]
    part = DTensor.from_local(base * (rank + 1), mesh2, [Partial(), Shard(0)],
                              run_check=False)
    full_part = part.full_tensor()
    for p in NORMS:
        check_stats(gradstats.grad_stats(params_from([part]), p), [[full_part]], p,
                    label="partial")

    # different meshes: a clear error on every rank, no collective issued
    with pytest.raises(ValueError, match="different device meshes"):
        gradstats.grad_stats(params_from([flat_dt[0], dtensor(base, mesh1, [Shard(0)])]))

    # HSDP (2-D FSDP2: replicate over dp, shard over the other dim)
    from torch.distributed.fsdp import fully_shard
    model = _mlp()
    for m in model:
        if isinstance(m, torch.nn.Linear):
            fully_shard(m, mesh=mesh2)
    fully_shard(model, mesh=mesh2)
    x, y = _batch(1, 16)
    torch.nn.functional.mse_loss(model(x.chunk(4)[rank]), y.chunk(4)[rank]).backward()
    grads = [p.grad for p in model.parameters()]
    pls = {repr(tuple(g.placements)) for g in grads}
    full = [g.full_tensor() for g in grads]
    for p in NORMS:
        st = gradstats.grad_stats(model.parameters(), p, per_tensor=True)
        check_stats(st, [full], p, True, "hsdp")

    # pipeline: 2 stages x 2 data-parallel ranks; each stage shards its own layers
    pmesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "dp"))
    stage = pmesh.get_coordinate()[0]
    dp = pmesh["dp"]
    shapes = {0: [(8, 4), (5,)], 1: [(6, 6), (3, 2), (7,)]}
    stages_full = {s: [full_grads(50 + s, shapes[s][:1]), full_grads(60 + s, shapes[s][1:])]
                   for s in (0, 1)}
    mine = [[dtensor(f, dp, [Shard(0)]) for f in grp] for grp in stages_full[stage]]
    all_groups = [stages_full[0][g] + stages_full[1][g] for g in range(2)]
    for p in NORMS:
        (st, calls) = _collectives_of(lambda: gradstats.grad_stats(
            [{"params": params_from(g)} for g in mine], p, pp_group=pmesh["pp"]))
        check_stats(st, all_groups, p, label="pp")
        assert len(calls) == 2, calls  # stage meshes x pp tile the world: one SUM + one MAX
        st = gradstats.grad_stats([{"params": params_from(g)} for g in mine], p,
                                  per_tensor=True, pp_group=pmesh["pp"].get_group())
        check_stats(st, all_groups, p, label="pp+per_tensor")
        ref_stage = ref_grad_stats(stages_full[stage], p)
        assert rel_err(st.per_tensor_norm, ref_stage.per_tensor_norm) <= TOL
    # clip across stages: the same coefficient everywhere
    total_all = float(ref_grad_stats(all_groups).total_norm)
    flat_mine = [g for grp in mine for g in grp]
    ps = params_from([t.clone() for t in flat_mine])
    (tn, calls) = _collectives_of(lambda: gradstats.distributed.clip_grad_norm_(
        ps, total_all / 4, pp_group=pmesh["pp"]))
    assert calls == ["torch.distributed.all_reduce"], calls
    assert rel_err(tn.full_tensor(), torch.tensor(total_all)) <= TOL
    coef = (total_all / 4) / (total_all + 1e-6)
    for a, b in zip(ps, flat_mine):
        assert torch.allclose(a.grad.to_local(), b.to_local() * coef, rtol=1e-6)
    # StableOptimizer on each stage, statistics combined across stages
    from gradstats import StableOptimizer
    for nan_stage in (None, 1):
        ps = [params_from([t.clone() for t in grp]) for grp in mine]
        if nan_stage == stage and pmesh.get_coordinate()[1] == 0:
            ps[1][0].grad.to_local().view(-1)[0] = float("nan")
        before = [p.detach().to_local().clone() for grp in ps for p in grp]
        opt = StableOptimizer(torch.optim.SGD([{"params": g} for g in ps], lr=0.1),
                              max_norm=total_all / 4)
        gradstats.distributed.set_pp_group(opt, pmesh["pp"])
        (_, calls) = _collectives_of(opt.step)
        assert len(calls) <= 2, calls
        rec = opt.last_stats
        assert same_everywhere(rec.clip_coef) and same_everywhere(rec.skipped)
        if nan_stage is None:
            check_stats(rec.stats, all_groups, 2.0, label="pp-stable")
            assert not bool(rec.skipped)
        else:
            assert bool(rec.skipped) and int(rec.stats.nonfinite.sum()) == 1
            after = [p.detach().to_local() for grp in ps for p in grp]
            assert all(torch.equal(a, b) for a, b in zip(after, before))
    return {"hsdp_placements": sorted(pls)}


# ------------------------------------------------------------------ StableOptimizer
def job_stable(rank, world, fused):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.device_mesh import init_device_mesh
    from gradstats import StableOptimizer
    mesh = init_device_mesh("cpu", (world,))
    model = _mlp(3)
    ref = copy.deepcopy(model)
    for m in model:
        if isinstance(m, torch.nn.Linear):
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    kw = dict(lr=1e-2, weight_decay=0.1)
    if fused:
        kw["fused"] = True
    opt = StableOptimizer(torch.optim.AdamW(model.parameters(), **kw), max_norm=0.5)
    ref_opt = StableOptimizer(torch.optim.AdamW(ref.parameters(), **kw), max_norm=0.5)
    n_coll = []
    for step in range(10):
        x, y = _batch(step, 4 * world)
        loss = torch.nn.functional.mse_loss(model(x.chunk(world)[rank]),
                                            y.chunk(world)[rank])
        loss.backward()
        c = CountCollectives()
        with c():
            opt.step()
        n_coll.append(len(c.calls))
        opt.zero_grad()
        torch.nn.functional.mse_loss(ref(x), y).backward()
        ref_opt.step()
        ref_opt.zero_grad()
        st, rst = opt.last_stats.stats, ref_opt.last_stats.stats
        assert rel_err(st.total_norm, rst.total_norm.double()) <= 1e-5, (step, st.total_norm,
                                                                         rst.total_norm)
        assert bool(opt.last_stats.clipped.any()) == bool(ref_opt.last_stats.clipped.any())
        assert same_everywhere(opt.last_stats.clip_coef)
    assert max(n_coll) <= 2, n_coll
    # relative error of each parameter tensor (norm of the difference over the norm):
    # FSDP2 averages the gradients in another order than one process sums them, so
    # single elements that Adam divides by a tiny sqrt(v) differ by a few ulps more
    worst = 0.0
    for p, q in zip(model.parameters(), ref.parameters()):
        a, b = p.detach().full_tensor().double(), q.detach().double()
        worst = max(worst, float((a - b).norm() / b.norm()))
    assert worst <= 1e-5, worst
    # the wrapper's own state (running statistics, policy state, counters) is identical
    # on every rank, so a checkpoint from rank 0 is valid for all
    own = _tensors_of(opt.state_dict()["stable_optimizer"])
    assert own and all(same_everywhere(t) for t in own)

    # NaN on one rank only: every rank skips; params and optimizer state unchanged
    x, y = _batch(99, 4 * world)
    torch.nn.functional.mse_loss(model(x.chunk(world)[rank]), y.chunk(world)[rank]).backward()
    if rank == world - 1:
        next(iter(model.parameters())).grad.to_local().view(-1)[0] = float("nan")
    before_p = [p.to_local().clone() for p in model.parameters()]
    before_s = {id(p): {k: (v.to_local().clone() if hasattr(v, "to_local") else v.clone())
                        for k, v in s.items()} for p, s in opt.state.items()}
    opt.step()
    assert bool(opt.last_stats.skipped) and bool(opt.last_stats.skipped_nonfinite)
    assert int(opt.last_stats.stats.nonfinite.sum()) == 1
    for p, b in zip(model.parameters(), before_p):
        assert torch.equal(p.to_local(), b)
    for p, s in opt.state.items():
        for k, v in s.items():
            v = v.to_local() if hasattr(v, "to_local") else v
            assert torch.equal(v, before_s[id(p)][k]), k
    return {"collectives_per_step": n_coll, "param_rel_err": worst}


def _tensors_of(obj):
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for k in sorted(obj, key=str) for t in _tensors_of(obj[k])]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors_of(v)]
    return []


# ------------------------------------------------------------------ tests
@pytest.mark.timeout(240)
def test_two_ranks_dtensor_ddp_fsdp2_pipeline_errors():
    out = spawn(job_two, 2, timeout=220)
    assert all(o["clip_collectives"] == 1 for o in out)
    assert all(o["ddp_collectives"] == 0 for o in out)
    assert out[0]["fsdp2_placements"] == ["Replicate()"]


@pytest.mark.timeout(300)
def test_four_ranks_2d_mesh_hsdp_pipeline():
    out = spawn(job_four, 4, timeout=280)
    assert any("Replicate(), Shard(dim=0)" in s for s in out[0]["hsdp_placements"])


@pytest.mark.parametrize("fused", [False, True], ids=["host", "folded"])
def test_stable_optimizer_fsdp2(fused):
    out = spawn(job_stable, 2, timeout=220, fused=fused)
    for o in out:
        assert max(o["collectives_per_step"]) <= 2
        assert o["param_rel_err"] <= 1e-5


@pytest.mark.timeout(200)
def test_example_fsdp2_stable_runs():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = ([torchrun] if os.path.exists(torchrun) else
           [sys.executable, "-m", "torch.distributed.run"])
    cmd += ["--standalone", "--nproc_per_node", "2",
            os.path.join(ROOT, "examples", "fsdp2_stable.py"), "--steps", "5"]
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180,
                           cwd=ROOT)
    except subprocess.TimeoutExpired:
        pytest.fail("examples/fsdp2_stable.py did not finish in 180 s")
    out = r.stdout + r.stderr
    finished = all(f"rank {k}: finished" in out for k in range(2))
    # torch 2.13's CPU gloo/FSDP teardown aborts a process at interpreter exit now and then
    # ("terminate called without an active exception"; 8 of 30 runs of a torch-only FSDP2
    # script, no gradstats involved). Accepted only after every rank has finished.
    upstream_teardown_abort = finished and "terminate called without an active exception" in out
    assert r.returncode == 0 or upstream_teardown_abort, r.stdout[-3000:] + r.stderr[-3000:]
    assert finished and "done" in r.stdout
    assert "skipped True" in r.stdout  # the NaN step (rank 1 only) was skipped
