"""The stats log format: its documentation, field tables and record encoding.

:class:`~gradstats.telemetry.StatsLogger` builds the records with :func:`header_record`,
:func:`step_record` and :func:`end_record`; the writers (:mod:`gradstats.telemetry.writers`)
encode them with :func:`encode_value`, and :func:`~gradstats.telemetry.reader.read_log`
decodes them with :func:`decode_value`. The field tables (:data:`SCALAR_FIELDS`,
:data:`PER_GROUP_FIELDS`, :data:`BOOL_FIELDS`, :data:`INT_FIELDS`) are shared by the three.

Log format (version 1)
======================
JSON Lines (default; ``.jsonl``), one object per line, each with a ``"type"``:

``header`` (first line of each segment; a new header may also follow if the number of
groups changes)
    ``format`` (``"gradstats-log"``), ``version`` (1), ``gradstats_version``,
    ``torch_version``, ``created`` (ISO time), ``norm_type``, ``groups`` (group names),
    ``params`` (all parameter names in optimizer order), ``param_group`` (group index of
    each parameter), ``flush_every``, ``device``, ``optimizer``, ``policy``, ``meta``
    (free-form dict given by the user, e.g. ``{"run": "baseline", "seed": 0}``).
    Optional: ``resume`` (``true``: this header starts a new *segment* appended to an
    existing log, e.g. after a restart from a checkpoint) with ``resume_step`` (the
    optimizer's step count the segment continues from: its first step record is
    ``resume_step + 1`` when the optimizer state was restored); ``rank`` and
    ``world_size`` (under ``torch.distributed``).
``step`` (one per optimizer step)
    ``step`` (int, number of ``step()`` calls so far, this one included; ``0 <= step <
    2**53``), ``loss``, ``total_norm``, ``skipped`` (bool), ``skip_reason`` (``null``,
    ``"nonfinite"``, ``"spike"`` or ``"other"``), ``nonfinite`` (bool: some gradient or
    the loss was NaN/Inf), ``loss_scale``; per group (lists of length G): ``lr``, ``norm``,
    ``max_abs``, ``nonfinite_count``, ``clip_coef``, ``clipped`` (bools),
    ``running_mean``, ``running_std``, ``zscore``; ``nonfinite_tensors`` (names of the
    first tensors, in parameter order, whose gradient norm was NaN/Inf; at most
    ``max_names``) and ``nonfinite_tensor_count``.
    A value that was not measured is ``null``. Non-finite numbers are written as the
    strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` (strict JSON);
    :func:`~gradstats.telemetry.reader.read_log` turns them back into floats.
``end`` (last line of a segment, written by ``close()``)
    ``steps`` (records written), ``counters``, ``dropped_rows`` (step records the logger
    could not write, e.g. on a full disk; ``0`` normally) and ``last_error`` (the last
    write error as text, or ``null``). A segment without an end record was not closed
    (the run crashed or is still running).

Segments: opening an existing log appends (``StatsLogger(..., overwrite=False)``, the
default): a header with ``"resume": true`` starts the new segment, and the step numbers
go on from the optimizer's step count. A reader takes the records of all segments in
file order (:attr:`~gradstats.telemetry.reader.LogData.segments` counts them).

CSV (``.csv``): the header record as a comment line ``# {json}``, then a row of column
names (``step, loss, total_norm, ..., norm.0, norm.1, ..., nonfinite_tensors``; names
joined by ``;``), then one row per step; the end record as a comment line. An appended
segment repeats the header comment and the (identical) column row; when the number of
groups differs, the segment goes to a new file ``<name>.1.csv`` instead (with a warning).
TensorBoard (a path starting with ``tensorboard:``, needs the ``tensorboard`` package):
scalars under ``loss``, ``grad_norm/<group>``, ``clip_coef/<group>``, ``skipped``, ...

Versioning: fields are only ever added; a reader ignores fields it does not know. The
resume header fields and the end record's ``dropped_rows``/``last_error`` were added
without changing ``version``: a reader that does not know them reads such a file
correctly (records in order, the last end record), so the version stays 1.
"""
from __future__ import annotations

import datetime
import math
from typing import Any, Callable, Dict, List, Optional

import torch

FORMAT_NAME = "gradstats-log"
FORMAT_VERSION = 1

#: scalar fields of a step record as :class:`StatsLogger` stores them in a device row
#: (in this order; ``skipped_nonfinite``/``skipped_spike`` become ``skip_reason``)
SCALAR_FIELDS = ("step", "loss", "total_norm", "skipped", "skipped_nonfinite",
                 "skipped_spike", "nonfinite", "loss_scale", "nonfinite_tensor_count")
