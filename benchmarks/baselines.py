"""The eager baselines gradstats is measured against (what users run today).

Each function takes what the corresponding user code takes (parameters with ``.grad``, or
gradient tensors grouped like ``optimizer.param_groups``), does no host synchronisation,
and returns device tensors, so it can be timed and captured like gradstats' functions.

Bytes each one moves, for gradients of ``N`` bytes:

==========================================  ==========================================
``clip_foreach`` / ``clip_loop``            3N: one read for the norms, then every
                                            gradient is multiplied by the clamped
                                            coefficient (read + write) even when it is 1
``foreach_norm``                            N: per-tensor norms only
``eager_group_stats``                       >= 3N: norm, max-abs and non-finite count are
                                            separate passes (plus temporaries)
``flat_read``                               N: one vectorised read of a flat tensor
                                            holding the same bytes -- the floor
==========================================  ==========================================
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
from torch import Tensor


def clip_foreach(params: Sequence[Tensor], max_norm: float, norm_type: float = 2.0) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_(..., foreach=True)`` (its default on CUDA)."""
    return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type, foreach=True)


def clip_loop(params: Sequence[Tensor], max_norm: float, norm_type: float = 2.0) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_(..., foreach=False)``: one norm and one mul per tensor."""
    return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type, foreach=False)


def foreach_norm(grads: Sequence[Tensor], norm_type: float = 2.0) -> List[Tensor]:
    """``torch._foreach_norm`` alone: per-tensor norms (in the gradients' dtype)."""
    return torch._foreach_norm(list(grads), norm_type)


def has_get_total_norm() -> bool:
    return hasattr(torch.nn.utils, "get_total_norm")


def torch_get_total_norm(grads: Sequence[Tensor], norm_type: float = 2.0) -> Tensor:
    """``torch.nn.utils.get_total_norm`` (torch >= 2.6)."""
    return torch.nn.utils.get_total_norm(list(grads), norm_type)


def eager_group_stats(groups: Sequence[Sequence[Tensor]]) -> Dict[str, Tensor]:
    """Per-group L2 norm + max-abs + non-finite count, as a user writes it today.

    Per group: ``_foreach_norm`` then ``stack`` + ``vector_norm``; ``abs().amax()`` per
    tensor; ``(~isfinite).sum()`` per tensor. No ``.item()``: results stay on the device.
    Unlike gradstats, ``max_abs`` here includes non-finite values (a user rarely filters
    them), so it equals gradstats' only on finite gradients.

    Returns:
        dict of ``norm`` [G] (float32), ``total_norm`` (0-dim), ``max_abs`` [G] (float32),
        ``nonfinite`` [G] (int64).
    """
    norms, maxes, nonfin = [], [], []
    dev = None
    for grads in groups:
        grads = [g for g in grads if g.numel() > 0]  # amax of an empty tensor raises
        if not grads:
            norms.append(None)
            maxes.append(None)
            nonfin.append(None)
            continue
        dev = grads[0].device
        tn = torch._foreach_norm(grads, 2.0)
        norms.append(torch.linalg.vector_norm(torch.stack(tn).float()))
        maxes.append(torch.stack([g.abs().amax() for g in grads]).amax().float())
        nonfin.append(torch.stack([(~torch.isfinite(g)).sum() for g in grads]).sum())
    if dev is None:
        dev = torch.device("cpu")
    zf = torch.zeros((), device=dev)
    zi = torch.zeros((), device=dev, dtype=torch.int64)
    norm = torch.stack([zf if n is None else n for n in norms])
    return {
        "norm": norm,
        "total_norm": torch.linalg.vector_norm(norm),
        "max_abs": torch.stack([zf if m is None else m for m in maxes]),
        "nonfinite": torch.stack([zi if c is None else c for c in nonfin]),
    }


def make_flat(nbytes: int, dtype: torch.dtype, device, seed: int = 0) -> Tensor:
    """One flat tensor of about ``nbytes`` bytes of random ``dtype`` data (for the floor)."""
    esize = torch.empty((), dtype=dtype).element_size()
    n = max(1, nbytes // esize)
    gen = torch.Generator(device=torch.device(device)).manual_seed(seed)
    if dtype == torch.float32:
        return torch.randn(n, generator=gen, device=device)
    out = torch.empty(n, dtype=dtype, device=device)
    step = 2 ** 26
    for i in range(0, n, step):
        k = min(step, n - i)
        out[i:i + k].copy_(torch.randn(k, generator=gen, device=device))
    return out


def flat_read(flat: Tensor) -> Tensor:
    """The read floor: ``flat.sum()`` over one flat tensor of the gradients' bytes."""
    return flat.sum()


def flat_copy(src: Tensor, dst: Tensor) -> Tensor:
    """A device-to-device copy (bytes moved: read + write) -- the copy ceiling."""
    return dst.copy_(src)


# name -> what the row measures, for tables
DESCRIPTIONS = {
    "torch clip foreach": "torch.nn.utils.clip_grad_norm_(foreach=True)",
    "torch clip for-loop": "torch.nn.utils.clip_grad_norm_(foreach=False)",
    "torch _foreach_norm": "torch._foreach_norm (per-tensor norms only)",
    "torch get_total_norm": "torch.nn.utils.get_total_norm",
    "eager group stats": "per group: foreach norm + stack + norm; abs().amax(); isfinite count",
    "flat read": "flat.sum() over one tensor of the same bytes",
}
