"""Reading a stats log back: :func:`read_log` (JSON Lines or CSV) -> :class:`LogData`.

Corrupt or truncated lines do not stop the reading: each one is reported with its line
number in :attr:`LogData.problems`. The format is documented in :mod:`gradstats.telemetry.format`.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

from .format import _BOOLS, _NONFINITE_STR, FORMAT_NAME, FORMAT_VERSION, _dec


@dataclass
class LogData:
    """A stats log read back by :func:`read_log`.

    Attributes:
        path: the file.
        header: the (first) header record, or ``{}`` if none was found.
        records: the step records in file order (values decoded: floats, bools, ``None``).
        end: the end record, or ``None`` if the run did not close the log.
        problems: one message per line that could not be used, naming the line number.
    """

    path: str
    header: Dict[str, Any] = field(default_factory=dict)
    records: List[Dict[str, Any]] = field(default_factory=list)
    end: Optional[Dict[str, Any]] = None
    problems: List[str] = field(default_factory=list)

    @property
    def groups(self) -> List[str]:
        return list(self.header.get("groups") or [])

    @property
    def label(self) -> str:
        meta = self.header.get("meta") or {}
        if meta.get("run") is not None:
            return str(meta["run"])
        base = os.path.basename(self.path)
        return base.rsplit(".", 1)[0] if "." in base else base


def _check_step(rec: Dict[str, Any]) -> Optional[str]:
    s = rec.get("step")
    if not isinstance(s, int) or isinstance(s, bool):
        return "step record without an integer 'step'"
    for k in ("norm", "clip_coef", "max_abs"):
        v = rec.get(k)
        if v is not None and not isinstance(v, list):
            return f"'{k}' is not a list"
    return None


def read_log(path: Union[str, os.PathLike]) -> LogData:
    """Read a stats log (JSON Lines or CSV) written by :class:`StatsLogger`.

    Corrupt or truncated lines do not stop the reading: each one is reported in
    :attr:`LogData.problems` with its line number, and every other line is returned.

    Raises:
        FileNotFoundError: ``path`` does not exist.
    """
    p = os.fspath(path)
    with open(p, "r", encoding="utf-8", errors="replace", newline="") as f:
        text = f.read()
    first = text.lstrip()[:1]
    if first == "#":
        return _read_csv(p, text)
    out = LogData(path=p)
    lines = text.split("\n")
    ends_clean = text.endswith("\n")
    n_lines = len(lines) - (1 if ends_clean or text == "" else 0)
    for i, line in enumerate(lines[:n_lines], start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            last = (i == n_lines and not ends_clean)
            what = ("truncated: the file ends in the middle of this record (was the run "
                    "killed while writing?)" if last else f"not valid JSON ({e.msg} at "
                    f"column {e.colno})")
            out.problems.append(f"{p}: line {i}: {what}; line skipped")
            continue
        if not isinstance(obj, dict):
            out.problems.append(f"{p}: line {i}: expected a JSON object, got "
                                f"{type(obj).__name__}; line skipped")
            continue
        kind = obj.get("type")
        obj = {k: _dec(v) for k, v in obj.items()}
        if kind == "header":
            if obj.get("format") != FORMAT_NAME:
                out.problems.append(f"{p}: line {i}: header of an unknown format "
                                    f"{obj.get('format')!r}")
            v = obj.get("version")
            if isinstance(v, int) and v > FORMAT_VERSION:
                out.problems.append(f"{p}: line {i}: log format version {v} is newer than "
                                    f"this gradstats reads ({FORMAT_VERSION}); reading "
                                    f"what it can")
            if not out.header:
                out.header = obj
            else:
                out.header = {**out.header, **{k: obj[k] for k in ("groups", "params",
                                                                   "param_group")
                                               if k in obj}}
        elif kind == "step":
            bad = _check_step(obj)
            if bad:
                out.problems.append(f"{p}: line {i}: {bad}; line skipped")
                continue
            out.records.append(obj)
        elif kind == "end":
            out.end = obj
        else:
            out.problems.append(f"{p}: line {i}: unknown record type {kind!r}; line skipped")
    if not out.header:
        out.problems.append(f"{p}: no header record found (line 1 should be the header); "
                            f"group and parameter names are unknown")
    return out


def _num(s: str) -> Any:
    if s == "":
        return None
    if s in ("True", "true"):
        return True
    if s in ("False", "false"):
        return False
    try:
        return int(s)
    except ValueError:
        pass
    try:
        return float(s)
    except ValueError:
        return _NONFINITE_STR.get(s, s)


def _read_csv(p: str, text: str) -> LogData:
    out = LogData(path=p)
    cols: Optional[List[str]] = None
    lines = text.split("\n")
    ends_clean = text.endswith("\n")
    n_lines = len(lines) - (1 if ends_clean else 0)
    for i, line in enumerate(lines[:n_lines], start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        if line.startswith("#"):
            try:
                obj = {k: _dec(v) for k, v in json.loads(line[1:]).items()}
            except (json.JSONDecodeError, AttributeError) as e:
                out.problems.append(f"{p}: line {i}: comment line is not a JSON record "
                                    f"({e}); line skipped")
                continue
            if obj.get("type") == "header":
                out.header = out.header or obj
                cols = None
            elif obj.get("type") == "end":
                out.end = obj
            continue
        row = next(csv.reader([line]))
        if cols is None:
            cols = row
            continue
        if len(row) != len(cols):
            last = (i == n_lines and not ends_clean)
            what = ("truncated: the file ends in the middle of this row" if last else
                    f"{len(row)} fields where the column row has {len(cols)}")
            out.problems.append(f"{p}: line {i}: {what}; line skipped")
            continue
        rec: Dict[str, Any] = {"type": "step"}
        per: Dict[str, Dict[int, Any]] = {}
        try:
            for c, v in zip(cols, row):
                if "." in c and c.rsplit(".", 1)[1].isdigit():
                    name, g = c.rsplit(".", 1)
                    val = _num(v)
                    if name in _BOOLS and val is not None:
                        val = bool(val)
                    per.setdefault(name, {})[int(g)] = val
                elif c == "nonfinite_tensors":
                    rec[c] = [s for s in v.split(";") if s] if v else []
                elif c in ("skip_reason",):
                    rec[c] = v or None
                else:
                    val = _num(v)
                    if c in _BOOLS and val is not None:
                        val = bool(val)
                    rec[c] = val
        except Exception as e:  # pragma: no cover - defensive
            out.problems.append(f"{p}: line {i}: unreadable row ({e}); line skipped")
            continue
        for name, d in per.items():
            vals = [d[g] for g in sorted(d)]
            rec[name] = None if all(v is None for v in vals) else vals
        bad = _check_step(rec)
        if bad:
            out.problems.append(f"{p}: line {i}: {bad}; line skipped")
            continue
        out.records.append(rec)
    if not out.header:
        out.problems.append(f"{p}: no header record found; group and parameter names are "
                            f"unknown")
    return out
