"""The one bounded cache of gradstats (a leaf module: every layer may import it).

Every per-gradient-set cache (validated gradient sets, backend choices, kernel plans, index
tensors, element counts) is an :class:`LRU` keyed by *structure* — shapes, dtypes, groups,
devices, layouts — never by ``id()`` and never by data addresses, so that gradients that
move between steps (``zero_grad(set_to_none=True)`` + ``backward()``) hit the same entry.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Callable, Generic, Hashable, List, Optional, TypeVar

import torch
from torch import Tensor

__all__ = ["LRU", "device_tensor", "clear_all"]

V = TypeVar("V")

_ALL: "List[LRU[Any]]" = []


class LRU(Generic[V]):
    """A thread-safe least-recently-used map with at most ``maxsize`` entries.

    Args:
        maxsize: entries kept (>= 1); the least recently used one is evicted first.
        name: shown in ``repr`` (which cache it is).
    """

    def __init__(self, maxsize: int = 64, name: str = "") -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be >= 1, got {maxsize!r}")
        self.maxsize = int(maxsize)
        self.name = name
        self._d: "OrderedDict[Hashable, V]" = OrderedDict()
        self._lock = threading.Lock()
        _ALL.append(self)

    def get(self, key: Hashable) -> Optional[V]:
        """The value of ``key`` (made most recent), or ``None``."""
        with self._lock:
            v = self._d.get(key)
            if v is not None:
                self._d.move_to_end(key)
            return v

    def put(self, key: Hashable, value: V) -> V:
        """Store ``value`` under ``key``, evicting the least recently used entries."""
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            while len(self._d) > self.maxsize:
                self._d.popitem(last=False)
        return value

    def get_or_make(self, key: Hashable, make: Callable[[], V]) -> V:
        """The value of ``key``, made by ``make()`` (outside the lock) on a miss."""
        v = self.get(key)
        if v is None:
            v = self.put(key, make())
        return v

    def clear(self) -> None:
        with self._lock:
            self._d.clear()

    def __len__(self) -> int:
        return len(self._d)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._d

    def __repr__(self) -> str:
        return f"LRU({self.name!r}, {len(self._d)}/{self.maxsize})"


def clear_all() -> None:
    """Empty every gradstats cache (e.g. after changing settings that plans depend on)."""
    for c in list(_ALL):
        c.clear()


def device_tensor(values: Any, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A new tensor holding ``values`` on ``device``, without a host synchronisation.

    On CUDA the values go through pinned memory with a non-blocking copy on the current
    stream (the pinned source stays referenced by the result's ``_gs_src`` attribute until
    the result is freed, so the copy never reads freed memory); elsewhere a plain copy.
    """
    host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    pinned = host.pin_memory()
    out = torch.empty(pinned.shape, dtype=dtype, device=device)
    out.copy_(pinned, non_blocking=True)
    out._gs_src = pinned  # type: ignore[attr-defined]
    return out
