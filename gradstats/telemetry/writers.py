"""Writers of the stats log: JSON Lines, CSV and TensorBoard, chosen by :func:`open_writer`.

A writer takes records (dicts, see :mod:`gradstats.telemetry.format`) one at a time through
``write(record)``, and has ``flush()`` and ``close()``. A file writer opened on an existing,
non-empty log appends to it (a new *segment*) unless ``overwrite=True``; its ``resumed``
attribute then says so, and :class:`~gradstats.telemetry.StatsLogger` marks the segment's
header with ``"resume": true``.
"""
from __future__ import annotations

import csv
import io
import json
import os
import warnings
from typing import Any, Dict, List, Optional, Sequence, Union

from .format import PER_GROUP_FIELDS, encode_value

__all__ = ["JSONLWriter", "CSVWriter", "TensorBoardWriter", "MultiWriter", "open_writer"]


def _has_content(path: str) -> bool:
    try:
        return os.path.isfile(path) and os.path.getsize(path) > 0
    except OSError:
        return False


def _ends_with_newline(path: str) -> bool:
    """Whether a non-empty file ends with a newline (a killed run may have cut a line)."""
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def _open_append(path: str, **kw: Any) -> io.TextIOBase:
    """Open ``path`` for appending; a cut last line is ended first so that the next
    record starts on a line of its own."""
    f = open(path, "a", encoding="utf-8", **kw)
    if not _ends_with_newline(path):
        f.write("\n")
    return f


def _dumps(record: Dict[str, Any]) -> str:
    # allow_nan=False: a non-finite float that escaped encode_value is an error here, not
    # an invalid line in the file
    return json.dumps(encode_value(record), separators=(",", ":"), allow_nan=False)


class JSONLWriter:
    """Writes records as JSON Lines (the default log format).

    Args:
        path_or_file: a path (the parent folder is created) or an open text file.
        overwrite: truncate an existing file; by default records are appended to it and
            :attr:`resumed` is ``True`` when it already held a log.
    """

    def __init__(self, path_or_file: Union[str, os.PathLike, io.TextIOBase], *,
                 overwrite: bool = False) -> None:
        #: the file already held records: this writer appends a new segment
        self.resumed = False
        if hasattr(path_or_file, "write"):
            self._f, self._own = path_or_file, False
            self.path = getattr(path_or_file, "name", None)
        else:
            self.path = os.fspath(path_or_file)
            parent = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(parent, exist_ok=True)
            if not overwrite and _has_content(self.path):
                self.resumed = True
                self._f = _open_append(self.path)
            else:
                self._f = open(self.path, "w", encoding="utf-8")
            self._own = True

    def write(self, record: Dict[str, Any]) -> None:
        self._f.write(_dumps(record) + "\n")

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        try:
            self._f.flush()
        finally:
            if self._own:
                self._f.close()


def _last_columns(path: str) -> Optional[List[str]]:
    """The column row of the last segment of a CSV log (``None`` if there is none)."""
    cols: Optional[List[str]] = None
    after_header = False
    with open(path, "r", encoding="utf-8", errors="replace", newline="") as f:
        for line in f:
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            if line.startswith("#"):
                after_header = '"header"' in line
                continue
            if after_header:
                cols = next(csv.reader([line]), None)
                after_header = False
    return cols


