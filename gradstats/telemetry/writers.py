"""Writers of the stats log: JSON Lines, CSV and TensorBoard, chosen by :func:`open_writer`.

A writer takes records (dicts, see :mod:`gradstats.telemetry.format`) one at a time through
``write(record)``, and has ``flush()`` and ``close()``.
"""
from __future__ import annotations

import csv
import io
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Union

from .format import _PER_GROUP, _enc


class JSONLWriter:
    """Writes records as JSON Lines (the default log format).

    Args:
        path_or_file: a path (the parent folder is created) or an open text file.
    """

    def __init__(self, path_or_file: Union[str, os.PathLike, io.TextIOBase]) -> None:
        if hasattr(path_or_file, "write"):
            self._f, self._own = path_or_file, False
            self.path = getattr(path_or_file, "name", None)
        else:
            self.path = os.fspath(path_or_file)
            parent = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(parent, exist_ok=True)
            self._f, self._own = open(self.path, "w", encoding="utf-8"), True

    def write(self, record: Dict[str, Any]) -> None:
        self._f.write(json.dumps(_enc(record), separators=(",", ":")) + "\n")

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        self._f.flush()
        if self._own:
            self._f.close()


class CSVWriter:
    """Writes records as CSV: ``# {header json}``, a column row, one row per step."""

    def __init__(self, path: Union[str, os.PathLike]) -> None:
        self.path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._f = open(self.path, "w", encoding="utf-8", newline="")
        self._w = csv.writer(self._f)
        self._cols: Optional[List[str]] = None
        self._G = 0

    @staticmethod
    def columns(G: int) -> List[str]:
        cols = ["step", "loss", "total_norm", "skipped", "skip_reason", "nonfinite",
                "loss_scale", "nonfinite_tensor_count"]
        for name in _PER_GROUP:
            cols += [f"{name}.{g}" for g in range(G)]
        return cols + ["nonfinite_tensors"]

    def write(self, record: Dict[str, Any]) -> None:
        kind = record.get("type")
        if kind == "header":
            self._f.write("# " + json.dumps(_enc(record), separators=(",", ":")) + "\n")
            self._G = len(record.get("groups", []))
            self._cols = self.columns(self._G)
            self._w.writerow(self._cols)
        elif kind == "end":
            self._f.write("# " + json.dumps(_enc(record), separators=(",", ":")) + "\n")
        elif kind == "step":
            row: List[Any] = []
            for c in self._cols or []:
                if "." in c:
                    name, g = c.rsplit(".", 1)
                    vals = record.get(name)
                    v = None if vals is None or int(g) >= len(vals) else vals[int(g)]
                elif c == "nonfinite_tensors":
                    v = ";".join(record.get(c) or [])
                else:
                    v = record.get(c)
                row.append("" if v is None else (int(v) if isinstance(v, bool) else v))
            self._w.writerow(row)

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class TensorBoardWriter:
    """Writes scalars to TensorBoard (needs the optional ``tensorboard`` package).

    Raises:
        ImportError: ``tensorboard`` is not installed (``pip install tensorboard``).
    """

    def __init__(self, logdir: Union[str, os.PathLike]) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception as e:  # torch raises ImportError when tensorboard is missing
            raise ImportError("the TensorBoard writer needs the tensorboard package "
                              f"(pip install tensorboard): {e}") from None
        self._tb = SummaryWriter(os.fspath(logdir))
        self._groups: List[str] = []

    def write(self, record: Dict[str, Any]) -> None:
        kind = record.get("type")
        if kind == "header":
            self._groups = list(record.get("groups", []))
            return
        if kind != "step":
            return
        s = int(record["step"])
        for k in ("loss", "total_norm", "loss_scale"):
            if record.get(k) is not None:
                self._tb.add_scalar(k, record[k], s)
        self._tb.add_scalar("skipped", float(bool(record.get("skipped"))), s)
        for name in ("norm", "max_abs", "clip_coef", "zscore", "lr", "nonfinite_count"):
            for g, v in enumerate(record.get(name) or []):
                if v is not None:
                    gname = self._groups[g] if g < len(self._groups) else str(g)
                    self._tb.add_scalar(f"{name}/{gname}", float(v), s)

    def flush(self) -> None:
        self._tb.flush()

    def close(self) -> None:
        self._tb.close()


class _MultiWriter:
    def __init__(self, writers: Sequence[Any]) -> None:
        self.writers = list(writers)
        self.path = next((getattr(w, "path", None) for w in self.writers
                          if getattr(w, "path", None)), None)

    def write(self, record: Dict[str, Any]) -> None:
        for w in self.writers:
            w.write(record)

    def flush(self) -> None:
        for w in self.writers:
            getattr(w, "flush", lambda: None)()

    def close(self) -> None:
        for w in self.writers:
            getattr(w, "close", lambda: None)()


def open_writer(spec: Any) -> Any:
    """A writer for ``spec``: a path (``.csv`` -> CSV, ``tensorboard:DIR`` -> TensorBoard,
    anything else -> JSON Lines), an object with ``write(record)``, or a list of these.

    Raises:
        TypeError: ``spec`` is none of these.
    """
    if isinstance(spec, (list, tuple)):
        return _MultiWriter([open_writer(s) for s in spec])
    if hasattr(spec, "write") and not isinstance(spec, (str, bytes, os.PathLike)):
        if isinstance(spec, io.TextIOBase):
            return JSONLWriter(spec)
        return spec
    if isinstance(spec, (str, os.PathLike)):
        s = os.fspath(spec)
        if s.startswith("tensorboard:"):
            return TensorBoardWriter(s[len("tensorboard:"):])
        if s.lower().endswith(".csv"):
            return CSVWriter(s)
        return JSONLWriter(s)
    raise TypeError(f"log must be a file path, a writer with write(record), a StatsLogger "
                    f"or a list of these, got {type(spec).__name__}")