#: per-group fields of a step record (a list of G values each), in device-row order
PER_GROUP_FIELDS = ("lr", "norm", "max_abs", "nonfinite_count", "clip_coef", "clipped",
                    "running_mean", "running_std", "zscore")
#: fields whose values are booleans
BOOL_FIELDS = frozenset({"skipped", "skipped_nonfinite", "skipped_spike", "nonfinite",
                         "clipped"})
#: fields whose values are integers
INT_FIELDS = frozenset({"step", "nonfinite_count", "nonfinite_tensor_count"})
#: the largest step number a log may hold (float64 device rows hold integers exactly
#: below it)
MAX_STEP = 2 ** 53
#: how non-finite floats are spelled in a log (the first three are written)
NONFINITE_STRINGS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf,
                     "nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def encode_value(v: Any) -> Any:
    """A JSON-ready copy of ``v``: non-finite floats become ``"NaN"``, ``"Infinity"``,
    ``"-Infinity"`` (strict JSON), in lists, tuples and dicts too."""
    if isinstance(v, float):
        if math.isnan(v):
            return "NaN"
        if math.isinf(v):
            return "Infinity" if v > 0 else "-Infinity"
        return v
    if isinstance(v, (list, tuple)):
        return [encode_value(x) for x in v]
    if isinstance(v, dict):
        return {k: encode_value(x) for k, x in v.items()}
    return v


def decode_value(v: Any) -> Any:
    """The inverse of :func:`encode_value` for values read back: the strings of
    :data:`NONFINITE_STRINGS` become floats, in lists too; anything else is returned
    unchanged."""
    if isinstance(v, str) and v in NONFINITE_STRINGS:
        return NONFINITE_STRINGS[v]
    if isinstance(v, list):
        return [decode_value(x) for x in v]
    return v


def header_record(*, norm_type: float, groups: List[str], params: List[str],
                  param_group: List[int], flush_every: int, device: str,
                  optimizer: Optional[str], policy: Optional[str], spike: Optional[str],
                  meta: Dict[str, Any], extra: Optional[Dict[str, Any]] = None
                  ) -> Dict[str, Any]:
    """The ``header`` record (versions and creation time filled in here); ``extra`` adds
    the optional fields (``resume``, ``resume_step``, ``rank``, ``world_size``)."""
    from ..version import __version__
    rec = {
        "type": "header", "format": FORMAT_NAME, "version": FORMAT_VERSION,
        "gradstats_version": __version__, "torch_version": torch.__version__,
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "norm_type": norm_type, "groups": groups, "params": params,
        "param_group": param_group, "flush_every": flush_every,
        "device": device, "optimizer": optimizer, "policy": policy, "spike": spike,
        "meta": meta,
    }
    rec.update(extra or {})
    return rec


def step_record(get: Callable[[str], Any], param_names: List[str]) -> Dict[str, Any]:
    """A ``step`` record from ``get(field)``, the step's value of each field of
    :data:`SCALAR_FIELDS`, :data:`PER_GROUP_FIELDS` and ``"nonfinite_tensors"`` (tensor
    indices in parameter order, -1 or NaN for none), ``None`` where not measured;
    ``param_names`` name the tensor indices."""
    rec: Dict[str, Any] = {"type": "step"}
    rec["step"] = get("step")
    rec["loss"] = get("loss")
    rec["total_norm"] = get("total_norm")
    skipped = get("skipped")
    rec["skipped"] = bool(skipped) if skipped is not None else False
    reason = None
    if rec["skipped"]:
        if get("skipped_nonfinite"):
            reason = "nonfinite"
        elif get("skipped_spike"):
            reason = "spike"
        else:
            reason = "other"
    rec["skip_reason"] = reason
    rec["nonfinite"] = get("nonfinite")
    rec["loss_scale"] = get("loss_scale")
    for name in PER_GROUP_FIELDS:
        rec[name] = get(name)
    idx = get("nonfinite_tensors")
    if idx is None:
        rec["nonfinite_tensors"] = None
        rec["nonfinite_tensor_count"] = None
    else:
        names = param_names
        rec["nonfinite_tensors"] = [names[int(i)] if 0 <= int(i) < len(names)
                                    else f"tensor{int(i)}" for i in idx
                                    if i == i and int(i) >= 0]
        rec["nonfinite_tensor_count"] = get("nonfinite_tensor_count")
    return rec


def end_record(steps: int, counters: Dict[str, int], *, dropped_rows: int = 0,
               last_error: Optional[str] = None) -> Dict[str, Any]:
    """The ``end`` record written when the log is closed.

    Args:
        steps: step records written.
        counters: the logger's counters.
        dropped_rows: step records that could not be written.
        last_error: the last write error as text, or ``None``.
    """
    return {"type": "end", "steps": steps, "counters": dict(counters),
            "dropped_rows": int(dropped_rows), "last_error": last_error}