class CSVWriter:
    """Writes records as CSV: ``# {header json}``, a column row, one row per step.

    Args:
        path: the file (the parent folder is created).
        overwrite: truncate an existing file. By default a new segment is appended when
            the file's last column row matches this run's columns; otherwise the
            segment goes to the first ``<name>.<k>.csv`` (k = 1, 2, ...) that is new or
            has the same columns, with a ``RuntimeWarning`` naming it (:attr:`path` is
            then that file).
    """

    def __init__(self, path: Union[str, os.PathLike], *, overwrite: bool = False) -> None:
        self.path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._f: Optional[io.TextIOBase] = None
        self._w: Any = None
        #: the file already held records: this writer appends a new segment
        self.resumed = not overwrite and _has_content(self.path)
        if not self.resumed:
            self._open(self.path, "w")
        self._cols: Optional[List[str]] = None
        self._G = 0

    def _open(self, path: str, mode: str) -> None:
        self.path = path
        self._f = (_open_append(path, newline="") if mode == "a" else
                   open(path, "w", encoding="utf-8", newline=""))
        self._w = csv.writer(self._f)

    def _open_segment(self, cols: List[str]) -> None:
        """Open the file of an appended segment: the same one if its columns match."""
        base = self.path
        if _last_columns(base) == cols:
            self._open(base, "a")
            return
        stem = base[:-4] if base.lower().endswith(".csv") else base
        k = 1
        while True:
            cand = f"{stem}.{k}.csv"
            if not _has_content(cand):
                self._open(cand, "w")
                break
            if _last_columns(cand) == cols:
                self._open(cand, "a")
                break
            k += 1
        warnings.warn(f"gradstats: {base} holds a CSV log with other columns (another "
                      f"number of groups); this run's log goes to {cand} instead",
                      RuntimeWarning, stacklevel=4)

    @staticmethod
    def columns(G: int) -> List[str]:
        """The column names of a log with ``G`` groups."""
        cols = ["step", "loss", "total_norm", "skipped", "skip_reason", "nonfinite",
                "loss_scale", "nonfinite_tensor_count"]
        for name in PER_GROUP_FIELDS:
            cols += [f"{name}.{g}" for g in range(G)]
        return cols + ["nonfinite_tensors"]

    def write(self, record: Dict[str, Any]) -> None:
        kind = record.get("type")
        if kind == "header":
            G = len(record.get("groups", []))
            cols = self.columns(G)
            line = "# " + _dumps(record) + "\n"
            if self._f is None:
                self._open_segment(cols)
            assert self._f is not None
            self._f.write(line)
            self._G, self._cols = G, cols
            self._w.writerow(cols)
        elif self._f is None:
            return  # nothing before a header
        elif kind == "end":
            self._f.write("# " + _dumps(record) + "\n")
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
        if self._f is not None:
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
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


class MultiWriter:
    """Writes every record to each of several writers (``log=[...]``)."""

    def __init__(self, writers: Sequence[Any]) -> None:
        self.writers = list(writers)

    @property
    def path(self) -> Optional[str]:
        return next((getattr(w, "path", None) for w in self.writers
                     if getattr(w, "path", None)), None)

    @property
    def resumed(self) -> bool:
        return any(getattr(w, "resumed", False) for w in self.writers)

    def write(self, record: Dict[str, Any]) -> None:
        for w in self.writers:
            w.write(record)

    def flush(self) -> None:
        for w in self.writers:
            getattr(w, "flush", lambda: None)()

    def close(self) -> None:
        err: Optional[BaseException] = None
        for w in self.writers:
            try:
                getattr(w, "close", lambda: None)()
            except Exception as e:  # close the others, then report the first failure
                err = err or e
        if err is not None:
            raise err


def open_writer(spec: Any, *, overwrite: bool = False) -> Any:
    """A writer for ``spec``: a path (``.csv`` -> CSV, ``tensorboard:DIR`` -> TensorBoard,
    anything else -> JSON Lines), an object with ``write(record)``, or a list of these.

    Args:
        spec: see above.
        overwrite: truncate existing log files instead of appending a new segment.

    Raises:
        TypeError: ``spec`` is none of these.
    """
    if isinstance(spec, (list, tuple)):
        return MultiWriter([open_writer(s, overwrite=overwrite) for s in spec])
    if hasattr(spec, "write") and not isinstance(spec, (str, bytes, os.PathLike)):
        if isinstance(spec, io.TextIOBase):
            return JSONLWriter(spec)
        return spec
    if isinstance(spec, (str, os.PathLike)):
        s = os.fspath(spec)
        if s.startswith("tensorboard:"):
            return TensorBoardWriter(s[len("tensorboard:"):])
        if s.lower().endswith(".csv"):
            return CSVWriter(s, overwrite=overwrite)
        return JSONLWriter(s, overwrite=overwrite)
    raise TypeError(f"log must be a file path, a writer with write(record), a StatsLogger "
                    f"or a list of these, got {type(spec).__name__}")
