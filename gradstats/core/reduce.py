"""The cross-rank reduction engine: DDP, FSDP2 / DTensor, tensor and pipeline parallelism.

``grad_stats``, the clipping drop-ins and ``StableOptimizer`` come here on their own (through
:func:`gradstats.core.stats.compute_groups`) when the gradients are DTensors or when a
``pp_group`` is given; nothing changes in user code. The public helpers are in
:mod:`gradstats.distributed`.

How it works
============
1. Every rank computes *raw* partial statistics of its local shards (``to_local()``) with
   the normal fused backends: sums of ``|x|**p`` (or max for ``p = inf``), max-abs, NaN and
   Inf counts, element counts — per group and, when asked, per tensor.
2. A DTensor placement says how the local pieces make up the whole gradient:

   * ``Shard(d)`` (and FSDP2's strided shards): disjoint pieces. Sums add up across the
     mesh dimension, maxima are maxima of the pieces.
   * ``Replicate()``: identical copies. Only the rank whose coordinate on that mesh
     dimension is 0 contributes (the others skip the tensor: no double counting; every
     element is still counted exactly once, so nothing is under-counted either).
   * ``Partial(op)``: the gradient is a *pending* reduction of the local tensors; the norm
     of a sum is not the sum of norms, so such a gradient is first redistributed to
     ``Replicate()`` on those dimensions (what torch's own norm does; one collective per
     such tensor; FSDP2 and the usual tensor-parallel plans never produce them).

3. The statistics of **all groups and tensors travel in one packed float64 buffer reduced
   with one ``all_reduce(SUM)``** over the mesh (sums of p-th powers and NaN/Inf counts;
   counts are exact in float64 up to 2**53), plus **at most one ``all_reduce(MAX)``** of
   max-abs and the ``inf``-norm accumulators. The MAX buffer holds the float32 values as
   int32 bit patterns: for values >= 0 the integer order is the float order, with NaN
   above +Inf, so NaN propagates (a float MAX reduction does not promise that). Element
   counts come from the DTensors' global shapes without communication. So the clipping
   drop-ins need one collective (SUM for finite ``p``, MAX for ``inf``) of 8 bytes (4 for
   ``inf``) per group; full statistics need one SUM and one MAX.
4. Every rank finalizes the identical reduced buffers with the same code, so norms,
   clipping coefficients and skip decisions are bit-identical on all ranks.

Pipeline parallelism: each stage holds different parameters; ``pp_group`` (a process group
or a 1-D device mesh) adds the stages' per-group statistics (sum of p-th powers, or max),
as torchtitan does for its total norm. When the stage meshes times the pipeline group
cover the whole world, both reductions are one ``all_reduce`` over the world group;
otherwise the group entries get a second SUM (and MAX) over ``pp_group``. Per-tensor norms
stay per stage. Every stage must call with gradients and the same number of groups.

DDP (plain tensors): DDP all-reduces the gradients during ``backward``, so every rank
holds the same, already global, gradient: the local statistics *are* the global ones and
no communication is needed (none is made).

Errors instead of hangs: gradients on different device meshes, DTensor and plain tensor
gradients in one call, or DTensor gradients (or a ``pp_group``) without an initialised
process group raise a clear error before any collective is issued. All decisions about
which collectives to run depend only on metadata that is the same on every rank
(placements, meshes, group counts, arguments), never on local values.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from ..backends import registry
from ..backends.base import FinalStats, Partials, apply_nonfinite, finalize
from . import grouping
from .cache import LRU, device_tensor
from .grouping import is_dtensor, local_groups

__all__ = ["reduce_groups", "last_reduction", "total_norm_like_torch", "as_process_group"]

_F32 = torch.float32
_F64 = torch.float64
_I64 = torch.int64

#: What the last distributed reduction sent: ``{"collectives": n, "bytes": b,
#: "sum_numel": k, "max_numel": m}`` (bytes per rank, payload only). For benchmarks.
last_reduction: Dict[str, int] = {"collectives": 0, "bytes": 0, "sum_numel": 0,
                                  "max_numel": 0}


def _dtensor_api():
    from torch.distributed.tensor import DTensor, Partial, Replicate
    return DTensor, Partial, Replicate


# ---------------------------------------------------------------------------- plans
class _Plan:
    """Everything about one gradient layout that does not change from step to step."""

    __slots__ = ("mesh", "keep", "keep_idx", "all_kept", "partial", "steps", "sharded_dims",
                 "pp_world", "pp_active", "G", "T")

    def __init__(self) -> None:
        self.mesh = None
        self.keep: List[bool] = []
        self.keep_idx: List[int] = []
        self.all_kept = True
        self.partial: List[Tuple[int, tuple]] = []  # (flat index, target placements)
        # reduction steps: (process group or None for WORLD, reduce per-tensor entries?)
        self.steps: List[Tuple[Any, bool]] = []
        self.sharded_dims: Tuple[int, ...] = ()
        self.pp_world = False
        self.pp_active = False  # statistics are combined across pipeline stages
        self.G = 0
        self.T = 0


_PLANS: "LRU[_Plan]" = LRU(32, "distributed reduction plans")


def _is_shard_like(pl: Any) -> bool:
    """``Shard(d)`` or FSDP2+TP's ``_StridedShard`` (disjoint pieces, not a Shard subclass)."""
    if pl.is_shard():
        return True
    try:
        from torch.distributed.tensor.placement_types import _StridedShard
    except ImportError:  # pragma: no cover - older torch
        return False
    return isinstance(pl, _StridedShard)


