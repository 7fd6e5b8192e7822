"""Plans and launches for the Triton backend.

A :class:`Plan` describes one gradient set (one :class:`DeviceSlice` key): the chunk tables
of every dtype present (device tensors), the slot bounds of every group and tensor, the
fixed-slot partials scratch and, for gradients that are not one dense run of memory, a
scratch buffer they are copied into before the stats pass.  Plans are built with numpy
vector ops and cached in a small LRU keyed by the slice key, so a repeated call on the same
gradients does no Python work proportional to chunks or tensors beyond the key itself.

Global chunk order: tensors in parameter order (groups contiguous), chunks in order within a
tensor.  So each group's and each tensor's chunks are a contiguous slot range.

Sizing heuristics (all here, none in the kernels):

* ``CHUNK`` elements per program (default 65536 on GPU: best of the H200 prototype sweep
  for both fp32 and bf16; 1024 under the interpreter), ``BLOCK`` elements per loop
  iteration (2048 / 256), ``NUM_WARPS`` (4), ``FINAL_BLOCK`` slots per iteration of the
  finalize kernel (1024 / 256).
* Each can be overridden by a module attribute (``launcher.CHUNK = 16384``) or an
  environment variable (``GRADSTATS_TRITON_CHUNK``, ``GRADSTATS_TRITON_BLOCK``,
  ``GRADSTATS_TRITON_NUM_WARPS``, ``GRADSTATS_TRITON_FINAL_BLOCK``); the attribute wins.
  The values are part of the plan cache key, so a sweep never reuses a stale plan.

Non-dense gradients (slow path): the stats pass copies them into the plan's scratch
(``view.copy_(grad)``, a fixed address, so the plan stays cacheable and CUDA-graph
capturable); ``scale_`` multiplies them in place with ``grad.mul_(coef.clamp(max=1))``,
a torch op that never syncs (multiplying by exactly 1.0 is bit-identical, and
``clamp`` keeps a NaN coefficient NaN).

Outputs are fresh tensors on every call; the partials scratch, tables and non-dense scratch
belong to the plan and are reused, so two calls on the *same* gradient set must not run
concurrently on different CUDA streams (calls on one stream are ordered and safe). All
device tensors of a plan are created when it is built (the first call), so later calls can
be captured in a CUDA graph. No call reads device values on the host.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

import triton.language as tl

from ..base import DeviceSlice, FinalStats, Partials, dense_span_ok
from . import kernels as K

# ---------------------------------------------------------------------------------------
# sizing heuristics
# ---------------------------------------------------------------------------------------

#: Overrides (None: use the environment variable, then the default below).
CHUNK: Optional[int] = None
BLOCK: Optional[int] = None
NUM_WARPS: Optional[int] = None
FINAL_BLOCK: Optional[int] = None
#: Number of plans kept (each holds its tables, partials and non-dense scratch).
PLAN_CACHE_SIZE = 16

INTERPRET = K.INTERPRET

_DEFAULTS_GPU = {"CHUNK": 65536, "BLOCK": 2048, "NUM_WARPS": 4, "FINAL_BLOCK": 1024}
_DEFAULTS_INTERPRET = {"CHUNK": 1024, "BLOCK": 256, "NUM_WARPS": 4, "FINAL_BLOCK": 256}

_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
SUPPORTED_DTYPES = tuple(_TL_DTYPE)
_NORM_CODE = {1.0: K.NORM_L1, 2.0: K.NORM_L2, float("inf"): K.NORM_INF}


def _setting(name: str) -> int:
    val = globals()[name]
    if val is None:
        env = os.environ.get("GRADSTATS_TRITON_" + name)
        if env:
            try:
                val = int(env)
            except ValueError:
                raise ValueError(f"GRADSTATS_TRITON_{name}={env!r} must be an integer") from None
        else:
            val = (_DEFAULTS_INTERPRET if INTERPRET else _DEFAULTS_GPU)[name]
    val = int(val)
    if val <= 0:
        raise ValueError(f"gradstats triton setting {name} must be positive, got {val}")
    if name in ("BLOCK", "FINAL_BLOCK", "NUM_WARPS") and val & (val - 1):
        raise ValueError(f"gradstats triton setting {name} must be a power of two, got {val}")
    if name == "CHUNK" and val >= 2 ** 31:
        raise ValueError(f"gradstats triton setting CHUNK must be below 2**31, got {val}")
    return val


def config() -> Tuple[int, int, int, int]:
    """(CHUNK, BLOCK, NUM_WARPS, FINAL_BLOCK) in effect now."""
    return (_setting("CHUNK"), _setting("BLOCK"), _setting("NUM_WARPS"),
            _setting("FINAL_BLOCK"))


# ---------------------------------------------------------------------------------------
# plans
# ---------------------------------------------------------------------------------------

def chunk_table(ptr: np.ndarray, numel: np.ndarray, elsize: np.ndarray, chunk: int):
    """Cut tensors into chunks of ``chunk`` elements (vectorised, int64 throughout).

    Args:
        ptr, numel, elsize: int64 arrays [T]: first-element address, elements, bytes each.
    Returns:
        (tensor slot bounds int64 [T+1], chunk's tensor int64 [C], chunk address int64 [C],
        chunk length int64 [C]) in global chunk order.
    """
    nch = (numel + (chunk - 1)) // chunk
    tb = np.zeros(len(numel) + 1, dtype=np.int64)
    np.cumsum(nch, out=tb[1:])
    C = int(tb[-1])
    tid = np.repeat(np.arange(len(numel), dtype=np.int64), nch)
    first = (np.arange(C, dtype=np.int64) - tb[tid]) * chunk  # element offset in tensor
    addr = ptr[tid] + first * elsize[tid]
    length = np.minimum(numel[tid] - first, chunk)
    return tb, tid, addr, length


class _Launch:
    """One launch: the chunks of one dtype with the same alignment."""

    __slots__ = ("dtype", "aligned", "n", "addr", "length", "slot", "grp")

    def __init__(self, dtype, aligned, n, addr, length, slot, grp):
        self.dtype, self.aligned, self.n = dtype, aligned, n
        self.addr, self.length, self.slot, self.grp = addr, length, slot, grp


class Plan:
    """Everything the kernels need for one gradient set, built once and cached."""

    def __init__(self, dslice: DeviceSlice, cfg: Tuple[int, int, int, int]):
        self.cfg = cfg
        chunk, self.block, self.num_warps, self.final_block = cfg
        self.chunk = chunk
        dev = dslice.device
        self.device = dev
        ts = dslice.tensors
        T = len(ts)
        G = dslice.num_groups
        self.T, self.G = T, G

        group_start = np.asarray(dslice.group_bounds, dtype=np.int64).reshape(G + 1)
        if group_start[-1] != T or np.any(np.diff(group_start) < 0):
            raise ValueError("DeviceSlice groups must be contiguous, non-decreasing ranges")
        group_of = np.repeat(np.arange(G, dtype=np.int64), np.diff(group_start))
        numel = np.fromiter(map(Tensor.numel, ts), dtype=np.int64, count=T)
        elsize = np.fromiter(map(Tensor.element_size, ts), dtype=np.int64, count=T)
        dtypes = [t.dtype for t in ts]
        bad = sorted({str(d) for d in dtypes if d not in _TL_DTYPE})
        if bad:
            raise TypeError(f"the triton backend supports float32, bfloat16 and float16 "
                            f"gradients, got {', '.join(bad)}")
        dense = [dense_span_ok(t) or n == 0 for t, n in zip(ts, numel.tolist())]
        ptr = np.fromiter(map(Tensor.data_ptr, ts), dtype=np.int64, count=T)

        # Non-dense gradients: a scratch buffer per dtype, each tensor at a 16-byte
        # aligned offset; the chunk table points at the scratch.
        self.copies: List[Tuple[int, Tensor]] = []  # (tensor index, scratch view)
        self.torch_scaled: List[Tuple[int, int]] = []  # (tensor index, group)
        self._scratch = []
        nondense = [i for i in range(T) if not dense[i]]
        for dt in dict.fromkeys(dtypes[i] for i in nondense):
            idx = [i for i in nondense if dtypes[i] == dt]
            align = max(1, 16 // dt.itemsize)
            offs, total = [], 0
            for i in idx:
                offs.append(total)
                total += -(-int(numel[i]) // align) * align
            buf = torch.empty(total, dtype=dt, device=dev)
            self._scratch.append(buf)
            for i, o in zip(idx, offs):
                view = buf[o:o + int(numel[i])].view(ts[i].shape)
                self.copies.append((i, view))
                ptr[i] = view.data_ptr()
                self.torch_scaled.append((i, int(group_of[i])))

        tb, tid, addr, length = chunk_table(ptr, numel, elsize, chunk)
        C = int(tb[-1])
        self.C = C
        gstart = group_start  # group g's tensors are gstart[g]:gstart[g+1]
        gb = tb[gstart]
        slot = np.arange(C, dtype=np.int64)
        grp = group_of[tid]
        aligned = (addr % 16) == 0
        dcode = np.fromiter((SUPPORTED_DTYPES.index(d) for d in dtypes), dtype=np.int64,
                            count=T)
        dense_arr = np.asarray(dense, dtype=bool).reshape(T)

        def to_dev(a, dtype):
            return torch.from_numpy(np.ascontiguousarray(a)).to(dtype=dtype, device=dev)

        def launches(sel_chunks):
            out = []
            cd = dcode[tid]
            for code, dt in enumerate(SUPPORTED_DTYPES):
                for al in (True, False):
                    sel = sel_chunks & (cd == code) & (aligned == al)
                    n = int(sel.sum())
                    if n == 0:
                        continue
                    out.append(_Launch(_TL_DTYPE[dt], al, n, to_dev(addr[sel], torch.int64),
                                       to_dev(length[sel], torch.int32),
                                       to_dev(slot[sel], torch.int32),
                                       to_dev(grp[sel], torch.int32)))
            return out

        all_chunks = np.ones(C, dtype=bool)
        self.stats_launches = launches(all_chunks)
        if nondense:
            # scale_ must write the gradients themselves, not the scratch copies
            self.scale_launches = launches(dense_arr[tid])
        else:
            self.scale_launches = self.stats_launches

        self.bounds = to_dev(np.concatenate([gb, tb]), torch.int32)
        self.gbounds = self.bounds[:G + 1]
        self.tbounds = self.bounds[G + 1:]
        nslots = max(C, 1)
        pf = torch.zeros(2 * nslots, dtype=torch.float32, device=dev)
        pi = torch.zeros(2 * nslots, dtype=torch.int32, device=dev)
        self.p_acc, self.p_max = pf[:nslots], pf[nslots:]
        self.p_nan, self.p_inf = pi[:nslots], pi[nslots:]


_CACHE: "OrderedDict[tuple, Plan]" = OrderedDict()
_LOCK = threading.Lock()


def clear_cache() -> None:
    with _LOCK:
        _CACHE.clear()


def get_plan(dslice: DeviceSlice) -> Plan:
    """The cached plan of ``dslice`` (built on a miss; slices without a key are not cached)."""
    cfg = config()
    k = dslice.key
    if k is None or (isinstance(k, int) and k == id(dslice)) or k == ():
        # No real key (DeviceSlice falls back to id(self), which Python reuses): no caching.
        return Plan(dslice, cfg)
    key = (k, dslice.device, dslice.num_groups, cfg)
    with _LOCK:
        plan = _CACHE.get(key)
        if plan is not None:
            _CACHE.move_to_end(key)
            return plan
    plan = Plan(dslice, cfg)
    with _LOCK:
        _CACHE[key] = plan
        _CACHE.move_to_end(key)
        while len(_CACHE) > max(int(PLAN_CACHE_SIZE), 1):
            _CACHE.popitem(last=False)
    return plan


# ---------------------------------------------------------------------------------------
# launches
# ---------------------------------------------------------------------------------------

class _DeviceGuard:
    """Make the slice's CUDA device current for the launches (no-op elsewhere)."""

    __slots__ = ("dev", "ctx")

    def __init__(self, dev: torch.device):
        self.dev = dev
        self.ctx = None

    def __enter__(self):
        if self.dev.type == "cuda" and self.dev.index is not None:
            self.ctx = torch.cuda.device(self.dev.index)
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


