#!/usr/bin/env python
"""Checks of the stable step that need a CUDA GPU (run by ``benchmarks/run_device.sh``).

Sections (each wrapped: a failure is recorded and the next section runs):

1. ``decide``: the decision program run by the Triton finalize kernel and by the native
   CUDA decide kernel (forced on: it is dispatched only once verified here) against the
   torch executor, step by step, on a small CUDA model with NaN and spike faults, several
   policy chains, the loss, and the folded AMP scaler; records and parameters compared.
2. ``sync``: 20 steps of ``StableOptimizer(AdamW(fused=True), max_norm=1.0, spike=...)`` with
   ``zero_grad(set_to_none=True)`` (gradients move every step) under
   ``torch.cuda.set_sync_debug_mode("error")``, per backend.
3. ``kernels``: CUDA kernels launched by one warm ``StableOptimizer(AdamW(fused=True),
   max_norm=1.0).step()`` beyond the bare fused step (torch.profiler; target <= 3).
4. ``host``: host microseconds per call at 150 tiny tensors (the GPU never limits):
   ``clip_grad_norm_``, ``get_total_norm``, ``grad_stats`` per backend and torch's clip, and
   ``StableOptimizer.step()`` against the bare fused step (targets: <= 30 us per call;
   step <= inner + 60 us).

    python benchmarks/device_checks.py [--out DIR] [--sections decide,sync,kernels,host]
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
import traceback
from typing import Any, Callable, Dict, List

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the checkout's gradstats

import gradstats  # noqa: E402
from gradstats import policies as P  # noqa: E402
from gradstats.backends import native, registry  # noqa: E402

DEV = torch.device("cuda" if "--cpu-dry" not in sys.argv else "cpu")
RES: Dict[str, Any] = {}


def _backends() -> List[str]:
    """Backends that can run on DEV (float32 gradients, p = 2)."""
    from gradstats.core import grouping
    probe = grouping.slices([[torch.zeros(4, device=DEV)]])[0][0]
    return [b for b in ("triton", "native", "torch") if not registry.reasons_for(b, probe, 2.0)]


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(),
                               torch.nn.Linear(64, 8)).to(DEV)


def _groups(m):
    ps = list(m.parameters())
    return [{"params": [p for p in ps if p.dim() > 1]},
            {"params": [p for p in ps if p.dim() <= 1]}]


CHAINS = {
    "max_norm": dict(max_norm=1.0),
    "zscore+quantile+pergroup": dict(policy=[P.ZScoreClip(warmup=3, z_thresh=2.0),
                                             P.QuantileClip(0.5, history=16),
                                             P.FixedNorm(2.0, per_group=True)]),
    "spike(loss)+max_norm": dict(max_norm=0.5, spike=P.SpikeSkip(window=8, warmup=3, k=3.0,
                                                                on=("grad_norm", "loss"))),
}


def _run_decide(backend: str, kw: Dict[str, Any], steps: int, amp: bool):
    m = _model()
    k = copy.deepcopy(kw)
    scaler = torch.amp.GradScaler(DEV.type, init_scale=1024.0) if amp else None
    opt = gradstats.StableOptimizer(torch.optim.AdamW(_groups(m), lr=1e-2, fused=True),
                                    backend=backend, grad_scaler=scaler, **k)
    g = torch.Generator().manual_seed(5)
    recs = []
    for i in range(steps):
        x = (torch.randn(16, 32, generator=g) * (30.0 if i == 9 else 1.0)).to(DEV)
        y = torch.randn(16, 8, generator=g).to(DEV)
        loss = torch.nn.functional.mse_loss(m(x), y)
        opt.zero_grad()
        (scaler.scale(loss) if amp else loss).backward()
        if i == 6:
            next(m.parameters()).grad[0, 0] = float("nan")
        opt.step(loss=loss.detach())
        if amp:
            scaler.update()
        recs.append(opt.last_stats.to_dict())
    return recs, [p.detach().cpu() for p in m.parameters()], opt.summary()


def _close(a, b, tol=2e-5) -> bool:
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return abs(a - b) <= tol * max(1.0, abs(a), abs(b))
    return a == b


def section_decide() -> Dict[str, Any]:
    return section_decide_for(*[b for b in _backends() if b != "torch"])


def section_decide_for(*backends: str) -> Dict[str, Any]:
    rows = []
    ok = True
    saved = native.CUDA_DECIDE_VERIFIED
    native.CUDA_DECIDE_VERIFIED = True  # force the CUDA decide kernel for this check
    try:
        for name, kw in CHAINS.items():
            for amp in (False, True):
                ref, ref_p, ref_s = _run_decide("torch", kw, 14, amp)
                for be in backends:
                    try:
                        got, got_p, got_s = _run_decide(be, kw, 14, amp)
                        bad = [f"step {i} {key}" for i, (r, g) in enumerate(zip(ref, got))
                               for key in r if not _close(r[key], g.get(key))]
                        pbad = [i for i, (a, b) in enumerate(zip(ref_p, got_p))
                                if not torch.allclose(a, b, rtol=1e-4, atol=1e-6)]
                        good = not bad and not pbad and ref_s == got_s
                        rows.append({"chain": name, "amp": amp, "backend": be, "ok": good,
                                     "mismatch": bad[:6], "params": pbad, "summary": got_s})
                    except Exception as e:  # noqa: BLE001
                        good = False
                        rows.append({"chain": name, "amp": amp, "backend": be, "ok": False,
                                     "error": f"{type(e).__name__}: {e}"})
                    ok = ok and good
    finally:
        native.CUDA_DECIDE_VERIFIED = saved
    for r in rows:
        print(f"  decide {r['chain']:28s} amp={r['amp']!s:5s} {r['backend']:7s} "
              f"{'ok' if r['ok'] else 'FAIL ' + str(r.get('error') or r.get('mismatch'))}")
    return {"ok": ok, "rows": rows}


def section_sync() -> Dict[str, Any]:
    return section_sync_for(*_backends())


def section_sync_for(*backends: str) -> Dict[str, Any]:
    rows = []
    ok = True
    for be in backends:
        m = _model()
        opt = gradstats.StableOptimizer(torch.optim.AdamW(m.parameters(), fused=True),
                                        max_norm=1.0, backend=be,
                                        spike=P.SpikeSkip(window=8, warmup=4))
        g = torch.Generator().manual_seed(3)
        data = [(torch.randn(16, 32, generator=g).to(DEV), torch.randn(16, 8, generator=g)
                 .to(DEV)) for _ in range(24)]
        nan = torch.tensor([float("nan")], device=DEV)
        err = None
        try:
            for i, (x, y) in enumerate(data):
                if i == 4:
                    torch.cuda.synchronize()
                    torch.cuda.set_sync_debug_mode("error")
                loss = torch.nn.functional.mse_loss(m(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if i == 10:
                    next(m.parameters()).grad[0, :1].copy_(nan)
                opt.step()
        except Exception as e:  # noqa: BLE001
            err = f"{type(e).__name__}: {str(e).splitlines()[0]}"
        finally:
            torch.cuda.set_sync_debug_mode(0)
        good = err is None and opt.summary()["skipped_by_reason"]["nonfinite"] == 1
        ok = ok and good
        rows.append({"backend": be, "ok": good, "error": err})
        print(f"  sync {be:7s} {'ok' if good else 'FAIL ' + str(err)}")
    return {"ok": ok, "rows": rows}


def _kernels_of(fn: Callable[[], None]) -> List[str]:
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = []
    for e in prof.events():
        dt = getattr(e, "device_type", None)
        if dt is not None and "CUDA" in str(dt) and "Memcpy" not in e.name \
                and "Memset" not in e.name:
            names.append(e.name)
    return names


def _gpt2_params(n=148, size=4096):
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(size, generator=g).to(DEV)) for _ in range(n)]


def _set_grads(ps, seed):
    g = torch.Generator(device=DEV).manual_seed(seed)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g, device=DEV)


def section_kernels_impl() -> Dict[str, Any]:
    out = {"ok": True, "rows": []}
    for be in [b for b in _backends() if b != "torch"]:
        ps = _gpt2_params()
        bare = torch.optim.AdamW(ps, fused=True)
        st = gradstats.StableOptimizer(torch.optim.AdamW(ps, fused=True), max_norm=1.0,
                                       backend=be)
        for i in range(3):
            _set_grads(ps, i)
            bare.step()
            st.step()
        _set_grads(ps, 7)
        kb = _kernels_of(bare.step)
        _set_grads(ps, 8)
        ks = _kernels_of(st.step)
        extra = len(ks) - len(kb)
        good = extra <= 3
        out["ok"] = out["ok"] and good
        out["rows"].append({"backend": be, "bare": len(kb), "stable": len(ks), "extra": extra,
                            "kernels": ks})
        print(f"  kernels {be:7s} bare {len(kb)} stable {len(ks)} extra {extra} "
              f"{'ok' if good else 'FAIL'}: {sorted(set(ks) - set(kb))}")
    return out


def _host_us(fn: Callable[[], Any], n: int = 300) -> float:
    sync = torch.cuda.synchronize if DEV.type == "cuda" else (lambda: None)
    for _ in range(20):
        fn()
    sync()
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        ts.append((time.perf_counter() - t0) / n * 1e6)
        sync()
    return min(ts)


def section_host(backends: Any = None, tag: str = "") -> Dict[str, Any]:
    backends = _backends() if backends is None else backends
    rows = []
    ps = [torch.nn.Parameter(torch.randn(256, device=DEV)) for _ in range(150)]
    for p in ps:
        p.grad = torch.randn(256, device=DEV)
    grads = [p.grad for p in ps]
    if not tag:
        rows.append(("torch clip_grad_norm_ (foreach)",
                     _host_us(lambda: torch.nn.utils.clip_grad_norm_(ps, 1e9))))
    for be in backends:
        os.environ["GRADSTATS_BACKEND"] = be
        n = 30 if be == "torch" else 300  # the torch fallback is slow by design
        try:
            registry.clear_selection_cache()
            rows.append((f"gradstats clip_grad_norm_ [{be}]{tag}",
                         _host_us(lambda: gradstats.clip_grad_norm_(ps, 1e9), n)))
            rows.append((f"gradstats get_total_norm [{be}]{tag}",
                         _host_us(lambda: gradstats.get_total_norm(grads), n)))
            rows.append((f"gradstats grad_stats [{be}]{tag}",
                         _host_us(lambda: gradstats.grad_stats(ps), n)))
        finally:
            os.environ.pop("GRADSTATS_BACKEND", None)
            registry.clear_selection_cache()
    bare = torch.optim.AdamW(ps, fused=True)
    rows.append(("bare AdamW(fused).step()" + tag, _host_us(bare.step, 100)))
    for be in [b for b in backends if b != "torch"]:
        st = gradstats.StableOptimizer(torch.optim.AdamW(ps, fused=True), max_norm=1.0,
                                       backend=be)
        rows.append((f"StableOptimizer(max_norm=1).step() [{be}]{tag}",
                     _host_us(st.step, 100)))
    for name, us in rows:
        print(f"  host {name:48s} {us:8.1f} us")
    return {"ok": True, "rows": [{"call": n, "us": u} for n, u in rows]}


def section_direct() -> Dict[str, Any]:
    """The Triton direct-launch mode (opt-in until verified): correctness against the
    reference and the normal launch path, and its host time."""
    if "triton" not in _backends():
        return {"ok": True, "note": "triton unavailable"}
    from gradstats.backends.triton import launcher as L
    from gradstats.core import reference as R
    rows = []
    ok = True
    g = torch.Generator(device=DEV).manual_seed(11)
    try:
        L.DIRECT = True
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            ts = [torch.randn(s, generator=g, device=DEV).to(dt)
                  for s in [(3, 1000), (77,), (65536 * 2 + 5,), (0,), (4096,)]]
            ts[1][3] = float("nan") if dt != torch.float32 else ts[1][3]
            ts.append(torch.randn(40, 30, generator=g, device=DEV).to(dt).t())
            ps = [torch.nn.Parameter(t.clone()) for t in ts]
            for p, t in zip(ps, ts):
                p.grad = t
            for p_ in (2.0, 1.0, math.inf):
                st = gradstats.grad_stats([{"params": ps[:3]}, {"params": ps[3:]}], p_,
                                          per_tensor=True, backend="triton")
                ref = R.ref_grad_stats([ts[:3], ts[3:]], p_)
                e = max(R.rel_err(st.norm, ref.norm), R.rel_err(st.total_norm, ref.total_norm),
                        R.rel_err(st.per_tensor_norm, ref.per_tensor_norm))
                good = e <= 1e-5 and R.max_abs_ok(st.max_abs, ref.max_abs)
                ok = ok and good
                rows.append({"dtype": str(dt), "p": p_, "rel_err": e, "ok": good})
        dec = section_decide_for("triton")
        ok = ok and dec["ok"]
        rows.append({"decide": dec})
        sync = section_sync_for("triton")
        ok = ok and sync["ok"]
        rows.append({"sync": sync})
        host = section_host(backends=["triton"], tag=" [direct]")
        rows.append({"host": host["rows"]})
    finally:
        L.DIRECT = False
    for r in rows[:-3]:
        print(f"  direct {r['dtype']:15s} p={r['p']:<4} err {r['rel_err']:.1e} "
              f"{'ok' if r['ok'] else 'FAIL'}")
    return {"ok": ok, "rows": rows}


SECTIONS = {"decide": section_decide, "sync": section_sync, "kernels": section_kernels_impl,
            "host": section_host, "direct": section_direct}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--cpu-dry", action="store_true",
                    help="run the decide and host sections on the CPU (a check of this "
                         "script; the CUDA sections are skipped)")
    args = ap.parse_args(argv)
    if args.cpu_dry:
        args.sections = "decide,host"
    elif not torch.cuda.is_available():
        print("device_checks: no CUDA device; nothing to check")
        return 0
    where = torch.cuda.get_device_name() if DEV.type == "cuda" else "cpu (dry run)"
    print(f"# device checks on {where} (torch {torch.__version__}, "
          f"gradstats {gradstats.__version__}); backends {_backends()}")
    status = {}
    for name in args.sections.split(","):
        t0 = time.time()
        try:
            RES[name] = SECTIONS[name]()
            status[name] = "ok" if RES[name].get("ok") else "FAIL"
        except Exception as e:  # noqa: BLE001
            RES[name] = {"ok": False, "error": traceback.format_exc()}
            status[name] = f"ERROR {type(e).__name__}: {e}"
            print(RES[name]["error"])
        print(f"[{name}] {status[name]} ({time.time() - t0:.1f}s)")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "device_checks.json"), "w") as f:
            json.dump({"status": status, "results": RES}, f, indent=1, default=str)
    print("device_checks:", status)
    return 0 if all(v == "ok" for v in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