def _require_initialized(why: str) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"gradstats: {why}, but torch.distributed is not initialised: call "
            "torch.distributed.init_process_group(...) on every rank first (the statistics "
            "need a reduction across ranks)")


def as_process_group(pp_group: Any):
    """A ProcessGroup from ``pp_group`` (ProcessGroup or 1-D DeviceMesh)."""
    if pp_group is None:
        return None
    if hasattr(pp_group, "get_group") and hasattr(pp_group, "ndim"):  # DeviceMesh
        if pp_group.ndim != 1:
            raise ValueError(f"pp_group must be a ProcessGroup or a 1-D DeviceMesh, got a "
                             f"{pp_group.ndim}-D DeviceMesh")
        return pp_group.get_group(0)
    if not isinstance(pp_group, dist.ProcessGroup):
        raise TypeError(f"pp_group must be a torch.distributed ProcessGroup or a 1-D "
                        f"DeviceMesh, got {type(pp_group).__name__}")
    return pp_group


def _mesh_steps(mesh) -> List[Tuple[Any, bool]]:
    """Process groups whose successive all-reduces cover every rank of ``mesh`` once."""
    if mesh.size() == 1:
        return []
    if mesh.ndim == 1:
        return [(mesh.get_group(0), True)]
    if mesh.size() == dist.get_world_size():
        return [(None, True)]  # the mesh is the world: one collective on WORLD
    if mesh.mesh_dim_names:
        try:
            return [(mesh._flatten().get_group(0), True)]
        except Exception:  # pragma: no cover - depends on the torch version
            pass
    # one collective per mesh dimension (sums/maxima compose across dimensions)
    return [(mesh.get_group(d), True) for d in range(mesh.ndim)]


