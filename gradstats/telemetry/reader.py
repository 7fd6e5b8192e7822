"""Reading a stats log back: :func:`read_log` (JSON Lines or CSV) -> :class:`LogData`.

Nothing in a file stops the reading: a line that is not JSON (a run killed while writing
it), a record of an unknown type or a field of the wrong type or out of range is reported
with its line number in :attr:`LogData.problems`, and everything else is returned. Every
field is checked against the format (:mod:`gradstats.telemetry.format`): what a caller gets
has the documented types, so a bad value in a file can never surface as an exception
further on. Messages about *invalid* content (as opposed to lines cut short) are also in
:attr:`LogData.errors`. Logs with several segments (a run resumed into the same file)
are read in file order.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from .format import (BOOL_FIELDS, FORMAT_NAME, FORMAT_VERSION, MAX_STEP, NONFINITE_STRINGS,
                     PER_GROUP_FIELDS, decode_value)

__all__ = ["LogData", "read_log", "check_record"]


@dataclass
class LogData:
    """A stats log read back by :func:`read_log`.

    Attributes:
        path: the file.
        header: the first header record (with the group and parameter names of a later
            header when the number of groups changed), or ``{}`` if none was found.
        records: the step records of all segments in file order (values decoded and
            checked: floats, ints, bools, strings, lists of these, ``None``).
        end: the end record of the last segment, or ``None`` if the run did not close
            the log.
        problems: one message per line or field that could not be used, naming the
            file and line number.
        errors: the messages of :attr:`problems` about invalid content (a value of the
            wrong type or out of range, an unknown record type), as opposed to lines that
            are cut short or not JSON.
        headers: every header record, in file order.
        ends: the end record of each segment (``None`` for a segment that was not
            closed).
        segment_starts: index in :attr:`records` of the first record of each segment.
        segment_headers: the header that opened each segment (``None`` for a segment
            that does not start with one).
    """

    path: str
    header: Dict[str, Any] = field(default_factory=dict)
    records: List[Dict[str, Any]] = field(default_factory=list)
    end: Optional[Dict[str, Any]] = None
    problems: List[str] = field(default_factory=list)
    errors: List[str] = field(default_factory=list)
    headers: List[Dict[str, Any]] = field(default_factory=list)
    ends: List[Optional[Dict[str, Any]]] = field(default_factory=list)
    segment_starts: List[int] = field(default_factory=list)
    segment_headers: List[Optional[Dict[str, Any]]] = field(default_factory=list)

    @property
    def segments(self) -> int:
        """Number of segments: runs written into this file one after the other (a
        resumed run appends one)."""
        return len(self.segment_starts)

    @property
    def groups(self) -> List[str]:
        return [str(g) for g in (self.header.get("groups") or [])]

    @property
    def label(self) -> str:
        meta = self.header.get("meta")
        if isinstance(meta, dict) and meta.get("run") is not None:
            return str(meta["run"])
        base = os.path.basename(self.path)
        return base.rsplit(".", 1)[0] if "." in base else base

    @property
    def dropped_rows(self) -> int:
        """Step records the logger could not write (summed over the segments' end
        records)."""
        return sum(int(e.get("dropped_rows") or 0) for e in self.ends if e)


# ---------------------------------------------------------------------- field checks
def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def _kind(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _as_float(v: Any) -> Optional[float]:
    """A number as a float (``None`` if ``v`` is not a finite-representable number)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        return float(v)
    except OverflowError:
        return None


# each checker returns (ok, cleaned value, what was expected)
Check = Callable[[Any], Tuple[bool, Any, str]]


def _number(v: Any) -> Tuple[bool, Any, str]:
    if v is None:
        return True, None, ""
    f = _as_float(v)
    if f is None:
        return False, None, "a number or null"
    return True, (v if _is_int(v) and abs(v) < 2 ** 63 else f), ""


def _int_in(lo: int, hi: int = 2 ** 63, nullable: bool = True) -> Check:
    rng = f" in [{lo}, 2**{hi.bit_length() - 1})"

    def chk(v: Any) -> Tuple[bool, Any, str]:
        if v is None and nullable:
            return True, None, ""
        if _is_int(v) and lo <= v < hi:
            return True, v, ""
        return False, None, "an integer" + rng
    return chk


def _boolean(v: Any) -> Tuple[bool, Any, str]:
    if v is None or isinstance(v, bool):
        return True, v, ""
    if _is_int(v) and v in (0, 1):
        return True, bool(v), ""
    return False, None, "true, false or null"


def _string(v: Any) -> Tuple[bool, Any, str]:
    if v is None or isinstance(v, str):
        return True, v, ""
    return False, None, "a string or null"


