"""Native backend: C++/CUDA kernels from ``csrc/`` registered as ``torch.ops.gradstats``.

Available when the compiled extension ``gradstats._C`` was built (``pip install
--no-build-isolation -e .`` builds it wherever a C++ compiler exists). Ops:

* ``torch.ops.gradstats.stats(tensors, group_bounds, norm_type, max_norm)``: one pass over
  all gradients of all groups; returns raw partials (per group and per tensor) and the
  final norms, NaN/Inf counts, max-abs and clipping coefficient, as fresh tensors.
* ``torch.ops.gradstats.scale_(tensors, group_bounds, coef)``: in-place multiply by a
  device-resident coefficient (0-dim or one per group); groups whose coefficient is
  >= 1 are not touched.

Bytes moved (CPU): the stats op reads each gradient once (chunks of 64K elements spread
over the intra-op threads, vectorised with ``at::vec``; the AVX2/baseline build is chosen at
run time, AVX512 only on request, see below). Non-contiguous gradients that are not a dense
permutation are copied once first. The scale op reads and writes each gradient once, only
when it clips.

Range: norms are right (relative error <= 1e-5 against float64) for elements anywhere in
the float32 range, 1e-38 to 3e38: a chunk whose float32 sum would lose precision or
overflow is recomputed in double (``csrc/gradstats_common.h``). float64 gradients are not
handled here; the dispatcher gives them to the torch backend.

The fake (meta) kernels below let the ops run under ``torch.compile`` and fake tensors.

Environment: ``GRADSTATS_NO_EXT=1`` ignores the compiled extension (pure Python);
``GRADSTATS_CPU_CAPABILITY=avx2|default`` caps the CPU kernel build used, and
``GRADSTATS_CPU_CAPABILITY=avx512`` opts in to the AVX512 build, which is compiled but not
used by default until it has passed the test suite on an AVX512 machine of ours (read once
per process; without it torch's ``ATEN_CPU_CAPABILITY`` caps the choice too). CUDA: the
device metadata of a gradient set is cached by structure (sizes, dtypes, groups), and the
data pointers are re-uploaded asynchronously when the gradients move; run one eager step
before capturing a CUDA graph.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .base import Backend, DeviceSlice, FinalStats, Partials

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: The CUDA decide kernel (csrc/cuda/decide_cuda.cu) is dispatched only once it has run on
#: a GPU of ours and matched the torch executor (benchmarks/gpu_check.py checks it by
#: forcing ``GRADSTATS_NATIVE_CUDA_DECIDE=1``).
CUDA_DECIDE_VERIFIED = os.environ.get("GRADSTATS_NATIVE_CUDA_DECIDE", "") == "1"


class StepOut:
    """Outputs of :meth:`NativeBackend.compute_step` (the program's layouts)."""

    __slots__ = ("outf", "outi", "nonfinite", "per_tensor_norm", "direct")

    def __init__(self, outf: Tensor, outi: Tensor, nonfinite: Tensor,
                 per_tensor_norm: Optional[Tensor], direct: Dict[str, Tensor]) -> None:
        self.outf, self.outi, self.nonfinite = outf, outi, nonfinite
        self.per_tensor_norm, self.direct = per_tensor_norm, direct
_C = None
_LOAD_ERROR: Optional[str] = None
_LOADED = False


def _status_note() -> str:
    """First line of the build status file setup.py leaves when the build failed."""
    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "_ext_status.txt")
    try:
        with open(path) as f:
            first = f.readline().strip()
        return f"; {first} (see {path})" if first else ""
    except OSError:
        return ""


def _load() -> Optional[str]:
    """Import ``gradstats._C`` once and register the fake kernels. Returns an error or None."""
    global _C, _LOAD_ERROR, _LOADED
    if _LOADED:
        return _LOAD_ERROR
    _LOADED = True
    if os.environ.get("GRADSTATS_NO_EXT", "").strip() == "1":
        _LOAD_ERROR = "GRADSTATS_NO_EXT=1 is set (the compiled extension is not used)"
        return _LOAD_ERROR
    try:
        from .. import _C as mod  # noqa: N814
    except Exception as e:
        _LOAD_ERROR = ("the compiled extension gradstats._C is not built "
                       f"({type(e).__name__}: {e}){_status_note()}; build it with "
                       "`pip install --no-build-isolation -e .`")
        return _LOAD_ERROR
    try:
        _register_fakes()
    except Exception as e:  # pragma: no cover - depends on the torch version
        _LOAD_ERROR = f"registering the fake kernels failed ({type(e).__name__}: {e})"
        return _LOAD_ERROR
    _C = mod
    return None


def _register_fakes() -> None:
    @torch.library.register_fake("gradstats::stats")
    def _stats_fake(tensors: List[Tensor], group_bounds: List[int], norm_type: float,
                    max_norm: Optional[float] = None) -> Tuple[Tensor, ...]:
        T, G = len(tensors), len(group_bounds) - 1
        dev = tensors[0].device if tensors else torch.device("cpu")

        def f32(*shape):
            return torch.empty(shape, dtype=torch.float32, device=dev)

        def i64(*shape):
            return torch.empty(shape, dtype=torch.int64, device=dev)

        return (f32(G), f32(G), i64(G), i64(G), f32(T), i64(T), i64(T), f32(G), f32(),
                i64(G), f32(T), f32())

    @torch.library.register_fake("gradstats::scale_")
    def _scale_fake(tensors: List[Tensor], group_bounds: List[int], coef: Tensor) -> None:
        return None

    @torch.library.register_fake("gradstats::decide")
    def _decide_fake(norm: Tensor, total: Tensor, max_abs: Tensor, loss: Optional[Tensor],
                     amp_scale: Optional[Tensor], amp_found: Optional[Tensor],
                     has_grads: Optional[Tensor], fstate: Tensor, istate: Tensor,
                     table: Tensor, params: Tensor, meta: List[int],
                     one_minus_alpha: float) -> Tuple[Tensor, ...]:
        dev = norm.device
        return (torch.empty(meta[3], dtype=torch.float32, device=dev),
                torch.empty(1, dtype=torch.int64, device=dev),
                torch.empty((), dtype=torch.float32, device=dev),
                torch.empty((), dtype=torch.float32, device=dev))