def _build_plan(flat: List[Tensor], sizes: Tuple[int, ...], pp: Any, per_tensor: bool,
                what: str) -> _Plan:
    plan = _Plan()
    plan.G, plan.T = len(sizes), len(flat)
    n_dt = sum(1 for g in flat if is_dtensor(g))
    if n_dt and n_dt != len(flat):
        raise TypeError(f"{what}: got a mix of DTensor and plain torch.Tensor gradients; "
                        "all gradients of one call must be DTensors on one device mesh "
                        "(as torch's clip_grad_norm_ requires), or all plain tensors")
    if n_dt:
        _require_initialized(f"{what} are DTensors")
        mesh = flat[0].device_mesh
        for i, g in enumerate(flat):
            m = g.device_mesh
            if m is not mesh and m != mesh:
                raise ValueError(
                    f"{what}: gradients live on different device meshes ({mesh} for "
                    f"tensor 0, {m} for tensor {i}); gradstats reduces one call over one "
                    "mesh: call it once per mesh (e.g. per parameter group) and combine")
        coord = mesh.get_coordinate()
        if coord is None:
            raise RuntimeError(f"{what}: this rank ({dist.get_rank()}) is not part of the "
                               f"gradients' device mesh {mesh}")
        _, _, Replicate = _dtensor_api()
        sharded = set()
        for i, g in enumerate(flat):
            keep = True
            target = []
            has_partial = False
            for d, pl in enumerate(g.placements):
                if _is_shard_like(pl):
                    sharded.add(d)
                    target.append(pl)
                elif pl.is_replicate():
                    keep = keep and coord[d] == 0
                    target.append(pl)
                elif pl.is_partial():
                    has_partial = True
                    sharded.add(d)
                    keep = keep and coord[d] == 0
                    target.append(Replicate())
                else:
                    raise TypeError(f"{what}[{i}]: unsupported DTensor placement {pl!r}")
            if has_partial:
                plan.partial.append((i, tuple(target)))
            plan.keep.append(keep)
        plan.mesh = mesh
        plan.sharded_dims = tuple(sorted(sharded))
        plan.steps = _mesh_steps(mesh)
    else:
        plan.keep = [True] * len(flat)
    plan.keep_idx = [i for i, k in enumerate(plan.keep) if k]
    plan.all_kept = len(plan.keep_idx) == len(flat)
    if pp is not None:
        _require_initialized("a pp_group was given")
        n_pp = dist.get_world_size(pp)
        if n_pp > 1:
            plan.pp_active = True
            world = dist.get_world_size()
            mesh = plan.mesh
            mesh_ranks = set(mesh.mesh.flatten().tolist()) if mesh is not None \
                else {dist.get_rank()}
            pp_ranks = set(dist.get_process_group_ranks(pp))
            if (not per_tensor and len(mesh_ranks) * n_pp == world
                    and mesh_ranks & pp_ranks == {dist.get_rank()}):
                # the stage meshes and the pipeline group tile the world: one reduction
                plan.steps = [(None, True)]
                plan.pp_world = True
            else:
                plan.steps = plan.steps + [(pp, False)]
    return plan


def _plan_for(flat: List[Tensor], sizes: Tuple[int, ...], pp: Any, per_tensor: bool,
              what: str) -> _Plan:
    if flat and is_dtensor(flat[0]):
        sig = tuple((g.device_mesh, g.placements) if is_dtensor(g) else None
                    for g in flat)
    else:
        sig = None  # plain tensors: the layout is all the plan depends on
    key = (sizes, sig, pp, per_tensor, len(flat))
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS.put(key, _build_plan(flat, sizes, pp, per_tensor, what))
    return plan


# ------------------------------------------------------------------- local tensors
def _local_compute_groups(groups: List[List[Tensor]], flat: List[Tensor], plan: _Plan
                          ) -> Tuple[List[List[Tensor]], List[List[Tensor]]]:
    """(all local tensors per group, contributing local tensors per group)."""
    if plan.mesh is None:
        return groups, groups
    locs = local_groups(groups)
    if plan.partial:
        flat_loc = [t for grads in locs for t in grads]
        for i, target in plan.partial:  # same tensors on every rank: collectives line up
            flat_loc[i] = flat[i].redistribute(flat[i].device_mesh, target).to_local()
        pos = 0
        comp = []
        for grads in locs:
            comp.append(flat_loc[pos:pos + len(grads)])
            pos += len(grads)
    else:
        comp = locs
    if not plan.all_kept:
        keep = plan.keep
        pos = 0
        sub = []
        for grads in comp:
            sub.append([t for j, t in enumerate(grads) if keep[pos + j]])
            pos += len(grads)
        comp = sub
    return locs, comp


