"""A stats log as numpy arrays: :class:`Run` and :func:`load_run`.

One :class:`Run` holds a log's N steps and G groups (loss, norms, clipping, skipped and
non-finite steps, the running mean/std band) with missing values as NaN; the diagnosis
(:mod:`gradstats.report.diagnosis`) and the plots (:mod:`gradstats.report.plots`) read these arrays.
For logs without the optimizer's running statistics the band is recomputed here with
StableOptimizer's EMA rule, leaving spikes out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ..telemetry.reader import LogData
from .signals import SPIKE_RATIO, SPIKE_Z, _spikes


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
    except (TypeError, ValueError):
        return math.nan


def _per_group(records: List[Dict[str, Any]], key: str, G: int) -> np.ndarray:
    out = np.full((len(records), G), np.nan)
    for i, r in enumerate(records):
        v = r.get(key)
        if isinstance(v, list):
            for g, x in enumerate(v[:G]):
                out[i, g] = _f(x)
    return out


def _ema_band(norm: np.ndarray, valid: np.ndarray, alpha: float = 0.97,
              warmup: int = 25) -> Tuple[np.ndarray, np.ndarray]:
    """Running mean/std before each step (StableOptimizer's rule), for logs without it."""
    N, G = norm.shape
    mean = np.zeros(G)
    var = np.zeros(G)
    cnt = np.zeros(G)
    m_out = np.full((N, G), np.nan)
    s_out = np.full((N, G), np.nan)
    for i in range(N):
        m_out[i] = np.where(cnt >= 2, mean, np.nan)
        s_out[i] = np.where(cnt >= 2, np.sqrt(np.maximum(var, 0)), np.nan)
        x = norm[i]
        ok = valid[i] & np.isfinite(x)
        n = cnt + ok
        xs = np.where(ok, x, mean)
        d = xs - mean
        w = 1.0 / np.maximum(n, 1)
        warm = n <= warmup
        m_new = np.where(warm, mean + w * d, alpha * mean + (1 - alpha) * xs)
        v_new = np.where(warm, (1 - w) * (var + w * d * d),
                         alpha * var + (1 - alpha) * (xs - (alpha * mean + (1 - alpha) * xs)) ** 2)
        mean = np.where(ok, m_new, mean)
        var = np.where(ok, v_new, var)
        cnt = n
    return m_out, s_out


def load_run(log: LogData) -> Run:
    """Arrays of a log read by :func:`gradstats.telemetry.read_log`."""
    recs = log.records
    G = max([len(log.groups)] + [len(r.get("norm") or []) for r in recs] + [1])
    groups = list(log.groups) + [f"group{g}" for g in range(len(log.groups), G)]
    steps = np.array([int(r["step"]) for r in recs], dtype=np.int64)
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
        # the optimizer's EMA rule, computed here; spikes are left out (as a skipping
        # optimizer would) so that one outlier does not blow up the band
        valid = ~skipped[:, None] & np.ones((len(recs), G), bool)
        for g in range(G):
            for i, _, _ in _spikes(norm[:, g], np.isfinite(norm[:, g]), SPIKE_RATIO, SPIKE_Z):
                valid[i, g] = False
        rm, rs = _ema_band(norm, valid)
    return Run(log=log, label=log.label, groups=groups, steps=steps, loss=loss, total=total,
               norm=norm, clip_coef=coef, clipped=clipped, has_clip=has_clip,
               skipped=skipped, reasons=reasons, nonfinite=nonfinite, nf_count=nf_count,
               band_mean=rm, band_std=rs, band_from_log=from_log,
               nf_tensors=[list(r.get("nonfinite_tensors") or []) for r in recs],
               nf_tensor_count=[r.get("nonfinite_tensor_count") for r in recs])