def _list_of(elem: Check, what: str) -> Check:
    def chk(v: Any) -> Tuple[bool, Any, str]:
        if v is None:
            return True, None, ""
        if not isinstance(v, list):
            return False, None, f"a list of {what}"
        out = []
        for x in v:
            ok, c, _ = elem(x)
            if not ok or isinstance(x, list):
                return False, None, f"a list of {what}"
            out.append(c)
        return True, out, ""
    return chk


def _str_list(v: Any) -> Tuple[bool, Any, str]:
    if v is None:
        return True, None, ""
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return True, list(v), ""
    return False, None, "a list of strings"


def _dict(v: Any) -> Tuple[bool, Any, str]:
    if v is None or isinstance(v, dict):
        return True, v, ""
    return False, None, "an object"


def _skip_reason(v: Any) -> Tuple[bool, Any, str]:
    if v is None or v in ("nonfinite", "spike", "other"):
        return True, v, ""
    return False, None, "null, \"nonfinite\", \"spike\" or \"other\""


def _norm_type(v: Any) -> Tuple[bool, Any, str]:
    f = _as_float(v)
    if f is not None and f > 0:  # inf included, NaN not
        return True, f, ""
    return False, None, "a positive number"


_NUMS = _list_of(_number, "numbers or nulls")
_HEADER: Dict[str, Check] = {
    "format": _string, "version": _int_in(0), "gradstats_version": _string,
    "torch_version": _string, "created": _string, "norm_type": _norm_type,
    "groups": _str_list, "params": _str_list,
    "param_group": _list_of(_int_in(0, nullable=False), "integers >= 0"),
    "flush_every": _int_in(1), "device": _string, "optimizer": _string, "policy": _string,
    "spike": _string, "meta": _dict, "resume": _boolean,
    "resume_step": _int_in(0, MAX_STEP), "rank": _int_in(0), "world_size": _int_in(1),
}
_STEP: Dict[str, Check] = {
    "step": _int_in(0, MAX_STEP, nullable=False), "loss": _number, "total_norm": _number,
    "loss_scale": _number, "skipped": _boolean, "nonfinite": _boolean,
    "skip_reason": _skip_reason, "nonfinite_tensors": _str_list,
    "nonfinite_tensor_count": _int_in(0),
}
for _name in PER_GROUP_FIELDS:
    _STEP[_name] = (_list_of(_boolean, "booleans or nulls") if _name in BOOL_FIELDS else
                    _list_of(_int_in(0), "integers >= 0 or nulls")
                    if _name == "nonfinite_count" else _NUMS)
_END: Dict[str, Check] = {"steps": _int_in(0), "counters": _dict,
                          "dropped_rows": _int_in(0), "last_error": _string}
_SCHEMA = {"header": _HEADER, "step": _STEP, "end": _END}


def check_record(rec: Dict[str, Any]) -> Tuple[Optional[Dict[str, Any]], List[str]]:
    """Check a decoded record's fields against the format.

    Args:
        rec: a record (``"type"`` one of ``header``, ``step``, ``end``) with the
            non-finite strings already decoded.

    Returns:
        ``(record, messages)``: the record with every invalid field removed (``None``
        when the record cannot be used at all: a step without a valid ``step``), and one
        message per invalid field.
    """
    kind = rec.get("type")
    schema = _SCHEMA.get(kind) if isinstance(kind, str) else None
    if schema is None:
        return None, [f"unknown record type {_short(kind)}"]
    out = dict(rec)
    msgs: List[str] = []
    for name, chk in schema.items():
        if name not in out:
            continue
        ok, val, want = chk(out[name])
        if ok:
            out[name] = val
            continue
        del out[name]
        if kind == "step" and name == "step":
            return None, [f"step record without an integer 'step' (got {_kind(rec[name])} "
                          f"{_short(rec[name])}, expected {want}); line skipped"]
        msgs.append(f"{kind} record field {name!r} is {_kind(rec[name])} "
                    f"{_short(rec[name])}, expected {want}; value ignored")
    if kind == "step" and "step" not in out:
        return None, ["step record without an integer 'step'; line skipped"]
    return out, msgs


