"""Named, contiguous entries of a flat output buffer (a leaf module: every layer may use it).

Kernels that write several results into one buffer (the finalize kernels) take the offsets
from a :class:`Layout`; Python reads the results back by name, never by raw offset.
"""
from __future__ import annotations

from typing import Dict, Tuple

from torch import Tensor

__all__ = ["Layout"]


class Layout:
    """Named, contiguous ``(offset, numel)`` entries of a flat buffer."""

    __slots__ = ("entries", "size")

    def __init__(self) -> None:
        self.entries: Dict[str, Tuple[int, int]] = {}
        self.size = 0

    def add(self, name: str, numel: int) -> int:
        if name in self.entries:
            raise KeyError(f"layout entry {name!r} defined twice")
        off = self.size
        self.entries[name] = (off, int(numel))
        self.size += int(numel)
        return off

    def offset(self, name: str) -> int:
        return self.entries[name][0]

    def view(self, buf: Tensor, name: str) -> Tensor:
        off, n = self.entries[name]
        return buf.narrow(0, off, n)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def __repr__(self) -> str:
        return f"Layout({self.entries})"