def norm_code(norm_type: float) -> int:
    code = _NORM_CODE.get(float(norm_type))
    if code is None:
        raise ValueError(f"norm_type={float(norm_type)}: the triton kernel supports 1, 2 and inf")
    return code


def compute(dslice: DeviceSlice, norm_type: float, per_tensor: bool,
            max_norm: Optional[float] = None) -> Partials:
    code = norm_code(norm_type)
    plan = get_plan(dslice)
    ts = dslice.tensors
    G = plan.G
    T = plan.T if per_tensor else 0
    dev = plan.device
    with _DeviceGuard(dev):
        for i, view in plan.copies:
            view.copy_(ts[i])
        for L in plan.stats_launches:
            K.grad_stats_chunks_kernel[(L.n,)](
                L.addr, L.length, L.slot, plan.p_acc, plan.p_max, plan.p_nan, plan.p_inf,
                DTYPE=L.dtype, NORM=code, BLOCK=plan.block, ALIGNED=L.aligned,
                num_warps=plan.num_warps)
        # Fresh outputs every call: callers keep old statistics.
        outf = torch.empty(3 * G + 2 + 2 * T, dtype=torch.float32, device=dev)
        outi = torch.empty(3 * G + 2 * T, dtype=torch.int64, device=dev)
        has_clip = max_norm is not None
        K.grad_stats_finalize_kernel[(1 + T,)](
            plan.p_acc, plan.p_max, plan.p_nan, plan.p_inf, plan.gbounds, plan.tbounds,
            outf, outi, G, T, float(max_norm) if has_clip else 0.0,
            NORM=code, HAS_CLIP=has_clip, RBLOCK=plan.final_block, num_warps=4)
    norm, max_abs, acc = outf[:G], outf[G:2 * G], outf[2 * G:3 * G]
    total = outf[3 * G]
    clip = outf[3 * G + 1] if has_clip else None
    n_nan, n_inf, nonfinite = outi[:G], outi[G:2 * G], outi[2 * G:3 * G]
    t_acc = t_norm = t_nan = t_inf = None
    if per_tensor:
        b = 3 * G + 2
        t_acc, t_norm = outf[b:b + T], outf[b + T:b + 2 * T]
        t_nan, t_inf = outi[3 * G:3 * G + T], outi[3 * G + T:3 * G + 2 * T]
    final = FinalStats(norm=norm, total_norm=total, max_abs=max_abs, nonfinite=nonfinite,
                       per_tensor_norm=t_norm, clip_coef=clip)
    return Partials(acc=acc, max_abs=max_abs, n_nan=n_nan, n_inf=n_inf, t_acc=t_acc,
                    t_nan=t_nan, t_inf=t_inf, final=final)