def _local_partials(comp: List[List[Tensor]], G: int, norm_type: float, per_tensor: bool,
                    backend: Optional[str], full: bool, device: torch.device,
                    what: str) -> Tuple[Partials, Any]:
    """Raw partials of the contributing local tensors, combined on ``device``.

    Returns (partials whose layout depends on (full, per_tensor) only, device slices).
    """
    inf = math.isinf(norm_type)
    slices, flat_c = grouping.slices(comp, what)
    Tk = len(flat_c)
    if not slices:
        z = torch.zeros(G, dtype=_F32, device=device)
        zi = torch.zeros(G, dtype=_I64, device=device)
        parts = Partials(acc=z, max_abs=z.clone() if full else None,
                         n_nan=zi if full else None, n_inf=zi.clone() if full else None)
        if per_tensor:
            parts.t_acc = torch.zeros(0, dtype=_F32, device=device)
            if full:
                parts.t_nan = torch.zeros(0, dtype=_I64, device=device)
                parts.t_inf = torch.zeros(0, dtype=_I64, device=device)
        return parts, slices
    plist = [registry.select(s, norm_type, backend).compute(s, norm_type, per_tensor, full,
                                                             None) for s in slices]
    counts = all(p.n_nan is not None for p in plist)
    if full and not counts:  # pragma: no cover - backends give counts when full=True
        raise RuntimeError("gradstats: a backend returned no NaN/Inf counts in full mode")

    def dev(t: Tensor) -> Tensor:
        return t.to(device)

    accs = []
    for p in plist:
        a = p.acc
        if not full and counts:  # carry NaN/Inf in acc: the layout has no counts
            a = apply_nonfinite(a, p.n_nan, p.n_inf)
        accs.append(dev(a))
    acc = accs[0] if len(accs) == 1 else (torch.stack(accs).amax(0) if inf
                                          else torch.stack(accs).sum(0))
    out = Partials(acc=acc)
    if full:
        out.max_abs = _stack_reduce([dev(p.max_abs) for p in plist], "max")
        out.n_nan = _stack_reduce([dev(p.n_nan) for p in plist], "sum")
        out.n_inf = _stack_reduce([dev(p.n_inf) for p in plist], "sum")
    if per_tensor:
        t_acc = torch.zeros(Tk, dtype=_F32, device=device)
        t_nan = torch.zeros(Tk, dtype=_I64, device=device) if full else None
        t_inf = torch.zeros(Tk, dtype=_I64, device=device) if full else None
        for s, p in zip(slices, plist):
            idx = None if len(slices) == 1 else torch.tensor(s.index, device=device)
            if p.t_acc is not None:
                ta = p.t_acc
                if not full and p.t_nan is not None:
                    ta = apply_nonfinite(ta, p.t_nan, p.t_inf)
            else:  # the backend finalized itself: per-tensor norms -> raw accumulators
                ta = p.final.per_tensor_norm
                ta = ta if (inf or norm_type == 1.0) else ta.pow(norm_type)
            if idx is None:
                t_acc = dev(ta).to(_F32)
            else:
                t_acc[idx] = dev(ta).to(_F32)
            if full:
                n_t = len(s.tensors)
                tn = p.t_nan if p.t_nan is not None else torch.zeros(n_t, dtype=_I64)
                ti = p.t_inf if p.t_inf is not None else torch.zeros(n_t, dtype=_I64)
                if idx is None:
                    t_nan, t_inf = dev(tn), dev(ti)
                else:
                    t_nan[idx] = dev(tn)
                    t_inf[idx] = dev(ti)
        out.t_acc, out.t_nan, out.t_inf = t_acc, t_nan, t_inf
    return out, slices


def _stack_reduce(ts: List[Tensor], op: str) -> Tensor:
    if len(ts) == 1:
        return ts[0]
    s = torch.stack(ts)
    return s.amax(0) if op == "max" else s.sum(0)


# ------------------------------------------------------------------------ reduction
def _all_reduce(buf: Tensor, op, group) -> None:
    # looked up at call time so that tests can count the collectives
    torch.distributed.all_reduce(buf, op=op, group=group)


