"""Plans and launches for the Triton backend.

A :class:`Plan` describes one gradient-set **structure** (one :class:`DeviceSlice` key:
sizes, dtypes, layouts, alignment classes, groups — never addresses): the chunk table of
every (dtype, alignment) launch, the slot bounds of every group and tensor, the fixed-slot
partials scratch and, for gradients that are not one dense run of memory, a scratch buffer
they are copied into before the stats pass. Plans are built with numpy vector ops and
cached in the bounded LRU of :mod:`gradstats.core.cache`.

Moving gradients cost nothing: the kernels read each tensor's address from a per-plan
**pointer table** (int64 ``[T]`` on the device). When a call's addresses differ from the
last ones uploaded (``zero_grad(set_to_none=True)`` + ``backward()`` can move them), the new
addresses are written into a slot of a small ring of pinned host buffers and copied with
``non_blocking=True`` on the current stream — no host synchronisation, no per-tensor Python
work beyond reading the addresses. A ring slot is reused only once the event recorded after
its copy has completed (``Event.query()``, never a blocking wait unless every slot is
busy). While a CUDA graph is being captured the upload reads a pinned buffer that is never
reused, so replays read stable addresses.

Global chunk order: tensors in parameter order (groups contiguous), chunks in order within a
tensor. So each group's and each tensor's chunks are a contiguous slot range.

Sizing heuristics (all here, none in the kernels):

* ``CHUNK`` elements per program (default 65536 on GPU: best of the H200 prototype sweep
  for both fp32 and bf16; 1024 under the interpreter); ``BLOCK`` elements per loop
  iteration for 4-byte dtypes (2048 / 256) — 16-bit dtypes load ``2 * BLOCK`` elements
  per iteration, so every launch keeps the same bytes in flight; ``NUM_WARPS`` (4);
  ``FINAL_BLOCK`` slots per iteration of the finalize kernels (1024 / 256).
* Each can be overridden by a module attribute (``launcher.CHUNK = 16384``) or an
  environment variable (``GRADSTATS_TRITON_CHUNK``, ``GRADSTATS_TRITON_BLOCK``,
  ``GRADSTATS_TRITON_NUM_WARPS``, ``GRADSTATS_TRITON_FINAL_BLOCK``); the attribute wins.
  The values are part of the plan cache key, so a sweep never reuses a stale plan.

Non-dense gradients (slow path): the stats pass copies them into the plan's scratch
(``view.copy_(grad)``, a fixed address); ``scale_`` multiplies them in place with
``grad.mul_(coef.clamp(max=1))``, a torch op that never syncs.

Outputs are fresh tensors on every call; the partials scratch, tables and non-dense scratch
belong to the plan and are reused, so two calls on the *same* gradient structure must not
run concurrently on different CUDA streams (calls on one stream are ordered and safe).
"""
from __future__ import annotations

import os
from typing import Any, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

import triton.language as tl

from ...core.cache import LRU
from ...core.layout import Layout
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
#: Pinned pointer-upload buffers per plan.
RING_SLOTS = 4
#: Launch compiled kernels directly, skipping ``JITFunction.run``'s per-call argument
#: binding (host time). Opt-in (``GRADSTATS_TRITON_DIRECT=1``) until verified on a GPU.
DIRECT = os.environ.get("GRADSTATS_TRITON_DIRECT", "") == "1"

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

def chunk_table(numel: np.ndarray, chunk: int):
    """Cut tensors into chunks of ``chunk`` elements (vectorised, int64 throughout).

    Args:
        numel: int64 array [T]: elements of each tensor.
    Returns:
        (tensor slot bounds int64 [T+1], chunk's tensor int64 [C], chunk's element offset
        int64 [C], chunk length int64 [C]) in global chunk order.
    """
    nch = (numel + (chunk - 1)) // chunk
    tb = np.zeros(len(numel) + 1, dtype=np.int64)
    np.cumsum(nch, out=tb[1:])
    C = int(tb[-1])
    tid = np.repeat(np.arange(len(numel), dtype=np.int64), nch)
    first = (np.arange(C, dtype=np.int64) - tb[tid]) * chunk  # element offset in tensor
    length = np.minimum(numel[tid] - first, chunk)
    return tb, tid, first, length


