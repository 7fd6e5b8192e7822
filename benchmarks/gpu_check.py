#!/usr/bin/env python
"""One script for a lent GPU: correctness of every backend, sync/graph checks, timings.

    python benchmarks/gpu_check.py                 # full run on a CUDA GPU (< 8 min on an H200)
    python benchmarks/gpu_check.py --quick         # fewer sets and cases (~2-3 min)
    python benchmarks/gpu_check.py --cpu-smoke     # no GPU: tiny shapes, Triton interpreter
    python benchmarks/gpu_check.py --out DIR       # results DIR/gpu_check.json and .md
                                                   # (default: $OUT when set)

Sections (each wrapped: a failure is recorded and the next section runs):

1. ``correctness``: every available backend (triton, native, torch) against
   ``gradstats.core.reference`` on fresh random data -- fp32/bf16/fp16, irregular and
   zero-size shapes, non-contiguous views, NaN/Inf injection, many tensors, mixed dtypes,
   per-group and per-tensor results, norm types 2/1/inf/3, bit-identical repeats, and
   ``get_total_norm``/``clip_grad_norm_`` against ``torch.nn.utils``.
   ``huge``: tensors over 2**31 elements (two bf16 tensors, >2**32 in one group; the CPU
   smoke run checks the same logic on 2**12-element tensors).
2. ``sync``: no host sync under ``torch.cuda.set_sync_debug_mode("error")`` for
   ``grad_stats``, ``get_total_norm``, ``clip_grad_norm_`` (GPU only).
3. ``graphs``: CUDA-graph capture and replay of ``clip_grad_norm_`` and ``grad_stats``
   give bit-identical results to eager, on data that clips and data that does not.
4. ``perf``: the the project's benchmark sets (benchmarks/shapes.py) sets; median time (CUDA events, L2 flushed before each
   call, as ``triton.testing.do_bench``), effective GB/s, % of the read ceiling measured
   in this run, speedups against each eager baseline, ratio to the one-read floor of the
   same bytes; and ``host``: host microseconds per call on tiny tensors (cached metadata).
5. ``sweep``: Triton CHUNK/BLOCK/NUM_WARPS (launcher attributes), when the launcher has them.
6. ``optimizer``: ``gradstats.StableOptimizer(AdamW(fused=True), max_norm=1.0).step()``
   vs the bare fused AdamW step, when ``StableOptimizer`` exists.

Effective GB/s counts the bytes the *task* needs: one read of the gradients (N) for
statistics, norms and a clip that does not scale; 3N (read, then read+write) for a clip
that scales. torch's ``clip_grad_norm_`` always scales, so it moves 3N even when the
coefficient is 1; the JSON records that as ``bytes_moved``.
The "clip" case of gradstats is timed with the gradients restored before every call,
outside the timed region (otherwise the repeated clipping converges to a norm at which no
clipping is needed and the scale pass is skipped).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
# the checkout's gradstats, also where it is not installed (e.g. on a lent GPU machine)
sys.path.insert(1, os.path.dirname(HERE))

# ------------------------------------------------------------------- mode, before gradstats

def _parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer sets and cases")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="run on CPU with tiny shapes and the Triton interpreter "
                         "(automatic when no CUDA device is present)")
    ap.add_argument("--out", default=None, help="directory (or .json path) for the results; "
                                                "default $OUT when set")
    ap.add_argument("--sections", default="all",
                    help="comma list of: correctness,huge,sync,graphs,perf,host,sweep,optimizer")
    ap.add_argument("--sets", default=None, help="comma list of perf sets (names in shapes.SETS)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds; optional work is skipped when little is left "
                         "(default 420 full, 200 quick, 90 cpu-smoke)")
    ap.add_argument("--seed", type=int, default=None, help="data seed (default: from the clock)")
    return ap.parse_args(argv)


ARGS = _parse()
CUDA = torch.cuda.is_available() and not ARGS.cpu_smoke
SMOKE = not CUDA
if SMOKE:
    # The Triton kernels read CPU tensors only under the interpreter, which must be chosen
    # before they are first loaded.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import baselines as B  # noqa: E402
import shapes as S  # noqa: E402

import gradstats  # noqa: E402
from gradstats.backends import registry as _dispatch  # noqa: E402
from gradstats.core import reference as R  # noqa: E402

DEV = torch.device("cuda" if CUDA else "cpu")
QUICK = ARGS.quick
BUDGET = ARGS.budget if ARGS.budget is not None else (90.0 if SMOKE else 200.0 if QUICK else 420.0)
T0 = time.perf_counter()
SEED = ARGS.seed if ARGS.seed is not None else int(time.time()) % 100000
SECTIONS = ("correctness", "huge", "sync", "graphs", "perf", "host", "sweep", "optimizer")
WANT = set(SECTIONS) if ARGS.sections == "all" else set(ARGS.sections.split(","))
TOL = 1e-5  # docs/architecture.md §4: relative error of every norm against float64
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
ALL_BACKENDS = ("triton", "native", "torch")

RESULTS: Dict[str, Any] = {"sections": {}}


def elapsed() -> float:
    return time.perf_counter() - T0


def remaining() -> float:
    return BUDGET - elapsed()


def log(*a) -> None:
    print(*a, flush=True)


def out_paths() -> Tuple[Optional[str], Optional[str]]:
    out = ARGS.out or os.environ.get("OUT")
    if not out:
        return None, None
    if out.endswith(".json"):
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        return out, out[:-5] + ".md"
    os.makedirs(out, exist_ok=True)
    return os.path.join(out, "gpu_check.json"), os.path.join(out, "gpu_check.md")


def save() -> None:
    """Write what we have (after every section: a killed run keeps its results)."""
    jpath, mpath = out_paths()
    if not jpath:
        return
    RESULTS["elapsed_s"] = round(elapsed(), 2)
    with open(jpath, "w") as f:
        json.dump(RESULTS, f, indent=1, default=str)
    with open(mpath, "w") as f:
        f.write("\n\n".join(MD) + "\n")


MD: List[str] = []


class _Skip(Exception):
    pass


def _skip(why: str):
    raise _Skip(why)


def run_section(name: str, fn: Callable[..., None], cuda_only: bool = False,
                min_left: float = 0.0) -> None:
    """Run ``fn(rec, skip)``; record ok / failed (with the traceback) / skipped, then save.

    A failure never stops the script: the next section runs.
    """
    rec: Dict[str, Any] = {"status": "running"}
    RESULTS["sections"][name] = rec
    t = time.perf_counter()
    log(f"\n## {name}  (t={elapsed():.0f}s)")
    try:
        if name not in WANT:
            _skip("not requested (--sections)")
        if cuda_only and not CUDA:
            _skip("needs a CUDA GPU (this run is the CPU smoke run)")
        if remaining() < min_left:
            _skip(f"time budget: {remaining():.0f}s left of {BUDGET:.0f}s")
        fn(rec, _skip)
        if rec["status"] == "running":
            rec["status"] = "ok"
    except _Skip as e:
        rec["status"] = "skipped"
        rec["note"] = str(e)
        log(f"  skipped: {e}")
    except Exception as e:  # record and carry on with the next section
        rec["status"] = "failed"
        rec["error"] = f"{type(e).__name__}: {e}"
        rec["traceback"] = traceback.format_exc()
        log(f"  SECTION FAILED: {type(e).__name__}: {e}")
        log(traceback.format_exc())
    finally:
        if CUDA:
            try:
                torch.cuda.set_sync_debug_mode(0)
                torch.cuda.synchronize()
            except Exception:
                pass
        rec["seconds"] = round(time.perf_counter() - t, 2)
        save()


@contextlib.contextmanager
def forced_backend(name: Optional[str]):
    """Force a backend for the drop-ins (they read ``GRADSTATS_BACKEND``)."""
    old = os.environ.get("GRADSTATS_BACKEND")
    if name is None:
        os.environ.pop("GRADSTATS_BACKEND", None)
    else:
        os.environ["GRADSTATS_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("GRADSTATS_BACKEND", None)
        else:
            os.environ["GRADSTATS_BACKEND"] = old


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def backends_here() -> List[str]:
    return [b for b in ALL_BACKENDS if _dispatch.unavailable_reason(b) is None]


def can_run(backend: str, groups: List[List[torch.Tensor]], p: float) -> Optional[str]:
    """None if ``backend`` handles these gradients, else its reasons."""
    from gradstats.core import grouping as _grouping
    slices, _ = _grouping.slices(groups)
    reasons = []
    for s in slices:
        reasons += _dispatch.reasons_for(backend, s, p)
    return "; ".join(reasons) if reasons else None


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        out.append("| " + " | ".join("" if v is None else str(v) for v in r) + " |")
    return "\n".join(out)


# =========================================================================== timing

class Bench:
    """Median time of a call: CUDA events with the L2 flushed before each call (the method of
    ``triton.testing.do_bench``), or ``perf_counter`` on CPU. ``setup`` runs before each call,
    outside the timed region."""

    def __init__(self, rep_ms: float, min_n: int, max_n: int):
        self.rep_ms, self.min_n, self.max_n = rep_ms, min_n, max_n
        self.flush = (torch.empty(256 * 2 ** 20 // 4, dtype=torch.int32, device=DEV)
                      if CUDA else None)

    def __call__(self, fn: Callable[[], Any], setup: Optional[Callable[[], Any]] = None,
                 warmup: int = 2) -> Dict[str, float]:
        if SMOKE:  # the interpreter is slow: one timed call is a smoke figure anyway
            return self._once(fn, setup)
        for _ in range(warmup):
            if setup:
                setup()
            fn()
        sync()
        t = time.perf_counter()
        for _ in range(2):
            if setup:
                setup()
            fn()
        sync()
        est_ms = max((time.perf_counter() - t) * 1e3 / 2, 1e-3)
        n = int(min(self.max_n, max(self.min_n, self.rep_ms / est_ms)))
        times = []
        if CUDA:
            ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(n)]
            for s, e in ev:
                if setup:
                    setup()
                self.flush.zero_()
                s.record()
                fn()
                e.record()
            torch.cuda.synchronize()
            times = [s.elapsed_time(e) * 1e3 for s, e in ev]
        else:
            for _ in range(n):
                if setup:
                    setup()
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e6)
        return self._summary(times)

    def _once(self, fn, setup) -> Dict[str, float]:
        if setup:
            setup()
        t = time.perf_counter()
        fn()
        return self._summary([(time.perf_counter() - t) * 1e6])

    @staticmethod
    def _summary(times: List[float]) -> Dict[str, float]:
        n = len(times)
        return {"us": statistics.median(times), "min_us": min(times), "n": n,
                "spread": (statistics.quantiles(times, n=5)[3] - statistics.quantiles(times, n=5)[0])
                / statistics.median(times) if n >= 5 else None}


BENCH = Bench(rep_ms=(60 if QUICK else 150), min_n=5, max_n=400)


# =========================================================================== flat-read floor

_FLAT_KERNEL = None


def _flat_kernel():
    """A flat sum-of-squares read in Triton (one block per program, fp32 partials)."""
    global _FLAT_KERNEL
    if _FLAT_KERNEL is None:
        import triton
        import triton.language as tl

        @triton.jit
        def flat_sumsq(x_ptr, part_ptr, n, BLOCK: tl.constexpr):
            # bytes: reads n * elsize once, writes 4 bytes per program
            pid = tl.program_id(0)
            offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            if (pid.to(tl.int64) + 1) * BLOCK <= n:
                x = tl.load(x_ptr + offs).to(tl.float32)
            else:
                x = tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
            tl.store(part_ptr + pid, tl.sum(x * x, axis=0))

        _FLAT_KERNEL = flat_sumsq
    return _FLAT_KERNEL


def triton_flat_read(flat: torch.Tensor, block: int = 4096, num_warps: int = 8):
    """Callable doing one flat Triton read of ``flat`` (sum of squares) -- the read floor."""
    k = _flat_kernel()
    n = flat.numel()
    grid = (max(1, -(-n // block)),)
    part = torch.empty(grid[0], dtype=torch.float32, device=flat.device)

    def run():
        k[grid](flat, part, n, BLOCK=block, num_warps=num_warps)
        return part.sum()
    return run


def triton_ok() -> Optional[str]:
    try:
        import triton
        import triton.language
        del triton
        return None
    except Exception as e:
        return f"{type(e).__name__}: {e}"


FLAT_CFGS = [(2048, 8), (4096, 8), (8192, 16)] if CUDA else [(8192, 4)]
BEST_FLAT = {"block": FLAT_CFGS[0][0], "num_warps": FLAT_CFGS[0][1]}
CEILING: Dict[str, float] = {}  # name -> GB/s


# =========================================================================== correctness

def _rand(shape, dtype, gen, magnitude: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=gen, device=DEV) * magnitude).to(dtype)


def _noncontig(kind: int, dtype, gen) -> torch.Tensor:
    if kind == 0:
        return _rand((67, 129), dtype, gen).t()                    # transposed
    if kind == 1:
        return _rand((2 * 1001,), dtype, gen)[::2]                 # strided 1-D
    if kind == 2:
        return _rand((5, 7, 33), dtype, gen).permute(2, 0, 1)      # permuted 3-D
    return _rand((31, 70), dtype, gen)[:, 3:67]                    # row gaps


def make_case(kind: str, dtype, gen) -> List[List[torch.Tensor]]:
    """Gradients of one correctness case, as groups (group 0: >=2-D, group 1: 1-D)."""
    mags = lambda: float(10 ** (torch.rand((), generator=gen, device=DEV).item() * 3 - 2))  # noqa: E731
    if kind == "irregular":
        shapes = [(1,), (7,), (33, 65), (1000,), (4097,), (3, 5, 7), (1, 1), (2049, 3),
                  (16, 16)]
        if not SMOKE:
            shapes += [(129, 257), (65537,), (12345,), (1025, 1031), (300001,)]
    elif kind == "zero-size":
        shapes = [(0,), (5,), (0, 7), (33, 3), (0,), (2, 0, 3)]
    elif kind == "noncontig":
        g0 = [_noncontig(k, dtype, gen) for k in (0, 2, 3)] + [_rand((40, 41), dtype, gen)]
        g1 = [_noncontig(1, dtype, gen), _rand((77,), dtype, gen)]
        return [g0, g1]
    elif kind == "nan-inf":
        g0 = [_rand((64, 33), dtype, gen), _rand((1000, 3), dtype, gen), _rand((5, 5), dtype, gen)]
        g1 = [_rand((999,), dtype, gen), _rand((4099,), dtype, gen), _rand((8,), dtype, gen)]
        g0[0].view(-1)[17] = float("nan")
        g0[1].view(-1)[2999] = float("inf")
        g0[1].view(-1)[5] = float("nan")
        g1[1].view(-1)[4098] = float("inf")
        g1[1].view(-1)[0] = float("-inf")
        g1[0].view(-1)[100] = 1e4 if dtype != torch.float16 else 6e4  # finite max
        return [g0, g1, [_rand((3, 3), dtype, gen)]]  # third group: finite
    elif kind == "many":
        n = 60 if SMOKE else 3000
        sizes = torch.randint(0, 3000 if not SMOKE else 200, (n,), generator=gen,
                              device=DEV).tolist()
        shapes = [((s,) if i % 2 else (max(1, s // 8), 8)) for i, s in enumerate(sizes)]
    elif kind == "mixed-dtype":
        others = [d for d in DTYPES if d != dtype]
        g0 = [_rand((100, 37), dtype, gen), _rand((64, 64), others[0], gen),
              _rand((3, 1000), others[1], gen)]
        g1 = [_rand((513,), others[0], gen), _rand((2048,), dtype, gen)]
        return [g0, g1]
    elif kind == "one-group":
        return [[_rand((257, 129), dtype, gen, mags()), _rand((7,), dtype, gen)]]
    else:
        raise ValueError(kind)
    groups: List[List[torch.Tensor]] = [[], []]
    for s in shapes:
        groups[0 if len(s) >= 2 else 1].append(_rand(s, dtype, gen, mags()))
    return groups


def _param_groups(groups):
    return S.param_groups(S.params_for(groups))


def check_stats(st, ref: R.RefStats, per_tensor: bool) -> Dict[str, Any]:
    errs = {
        "norm": R.rel_err(st.norm, ref.norm),
        "total_norm": R.rel_err(st.total_norm, ref.total_norm),
    }
    if per_tensor:
        errs["per_tensor_norm"] = (R.rel_err(st.per_tensor_norm, ref.per_tensor_norm)
                                   if st.per_tensor_norm is not None else math.inf)
    ok = all(v <= TOL for v in errs.values())
    flags = {
        "max_abs": R.max_abs_ok(st.max_abs, ref.max_abs),
        "nonfinite": torch.equal(st.nonfinite.cpu(), ref.nonfinite),
        "numel": torch.equal(st.numel.cpu(), ref.numel),
        "float32": st.norm.dtype == torch.float32 and st.total_norm.dtype == torch.float32,
        "device": st.norm.device.type == DEV.type,
    }
    ok = ok and all(flags.values())
    bad = [k for k, v in flags.items() if not v] + [k for k, v in errs.items() if v > TOL]
    return {"ok": ok, "max_rel_err": max(errs.values()), "bad": bad}


def check_clip(backend: str, groups, dtype, gen) -> Dict[str, Any]:
    """get_total_norm and clip_grad_norm_ (clip and no clip) vs torch.nn.utils and the spec."""
    flat = [g for gs in groups for g in gs]
    finite = all(bool(torch.isfinite(g).all()) for g in flat)
    ref = R.ref_grad_stats([flat])
    res: Dict[str, Any] = {"ok": True, "bad": []}
    with forced_backend(backend):
        t = gradstats.get_total_norm(flat)
        e = R.rel_err(t, ref.total_norm)
        if e > TOL:
            res["ok"] = False
            res["bad"].append(f"get_total_norm rel err {e:.2e}")
        tn = float(ref.total_norm)
        cases = [("clip", 0.5 * tn if math.isfinite(tn) and tn > 0 else 1.0)]
        if finite:
            cases.append(("no clip", 2.0 * tn + 1.0))
        for name, max_norm in cases:
            ps = S.params_for([[g.clone() for g in flat]])[0]
            tp = S.params_for([[g.clone() for g in flat]])[0]
            total = gradstats.clip_grad_norm_(ps, max_norm)
            torch.nn.utils.clip_grad_norm_(tp, max_norm)  # for the NaN pattern below
            e = R.rel_err(total, ref.total_norm)
            if e > TOL:
                res["ok"] = False
                res["bad"].append(f"clip_grad_norm_ ({name}) norm rel err {e:.2e}")
            coef = torch.clamp(max_norm / (total.float() + 1e-6), max=1.0)
            for i, (p, q, g0) in enumerate(zip(ps, tp, flat)):
                if name == "no clip":
                    if not torch.equal(p.grad, g0):
                        res["ok"] = False
                        res["bad"].append(f"no clip: grad {i} changed")
                        break
                    continue
                want = (g0.float() * coef).to(g0.dtype)
                eps = torch.finfo(g0.dtype).eps
                try:
                    torch.testing.assert_close(p.grad, want, rtol=eps, atol=0.0, equal_nan=True)
                    # same NaN pattern as torch's own clip (NaN/Inf gradients)
                    if not torch.equal(p.grad.isnan(), q.grad.isnan()):
                        raise AssertionError("NaN pattern differs from torch.nn.utils")
                except AssertionError as ex:
                    res["ok"] = False
                    res["bad"].append(f"clip: grad {i}: {str(ex).splitlines()[0]}")
                    break
    return res


def run_correctness(rec) -> None:
    bks = backends_here()
    rec["backends"] = {b: _dispatch.unavailable_reason(b) for b in ALL_BACKENDS}
    for b in ALL_BACKENDS:
        if b not in bks:
            log(f"  backend {b}: unavailable ({rec['backends'][b]})")
    kinds = ["irregular", "zero-size", "noncontig", "nan-inf", "many", "mixed-dtype", "one-group"]
    norms = [2.0, 1.0, math.inf, 3.0]
    gen = torch.Generator(device=DEV).manual_seed(SEED)
    checks: List[Dict[str, Any]] = []
    rec["checks"] = checks
    for ki, kind in enumerate(kinds):
        for dtype in DTYPES:
            groups = make_case(kind, dtype, gen)
            pg = _param_groups(groups)
            # CPU smoke: the Triton interpreter checks one dtype per case (rotating)
            bk = [b for b in bks if not (SMOKE and b == "triton" and dtype != DTYPES[ki % 3])]
            for p in (norms if kind not in ("many",) else [2.0, math.inf]):
                ref = R.ref_grad_stats(groups, p)
                for b in bk:
                    if SMOKE and b == "triton" and p != 2.0 and kind not in ("irregular",
                                                                             "nan-inf"):
                        continue
                    why = can_run(b, groups, p)
                    row = {"kind": kind, "dtype": DT[dtype], "p": p, "backend": b}
                    if why:
                        row.update(ok=None, note=f"unsupported: {why}")
                        checks.append(row)
                        continue
                    try:
                        per_tensor = p in (2.0, math.inf) or kind == "irregular"
                        st = gradstats.grad_stats(pg, norm_type=p, per_tensor=per_tensor,
                                                  backend=b)
                        row.update(check_stats(st, ref, per_tensor))
                        st2 = gradstats.grad_stats(pg, norm_type=p, per_tensor=per_tensor,
                                                   backend=b)
                        same = (torch.equal(st.norm, st2.norm) or
                                (st.norm.isnan().equal(st2.norm.isnan()) and
                                 torch.equal(st.norm.nan_to_num(), st2.norm.nan_to_num())))
                        if not same:
                            row["ok"] = False
                            row["bad"].append("not bit-identical on repeat")
                        if p == 2.0 and kind != "many":
                            c = check_clip(b, groups, dtype, gen)
                            if not c["ok"]:
                                row["ok"] = False
                                row["bad"] += c["bad"]
                    except Exception as e:
                        row.update(ok=False, bad=[f"{type(e).__name__}: {e}"])
                    checks.append(row)
            del groups, pg
    # summary: backend x kind
    rows = []
    for b in bks:
        r = [b]
        for kind in kinds:
            cs = [c for c in checks if c["backend"] == b and c["kind"] == kind]
            good = sum(1 for c in cs if c["ok"])
            uns = sum(1 for c in cs if c["ok"] is None)
            r.append(f"{good}/{len(cs) - uns}" + (f" (+{uns} unsupp.)" if uns else ""))
        errs = [c["max_rel_err"] for c in checks if c["backend"] == b and c.get("max_rel_err")
                is not None and math.isfinite(c["max_rel_err"])]
        r.append(f"{max(errs):.1e}" if errs else "-")
        rows.append(r)
    table = md_table(["backend"] + kinds + ["max rel err"], rows)
    fails = [c for c in checks if c["ok"] is False]
    rec["failures"] = len(fails)
    log(table)
    for c in fails[:25]:
        log(f"  FAIL {c['backend']} {c['kind']} {c['dtype']} p={c['p']}: {c.get('bad')}")
    MD.append(f"### Correctness vs gradstats.core.reference (seed {SEED}; passed/checked)\n\n" + table)
    if fails:
        rec["status"] = "failed"
        rec["error"] = f"{len(fails)} correctness checks failed"


def _chunked_ref(ts: Sequence[torch.Tensor]) -> Dict[str, float]:
    """float64 sum of squares, max |x| (finite), non-finite count, over big tensors on GPU."""
    ss, mx, nf = 0.0, 0.0, 0
    for t in ts:
        for c in t.view(-1).split(2 ** 27):
            d = c.double()
            fin = torch.isfinite(d)
            ss += float(torch.where(fin, d, 0.0).square().sum())
            nf += int((~fin).sum())
            if bool(fin.any()):
                mx = max(mx, float(torch.where(fin, d.abs(), 0.0).max()))
    return {"sumsq": ss, "max": mx, "nonfinite": nf}


def run_huge(rec) -> None:
    """Tensors over 2**31 elements (and a group over 2**32): int64 indexing everywhere.

    The CPU smoke run does the same with 2**12-element tensors (the logic, not the size).
    """
    big = 2 ** 12 if SMOKE else 2 ** 31
    n1, n2 = big + 1031, big + 5
    gen = torch.Generator(device=DEV).manual_seed(SEED + 7)
    xs = []
    for n in (n1, n2):
        x = torch.empty(n, dtype=torch.bfloat16, device=DEV)
        for c in x.split(2 ** 28):
            c.copy_(torch.randn(c.numel(), generator=gen, device=DEV))
        xs.append(x)
    small = torch.randn(300, 7, generator=gen, device=DEV).to(torch.bfloat16)
    xs[0][big + 17] = 100.0          # the unique max, beyond 2**31
    xs[1][big + 2] = -99.0
    groups = [[small], xs]           # group 1 holds > 2**32 elements
    ref1 = _chunked_ref(xs)
    ref0 = _chunked_ref([small])
    backup = [t.clone() for t in xs + [small]]  # each backend starts from the same data
    pg = _param_groups(groups)
    rows, checks = [], []
    for b in backends_here():
        why = can_run(b, groups, 2.0)
        if why:
            rows.append([b, "unsupported", why, "", "", ""])
            continue
        st = gradstats.grad_stats(pg, backend=b)
        d = st.to_dict()
        e1 = abs(d["norm"][1] - math.sqrt(ref1["sumsq"])) / math.sqrt(ref1["sumsq"])
        e0 = abs(d["norm"][0] - math.sqrt(ref0["sumsq"])) / math.sqrt(ref0["sumsq"])
        ok = (e1 <= TOL and e0 <= TOL and d["max_abs"][1] == 100.0
              and d["numel"][1] == n1 + n2 and d["nonfinite"] == [0, 0])
        # a non-finite value near the end of the second tensor
        saved = xs[1][-3].clone()
        xs[1][-3] = float("inf")
        d2 = gradstats.grad_stats(pg, backend=b).to_dict()
        xs[1][-3] = saved
        ok2 = d2["nonfinite"] == [0, 1] and d2["norm"][1] == math.inf and d2["max_abs"][1] == 100.0
        # clip the far end: elements beyond 2**31 must be scaled
        tail = xs[0][-5:].float().clone()
        with forced_backend(b):
            total = gradstats.clip_grad_norm_([p for gs in pg for p in gs["params"]],
                                              0.5 * math.sqrt(ref1["sumsq"] + ref0["sumsq"]))
        coef = torch.clamp(0.5 * math.sqrt(ref1["sumsq"] + ref0["sumsq"]) / (total + 1e-6),
                           max=1.0)
        want = (tail * coef).to(torch.bfloat16).float()
        # within one bf16 ulp (the coefficient may differ from this formula in its last bit)
        ok3 = bool(((xs[0][-5:].float() - want).abs() <= want.abs() * 2 ** -7).all())
        torch._foreach_copy_(xs + [small], backup)
        checks.append({"backend": b, "ok": ok and ok2 and ok3, "rel_err": max(e0, e1),
                       "max_abs": d["max_abs"][1], "inf_count": d2["nonfinite"],
                       "tail_scaled": ok3})
        rows.append([b, "ok" if ok and ok2 and ok3 else "FAIL", f"{max(e0, e1):.1e}",
                     d["max_abs"][1], d2["nonfinite"], "yes" if ok3 else "NO"])
    rec["checks"] = checks
    table = md_table(["backend", "result", "rel err", "max_abs (100 at 2^31+17)",
                      "nonfinite after Inf at end", "tail beyond 2^31 clipped"], rows)
    log(table)
    MD.append(f"### Tensors over 2^31 elements (bf16, {n1} + {n2} elements in one group)"
              + (" -- CPU smoke: scaled down to 2^12" if SMOKE else "") + "\n\n"
              + table)
    if any(not c["ok"] for c in checks):
        rec["status"] = "failed"
        rec["error"] = "huge-tensor check failed"
    del xs, groups, pg, backup
    if CUDA:
        torch.cuda.empty_cache()


# =========================================================================== sync + graphs

def _small_model_groups(dtype, seed):
    specs = S.gpt2_124m(scale=1 / 8)
    groups = S.build(specs, DEV, dtype, seed=seed)
    return groups, S.params_for(groups)


def run_sync(rec) -> None:
    rows, checks = [], []
    for dtype in (torch.float32, torch.bfloat16):
        groups, params = _small_model_groups(dtype, SEED + 1)
        pg = S.param_groups(params)
        flat_p = [p for ps in params for p in ps]
        flat_g = [g for gs in groups for g in gs]
        total = float(gradstats.get_total_norm(flat_g))
        total_t = torch.tensor(total, device=DEV)  # made here: an H2D copy syncs
        for b in backends_here():
            if can_run(b, groups, 2.0):
                continue
            calls = {
                "grad_stats": lambda: gradstats.grad_stats(pg, backend=b),
                "grad_stats(per_tensor)": lambda: gradstats.grad_stats(pg, per_tensor=True,
                                                                       backend=b),
                "get_total_norm": lambda: gradstats.get_total_norm(flat_g),
                "clip_grad_norm_ (no clip)": lambda: gradstats.clip_grad_norm_(flat_p, 1e9),
                "clip_grad_norm_ (clip)": lambda: gradstats.clip_grad_norm_(flat_p,
                                                                            0.5 * total),
                "clip_grads_with_norm_": lambda: gradstats.clip_grads_with_norm_(
                    flat_p, 0.5 * total, total_t),
            }
            with forced_backend(b):
                for name, fn in calls.items():
                    # first call: plans are built (informational: count syncs in "warn" mode)
                    with warnings.catch_warnings(record=True) as w:
                        warnings.simplefilter("always")
                        torch.cuda.set_sync_debug_mode("warn")
                        try:
                            fn()
                        finally:
                            torch.cuda.set_sync_debug_mode(0)
                    first = sum(1 for x in w if "synchroniz" in str(x.message).lower())
                    fn()
                    torch.cuda.synchronize()
                    err = None
                    torch.cuda.set_sync_debug_mode("error")
                    try:
                        for _ in range(3):
                            fn()
                    except Exception as e:
                        err = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                    finally:
                        torch.cuda.set_sync_debug_mode(0)
                    torch.cuda.synchronize()
                    checks.append({"backend": b, "dtype": DT[dtype], "call": name,
                                   "ok": err is None, "error": err, "first_call_syncs": first})
                    rows.append([b, DT[dtype], name, "0 (ok)" if err is None else f"SYNC: {err}",
                                 first])
        del groups, params
    rec["checks"] = checks
    table = md_table(["backend", "dtype", "call", "host syncs (steady state, mode=error)",
                      "syncs on first call (plan build)"], rows)
    log(table)
    MD.append("### Host syncs under torch.cuda.set_sync_debug_mode('error')\n\n" + table)
    if any(not c["ok"] for c in checks):
        rec["status"] = "failed"
        rec["error"] = "host syncs found"


def run_graphs(rec) -> None:
    rows, checks = [], []
    for dtype in (torch.float32, torch.bfloat16):
        groups, params = _small_model_groups(dtype, SEED + 2)
        flat_p = [p for ps in params for p in ps]
        grads = [p.grad for p in flat_p]
        data_clip = [g.clone() for g in grads]
        total = float(R.ref_grad_stats([data_clip]).total_norm)
        max_norm = 0.5 * total
        data_noclip = [g * 0.25 for g in data_clip]            # norm 0.25*total < max_norm
        data_nan = [g.clone() for g in data_clip]
        data_nan[3].view(-1)[0] = float("nan")
        data_nan[-1].view(-1)[-1] = float("inf")

        def load(data):
            torch._foreach_copy_(grads, data)

        pg = S.param_groups(params)
        for b in backends_here():
            if can_run(b, groups, 2.0):
                continue
            for what in ("clip_grad_norm_", "grad_stats"):
                try:
                    with forced_backend(b):
                        if what == "clip_grad_norm_":
                            fn = lambda: gradstats.clip_grad_norm_(flat_p, max_norm)  # noqa: E731
                        else:
                            fn = lambda: gradstats.grad_stats(pg, per_tensor=True, backend=b)  # noqa: E731
                        s = torch.cuda.Stream()
                        s.wait_stream(torch.cuda.current_stream())
                        with torch.cuda.stream(s):
                            for _ in range(3):
                                load(data_clip)
                                fn()
                        torch.cuda.current_stream().wait_stream(s)
                        load(data_clip)
                        g = torch.cuda.CUDAGraph()
                        with torch.cuda.graph(g):
                            out = fn()
                        for dname, data in (("clips", data_clip), ("no clip", data_noclip),
                                            ("NaN/Inf", data_nan)):
                            load(data)
                            g.replay()
                            torch.cuda.synchronize()
                            if what == "clip_grad_norm_":
                                got = [out.clone()] + [x.clone() for x in grads]
                            else:
                                got = [out.norm.clone(), out.max_abs.clone(),
                                       out.nonfinite.clone(), out.per_tensor_norm.clone()]
                            load(data)
                            e = fn()
                            if what == "clip_grad_norm_":
                                want = [e] + list(grads)
                            else:
                                want = [e.norm, e.max_abs, e.nonfinite, e.per_tensor_norm]
                            same = all(torch.equal(x.nan_to_num(), y.nan_to_num()) and
                                       torch.equal(x.isnan(), y.isnan()) for x, y in zip(got, want))
                            checks.append({"backend": b, "dtype": DT[dtype], "call": what,
                                           "data": dname, "ok": same})
                            rows.append([b, DT[dtype], what, dname,
                                         "identical" if same else "DIFFERENT"])
                except Exception as ex:
                    msg = f"{type(ex).__name__}: {str(ex).splitlines()[0][:200]}"
                    checks.append({"backend": b, "dtype": DT[dtype], "call": what, "ok": False,
                                   "error": msg})
                    rows.append([b, DT[dtype], what, "-", f"CAPTURE FAILED: {msg}"])
        del groups, params
    rec["checks"] = checks
    table = md_table(["backend", "dtype", "captured call", "replayed on", "graph vs eager"], rows)
    log(table)
    MD.append("### CUDA graph capture and replay\n\n" + table)
    if any(not c["ok"] for c in checks):
        rec["status"] = "failed"
        rec["error"] = "graph replay differs or capture failed"


# =========================================================================== perf

def perf_sets() -> List[Tuple[str, torch.dtype, float]]:
    """(set name, dtype, scale) to time."""
    if SMOKE:
        return [("gpt2-124M", torch.float32, 1 / 1024), ("small-2000", torch.float32, 1 / 2048)]
    full = [("gpt2-124M", torch.float32, 1.0), ("llama-3.2-1B", torch.bfloat16, 1.0),
            ("llama-3.2-1B", torch.float32, 1.0), ("small-2000", torch.float32, 1.0),
            ("resnet50", torch.float32, 1.0), ("llama-3-8B", torch.bfloat16, 1.0),
            ("huge-2^31", torch.bfloat16, 1.0)]
    if QUICK:
        full = full[:4]
    if ARGS.sets:
        want = ARGS.sets.split(",")
        full = [x for x in full if x[0] in want]
    return full


def measure_ceiling(rec) -> None:
    """Read ceiling (flat Triton sum of squares), torch flat sum, and device copy."""
    nbytes = (2 * 2 ** 30) if CUDA else 2 ** 20
    rows = []
    flat = B.make_flat(nbytes, torch.float32, DEV, seed=SEED)
    if triton_ok() is None:
        best = 0.0
        for blk, w in FLAT_CFGS:
            t = BENCH(triton_flat_read(flat, blk, w))
            gbs = nbytes / t["us"] / 1e3
            rows.append([f"triton flat sumsq read B{blk} w{w}", f"{t['us']:.1f}", f"{gbs:.0f}"])
            if gbs > best:
                best = gbs
                BEST_FLAT.update(block=blk, num_warps=w)
        if CUDA:  # under the interpreter the Triton read is no ceiling
            CEILING["read"] = best
    t = BENCH(lambda: B.flat_read(flat))
    CEILING["torch_sum"] = nbytes / t["us"] / 1e3
    rows.append(["torch flat.sum()", f"{t['us']:.1f}", f"{CEILING['torch_sum']:.0f}"])
    dst = torch.empty_like(flat)
    t = BENCH(lambda: B.flat_copy(flat, dst))
    CEILING["copy"] = 2 * nbytes / t["us"] / 1e3
    rows.append(["copy (read+write)", f"{t['us']:.1f}", f"{CEILING['copy']:.0f}"])
    CEILING.setdefault("read", CEILING["torch_sum"])
    del flat, dst
    rec["ceiling_GBps"] = dict(CEILING)
    rec["ceiling_rows"] = rows
    table = md_table([f"ceiling ({nbytes / 2 ** 30:.2f} GiB fp32)", "us", "GB/s"], rows)
    log(table)
    MD.append("### Bandwidth ceilings measured in this run\n\n" + table)


class _Rows:
    def __init__(self, set_label: str, nbytes: int):
        self.label, self.N = set_label, nbytes
        self.rows: List[Dict[str, Any]] = []

    def add(self, method: str, t: Dict[str, float], task_bytes: int, moved: int,
            kind: str, rel_err: Optional[float] = None) -> Dict[str, Any]:
        r = {"set": self.label, "method": method, "kind": kind, "us": t["us"],
             "min_us": t["min_us"], "n": t["n"], "spread": t.get("spread"),
             "task_bytes": task_bytes, "bytes_moved": moved,
             "GBps": task_bytes / t["us"] / 1e3, "rel_err": rel_err}
        self.rows.append(r)
        log(f"  {self.label:24s} {method:44s} {t['us']:10.1f} us {r['GBps']:7.0f} GB/s")
        return r


def _gpu_ref_norms(groups) -> List[float]:
    """Per-group L2 norms in float64 on the device (chunked; for the rel-err column)."""
    out = []
    for gs in groups:
        ss = 0.0
        for g in gs:
            for c in g.reshape(-1).split(2 ** 27):
                ss += float(c.double().square().sum())
        out.append(math.sqrt(ss))
    return out


def time_set(name: str, dtype: torch.dtype, scale: float) -> List[Dict[str, Any]]:
    specs = S.get(name, scale)
    label = f"{name} {DT[dtype]}" + (f" x1/{round(1 / scale)}" if scale != 1.0 else "")
    groups = S.build(specs, DEV, dtype, seed=SEED + 3)
    params = S.params_for(groups)
    pg = S.param_groups(params)
    flat_p = [p for ps in params for p in ps]
    flat_g = [g for gs in groups for g in gs]
    N = S.nbytes(specs, dtype)
    log(f"--- {S.describe(label, specs, dtype)}")
    R_ = _Rows(label, N)
    ref = _gpu_ref_norms(groups)
    ref_total = math.sqrt(sum(x * x for x in ref))
    backup = [g.clone() for g in flat_g]
    restore = lambda: torch._foreach_copy_(flat_g, backup)  # noqa: E731
    max_clip = 0.5 * ref_total
    NOCLIP = 1e30

    # floors: one read of the same bytes
    flat = B.make_flat(N, dtype, DEV, seed=SEED + 4)
    if triton_ok() is None and CUDA:
        R_.add("floor: flat Triton read", BENCH(triton_flat_read(flat, **BEST_FLAT)), N, N,
               "floor")
    R_.add("floor: flat.sum() (torch)", BENCH(lambda: B.flat_read(flat)), N, N, "floor")
    del flat

    # baselines
    R_.add("torch clip_grad_norm_ foreach (no clip)",
           BENCH(lambda: B.clip_foreach(flat_p, NOCLIP)), N, 3 * N, "clip-noclip-base")
    R_.add("torch clip_grad_norm_ foreach (clip)",
           BENCH(lambda: B.clip_foreach(flat_p, max_clip), setup=restore), 3 * N, 3 * N,
           "clip-base")
    if not (QUICK and len(flat_g) > 1000):
        R_.add("torch clip_grad_norm_ for-loop (no clip)",
               BENCH(lambda: B.clip_loop(flat_p, NOCLIP)), N, 3 * N, "clip-noclip-loop")
    restore()
    R_.add("torch._foreach_norm", BENCH(lambda: B.foreach_norm(flat_g)), N, N, "norm-base")
    R_.add("eager per-group L2+maxabs+nonfinite", BENCH(lambda: B.eager_group_stats(groups)),
           N, 3 * N, "stats-base")

    # gradstats, per backend
    for b in backends_here():
        why = can_run(b, groups, 2.0)
        if SMOKE and b == "triton" and len(flat_g) > 500:
            log(f"  {b}: not timed in the CPU smoke run on {len(flat_g)} tensors (the "
                "interpreter takes ~5 ms per chunk)")
            continue
        if why:
            log(f"  {b}: unsupported here ({why})")
            continue
        st = gradstats.grad_stats(pg, backend=b)
        err = max(abs(float(x) - y) / y for x, y in zip(st.norm.tolist(), ref) if y > 0)
        R_.add(f"gradstats grad_stats [{b}]",
               BENCH(lambda: gradstats.grad_stats(pg, backend=b)), N, N, "stats", err)
        with forced_backend(b):
            R_.add(f"gradstats get_total_norm [{b}]",
                   BENCH(lambda: gradstats.get_total_norm(flat_g)), N, N, "norm")
            R_.add(f"gradstats clip_grad_norm_ (no clip) [{b}]",
                   BENCH(lambda: gradstats.clip_grad_norm_(flat_p, NOCLIP)), N, N, "clip-noclip")
            R_.add(f"gradstats clip_grad_norm_ (clip) [{b}]",
                   BENCH(lambda: gradstats.clip_grad_norm_(flat_p, max_clip), setup=restore),
                   3 * N, 3 * N, "clip")
        restore()
    del groups, params, pg, flat_p, flat_g, backup
    if CUDA:
        torch.cuda.empty_cache()
    return _derive(R_.rows)


def _derive(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Add % of the read ceiling, the floor ratio and speedups against the baselines."""
    by = {r["kind"]: r for r in rows if r["kind"].endswith("base") or r["kind"] == "floor"}
    floor = min((r["us"] for r in rows if r["kind"] == "floor"), default=None)
    ceil = CEILING.get("read")
    for r in rows:
        r["pct_ceiling"] = 100.0 * r["GBps"] / ceil if ceil else None
        r["x_floor"] = r["us"] / floor if floor else None
        clip_base = by.get("clip-base" if r["kind"] in ("clip", "clip-base") else "clip-noclip-base")
        r["vs_clip_foreach"] = clip_base["us"] / r["us"] if clip_base else None
        r["vs_foreach_norm"] = by["norm-base"]["us"] / r["us"] if "norm-base" in by else None
        r["vs_eager_stats"] = by["stats-base"]["us"] / r["us"] if "stats-base" in by else None
    return rows