def reduce_groups(groups: List[List[Tensor]], norm_type: float = 2.0,
                  per_tensor: bool = False, backend: Optional[str] = None,
                  full: bool = True, pp_group: Any = None
                  ) -> Tuple[FinalStats, Tensor, list]:
    """Global statistics of DTensor gradients and/or pipeline stages.

    Returns:
        ``(final statistics, element counts int64 [G], device slices of *all* local
        tensors)`` — the slices are what a scale pass multiplies.
    """
    what = "gradients"
    pp = as_process_group(pp_group)
    G = len(groups)
    flat: List[Tensor] = groups[0] if G == 1 else [g for grads in groups for g in grads]
    sizes = tuple(map(len, groups))
    plan = _plan_for(flat, sizes, pp, per_tensor, what)
    if plan.steps or plan.partial:  # every call: the group may have been destroyed since
        _require_initialized(f"{what} are DTensors" if plan.mesh is not None
                             else "a pp_group was given")
    locs, comp = _local_compute_groups(groups, flat, plan)
    device = _buffer_device(locs, plan, pp)
    parts, cslices = _local_partials(comp, G, norm_type, per_tensor, backend, full, device,
                                     what)
    all_slices = cslices if comp is locs else grouping.slices(locs, what)[0]
    # element counts: the DTensors' global sizes (no communication); with a pipeline the
    # contributing local counts are summed across ranks
    numel = _numel_of(comp if plan.pp_active else groups, device)
    T = len(flat)
    fin, numel = _reduce_and_finalize(parts, numel, plan, norm_type, per_tensor, full, G, T,
                                      device)
    if per_tensor and fin.per_tensor_norm is None:
        fin.per_tensor_norm = torch.zeros(0, dtype=_F32, device=device)
    return fin, numel, all_slices


def _buffer_device(locs: List[List[Tensor]], plan: _Plan, pp: Any) -> torch.device:
    for grads in locs:
        if grads:
            return grads[0].device
    group = plan.steps[0][0] if plan.steps else None
    if plan.steps and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


_NUMEL: "LRU[Tensor]" = LRU(64, "global element counts")


def _numel_of(groups: List[List[Tensor]], device: torch.device) -> Tensor:
    """int64 [G] element counts (of DTensors: their global sizes), cached by value."""
    vals = tuple(sum(t.numel() for t in grads) for grads in groups)
    key = (vals, device)
    t = _NUMEL.get(key)
    if t is None:
        t = _NUMEL.put(key, device_tensor(list(vals), _I64, device))
    return t


def _max_bits(x: Tensor) -> Tensor:
    """float32 values >= 0 (or NaN) as int32 bit patterns whose integer order is the float
    order with NaN above +Inf: an integer MAX then propagates NaN, which a float MAX
    reduction does not guarantee."""
    x = x.to(_F32).abs()
    x = torch.where(torch.isnan(x), torch.full_like(x, math.nan).abs(), x)
    return x.view(torch.int32)


