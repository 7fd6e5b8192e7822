"""``patch_torch()``: route torch's gradient clipping functions to gradstats, in one line.

Frameworks clip through ``torch.nn.utils``: the transformers Trainer (through accelerate)
calls ``get_total_norm`` and ``clip_grads_with_norm_``, Lightning calls
``clip_grad_norm_`` or ``clip_grad_value_``, many training scripts call
``clip_grad_norm_``. Replacing only ``clip_grad_norm_`` misses the first two;
:func:`patch_torch` replaces all of them, in ``torch.nn.utils`` and in
``torch.nn.utils.clip_grad`` (where torch's own ``clip_grad_norm_`` looks up the other
two), so every caller that looks the functions up at call time gets the fused,
sync-free gradstats versions::

    import gradstats
    gradstats.patch_torch()          # for the rest of the process
    trainer.train()

    with gradstats.patch_torch():    # or only inside a block
        trainer.train()

What is routed, and where:

=================================  =============================================
``torch.nn.utils.`` name           gradstats function
=================================  =============================================
``clip_grad_norm_``                :func:`gradstats.clip_grad_norm_`
``get_total_norm`` (torch>=2.6)    :func:`gradstats.get_total_norm`
``clip_grads_with_norm_`` (2.6+)   :func:`gradstats.clip_grads_with_norm_`
``clip_grad_value_``               :func:`gradstats.clip_grad_value_`
``clip_grad_norm`` (deprecated)    :func:`gradstats.clip_grad_norm_` (torch's
                                   ``FutureWarning`` is kept)
=================================  =============================================

The same names in ``torch.nn.utils.clip_grad`` are replaced too, including torch's
private ``_get_total_norm`` / ``_clip_grads_with_norm_`` there: a reference to torch's
own ``clip_grad_norm_`` taken before patching then measures and scales through gradstats
as well. Functions the installed torch lacks are skipped (torch >= 2.4 is supported).

Behaviour is unchanged: arguments the fused kernels do not handle (``norm_type <= 0``,
``-inf``, a negative or NaN ``max_norm``) go to the function that was there before
patching. One difference is deliberate: ``get_total_norm`` returns a float32 norm for
bf16/fp16 gradients (accumulated in float32) where torch returns the gradients' dtype.

Limits:
    * Code that bound a function to its own name *before* patching
      (``from torch.nn.utils import clip_grad_norm_`` at module level) keeps torch's
      function object. For ``clip_grad_norm_`` that still goes through gradstats (torch's
      version looks up ``_get_total_norm``/``_clip_grads_with_norm_`` in its module,
      which are patched), but ``clip_grad_value_`` and the others do not: patch before
      importing such code, or call gradstats directly there. Imports done inside a
      function at call time (accelerate, transformers) are covered.
    * FSDP1's ``FullyShardedDataParallel.clip_grad_norm_`` and DeepSpeed clip on their
      own and are not affected.

Nesting rule (reference counting): the first active handle installs the patch and
remembers what was there; later calls return new handles on the same patch (patching
twice is one patch); the patch is removed, restoring exactly the remembered objects,
when the last handle is undone. ``undo()`` on a handle that is already undone does
nothing. A name that someone else replaced after gradstats patched it is left as they
set it. All of this is guarded by a lock.
"""
from __future__ import annotations

import functools
import threading
import warnings
from types import ModuleType
from typing import Any, Callable, Dict, List, Tuple

import torch.nn.utils
import torch.nn.utils.clip_grad

from . import clip

__all__ = ["TorchPatch", "patch_torch", "is_patched"]

# (attribute in torch.nn.utils.clip_grad / torch.nn.utils, what it is)
_NAMES: Tuple[Tuple[str, str], ...] = (
    ("clip_grad_norm_", "clip_grad_norm_"),
    ("clip_grad_norm", "clip_grad_norm"),
    ("get_total_norm", "get_total_norm"),
    ("_get_total_norm", "get_total_norm"),
    ("clip_grads_with_norm_", "clip_grads_with_norm_"),
    ("_clip_grads_with_norm_", "clip_grads_with_norm_"),
    ("clip_grad_value_", "clip_grad_value_"),
)

_LOCK = threading.RLock()
_count = 0
# (module, attribute) -> the object that was there before patching
_saved: Dict[Tuple[ModuleType, str], Any] = {}
# kind -> the function that was there before patching (for arguments gradstats leaves
# to torch); kept after undo() so that a stale reference to a wrapper still works.
_fallback: Dict[str, Callable] = {}


def _norm_ok(norm_type: Any) -> bool:
    """Whether the fused kernels compute this norm (``p > 0`` or ``inf``)."""
    try:
        return float(norm_type) > 0
    except (TypeError, ValueError):
        return False  # torch raises its own error


def _max_ok(max_norm: Any) -> bool:
    """Whether gradstats accepts this ``max_norm`` (a number ``>= 0``)."""
    try:
        return float(max_norm) >= 0  # False for NaN
    except (TypeError, ValueError):
        return False


def _original(kind: str) -> Callable:
    fn = _fallback.get(kind)
    if fn is None:  # pragma: no cover - only reachable if torch lacks the function
        raise RuntimeError(f"torch.nn.utils has no {kind} to fall back to")
    return fn


@functools.wraps(clip.clip_grad_norm_)
def _clip_grad_norm_(parameters, max_norm, norm_type=2.0, error_if_nonfinite=False,
                     foreach=None):
    if _norm_ok(norm_type) and _max_ok(max_norm):
        return clip.clip_grad_norm_(parameters, max_norm, norm_type, error_if_nonfinite,
                                    foreach)
    return _original("clip_grad_norm_")(parameters, max_norm, norm_type,
                                        error_if_nonfinite, foreach)


