"""The thresholds of the training diagnosis and the robust statistics of one series.

Shared by :mod:`gradstats.report.runs` (the running-statistics band leaves spikes out),
:mod:`gradstats.report.diagnosis` (the signals), :mod:`gradstats.report.plots` (the clip-rate
line) and :mod:`gradstats.report` (which documents the thresholds in ``report.md``):

* :func:`find_spikes`: upward outliers against a robust z-score of the previous window;
* :func:`dispersion`: rolling robust spread of the step-to-step change of log(x);
* :func:`final_value`: the final value of a series (median of its last 10%).
"""
from __future__ import annotations

import math
from typing import List, Tuple

import numpy as np

#: thresholds of the diagnosis (documented in the report itself)
SPIKE_RATIO = 3.0        # a spike is >= 3x the median of the previous window ...
SPIKE_Z = 6.0            # ... and >= 6 robust standard deviations above it
SPIKE_WINDOW = 50
SPIKE_MIN_HISTORY = 10
CLIP_RATE = 0.5
VAR_WINDOW = 20
VAR_RISE = 2.5           # rise of the step-to-step dispersion before divergence
VAR_RISE_NO_DIV = 4.0    # ... or without divergence (last quarter vs first quarter)
VANISH_FACTOR = 1e-3     # late median norm < 1e-3 x early median norm
SEED_SPREAD = 0.25       # (max - min) / |median| of the final losses


def find_spikes(x: np.ndarray, usable: np.ndarray, ratio: float, z: float,
            window: int = SPIKE_WINDOW, min_hist: int = SPIKE_MIN_HISTORY,
            rel_floor: float = 0.05) -> List[Tuple[int, float, float]]:
    """(index, value, typical value) of upward outliers against the previous window's
    median and MAD (a robust z-score); earlier spikes are left out of the window."""
    out: List[Tuple[int, float, float]] = []
    hist: List[float] = []
    for i, v in enumerate(x):
        if not (usable[i] and np.isfinite(v)):
            continue
        if len(hist) >= min_hist:
            h = np.asarray(hist[-window:])
            med = float(np.median(h))
            mad = float(np.median(np.abs(h - med))) * 1.4826
            scale = max(mad, rel_floor * abs(med), 1e-30)
            zv = (v - med) / scale
            if zv >= z and (med <= 0 or v >= ratio * med):
                out.append((i, float(v), med))
                continue
        hist.append(float(v))
    return out



def dispersion(x: np.ndarray, w: int) -> np.ndarray:
    """Rolling robust dispersion (1.4826 * MAD) of the step-to-step change of log(x)."""
    lx = np.log(np.where(x > 0, x, np.nan))
    d = np.diff(lx, prepend=np.nan)
    out = np.full(len(x), np.nan)
    for i in range(w, len(x) + 1):
        seg = d[i - w:i]
        seg = seg[np.isfinite(seg)]
        if len(seg) >= w // 2:
            out[i - 1] = 1.4826 * float(np.median(np.abs(seg - np.median(seg))))
    return out



def final_value(x: np.ndarray) -> float:
    """Median of the last 10% (at least 5) of the values; NaN if the last one is NaN/Inf."""
    if len(x) == 0 or np.all(np.isnan(x)):
        return math.nan
    k = max(5, len(x) // 10)
    tail = x[-k:]
    if not np.isfinite(tail[-1]):
        return float(tail[-1])
    return float(np.nanmedian(tail[np.isfinite(tail)]))

