"""Triton backend: one fused multi-tensor stats pass, a finalize kernel, an in-place scale.

Importing this package never imports triton; the kernels (``kernels.py``) and launchers
(``launcher.py``) are loaded on first use. Set ``TRITON_INTERPRET=1`` *before* they are
loaded to run the kernels on CPU tensors under the Triton interpreter (slow, for tests).
"""
from __future__ import annotations

import math
import os
from operator import attrgetter
from typing import Any, List, Optional

from torch import Tensor

from ..base import Backend, DeviceSlice, Partials

__all__ = ["TritonBackend"]

_DTYPE_NAMES = {"torch.float32": "float32", "torch.bfloat16": "bfloat16",
                "torch.float16": "float16"}
_TRUE = ("1", "true", "yes", "on", "y")

_launcher = None
_import_error: Optional[str] = None
_import_checked = False


def _triton_import_error() -> Optional[str]:
    """Why ``import triton`` fails, or None (checked once)."""
    global _import_error, _import_checked
    if not _import_checked:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
        except ImportError as e:
            _import_error = f"triton is not installed ({e})"
        except Exception as e:  # a broken install: report, never crash the caller
            _import_error = f"triton failed to import ({type(e).__name__}: {e})"
        _import_checked = True
    return _import_error


def _get_launcher():
    global _launcher
    if _launcher is None:
        from . import launcher
        _launcher = launcher
    return _launcher


def _interpret_mode() -> bool:
    """Whether the kernels run (or, once loaded, will run) under the Triton interpreter."""
    if _launcher is not None:
        return _launcher.INTERPRET
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


_NORMS = (1.0, 2.0, math.inf)
_dtype = attrgetter("dtype")


class TritonBackend(Backend):
    """Multi-tensor Triton kernels over a cached chunk table (see ``launcher.py``)."""

    name = "triton"

    def unavailable_reason(self) -> Optional[str]:
        return _triton_import_error()

    def unsupported_reasons(self, dslice: DeviceSlice, norm_type: float) -> List[str]:
        reasons: List[str] = []
        err = _triton_import_error()
        if err is not None:
            return [err]
        dev = dslice.device
        interp = _interpret_mode()
        if interp:
            if dev.type != "cpu":
                reasons.append(f"the triton kernels run under the interpreter "
                               f"(TRITON_INTERPRET=1), which reads CPU tensors only; got "
                               f"device {dev}")
        elif dev.type != "cuda":
            if os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE:
                reasons.append("TRITON_INTERPRET=1 was set after the triton kernels were "
                               "loaded; set it before the first use of the triton backend")
            else:
                reasons.append("triton kernels need a CUDA device; for CPU tensors set "
                               "TRITON_INTERPRET=1 (slow, for testing)")
        try:
            p = float(norm_type)
        except (TypeError, ValueError):
            p = None
        if p not in _NORMS:
            reasons.append(f"norm_type={norm_type if p is None else p}: the triton kernel "
                           f"supports 1, 2 and inf")
        bad = {str(d) for d in set(map(_dtype, dslice.tensors))} - set(_DTYPE_NAMES)
        if bad:
            reasons.append(f"dtype {', '.join(sorted(bad))}: the triton kernel supports "
                           f"float32, bfloat16 and float16")
        return reasons

    def compute(self, dslice: DeviceSlice, norm_type: float, per_tensor: bool,
                full: bool, max_norm: Optional[float] = None) -> Partials:
        """One stats pass + one finalize launch; always fills ``Partials.final``.

        ``full`` is ignored: max_abs and the NaN/Inf counts come for free.
        """
        return _get_launcher().compute(dslice, norm_type, per_tensor, max_norm)

    def supports_program(self, dslice: DeviceSlice, norm_type: float, prog: Any) -> bool:
        """Whether :meth:`compute_step` can run ``prog``'s fused prefix in its finalize
        kernel (groups and ring buffers small enough for one block; ``tl.sort`` present
        when a quantile rule is fused)."""
        if prog.G > 1024 or prog.quantile_history > 4096 or prog.spike_window > 4096:
            return False
        if prog.quantile_history and not _get_launcher().K.HAS_SORT:
            return False
        return True

    def compute_step(self, dslice: DeviceSlice, norm_type: float, per_tensor: bool,
                     prog: Any, **inputs: Any) -> Any:
        """Statistics pass + one finalize launch that also runs the decision program."""
        return _get_launcher().compute_step(dslice, norm_type, per_tensor, prog, **inputs)

    def scale_(self, dslice: DeviceSlice, coef: Tensor) -> None:
        _get_launcher().scale_(dslice, coef)