@functools.wraps(clip.get_total_norm)
def _get_total_norm(tensors, norm_type=2.0, error_if_nonfinite=False, foreach=None):
    if _norm_ok(norm_type):
        return clip.get_total_norm(tensors, norm_type, error_if_nonfinite, foreach)
    return _original("get_total_norm")(tensors, norm_type, error_if_nonfinite, foreach)


@functools.wraps(clip.clip_grads_with_norm_)
def _clip_grads_with_norm_(parameters, max_norm, total_norm, foreach=None):
    if _max_ok(max_norm):
        return clip.clip_grads_with_norm_(parameters, max_norm, total_norm, foreach)
    return _original("clip_grads_with_norm_")(parameters, max_norm, total_norm, foreach)


@functools.wraps(clip.clip_grad_value_)
def _clip_grad_value_(parameters, clip_value, foreach=None):
    return clip.clip_grad_value_(parameters, clip_value, foreach)


def _clip_grad_norm(parameters, max_norm, norm_type=2.0, error_if_nonfinite=False,
                    foreach=None):
    """Deprecated alias of ``clip_grad_norm_`` (torch's warning is kept)."""
    warnings.warn("`torch.nn.utils.clip_grad_norm` is now deprecated in favor of "
                  "`torch.nn.utils.clip_grad_norm_`.", FutureWarning, stacklevel=2)
    return _clip_grad_norm_(parameters, max_norm, norm_type, error_if_nonfinite, foreach)


_WRAPPERS: Dict[str, Callable] = {
    "clip_grad_norm_": _clip_grad_norm_,
    "clip_grad_norm": _clip_grad_norm,
    "get_total_norm": _get_total_norm,
    "clip_grads_with_norm_": _clip_grads_with_norm_,
    "clip_grad_value_": _clip_grad_value_,
}
for _kind, _fn in _WRAPPERS.items():
    _fn.__module__ = __name__
    _fn.__gradstats_patch__ = _kind  # type: ignore[attr-defined]


def _targets() -> List[Tuple[ModuleType, str, str]]:
    """(module, attribute, kind) for every function this torch has."""
    out = []
    for mod in (torch.nn.utils, torch.nn.utils.clip_grad):
        for attr, kind in _NAMES:
            if hasattr(mod, attr):
                out.append((mod, attr, kind))
    return out


def _install() -> None:
    targets = _targets()
    fallbacks: Dict[str, Callable] = {}
    for mod, attr, kind in targets:
        cur = getattr(mod, attr)
        _saved[(mod, attr)] = cur
        if getattr(cur, "__gradstats_patch__", None) is None:
            fallbacks.setdefault(kind, cur)  # torch.nn.utils' object first
    _fallback.update(fallbacks)
    for mod, attr, kind in targets:
        setattr(mod, attr, _WRAPPERS[kind])


def _restore() -> None:
    for (mod, attr), old in _saved.items():
        cur = getattr(mod, attr, None)
        if getattr(cur, "__gradstats_patch__", None) is not None:  # still ours
            setattr(mod, attr, old)
        # else: someone replaced it after we patched; leave theirs in place
    _saved.clear()


class TorchPatch:
    """A handle on the :func:`patch_torch` patch; creating one is calling
    :func:`patch_torch`.

    ``undo()`` releases this handle; the patch is removed when the last handle is
    released (see the module docstring for the rule). Usable as a context manager.

    Attributes:
        active: whether this handle still holds the patch.
    """

    __slots__ = ("active",)

    def __init__(self) -> None:
        global _count
        with _LOCK:
            if _count == 0:
                _install()
            _count += 1
            self.active = True

    def undo(self) -> None:
        """Release this handle; when it was the last one, restore torch's functions.

        Calling it again does nothing.
        """
        global _count
        with _LOCK:
            if not self.active:
                return
            self.active = False
            _count -= 1
            if _count == 0:
                _restore()

    def __enter__(self) -> "TorchPatch":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.undo()

    def __repr__(self) -> str:
        return f"TorchPatch(active={self.active}, handles={_count})"


def patch_torch() -> TorchPatch:
    r"""Route torch's gradient clipping functions to gradstats' fused versions.

    The one-line way to speed up any framework that clips through ``torch.nn.utils``
    (the transformers Trainer via accelerate, Lightning, plain training loops): after
    this call ``torch.nn.utils.clip_grad_norm_``, ``get_total_norm``,
    ``clip_grads_with_norm_``, ``clip_grad_value_`` (and the deprecated
    ``clip_grad_norm``), in ``torch.nn.utils`` and in ``torch.nn.utils.clip_grad``, are
    gradstats' drop-ins: same arguments, same results, one fused pass and no host sync.
    See :mod:`gradstats.patch` for what is covered and what is not (references bound
    before patching).

    Patching is reference-counted and thread-safe: calling it while patched returns a
    new handle on the same patch; torch's functions come back when every handle has been
    undone.

    Returns:
        TorchPatch: a handle; ``handle.undo()`` (or leaving ``with patch_torch():``)
        releases it.

    Example::

        >>> import gradstats
        >>> with gradstats.patch_torch():
        ...     trainer.train()          # Trainer's clipping runs through gradstats
        >>> h = gradstats.patch_torch()  # or for the rest of the process
        >>> h.undo()
    """
    return TorchPatch()


def is_patched() -> bool:
    """Whether a :func:`patch_torch` handle is active."""
    with _LOCK:
        return _count > 0