def perf_table(rows: List[Dict[str, Any]]) -> str:
    f = lambda v, fmt: "" if v is None else format(v, fmt)  # noqa: E731
    out = []
    for r in rows:
        out.append([r["set"], r["method"], f(r["us"], ".1f"), f(r["GBps"], ".0f"),
                    f(r["pct_ceiling"], ".0f"), f(r["x_floor"], ".2f"),
                    f(r["vs_clip_foreach"], ".2f"), f(r["vs_foreach_norm"], ".2f"),
                    f(r["vs_eager_stats"], ".2f"),
                    "" if r["rel_err"] is None else f"{r['rel_err']:.1e}"])
    return md_table(["set", "method", "median us", "eff. GB/s", "% read ceil.", "x floor",
                     "speedup vs torch clip foreach", "vs _foreach_norm", "vs eager stats",
                     "rel err"], out)


_MATCH = {"stats": ("stats-base", "eager stats"), "norm": ("norm-base", "_foreach_norm"),
          "clip": ("clip-base", "torch clip foreach"),
          "clip-noclip": ("clip-noclip-base", "torch clip foreach")}


def compact_table(rows: List[Dict[str, Any]]) -> str:
    """Key rows only (best floor, baselines, the first fused backend), one speedup each."""
    out = []
    sets = list(dict.fromkeys(r["set"] for r in rows))
    for s_ in sets:
        rs = [r for r in rows if r["set"] == s_]
        fused = next((b for b in ("triton", "native") if any(f"[{b}]" in r["method"] for r in rs)),
                     "torch")
        base = {r["kind"]: r for r in rs if r["kind"].endswith("base")}
        floor = min((r for r in rs if r["kind"] == "floor"), key=lambda r: r["us"], default=None)
        keep = ([floor] if floor else []) + [
            r for r in rs if r["kind"] in ("clip-noclip-base", "clip-base", "norm-base",
                                           "stats-base") or f"[{fused}]" in r["method"]]
        for r in keep:
            m = _MATCH.get(r["kind"])
            sp = ""
            if m and m[0] in base:
                sp = f"{base[m[0]]['us'] / r['us']:.2f}x vs {m[1]}"
            out.append([s_, r["method"], f"{r['us']:.1f}", f"{r['GBps']:.0f}",
                        "" if r["pct_ceiling"] is None else f"{r['pct_ceiling']:.0f}",
                        "" if r["x_floor"] is None else f"{r['x_floor']:.2f}", sp])
    return md_table(["set", "method", "us", "GB/s", "% ceil", "x floor", "speedup"], out)