def extension():
    """The loaded ``gradstats._C`` module, or ``None``."""
    _load()
    return _C


def describe() -> str:
    """One line for ``gradstats info``: kernel builds in use, or why unavailable."""
    err = _load()
    if err:
        return "unavailable because " + err
    cuda = "built" if _C.cuda_built() else "not built"
    return f"{_C.cpu_capability_summary()}; CUDA kernels {cuda}"


_BOUNDS: Dict[tuple, List[int]] = {}


def _bounds(dslice: DeviceSlice) -> List[int]:
    key = dslice.key
    if key is None:
        return dslice.group_bounds
    b = _BOUNDS.get(key)
    if b is None:
        if len(_BOUNDS) > 64:
            _BOUNDS.clear()
        b = _BOUNDS[key] = dslice.group_bounds
    return b


class NativeBackend(Backend):
    """C++ (CPU) and CUDA kernels of ``csrc/``."""

    name = "native"

    def unavailable_reason(self) -> Optional[str]:
        return _load()

    def unsupported_reasons(self, dslice: DeviceSlice, norm_type: float) -> List[str]:
        why: List[str] = []
        dev = dslice.device.type
        if dev == "cuda":
            if not _C.cuda_built():
                why.append("gradstats._C was built without the CUDA kernels (torch without "
                           "CUDA, nvcc not found, or GRADSTATS_BUILD_CUDA=0)")
        elif dev != "cpu":
            why.append(f"device {dslice.device}: native kernels exist for cpu and cuda only")
        bad = {t.dtype for t in dslice.tensors if t.dtype not in _SUPPORTED_DTYPES}
        if torch.float64 in bad:
            why.append("float64 gradients: the native kernels do not support float64 "
                       "(they handle float32, bfloat16 and float16); use the torch backend")
            bad.discard(torch.float64)
        if bad:
            names = ", ".join(sorted(str(d).replace("torch.", "") for d in bad))
            why.append(f"dtype {names}: the native kernels handle float32, bfloat16 and "
                       "float16 only")
        if not (norm_type > 0):
            why.append(f"norm_type={norm_type}: only p > 0 and inf are supported")
        return why

    def compute(self, dslice: DeviceSlice, norm_type: float, per_tensor: bool,
                full: bool, max_norm: Optional[float] = None) -> Partials:
        p = float(norm_type)
        (acc, max_abs, n_nan, n_inf, t_acc, t_nan, t_inf, norm, total, nonfinite, ptn,
         coef) = torch.ops.gradstats.stats(dslice.tensors, _bounds(dslice), p,
                                           None if max_norm is None else float(max_norm))
        final = FinalStats(norm=norm, total_norm=total, max_abs=max_abs, nonfinite=nonfinite,
                           per_tensor_norm=ptn if per_tensor else None,
                           clip_coef=coef if max_norm is not None else None)
        return Partials(acc=acc, max_abs=max_abs, n_nan=n_nan, n_inf=n_inf,
                        t_acc=t_acc if per_tensor else None,
                        t_nan=t_nan if per_tensor else None,
                        t_inf=t_inf if per_tensor else None, final=final)

    def supports_program(self, dslice: DeviceSlice, norm_type: float, prog: Any) -> bool:
        """The decide op runs the program on the CPU; on CUDA only once the CUDA decide
        kernel has been verified on a GPU (:data:`CUDA_DECIDE_VERIFIED`)."""
        if dslice.device.type == "cpu":
            return True
        return dslice.device.type == "cuda" and CUDA_DECIDE_VERIFIED and _C.cuda_built()

    def compute_step(self, dslice: DeviceSlice, norm_type: float, per_tensor: bool,
                     prog: Any, *, loss: Optional[Tensor], amp_scale: Optional[Tensor],
                     amp_found: Optional[Tensor], has_grads: Optional[Tensor]) -> "StepOut":
        """The stats op, then the decide op on its final statistics (two op calls)."""
        p = float(norm_type)
        (_, max_abs, _, _, _, _, _, norm, total, nonfinite, ptn,
         _) = torch.ops.gradstats.stats(dslice.tensors, _bounds(dslice), p, None)
        meta = prog._native_meta
        if meta is None:
            meta = prog._native_meta = prog.native_meta
        outf, outi, gs, fi = torch.ops.gradstats.decide(
            norm, total, max_abs, loss, amp_scale, amp_found, has_grads, prog.fstate,
            prog.istate, prog.table, prog.params, meta, 1.0 - prog.alpha)
        if per_tensor and amp_scale is not None:
            ptn = ptn * amp_scale.double().reciprocal().float()
        return StepOut(outf, outi, nonfinite, ptn if per_tensor else None,
                       {"grad_scale": gs, "found_inf": fi})

    def scale_(self, dslice: DeviceSlice, coef: Tensor) -> None:
        if coef.device != dslice.device or coef.dtype != torch.float32:
            coef = coef.to(device=dslice.device, dtype=torch.float32)
        if dslice.device.type == "cpu" and bool((coef >= 1.0).all()):
            return  # reading a CPU value is no device sync: skip the op call entirely
        torch.ops.gradstats.scale_(dslice.tensors, _bounds(dslice), coef)