def scale_(dslice: DeviceSlice, coef: Tensor) -> None:
    plan = get_plan(dslice)
    dev = plan.device
    if coef.dtype != torch.float32 or coef.device != dev:
        coef = coef.to(device=dev, dtype=torch.float32)
    per_group = coef.dim() == 1
    if per_group:
        if coef.numel() != plan.G:
            raise ValueError(f"coef must be 0-dim or have one entry per group ({plan.G}), "
                             f"got shape {tuple(coef.shape)}")
    elif coef.dim() != 0:
        raise ValueError(f"coef must be 0-dim or 1-D [num_groups], got shape {tuple(coef.shape)}")
    if not coef.is_contiguous():
        coef = coef.contiguous()
    with _DeviceGuard(dev):
        for L in plan.scale_launches:
            K.grad_scale_chunks_kernel[(L.n,)](
                L.addr, L.length, L.grp, coef, DTYPE=L.dtype, BLOCK=plan.block,
                ALIGNED=L.aligned, PER_GROUP=per_group, num_warps=plan.num_warps)
        if plan.torch_scaled:
            eff = coef.clamp(max=1.0)  # NaN stays NaN; >= 1 becomes exactly 1 (a no-op)
            ts = dslice.tensors
            for i, g in plan.torch_scaled:
                ts[i].mul_(eff[g] if per_group else eff)
