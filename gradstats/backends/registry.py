"""Backend registry and selection.

``backend=None`` picks the best backend that can run, silently. An explicitly requested
backend (argument or the ``GRADSTATS_BACKEND`` environment variable) that cannot run
raises :class:`BackendUnavailableError` listing why.
"""
from __future__ import annotations

import importlib
import os
from typing import Dict, List, Optional, Tuple

from ..core.cache import LRU
from .base import Backend, DeviceSlice

BACKEND_NAMES = ("triton", "native", "torch")

# name -> (module, class); imported lazily so that `import gradstats` needs neither
# triton nor the compiled extension.
_SPECS: Dict[str, Tuple[str, str]] = {
    "torch": ("gradstats.backends.torch_backend", "TorchBackend"),
    "triton": ("gradstats.backends.triton", "TritonBackend"),
    "native": ("gradstats.backends.native", "NativeBackend"),
}
_INSTANCES: Dict[str, Backend] = {}
_LOAD_ERRORS: Dict[str, str] = {}


class BackendUnavailableError(RuntimeError):
    """A requested backend cannot run; the message lists the reasons."""


def get_backend(name: str) -> Optional[Backend]:
    """The backend instance called ``name``, or ``None`` if its module failed to import."""
    if name in _INSTANCES:
        return _INSTANCES[name]
    if name in _LOAD_ERRORS:
        return None
    if name not in _SPECS:
        raise ValueError(f"backend must be one of {BACKEND_NAMES} or None, got {name!r}")
    mod, cls = _SPECS[name]
    try:
        inst = getattr(importlib.import_module(mod), cls)()
    except Exception as e:  # pragma: no cover - depends on the installation
        _LOAD_ERRORS[name] = f"{type(e).__name__}: {e}"
        return None
    _INSTANCES[name] = inst
    return inst


def unavailable_reason(name: str) -> Optional[str]:
    """Why backend ``name`` cannot run at all in this process (``None`` if it can)."""
    b = get_backend(name)
    if b is None:
        return f"backend module failed to load ({_LOAD_ERRORS.get(name, 'unknown error')})"
    return b.unavailable_reason()


def requested_backend(backend: Optional[str]) -> Optional[str]:
    """The explicitly requested backend: the argument, else ``GRADSTATS_BACKEND``."""
    if backend is None:
        env = os.environ.get("GRADSTATS_BACKEND", "").strip().lower()
        backend = env or None
        what = "GRADSTATS_BACKEND"
    else:
        what = "backend"
    if backend is not None and backend not in BACKEND_NAMES:
        raise ValueError(f"{what} must be one of {BACKEND_NAMES}, got {backend!r}")
    return backend


def _default_order(device_type: str) -> Tuple[str, ...]:
    if device_type == "cuda":
        return ("triton", "native", "torch")
    if device_type == "cpu":
        return ("native", "torch")
    return ("torch",)


_SELECTED: "LRU[Backend]" = LRU(64, "backend choices")


def select(dslice: DeviceSlice, norm_type: float, backend: Optional[str]) -> Backend:
    """The backend that will handle ``dslice``.

    The choice is cached per gradient set (``dslice.key``), norm type and request: the
    backends' checks look at every tensor, which is host time on every call otherwise.

    Raises:
        BackendUnavailableError: the requested backend cannot run this slice.
    """
    forced = requested_backend(backend)
    ck = None if dslice.key is None else (dslice.key, norm_type, forced)
    if ck is not None:
        hit = _SELECTED.get(ck)
        if hit is not None:
            return hit
    chosen = _select(dslice, norm_type, forced)
    if ck is not None:
        _SELECTED.put(ck, chosen)
    return chosen


def clear_selection_cache() -> None:
    """Forget cached backend choices (after changing what is installed or loaded)."""
    _SELECTED.clear()


def _select(dslice: DeviceSlice, norm_type: float, forced: Optional[str]) -> Backend:
    if forced is not None:
        reasons = reasons_for(forced, dslice, norm_type)
        if reasons:
            raise BackendUnavailableError(
                f"gradstats backend {forced!r} is unavailable because: " + "; ".join(reasons))
        return get_backend(forced)  # type: ignore[return-value]
    for name in _default_order(dslice.device.type):
        if not reasons_for(name, dslice, norm_type):
            return get_backend(name)  # type: ignore[return-value]
    raise BackendUnavailableError(  # pragma: no cover - torch always runs
        "no gradstats backend can run: "
        + "; ".join(f"{n}: {', '.join(reasons_for(n, dslice, norm_type))}" for n in BACKEND_NAMES))


def reasons_for(name: str, dslice: DeviceSlice, norm_type: float) -> List[str]:
    """Why backend ``name`` cannot handle ``dslice`` with ``norm_type`` (empty: it can)."""
    why = unavailable_reason(name)
    if why:
        return [why]
    return get_backend(name).unsupported_reasons(dslice, norm_type)  # type: ignore[union-attr]


def backend_table() -> List[Tuple[str, Optional[str]]]:
    """(name, reason it is unavailable or None) for every backend."""
    return [(n, unavailable_reason(n)) for n in BACKEND_NAMES]