def run_perf(rec) -> None:
    measure_ceiling(rec)
    rec["rows"] = []
    est = {"llama-3-8B": 60, "huge-2^31": 25}
    for name, dtype, scale in perf_sets():
        need = est.get(name, 15)
        if remaining() < need + (60 if CUDA else 5):
            log(f"  {name} {DT[dtype]}: skipped (time budget: {remaining():.0f}s left)")
            rec.setdefault("skipped", []).append(f"{name} {DT[dtype]}")
            continue
        try:
            rows = time_set(name, dtype, scale)
            rec["rows"] += rows
            log(perf_table(rows))
        except Exception as e:
            rec.setdefault("errors", []).append(f"{name} {DT[dtype]}: {type(e).__name__}: {e}")
            log(f"  {name} {DT[dtype]} FAILED: {type(e).__name__}: {e}")
            log(traceback.format_exc())
            if CUDA:
                torch.cuda.empty_cache()
        save()
    MD.append("### Timings (median; effective GB/s = bytes the task needs / time; speedup = "
              "baseline time / this time)\n\n" + perf_table(rec["rows"]))


def run_host(rec) -> None:
    """Host microseconds per call: tiny tensors, so the device never limits the loop."""
    rows, out = [], []
    for T in ((20,) if SMOKE else (150, 2000)):
        gen = torch.Generator(device=DEV).manual_seed(SEED + T)
        groups = [[torch.randn(8, 8, generator=gen, device=DEV) for _ in range(T // 2)],
                  [torch.randn(64, generator=gen, device=DEV) for _ in range(T - T // 2)]]
        params = S.params_for(groups)
        pg = S.param_groups(params)
        flat_p = [p for ps in params for p in ps]
        flat_g = [g for gs in groups for g in gs]
        calls: List[Tuple[str, Callable[[], Any]]] = [
            ("torch clip_grad_norm_ foreach", lambda: B.clip_foreach(flat_p, 1e30)),
            ("torch._foreach_norm", lambda: B.foreach_norm(flat_g)),
            ("eager per-group stats", lambda: B.eager_group_stats(groups)),
        ]
        for b in backends_here():
            if can_run(b, groups, 2.0):
                continue
            calls += [
                (f"gradstats grad_stats [{b}]", lambda b=b: gradstats.grad_stats(pg, backend=b)),
                (f"gradstats get_total_norm [{b}]", lambda b=b: gradstats.get_total_norm(flat_g)),
                (f"gradstats clip_grad_norm_ no clip [{b}]",
                 lambda b=b: gradstats.clip_grad_norm_(flat_p, 1e30)),
                (f"gradstats clip_grad_norm_ clip [{b}]",
                 lambda b=b: gradstats.clip_grad_norm_(flat_p, 1e-3)),
            ]
        for name, fn in calls:
            b = name[name.index("[") + 1:-1] if "[" in name else None
            with forced_backend(b):
                for _ in range(1 if SMOKE else 3):
                    fn()
                sync()
                t = time.perf_counter()
                fn()
                sync()
                est = time.perf_counter() - t
                n = 2 if SMOKE else int(min(200, max(3, 0.3 / max(est, 1e-6))))
                sync()
                t0 = time.perf_counter()
                for _ in range(n):
                    fn()
                t1 = time.perf_counter()
                sync()
                t2 = time.perf_counter()
            host = (t1 - t0) / n * 1e6
            wall = (t2 - t0) / n * 1e6
            out.append({"tensors": T, "call": name, "host_us": host, "with_sync_us": wall,
                        "n": n})
            rows.append([T, name, f"{host:.1f}", f"{wall:.1f}"])
            log(f"  {T:5d} tensors  {name:44s} host {host:9.1f} us  (with sync {wall:9.1f})")
        del groups, params
    rec["rows"] = out
    table = md_table(["tensors", "call", "host us/call", "us/call incl. final sync"], rows)
    MD.append("### Host time per call (tiny tensors, cached metadata)\n\n" + table)


# =========================================================================== sweep

def run_sweep(rec, skip) -> None:
    try:
        from gradstats.backends.triton import launcher as L
    except Exception as e:
        skip(f"no triton launcher ({type(e).__name__}: {e})")
    knobs = [k for k in ("CHUNK", "BLOCK", "NUM_WARPS") if hasattr(L, k)]
    if not knobs or "triton" not in backends_here():
        skip("the triton launcher exposes no CHUNK/BLOCK/NUM_WARPS attributes, or the "
             "triton backend is unavailable")
    if SMOKE:
        grid = [(1024, 256, 4), (2048, 512, 4)]
        sets = [("gpt2-124M", torch.float32, 1 / 1024)]  # first 12 tensors only (below)
    else:
        grid = [(c, b, w) for c in (16384, 65536, 262144) for b, w in
                ((1024, 4), (2048, 4), (4096, 8), (8192, 8))]
        sets = [("gpt2-124M", torch.float32, 1.0), ("llama-3.2-1B", torch.bfloat16, 1.0),
                ("small-2000", torch.float32, 1.0)]
        if QUICK:
            grid = [(c, b, w) for c in (16384, 65536) for b, w in ((2048, 4), (4096, 8))]
            sets = sets[:2]
    old = {k: getattr(L, k) for k in knobs}
    rows, out = [], []
    try:
        for name, dtype, scale in sets:
            if remaining() < (40 if CUDA else 5):
                rec.setdefault("skipped", []).append(name)
                continue
            specs = S.get(name, scale)
            if SMOKE:
                specs = specs[:12]
            groups = S.build(specs, DEV, dtype, seed=SEED + 5)
            pg = _param_groups(groups)
            N = S.nbytes(specs, dtype)
            ref = _gpu_ref_norms(groups)
            for chunk, block, warps in grid:
                if block > chunk:
                    continue
                L.CHUNK, L.BLOCK, L.NUM_WARPS = chunk, block, warps
                try:
                    st = gradstats.grad_stats(pg, backend="triton")
                    err = max(abs(float(x) - y) / y for x, y in zip(st.norm.tolist(), ref) if y)
                    t = BENCH(lambda: gradstats.grad_stats(pg, backend="triton"))
                    gbs = N / t["us"] / 1e3
                    pct = 100 * gbs / CEILING["read"] if CEILING.get("read") else None
                    out.append({"set": f"{name} {DT[dtype]}", "chunk": chunk, "block": block,
                                "num_warps": warps, "us": t["us"], "GBps": gbs,
                                "pct_ceiling": pct, "rel_err": err})
                    rows.append([f"{name} {DT[dtype]}", chunk, block, warps, f"{t['us']:.1f}",
                                 f"{gbs:.0f}", "" if pct is None else f"{pct:.0f}", f"{err:.1e}"])
                except Exception as e:
                    rows.append([f"{name} {DT[dtype]}", chunk, block, warps, "error",
                                 f"{type(e).__name__}: {e}"[:80], "", ""])
            del groups, pg
            if CUDA:
                torch.cuda.empty_cache()
    finally:
        for k, v in old.items():
            setattr(L, k, v)
        if hasattr(L, "clear_cache"):
            L.clear_cache()
    rec["rows"] = out
    table = md_table(["set", "CHUNK", "BLOCK", "num_warps", "grad_stats us", "GB/s",
                      "% read ceil.", "rel err"], rows)
    log(table)
    MD.append("### Triton launcher sweep (grad_stats)\n\n" + table)


# =========================================================================== optimizer

def run_optimizer(rec, skip) -> None:
    """StableOptimizer(AdamW(fused=True), max_norm=1.0).step() vs the bare fused AdamW step.

    Two gradient states: total norm 0.5 (no clipping needed: the common step) and 4.0 (clips;
    the gradients are restored before each step, outside the timed region). The fused AdamW
    step itself is timed on the same parameters and state.
    """
    if not hasattr(gradstats, "StableOptimizer"):
        skip("gradstats.StableOptimizer does not exist yet")
    sets = ([("gpt2-124M", 1 / 1024)] if SMOKE else
            [("gpt2-124M", 1.0)] + ([] if QUICK else [("llama-3.2-1B", 1.0)]))
    rows, out = [], []
    for name, scale in sets:
        specs = S.get(name, scale)
        groups = S.build(specs, DEV, torch.float32, seed=SEED + 6)
        params = S.params_for(groups, weights_too=True)
        flat_p = [p for ps in params for p in ps]
        grads = [p.grad for p in flat_p]
        norm0 = math.sqrt(sum(float(g.double().square().sum()) for g in grads))
        try:
            inner = torch.optim.AdamW(S.param_groups(params), lr=1e-4, fused=True)
            fused = True
        except Exception:  # no fused kernel for this device in this torch
            inner = torch.optim.AdamW(S.param_groups(params), lr=1e-4)
            fused = False
        wrapped = gradstats.StableOptimizer(inner, max_norm=1.0)
        label = (f"{name} fp32" + ("" if scale == 1.0 else f" x1/{round(1 / scale)}")
                 + ("" if fused else " (not fused)"))
        for case, target in (("no clip", 0.5), ("clips", 4.0)):
            torch._foreach_mul_(grads, target / norm0)
            norm0 = target
            backup = [g.clone() for g in grads]
            restore = lambda: torch._foreach_copy_(grads, backup)  # noqa: E731
            for _ in range(2):
                inner.step()
                wrapped.step()
                restore()
            sync()
            t_bare = BENCH(inner.step, setup=restore, warmup=1)
            t_wrap = BENCH(wrapped.step, setup=restore, warmup=1)
            nosync = None
            if CUDA:
                restore()
                try:
                    torch.cuda.set_sync_debug_mode("error")
                    for _ in range(3):
                        wrapped.step()
                    nosync = "0 syncs"
                except Exception as e:
                    nosync = f"SYNC: {type(e).__name__}: {str(e).splitlines()[0][:150]}"
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            restore()
            last = getattr(wrapped, "last_stats", None)
            out.append({"set": label, "case": case, "grad_norm": target,
                        "bare_us": t_bare["us"], "wrapped_us": t_wrap["us"],
                        "overhead_us": t_wrap["us"] - t_bare["us"], "sync": nosync,
                        "fused": fused, "last_stats": repr(last)[:400]})
            rows.append([label, f"{case} (norm {target:g})", f"{t_bare['us']:.1f}",
                         f"{t_wrap['us']:.1f}", f"{t_wrap['us'] - t_bare['us']:.1f}",
                         f"{t_wrap['us'] / t_bare['us']:.2f}", nosync or "n/a (CPU)"])
            del backup
        del groups, params, flat_p, grads, inner, wrapped
        if CUDA:
            torch.cuda.empty_cache()
    rec["rows"] = out
    table = md_table(["set", "gradients", "AdamW step us", "StableOptimizer step us",
                      "overhead us", "ratio", "host syncs (mode=error)"], rows)
    log(table)
    MD.append("### StableOptimizer(AdamW(fused=True), max_norm=1.0).step() vs bare AdamW\n\n"
              + table)
    if any(r["sync"] and r["sync"].startswith("SYNC") for r in out):
        rec["status"] = "failed"
        rec["error"] = "StableOptimizer.step() synchronised"


# =========================================================================== acceptance

def acceptance() -> List[List[str]]:
    """The performance acceptance of issue 2, from this run's numbers."""
    perf = RESULTS["sections"].get("perf", {}).get("rows", [])
    host = RESULTS["sections"].get("host", {}).get("rows", [])

    def row(setname, method_prefix, backend="triton"):
        for r in perf:
            if r["set"] == setname and r["method"].startswith(method_prefix) and \
                    f"[{backend}]" in r["method"]:
                return r
        return None

    def base(setname, method):
        return next((r for r in perf if r["set"] == setname and r["method"] == method), None)

    out = []

    def add(what, target, value, ok):
        out.append([what, target, value if value is not None else "not measured",
                    "-" if value is None else ("PASS" if ok else "FAIL")])

    for s in ("gpt2-124M fp32", "llama-3.2-1B bf16"):
        r = row(s, "gradstats grad_stats")
        add(f"stats pass GB/s, {s}", ">= 3900 GB/s (90% of 4.37 TB/s)",
            None if r is None else f"{r['GBps']:.0f} GB/s ({r['pct_ceiling'] or 0:.0f}% of "
            f"this run's ceiling)", r is not None and r["GBps"] >= 3900)
    r = row("small-2000 fp32", "gradstats grad_stats")
    add("stats pass vs one-read floor, 2000 small", "<= 2x",
        None if r is None else f"{r['x_floor']:.2f}x", r is not None and r["x_floor"] <= 2.0)
    for s, case, target in (("gpt2-124M fp32", "no clip", 6.0), ("gpt2-124M fp32", "clip", 2.5),
                            ("small-2000 fp32", "no clip", 50.0)):
        r = row(s, f"gradstats clip_grad_norm_ ({case})")
        bl = base(s, f"torch clip_grad_norm_ foreach ({case})")
        v = None if (r is None or bl is None) else bl["us"] / r["us"]
        add(f"clip_grad_norm_ speedup vs torch foreach, {s}, {case}", f">= {target:g}x",
            None if v is None else f"{v:.1f}x", v is not None and v >= target)
    h = next((x for x in host if x["tensors"] == 150 and
              x["call"] == "gradstats clip_grad_norm_ no clip [triton]"), None)
    add("host us per clip_grad_norm_ call, 150 tensors", "<= 30 us",
        None if h is None else f"{h['host_us']:.1f} us", h is not None and h["host_us"] <= 30)
    sy = RESULTS["sections"].get("sync", {})
    add("zero host syncs", "0", None if sy.get("status") in (None, "skipped") else
        ("0" if sy.get("status") == "ok" else "syncs found (see sync)"), sy.get("status") == "ok")
    gr = RESULTS["sections"].get("graphs", {})
    add("CUDA graph replay == eager", "identical", None if gr.get("status") in (None, "skipped")
        else ("identical" if gr.get("status") == "ok" else "differs/failed"),
        gr.get("status") == "ok")
    return out


# =========================================================================== main

def main() -> int:
    meta = {
        "device": torch.cuda.get_device_name(0) if CUDA else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "mode": "cpu-smoke" if SMOKE else ("quick" if QUICK else "full"),
        "torch": torch.__version__,
        "triton": None,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "gradstats": gradstats.__version__,
        "seed": SEED,
        "backends": {b: _dispatch.unavailable_reason(b) for b in ALL_BACKENDS},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "budget_s": BUDGET,
    }
    try:
        import triton
        meta["triton"] = triton.__version__
    except Exception:
        pass
    if SMOKE:
        meta["triton_interpret"] = os.environ.get("TRITON_INTERPRET")
    RESULTS["meta"] = meta
    log(f"# gradstats gpu_check: {meta['device']} | torch {meta['torch']} | triton "
        f"{meta['triton']} | mode {meta['mode']} | seed {SEED}")
    for b, why in meta["backends"].items():
        log(f"  backend {b}: {'available' if why is None else 'unavailable: ' + why}")
    if SMOKE:
        log("  NOTE: CPU smoke run -- tiny shapes, Triton interpreter; the CUDA-only parts "
            "(sync debug mode, CUDA graphs, sizes over 2^31) are skipped and timings are not "
            "GPU figures.")
    MD.append(f"## gradstats gpu_check — {meta['device']}, torch {meta['torch']}, triton "
              f"{meta['triton']}, {meta['mode']}, {meta['date']}")

    run_section("correctness", lambda rec, skip: run_correctness(rec))
    run_section("huge", lambda rec, skip: run_huge(rec), min_left=60 if CUDA else 5)
    run_section("sync", lambda rec, skip: run_sync(rec), cuda_only=True)
    run_section("graphs", lambda rec, skip: run_graphs(rec), cuda_only=True)
    run_section("perf", lambda rec, skip: run_perf(rec), min_left=30)
    run_section("host", lambda rec, skip: run_host(rec))
    run_section("optimizer", run_optimizer, min_left=20)
    run_section("sweep", run_sweep, min_left=40 if CUDA else 5)

    acc = acceptance()
    RESULTS["acceptance"] = acc
    acc_table = md_table(["acceptance (issue 2)", "target", "this run", ""], acc)
    MD.append("### Acceptance summary\n\n" + acc_table)
    status = {k: v.get("status") for k, v in RESULTS["sections"].items()}
    RESULTS["status"] = status
    save()
    log("\n## summary")
    if "perf" in RESULTS["sections"] and RESULTS["sections"]["perf"].get("rows"):
        log(compact_table(RESULTS["sections"]["perf"]["rows"]))
    log(acc_table)
    log("sections: " + ", ".join(f"{k}={v}" for k, v in status.items()))
    jpath, _ = out_paths()
    log(f"results: {jpath or '(no --out and no $OUT: not written)'}; {elapsed():.0f}s")
    return 0 if all(v in ("ok", "skipped") for v in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