class _Launch:
    """One launch: the chunks of one dtype with the same alignment."""

    __slots__ = ("dtype", "aligned", "n", "meta", "block")

    def __init__(self, dtype, aligned: bool, n: int, meta: Tensor, block: int) -> None:
        self.dtype, self.aligned, self.n, self.meta, self.block = dtype, aligned, n, meta, block


class _PointerRing:
    """Pinned host buffers that upload a plan's pointer table without a host sync."""

    def __init__(self, T: int, slots: int) -> None:
        self.bufs = [torch.empty(max(T, 1), dtype=torch.int64).pin_memory()
                     for _ in range(slots)]
        self.events: List[Optional[Any]] = [None] * slots
        self.next = 0
        self.captured: List[Tensor] = []  # buffers read by captured graphs: never reused

    def upload(self, dev_ptrs: Tensor, vals: np.ndarray) -> None:
        if torch.cuda.is_current_stream_capturing():
            buf = torch.from_numpy(vals.copy()).pin_memory()
            self.captured.append(buf)
            dev_ptrs.copy_(buf, non_blocking=True)
            return
        n = len(self.bufs)
        for k in range(n):  # the first slot whose last copy has completed
            i = (self.next + k) % n
            ev = self.events[i]
            if ev is None or ev.query():
                break
        else:  # every slot busy: wait for the oldest (rare)
            i = self.next
            self.events[i].synchronize()
        buf = self.bufs[i]
        buf.numpy()[:len(vals)] = vals
        dev_ptrs.copy_(buf[:len(vals)], non_blocking=True)
        ev = self.events[i]
        if ev is None:
            ev = self.events[i] = torch.cuda.Event()
        ev.record()
        self.next = (i + 1) % n


