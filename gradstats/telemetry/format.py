"""The stats log format: its documentation, field tables and record encoding.

:class:`~gradstats.telemetry.StatsLogger` builds the records with :func:`header_record`,
:func:`step_record` and :func:`end_record`; the writers (:mod:`gradstats.telemetry.writers`)
encode them with :func:`_enc`, and :func:`~gradstats.telemetry.reader.read_log` decodes them with
:func:`_dec`.

Log format (version 1)
======================
JSON Lines (default; ``.jsonl``), one object per line, each with a ``"type"``:

``header`` (first line; a new header may follow if the number of groups changes)
    ``format`` (``"gradstats-log"``), ``version`` (1), ``gradstats_version``,
    ``torch_version``, ``created`` (ISO time), ``norm_type``, ``groups`` (group names),
    ``params`` (all parameter names in optimizer order), ``param_group`` (group index of
    each parameter), ``flush_every``, ``device``, ``optimizer``, ``policy``, ``meta``
    (free-form dict given by the user, e.g. ``{"run": "baseline", "seed": 0}``).
``step`` (one per optimizer step)
    ``step`` (int, number of ``step()`` calls so far, this one included), ``loss``,
    ``total_norm``, ``skipped`` (bool), ``skip_reason`` (``null``, ``"nonfinite"``,
    ``"spike"`` or ``"other"``), ``nonfinite`` (bool: some gradient or the loss was
    NaN/Inf), ``loss_scale``; per group (lists of length G): ``lr``, ``norm``,
    ``max_abs``, ``nonfinite_count``, ``clip_coef``, ``clipped`` (bools),
    ``running_mean``, ``running_std``, ``zscore``; ``nonfinite_tensors`` (names of the
    first tensors, in parameter order, whose gradient norm was NaN/Inf; at most
    ``max_names``) and ``nonfinite_tensor_count``.
    A value that was not measured is ``null``. Non-finite numbers are written as the
    strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` (strict JSON);
    :func:`~gradstats.telemetry.reader.read_log` turns them back into floats.
``end`` (last line, written by ``close()``)
    ``steps`` (records written), ``counters``. A log without it was not closed (the run
    crashed or is still running).

CSV (``.csv``): the header record as a comment line ``# {json}``, then a row of column
names (``step, loss, total_norm, ..., norm.0, norm.1, ..., nonfinite_tensors``; names
joined by ``;``), then one row per step. TensorBoard (a path starting with
``tensorboard:``, needs the ``tensorboard`` package): scalars under ``loss``,
``grad_norm/<group>``, ``clip_coef/<group>``, ``skipped``, ...
"""
from __future__ import annotations

import datetime
import math
from typing import Any, Callable, Dict, List, Optional

import torch

FORMAT_NAME = "gradstats-log"
FORMAT_VERSION = 1

# scalar fields of a step record, then per-group fields (G values each); StatsLogger's
# device rows hold them in this order
_SCALARS = ("step", "loss", "total_norm", "skipped", "skipped_nonfinite", "skipped_spike",
            "nonfinite", "loss_scale", "nonfinite_tensor_count")
_PER_GROUP = ("lr", "norm", "max_abs", "nonfinite_count", "clip_coef", "clipped",
              "running_mean", "running_std", "zscore")
_BOOLS = {"skipped", "skipped_nonfinite", "skipped_spike", "nonfinite", "clipped"}
_INTS = {"step", "nonfinite_count", "nonfinite_tensor_count"}


def _enc(v: Any) -> Any:
    """JSON-ready value: non-finite floats become strings (strict JSON)."""
    if isinstance(v, float):
        if math.isnan(v):
            return "NaN"
        if math.isinf(v):
            return "Infinity" if v > 0 else "-Infinity"
        return v
    if isinstance(v, (list, tuple)):
        return [_enc(x) for x in v]
    if isinstance(v, dict):
        return {k: _enc(x) for k, x in v.items()}
    return v


_NONFINITE_STR = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf,
                  "nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _dec(v: Any) -> Any:
    if isinstance(v, str) and v in _NONFINITE_STR:
        return _NONFINITE_STR[v]
    if isinstance(v, list):
        return [_dec(x) for x in v]
    return v


def header_record(*, norm_type: float, groups: List[str], params: List[str],
                  param_group: List[int], flush_every: int, device: str,
                  optimizer: Optional[str], policy: Optional[str], spike: Optional[str],
                  meta: Dict[str, Any]) -> Dict[str, Any]:
    """The ``header`` record (versions and creation time filled in here)."""
    from ..version import __version__
    return {
        "type": "header", "format": FORMAT_NAME, "version": FORMAT_VERSION,
        "gradstats_version": __version__, "torch_version": torch.__version__,
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "norm_type": norm_type, "groups": groups, "params": params,
        "param_group": param_group, "flush_every": flush_every,
        "device": device, "optimizer": optimizer, "policy": policy, "spike": spike,
        "meta": meta,
    }


def step_record(get: Callable[[str], Any], param_names: List[str]) -> Dict[str, Any]:
    """A ``step`` record from ``get(field)``, the step's value of each field of
    ``_SCALARS``, ``_PER_GROUP`` and ``"nonfinite_tensors"`` (tensor indices in parameter
    order, -1 or NaN for none), ``None`` where not measured; ``param_names`` name the
    tensor indices."""
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
    for name in _PER_GROUP:
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


def end_record(steps: int, counters: Dict[str, int]) -> Dict[str, Any]:
    """The ``end`` record written when the log is closed."""
    return {"type": "end", "steps": steps, "counters": dict(counters)}
