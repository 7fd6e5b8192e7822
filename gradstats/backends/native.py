"""Native backend: C++/CUDA kernels from ``csrc/`` registered as ``torch.ops.gradstats``.

Available only when the compiled extension ``gradstats._C`` was built.
"""
from __future__ import annotations

from typing import List, Optional

from .base import Backend, DeviceSlice, Partials


def _load_error() -> Optional[str]:
    try:
        from .. import _C  # noqa: F401
    except Exception as e:
        return ("the compiled extension gradstats._C is not built "
                f"({type(e).__name__}: {e}); reinstall with "
                "`pip install --no-build-isolation -e .`")
    return None


class NativeBackend(Backend):
    name = "native"

    def unavailable_reason(self) -> Optional[str]:
        return _load_error()

    def unsupported_reasons(self, dslice: DeviceSlice, norm_type: float) -> List[str]:
        return ["native kernels are not implemented yet"]

    def compute(self, dslice, norm_type, per_tensor, full, max_norm=None) -> Partials:
        raise NotImplementedError("native backend unavailable")

    def scale_(self, dslice, coef) -> None:
        raise NotImplementedError("native backend unavailable")
