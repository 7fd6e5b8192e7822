"""A stats log as numpy arrays: :class:`Run` and :func:`load_run`.

One :class:`Run` holds a log's N steps and G groups (loss, norms, clipping, skipped and
non-finite steps, the running mean/std band) with missing values as NaN; the diagnosis
(:mod:`gradstats.report.diagnosis`) and the plots (:mod:`gradstats.report.plots`) read these arrays.
For logs without the optimizer's running statistics the band is recomputed here with the
one running-statistics rule (:mod:`gradstats.core.running`), leaving skipped steps and
spikes out. A log with several segments (a resumed run) becomes one run with continuing
steps (:func:`load_run`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ..core.running import DEFAULT_ALPHA, update_numpy
from ..telemetry.reader import LogData
from .signals import SPIKE_RATIO, SPIKE_Z, find_spikes


@dataclass
class Run:
    """One log as numpy arrays (N steps, G groups); missing values are NaN."""

    log: LogData
    label: str
    groups: List[str]
    steps: np.ndarray
    loss: np.ndarray
    total: np.ndarray
    norm: np.ndarray            # [N, G]
    clip_coef: np.ndarray       # [N, G]
    clipped: np.ndarray         # [N] bool: some group clipped
    has_clip: bool
    skipped: np.ndarray         # [N] bool
    reasons: List[Optional[str]]
    nonfinite: np.ndarray       # [N] bool
    nf_count: np.ndarray        # [N, G]
    band_mean: np.ndarray       # [N, G]
    band_std: np.ndarray        # [N, G]
    band_from_log: bool
    nf_tensors: List[List[str]]
    nf_tensor_count: List[Optional[int]]
    records: List[Dict[str, Any]] = field(default_factory=list)  # one per step, as shown
    segments: List[Dict[str, Any]] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.steps)

    @property
    def has_loss(self) -> bool:
        return bool(np.any(~np.isnan(self.loss)))



def _f(v: Any) -> float:
    if v is None or isinstance(v, bool):
        return math.nan if v is None else float(v)
    try:
        return float(v)
    except (TypeError, ValueError, OverflowError):
        return math.nan


def _per_group(records: List[Dict[str, Any]], key: str, G: int) -> np.ndarray:
    out = np.full((len(records), G), np.nan)
    for i, r in enumerate(records):
        v = r.get(key)
        if isinstance(v, list):
            for g, x in enumerate(v[:G]):
                out[i, g] = _f(x)
    return out


def running_stats(norm: np.ndarray, valid: np.ndarray, alpha: float = DEFAULT_ALPHA
                  ) -> Tuple[np.ndarray, np.ndarray]:
    """Running mean and variance of each group's norm *before* each step, by the one
    running-statistics rule (:func:`gradstats.core.running.update_numpy`, float32, the
    operations of the optimizer's :func:`~gradstats.core.running.update_`).

    Args:
        norm: ``[N, G]`` norms.
        valid: ``[N, G]`` bool: the value was recorded. Where ``False`` (a skipped step,
            a spike left out) the value is passed as NaN, which the rule does not record,
            as the optimizer does not record a step it skipped.
        alpha: EMA factor.

    Returns:
        ``(mean, var)``, ``[N, G]`` float64 each; NaN until a first value was recorded.
    """
    N, G = norm.shape
    mean = np.full((N, G), np.nan)
    var = np.full((N, G), np.nan)
    for g in range(G):
        x = np.where(valid[:, g], norm[:, g], np.nan)
        mean[:, g], var[:, g] = update_numpy(x, alpha)
    return mean, var


def _join_segments(log: LogData) -> Tuple[List[Dict[str, Any]], List[int], List[Dict[str, Any]]]:
    """The records of a log's segments as one run with continuing steps.

    A segment that starts after the previous one's last step just continues. One that
    starts at or before it went back to an earlier checkpoint: its records replace the
    earlier ones from its first step on. One that starts again at step 1 with no
    optimizer state (``resume_step`` 0) is placed after the previous one, its steps
    shifted by that one's last step.

    Returns:
        ``(records, steps, segments)``: the kept records, their step numbers as shown,
        and per segment ``{"first", "last", "resume_step", "replaced", "shift",
        "closed"}`` (shown step numbers).
    """
    recs = log.records
    starts = list(log.segment_starts) or ([0] if recs else [])
    bounds = list(zip(starts, starts[1:] + [len(recs)]))
    heads = list(log.segment_headers) + [None] * len(bounds)
    ends = list(log.ends) + [None] * len(bounds)
    kept: List[Dict[str, Any]] = []
    steps: List[int] = []
    segs: List[Dict[str, Any]] = []
    for k, (a, b) in enumerate(bounds):
        seg = recs[a:b]
        if not seg:
            continue
        head = heads[k] or {}
        rs = head.get("resume_step")
        own = [int(r["step"]) for r in seg]
        replaced, shift = 0, 0
        if steps and own[0] <= steps[-1]:
            if own[0] <= 1 and not rs:
                shift = steps[-1]  # started over without the optimizer's state
            else:
                cut = next((i for i, s in enumerate(steps) if s >= own[0]), len(steps))
                replaced = len(steps) - cut
                del kept[cut:], steps[cut:]
        kept += seg
        steps += [s + shift for s in own]
        segs.append({"first": own[0] + shift, "last": own[-1] + shift,
                     "resume_step": rs, "replaced": replaced, "shift": shift,
                     "closed": ends[k] is not None})
    return kept, steps, segs


def load_run(log: LogData) -> Run:
    """Arrays of a log read by :func:`gradstats.telemetry.read_log`.

    The segments of a resumed run are joined into one run with continuing steps (see
    :attr:`Run.segments`): a segment that went back to an earlier checkpoint replaces
    the earlier records from its first step on.
    """
    recs, step_list, segments = _join_segments(log)
    G = max([len(log.groups)] + [len(r.get("norm") or []) for r in recs] + [1])
    groups = list(log.groups) + [f"group{g}" for g in range(len(log.groups), G)]
    steps = np.array(step_list, dtype=np.int64)
    loss = np.array([_f(r.get("loss")) for r in recs])
    total = np.array([_f(r.get("total_norm")) for r in recs])
    norm = _per_group(recs, "norm", G)
    coef = _per_group(recs, "clip_coef", G)
    clipped_g = _per_group(recs, "clipped", G)
    has_clip = any(r.get("clipped") is not None for r in recs)
    clipped = np.nan_to_num(clipped_g, nan=0.0).max(axis=1) > 0 if recs else np.zeros(0, bool)
    skipped = np.array([bool(r.get("skipped")) for r in recs], dtype=bool)
    reasons = [r.get("skip_reason") for r in recs]
    nf_count = _per_group(recs, "nonfinite_count", G)
    nonfinite = np.array([bool(r.get("nonfinite")) for r in recs], dtype=bool)
    if len(recs):
        tot_given = np.array([r.get("total_norm") is not None for r in recs])
        loss_given = np.array([r.get("loss") is not None for r in recs])
        nonfinite |= tot_given & ~np.isfinite(total)
        nonfinite |= loss_given & ~np.isfinite(loss)
        nonfinite |= np.nan_to_num(nf_count, nan=0).sum(axis=1) > 0
    rm = _per_group(recs, "running_mean", G)
    rs = _per_group(recs, "running_std", G)
    from_log = bool(len(recs)) and not np.all(np.isnan(rm))
    if from_log:
        # the optimizer's statistics need two values before they mean anything
        rs = np.where(rs > 0, rs, np.nan)
        rm = np.where(np.isnan(rs), np.nan, rm)
    else:
        # the optimizer's rule, computed here; skipped steps and spikes are left out (as
        # a skipping optimizer would) so that one outlier does not blow up the band
        valid = ~skipped[:, None] & np.ones((len(recs), G), bool)
        for g in range(G):
            for i, _, _ in find_spikes(norm[:, g], np.isfinite(norm[:, g]), SPIKE_RATIO,
                                       SPIKE_Z):
                valid[i, g] = False
        rm, rv = running_stats(norm, valid)
        rs = np.sqrt(rv)
        # like the optimizer's own statistics: shown once two values were recorded
        rs = np.where(rs > 0, rs, np.nan)
        rm = np.where(np.isnan(rs), np.nan, rm)
    return Run(log=log, label=log.label, groups=groups, steps=steps, loss=loss, total=total,
               norm=norm, clip_coef=coef, clipped=clipped, has_clip=has_clip,
               skipped=skipped, reasons=reasons, nonfinite=nonfinite, nf_count=nf_count,
               band_mean=rm, band_std=rs, band_from_log=from_log,
               nf_tensors=[list(r.get("nonfinite_tensors") or []) for r in recs],
               nf_tensor_count=[r.get("nonfinite_tensor_count") for r in recs],
               records=recs, segments=segments)