class Plan:
    """Everything the kernels need for one gradient structure, built once and cached."""

    def __init__(self, dslice: DeviceSlice, cfg: Tuple[int, int, int, int]):
        self.cfg = cfg
        chunk, block, self.num_warps, self.final_block = cfg
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
        dtypes = [t.dtype for t in ts]
        bad = sorted({str(d) for d in dtypes if d not in _TL_DTYPE})
        if bad:
            raise TypeError(f"the triton backend supports float32, bfloat16 and float16 "
                            f"gradients, got {', '.join(bad)}")
        dense = [dense_span_ok(t) or n == 0 for t, n in zip(ts, numel.tolist())]
        ptr = np.fromiter(map(Tensor.data_ptr, ts), dtype=np.int64, count=T)

        # Non-dense gradients: a scratch buffer per dtype, each tensor at a 16-byte
        # aligned offset; the pointer table points at the scratch.
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
        self.nondense_idx = np.asarray([i for i, _ in self.copies], dtype=np.int64)
        self.nondense_ptr = ptr[self.nondense_idx] if len(self.copies) else ptr[:0]
        # alignment is part of the structure key: the first call's addresses tell it
        aligned_t = (ptr % 16) == 0

        tb, tid, off, length = chunk_table(numel, chunk)
        C = int(tb[-1])
        self.C = C
        gb = tb[group_start]
        slot = np.arange(C, dtype=np.int64)
        grp = group_of[tid]
        aligned = aligned_t[tid]
        dcode = np.fromiter((SUPPORTED_DTYPES.index(d) for d in dtypes), dtype=np.int64,
                            count=T)
        dense_arr = np.asarray(dense, dtype=bool).reshape(T)
        to_dev = self._to_dev

        def launches(sel_chunks: np.ndarray) -> List[_Launch]:
            out = []
            cd = dcode[tid]
            for code, dt in enumerate(SUPPORTED_DTYPES):
                blk = block * max(1, 4 // dt.itemsize)  # same bytes per iteration
                for al in (True, False):
                    sel = sel_chunks & (cd == code) & (aligned == al)
                    n = int(sel.sum())
                    if n == 0:
                        continue
                    meta = np.stack([tid[sel], off[sel], length[sel], slot[sel], grp[sel]],
                                    axis=1)
                    out.append(_Launch(_TL_DTYPE[dt], bool(al), n,
                                       to_dev(meta.reshape(-1), torch.int64), blk))
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
        self.p_acc = torch.zeros(nslots, dtype=torch.float64, device=dev)
        self.p_max = torch.zeros(nslots, dtype=torch.float32, device=dev)
        pi = torch.zeros(2 * nslots, dtype=torch.int32, device=dev)
        self.p_nan, self.p_inf = pi[:nslots], pi[nslots:]
        # the pointer table: the first call's addresses (a blocking copy at build time)
        self.ptrs = to_dev(ptr, torch.int64) if T else torch.zeros(1, dtype=torch.int64,
                                                                   device=dev)
        self.last_ptrs: Any = None
        self._ring: Optional[_PointerRing] = None
        self._first_vals = ptr

    def _to_dev(self, a: np.ndarray, dtype: torch.dtype) -> Tensor:
        """A device copy of ``a`` made while the plan is built (first call only)."""
        t = torch.from_numpy(np.ascontiguousarray(a)).to(dtype=dtype)
        return t.to(self.device) if self.device.type != "cpu" else t

    def set_pointers(self, dslice: DeviceSlice) -> None:
        """Make the device pointer table hold this call's addresses (async, no sync)."""
        cur = dslice.ptrs
        if cur == self.last_ptrs:
            return
        if self.last_ptrs is None and self._first_vals is not None:
            vals = (np.frombuffer(cur, dtype=np.int64) if isinstance(cur, (bytes, bytearray))
                    else np.asarray(cur, dtype=np.int64))
            first = self._first_vals
            self._first_vals = None
            if len(self.copies):
                vals = vals.copy()
                vals[self.nondense_idx] = self.nondense_ptr
            if np.array_equal(vals, first):  # the build uploaded these already
                self.last_ptrs = cur
                return
        else:
            vals = (np.frombuffer(cur, dtype=np.int64) if isinstance(cur, (bytes, bytearray))
                    else np.asarray(cur, dtype=np.int64))
            if len(self.copies):
                vals = vals.copy()
                vals[self.nondense_idx] = self.nondense_ptr
        if self.device.type == "cuda":
            if self._ring is None:
                self._ring = _PointerRing(self.T, RING_SLOTS)
            self._ring.upload(self.ptrs, vals)
        else:
            self.ptrs.copy_(torch.from_numpy(np.array(vals, dtype=np.int64)))  # a writable copy
        self.last_ptrs = cur


_CACHE: "LRU[Plan]" = LRU(PLAN_CACHE_SIZE, "triton plans")


def clear_cache() -> None:
    _CACHE.clear()


def get_plan(dslice: DeviceSlice) -> Plan:
    """The cached plan of ``dslice``'s structure with this call's pointers in place
    (built on a miss; slices without a key are not cached)."""
    cfg = config()
    _CACHE.maxsize = max(int(PLAN_CACHE_SIZE), 1)
    k = dslice.key
    if k is None:
        plan = Plan(dslice, cfg)
    else:
        key = (k, dslice.device, dslice.num_groups, cfg)
        plan = _CACHE.get(key)
        if plan is None:
            plan = _CACHE.put(key, Plan(dslice, cfg))
    plan.set_pointers(dslice)
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


_COMPILED: "LRU[Any]" = LRU(256, "compiled triton kernels (direct launch)")


def _spec(a: Any) -> Any:
    """What Triton specialises a kernel argument on (so a compiled kernel is reused only
    for arguments it was compiled for): a tensor's dtype and 16-byte alignment; an int's
    being 1 and its divisibility by 16."""
    if isinstance(a, Tensor):
        return (a.dtype, a.data_ptr() % 16 == 0)
    if isinstance(a, bool):
        return ("b", a)
    if isinstance(a, int):
        return ("i", a == 1, a % 16 == 0)
    return type(a)


def _launch(kernel: Any, n: int, args: tuple, consts: dict, num_warps: int) -> None:
    """``kernel[(n,)](*args, **consts)``; with :data:`DIRECT`, the compiled kernel is cached
    by (constexprs, argument specialisation) and launched without re-binding."""
    if not DIRECT or INTERPRET:
        kernel[(n,)](*args, **consts, num_warps=num_warps)
        return
    key = (kernel, tuple(consts.items()), num_warps, tuple(map(_spec, args)))
    hit = _COMPILED.get(key)
    if hit is None:
        ck = kernel.warmup(*args, grid=(n,), **consts, num_warps=num_warps)
        ck._init_handles()
        order = [consts[a] for a in kernel.arg_names if a in consts]
        hit = _COMPILED.put(key, (ck, order))
    ck, order = hit
    stream = torch.cuda.current_stream().cuda_stream
    ck.run(n, 1, 1, stream, ck.function, ck.packed_metadata, None, None, None, *args, *order)


def _stats_pass(plan: Plan, ts: List[Tensor], code: int) -> None:
    for i, view in plan.copies:
        view.copy_(ts[i])
    for L in plan.stats_launches:
        _launch(K.grad_stats_chunks_kernel, L.n,
                (plan.ptrs, L.meta, plan.p_acc, plan.p_max, plan.p_nan, plan.p_inf),
                dict(DTYPE=L.dtype, NORM=code, BLOCK=L.block, ALIGNED=L.aligned),
                plan.num_warps)


def stats_layouts(G: int, T: int) -> Tuple[Layout, Layout]:
    """Named layouts of the two output buffers of ``grad_stats_finalize_kernel`` (float32,
    int64), in the order the kernel writes them."""
    f, i = Layout(), Layout()
    for name, n in (("norm", G), ("max_abs", G), ("acc", G), ("total_norm", 1),
                    ("clip_coef", 1), ("t_acc", T), ("t_norm", T)):
        f.add(name, n)
    for name, n in (("n_nan", G), ("n_inf", G), ("nonfinite", G), ("t_nan", T),
                    ("t_inf", T)):
        i.add(name, n)
    return f, i


def compute(dslice: DeviceSlice, norm_type: float, per_tensor: bool,
            max_norm: Optional[float] = None) -> Partials:
    """One statistics pass + one finalize launch (see :class:`TritonBackend.compute`)."""
    code = norm_code(norm_type)
    plan = get_plan(dslice)
    G = plan.G
    T = plan.T if per_tensor else 0
    dev = plan.device
    fl, il = stats_layouts(G, T)
    with _DeviceGuard(dev):
        _stats_pass(plan, dslice.tensors, code)
        # Fresh outputs every call: callers keep old statistics.
        outf = torch.empty(fl.size, dtype=torch.float32, device=dev)
        outi = torch.empty(il.size, dtype=torch.int64, device=dev)
        has_clip = max_norm is not None
        _launch(K.grad_stats_finalize_kernel, 1 + T,
                (plan.p_acc, plan.p_max, plan.p_nan, plan.p_inf, plan.gbounds, plan.tbounds,
                 outf, outi, G, T, float(max_norm) if has_clip else 0.0),
                dict(NORM=code, HAS_CLIP=has_clip, RBLOCK=plan.final_block), 4)
    f = {n: fl.view(outf, n) for n in fl.entries}
    i = {n: il.view(outi, n) for n in il.entries}
    final = FinalStats(norm=f["norm"], total_norm=f["total_norm"].view(()),
                       max_abs=f["max_abs"], nonfinite=i["nonfinite"],
                       per_tensor_norm=f["t_norm"] if per_tensor else None,
                       clip_coef=f["clip_coef"].view(()) if has_clip else None)
    return Partials(acc=f["acc"], max_abs=f["max_abs"], n_nan=i["n_nan"], n_inf=i["n_inf"],
                    t_acc=f["t_acc"] if per_tensor else None,
                    t_nan=i["t_nan"] if per_tensor else None,
                    t_inf=i["t_inf"] if per_tensor else None, final=final)


class StepOut:
    """Buffers written by :func:`compute_step` (layouts: the program's)."""

    __slots__ = ("outf", "outi", "nonfinite", "per_tensor_norm")

    def __init__(self, outf: Tensor, outi: Tensor, nonfinite: Tensor,
                 per_tensor_norm: Optional[Tensor]) -> None:
        self.outf, self.outi = outf, outi
        self.nonfinite, self.per_tensor_norm = nonfinite, per_tensor_norm


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def compute_step(dslice: DeviceSlice, norm_type: float, per_tensor: bool, prog: Any, *,
                 loss: Optional[Tensor], amp_scale: Optional[Tensor],
                 amp_found: Optional[Tensor], has_grads: Optional[Tensor]) -> StepOut:
    """The statistics pass + one finalize launch that also runs the decision program.

    ``prog`` is a :class:`gradstats.policies.program.Program` (read through its attributes:
    ``table``, ``params``, ``fstate``, ``istate``, ``out_layout``, ``op_codes``, ...).
    """
    code = norm_code(norm_type)
    plan = get_plan(dslice)
    G = plan.G
    T = plan.T if per_tensor else 0
    dev = plan.device
    lay = prog.out_layout
    ops = tuple(prog.op_codes) + (0,) * (6 - len(prog.op_codes))
    dummy = plan.p_max  # any float32 device tensor, for absent optional inputs
    with _DeviceGuard(dev):
        _stats_pass(plan, dslice.tensors, code)
        outf = torch.empty(max(lay.size, 1), dtype=torch.float32, device=dev)
        outi = torch.empty(1 + G, dtype=torch.int64, device=dev)
        stf = torch.empty(max(T, 1), dtype=torch.float32, device=dev)
        e = lay.entries
        _launch(K.step_finalize_kernel, 1 + T,
                (plan.p_acc, plan.p_max, plan.p_nan, plan.p_inf, plan.gbounds, plan.tbounds,
                 outf, outi, stf, outi[1:], prog.fstate, prog.istate, prog.table, prog.params,
                 dummy if loss is None else loss,
                 dummy if amp_scale is None else amp_scale,
                 dummy if amp_found is None else amp_found,
                 dummy if has_grads is None else has_grads,
                 G, T, 1.0 - prog.alpha,
                 e["norm"][0], e["total_norm"][0], e["max_abs"][0], e["clip_coef"][0],
                 e["grad_scale"][0], e["found_inf"][0], e["skipped"][0],
                 e["skipped_nonfinite"][0], e["skipped_spike"][0], e["nonfinite"][0],
                 e["clipped"][0], e["running"][0]),
                dict(NORM=code, RBLOCK=plan.final_block, BLOCK_G=_pow2(max(G, 1)),
                     HAS_LOSS=loss is not None, HAS_AMP_SCALE=amp_scale is not None,
                     HAS_AMP_FOUND=amp_found is not None, HAS_MASK=has_grads is not None,
                     EPILOGUE=bool(prog.fully_fused),
                     OP0=ops[0], OP1=ops[1], OP2=ops[2], OP3=ops[3], OP4=ops[4], OP5=ops[5],
                     QH=_pow2(max(prog.quantile_history, 1)),
                     SW=_pow2(max(prog.spike_window, 1))), 4)
    return StepOut(outf, outi[:1], outi[1:], stf[:T] if per_tensor else None)


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
            _launch(K.grad_scale_chunks_kernel, L.n, (plan.ptrs, L.meta, coef),
                    dict(DTYPE=L.dtype, BLOCK=L.block, ALIGNED=L.aligned,
                         PER_GROUP=per_group), plan.num_warps)
        if plan.torch_scaled:
            eff = coef.clamp(max=1.0)  # NaN stays NaN; >= 1 becomes exactly 1 (a no-op)
            ts = dslice.tensors
            for i, g in plan.torch_scaled:
                c = eff[g] if per_group else eff
                t = ts[i]
                if t.dtype == torch.float32:
                    t.mul_(c)
                else:  # in float32, rounded once (a 16-bit mul_ would round c first)
                    t.copy_(t.float() * c)