def _reduce_and_finalize(parts: Partials, numel: Tensor, plan: _Plan, norm_type: float,
                         per_tensor: bool, full: bool, G: int, T: int,
                         device: torch.device):
    """Pack, all-reduce (at most one SUM and one MAX per step), unpack, finalize.

    SUM buffer (float64; counts exact up to 2**53): ``[numel (pipeline only), acc
    (finite p), n_nan, n_inf (full)]`` per group, then the same per tensor. MAX buffer
    (float32 bit patterns as int32, see :func:`_max_bits`): ``[max_abs (full), acc (p =
    inf)]`` per group, then ``acc`` per tensor for ``p = inf``. Group entries come first
    so that a pipeline step can reduce just them.
    """
    inf = math.isinf(norm_type)
    pp_numel = plan.pp_active
    t_acc = t_nan = t_inf = None
    if per_tensor:  # scatter the contributing tensors' entries to all T slots
        if plan.all_kept:
            t_acc, t_nan, t_inf = parts.t_acc, parts.t_nan, parts.t_inf
        else:
            idx = torch.tensor(plan.keep_idx, dtype=_I64, device=device)

            def scatter(v: Tensor) -> Tensor:
                return torch.zeros(T, dtype=v.dtype, device=device).index_copy_(0, idx, v)
            t_acc = scatter(parts.t_acc)
            if full:
                t_nan, t_inf = scatter(parts.t_nan), scatter(parts.t_inf)
    g_sum: List[Tensor] = []
    if pp_numel:
        g_sum.append(numel)
    if not inf:
        g_sum.append(parts.acc)
    if full:
        g_sum += [parts.n_nan, parts.n_inf]
    t_sum: List[Tensor] = []
    if per_tensor:
        if not inf:
            t_sum.append(t_acc)
        if full:
            t_sum += [t_nan, t_inf]
    g_max: List[Tensor] = []
    if full:
        g_max.append(parts.max_abs)
    if inf:
        g_max.append(parts.acc)
    t_max = [t_acc] if (per_tensor and inf) else []

    def pack(ts: List[Tensor], conv) -> Optional[Tensor]:
        return torch.cat([conv(t) for t in ts]) if ts else None
    to64 = (lambda t: t.to(_F64))
    sum_buf = pack(g_sum + t_sum, to64)
    max_buf = pack(g_max + t_max, _max_bits)
    n_gsum = G * len(g_sum)
    n_gmax = G * len(g_max)
    n_coll = nbytes = 0
    for group, with_tensors in plan.steps:
        for buf, n_g, op in ((sum_buf, n_gsum, dist.ReduceOp.SUM),
                             (max_buf, n_gmax, dist.ReduceOp.MAX)):
            if buf is None:
                continue
            b = buf if with_tensors else buf.narrow(0, 0, n_g)
            if b.numel() == 0:
                continue
            _all_reduce(b, op, group)
            n_coll += 1
            nbytes += b.numel() * b.element_size()
    last_reduction.update(collectives=n_coll, bytes=nbytes,
                          sum_numel=0 if sum_buf is None else sum_buf.numel(),
                          max_numel=0 if max_buf is None else max_buf.numel())

    # ---- unpack (same order as packed)
    cur = {"off": 0}

    def take(buf: Tensor, n: int) -> Tensor:
        v = buf.narrow(0, cur["off"], n)
        cur["off"] += n
        return v

    if pp_numel:
        numel = take(sum_buf, G).round().to(_I64)
    acc = None if inf else take(sum_buf, G)
    n_nan = n_inf = None
    if full:
        n_nan = take(sum_buf, G).round().to(_I64)
        n_inf = take(sum_buf, G).round().to(_I64)
    tacc = tnan = tinf = None
    if per_tensor:
        if not inf:
            tacc = take(sum_buf, T)
        if full:
            tnan = take(sum_buf, T).round().to(_I64)
            tinf = take(sum_buf, T).round().to(_I64)
    max_abs = None
    if max_buf is not None:
        maxf = max_buf.view(_F32)
        cur["off"] = 0
        if full:
            max_abs = take(maxf, G)
        if inf:
            acc = take(maxf, G).to(_F64)
            if per_tensor:
                tacc = take(maxf, T).to(_F64)
    red = Partials(acc=acc, max_abs=max_abs, n_nan=n_nan, n_inf=n_inf, t_acc=tacc,
                   t_nan=tnan, t_inf=tinf)
    return finalize(red, norm_type, per_tensor), numel



def total_norm_like_torch(total: Tensor, grads: Sequence[Tensor], norm_type: float) -> Tensor:
    """Wrap a total norm as torch's ``get_total_norm`` returns it for DTensor gradients.

    torch returns a DTensor on the gradients' mesh: ``Replicate()`` on every mesh
    dimension for finite ``p``; for ``p = inf``, ``Partial("max")`` on the dimensions
    where some gradient is sharded. Here the local value is already the global norm on
    every rank (so ``full_tensor()`` and ``to_local()`` agree).
    """
    DTensor, Partial, Replicate = _dtensor_api()
    mesh = grads[0].device_mesh
    if math.isinf(norm_type):
        sharded = set()
        for g in grads:
            for d, pl in enumerate(g.placements):
                if not pl.is_replicate():
                    sharded.add(d)
        placements = [Partial("max") if d in sharded else Replicate()
                      for d in range(mesh.ndim)]
    else:
        placements = [Replicate()] * mesh.ndim
    return DTensor.from_local(total, mesh, placements, run_check=False)