# ------------------------------------------------------------------------- reading
class _Builder:
    """Collects records of one file into a :class:`LogData`, segment by segment."""

    def __init__(self, p: str) -> None:
        self.out = LogData(path=p)
        self._after_end = False

    def problem(self, line: int, msg: str, error: bool = False) -> None:
        m = f"{self.out.path}: line {line}: {msg}"
        self.out.problems.append(m)
        if error:
            self.out.errors.append(m)

    def _new_segment(self, header: Optional[Dict[str, Any]]) -> None:
        out = self.out
        out.segment_starts.append(len(out.records))
        out.segment_headers.append(header)
        out.ends.append(None)

    def add(self, line: int, obj: Dict[str, Any]) -> None:
        rec, msgs = check_record(obj)
        for m in msgs:
            self.problem(line, m, error=True)
        if rec is None:
            return
        kind = rec["type"]
        out = self.out
        if kind == "header":
            if rec.get("format") != FORMAT_NAME:
                self.problem(line, f"header of an unknown format {_short(rec.get('format'))}")
            v = rec.get("version")
            if isinstance(v, int) and v > FORMAT_VERSION:
                self.problem(line, f"log format version {v} is newer than this gradstats "
                                   f"reads ({FORMAT_VERSION}); reading what it can")
            if not out.headers or rec.get("resume") or self._after_end:
                self._new_segment(rec)
            self._after_end = False
            out.headers.append(rec)
            if not out.header:
                out.header = rec
            else:
                out.header = {**out.header, **{k: rec[k] for k in ("groups", "params",
                                                                   "param_group")
                                               if k in rec}}
        elif kind == "step":
            if not out.segment_starts or self._after_end:
                self._new_segment(None)
            self._after_end = False
            out.records.append(rec)
        else:  # end
            if not out.segment_starts:
                self._new_segment(None)
            out.ends[-1] = rec
            self._after_end = True

    def finish(self, no_header: str) -> LogData:
        out = self.out
        out.end = out.ends[-1] if out.ends else None
        if not out.header:
            out.problems.append(f"{out.path}: {no_header}")
        return out


def read_log(path: Union[str, os.PathLike]) -> LogData:
    """Read a stats log (JSON Lines or CSV) written by :class:`StatsLogger`.

    Corrupt, truncated or invalid lines and fields do not stop the reading: each one is
    reported in :attr:`LogData.problems` with its line number, and every other line is
    returned, its fields checked against the format.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        IsADirectoryError: ``path`` is a folder.
        OSError: the file cannot be read.
    """
    p = os.fspath(path)
    with open(p, "r", encoding="utf-8", errors="replace", newline="") as f:
        text = f.read()
    first = text.lstrip()[:1]
    if first == "#":
        return _read_csv(p, text)
    b = _Builder(p)
    lines = text.split("\n")
    ends_clean = text.endswith("\n")
    n_lines = len(lines) - (1 if ends_clean or text == "" else 0)
    for i, line in enumerate(lines[:n_lines], start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError) as e:
            last = (i == n_lines and not ends_clean)
            what = ("truncated: the file ends in the middle of this record (was the run "
                    "killed while writing?)" if last else
                    f"not valid JSON ({e.msg} at column {e.colno})"
                    if isinstance(e, json.JSONDecodeError) else
                    f"not valid JSON ({type(e).__name__}: {str(e)[:60]})")
            b.problem(i, f"{what}; line skipped")
            continue
        if not isinstance(obj, dict):
            b.problem(i, f"expected a JSON object, got {type(obj).__name__}; line skipped",
                      error=True)
            continue
        b.add(i, {k: decode_value(v) for k, v in obj.items()})
    return b.finish("no header record found (line 1 should be the header); group and "
                    "parameter names are unknown")


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
        return NONFINITE_STRINGS.get(s, s)


def _read_csv(p: str, text: str) -> LogData:
    b = _Builder(p)
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
                raw = json.loads(line[1:])
            except (ValueError, RecursionError) as e:
                b.problem(i, f"comment line is not a JSON record ({str(e)[:60]}); line "
                             f"skipped")
                continue
            if not isinstance(raw, dict):
                b.problem(i, f"comment line holds a JSON {type(raw).__name__}, not a "
                             f"record; line skipped", error=True)
                continue
            obj = {k: decode_value(v) for k, v in raw.items()}
            if obj.get("type") == "header":
                cols = None
            b.add(i, obj)
            continue
        try:
            row = next(csv.reader([line]))
        except csv.Error as e:
            b.problem(i, f"not a CSV row ({e}); line skipped")
            continue
        if cols is None:
            cols = row
            continue
        if len(row) != len(cols):
            last = (i == n_lines and not ends_clean)
            what = ("truncated: the file ends in the middle of this row" if last else
                    f"{len(row)} fields where the column row has {len(cols)}")
            b.problem(i, f"{what}; line skipped")
            continue
        rec: Dict[str, Any] = {"type": "step"}
        per: Dict[str, Dict[int, Any]] = {}
        for c, v in zip(cols, row):
            if "." in c and c.rsplit(".", 1)[1].isdigit():
                name, g = c.rsplit(".", 1)
                per.setdefault(name, {})[int(g)] = _num(v)
            elif c == "nonfinite_tensors":
                rec[c] = [s for s in v.split(";") if s] if v else []
            elif c == "skip_reason":
                rec[c] = v or None
            else:
                rec[c] = _num(v)
        for name, d in per.items():
            vals = [d[g] for g in sorted(d)]
            rec[name] = None if all(v is None for v in vals) else vals
        b.add(i, rec)
    return b.finish("no header record found; group and parameter names are unknown")
