"""The noise-scale section of ``gradstats report``: ``B_simple`` over training, with its
uncertainty, and what it means for the batch size, in plain words.

Reads the per-step fields a :class:`gradstats.noise_scale.NoiseScaleTracker` adds to the
stats log (``noise_g2``, ``noise_trace``: the step's own unbiased estimates of ``|G|^2``
and ``tr(Sigma)``; ``noise_b_simple``: the tracker's smoothed value; ``noise_b_small``,
``noise_b_big``: the two batch sizes). Logs without them get no section.

The curve: over a trailing window of steps, ``B = sum(tr) / sum(|G|^2)`` (the ratio of
means, as the tracker computes it); the band is ``B +- 2`` standard errors from the
spread of the per-step estimates in the window (delta method for a ratio of means, with
the covariance of the two estimates). The advice uses the last window and the model of
McCandlish et al. (2018): to reach a given loss, a batch ``B`` needs
``S = S_min (1 + B_noise / B)`` steps and ``E = E_min (1 + B / B_noise)`` examples, with
``B_noise ~ B_simple``.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

__all__ = ["NoiseSeries", "NoiseSection", "NoiseSummary", "noise_series", "rolling_b_simple",
           "summarize", "advice", "noise_section", "WINDOW"]

#: trailing window (steps) of the curve and of the final estimate
WINDOW = 100
_MIN_FRAC = 0.5  # a window needs at least half its steps measured


@dataclass
class NoiseSeries:
    """The noise-scale fields of one log, one entry per step (NaN where not measured)."""

    steps: np.ndarray
    g2: np.ndarray
    trace: np.ndarray
    b_small: np.ndarray
    b_big: np.ndarray
    b_simple_logged: np.ndarray
    skipped: np.ndarray

    @property
    def n_measured(self) -> int:
        return int(np.sum(self.usable))

    @property
    def usable(self) -> np.ndarray:
        return np.isfinite(self.g2) & np.isfinite(self.trace) & ~self.skipped


def _f(v: Any) -> float:
    if v is None or isinstance(v, bool):
        return math.nan
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def noise_series(records: Sequence[Dict[str, Any]]) -> Optional[NoiseSeries]:
    """The noise fields of a log's step records, or ``None`` if no step has them."""
    if not any(isinstance(r, dict) and "noise_g2" in r for r in records):
        return None
    recs = [r for r in records if isinstance(r, dict)]

    def col(k: str) -> np.ndarray:
        return np.array([_f(r.get(k)) for r in recs], dtype=np.float64)
    return NoiseSeries(steps=col("step"), g2=col("noise_g2"), trace=col("noise_trace"),
                       b_small=col("noise_b_small"), b_big=col("noise_b_big"),
                       b_simple_logged=col("noise_b_simple"),
                       skipped=np.array([bool(r.get("skipped")) for r in recs], dtype=bool))


def _ratio_stats(g: np.ndarray, t: np.ndarray):
    """(B, standard error of B, mean |G|^2, n) of one window's per-step values."""
    n = len(g)
    mg, mt = float(np.mean(g)), float(np.mean(t))
    if n < 2 or not mg > 0:
        return math.nan, math.nan, mg, n
    r = mt / mg
    c = np.cov(np.vstack([t, g]), ddof=1)
    var = (c[0, 0] - 2 * r * c[0, 1] + r * r * c[1, 1]) / (n * mg * mg)
    return r, math.sqrt(max(var, 0.0)), mg, n


def rolling_b_simple(s: NoiseSeries, window: int = WINDOW):
    """``(B, lower, upper)`` arrays over the steps: ratio of the means of ``tr(Sigma)``
    and ``|G|^2`` over the last ``window`` records, +- 2 standard errors (NaN where fewer
    than half of them are measured or the mean ``|G|^2 <= 0``; ``lower`` is clipped at
    0). Prefix sums: linear in the number of steps."""
    N = len(s.steps)
    ok = s.usable
    g = np.where(ok, s.g2, 0.0)
    t = np.where(ok, s.trace, 0.0)
    z = np.zeros(1)
    cs = {k: np.concatenate([z, np.cumsum(v)]) for k, v in
          (("n", ok.astype(np.float64)), ("g", g), ("t", t), ("gg", g * g), ("tt", t * t),
           ("gt", g * t))}
    i1 = np.arange(1, N + 1)
    i0 = np.maximum(i1 - window, 0)
    w = {k: v[i1] - v[i0] for k, v in cs.items()}
    n = w["n"]
    with np.errstate(divide="ignore", invalid="ignore"):
        mg, mt = w["g"] / n, w["t"] / n
        d = np.maximum(n - 1, 1)
        vg = (w["gg"] - n * mg * mg) / d
        vt = (w["tt"] - n * mt * mt) / d
        cgt = (w["gt"] - n * mg * mt) / d
        B = mt / mg
        var = (vt - 2 * B * cgt + B * B * vg) / (n * mg * mg)
        se = np.sqrt(np.maximum(var, 0.0))
    bad = ~ok | (n < max(2, int(window * _MIN_FRAC))) | ~(mg > 0)
    B = np.where(bad, np.nan, B)
    lo = np.where(bad, np.nan, np.maximum(B - 2 * se, 0.0))
    hi = np.where(bad, np.nan, B + 2 * se)
    return B, lo, hi


@dataclass
class NoiseSummary:
    """The final estimate of one run and the advice drawn from it."""

    label: str
    b_simple: float          # NaN when not resolved
    lower: float
    upper: float
    batch: float             # the step's batch size (b_big)
    steps_used: int
    first: float             # the estimate over the first window (trend), NaN if none
    advice: str
    plot: Optional[str] = None


def _fmt_n(x: float) -> str:
    """A count rounded to 2 significant figures, with thousands separators."""
    if not math.isfinite(x):
        return "?"
    if x <= 0:
        return "0"
    digits = 1 - int(math.floor(math.log10(abs(x))))
    v = round(x, digits)
    if v >= 100:
        return f"{int(round(v)):,}"
    return f"{v:g}"


def _fmt_b(x: float) -> str:
    """A batch size as given (integers exact, with thousands separators)."""
    if not math.isfinite(x):
        return "?"
    return f"{int(round(x)):,}" if abs(x - round(x)) < 1e-9 else f"{x:,.4g}"


def _fmt_x(x: float) -> str:
    return f"{x:.0f}" if x >= 10 else f"{x:.1f}"


ASSUMPTIONS = (
    "Assumptions (McCandlish et al., 2018): B_simple = tr(Sigma)/|G|^2 stands in for the "
    "critical batch size B_noise, which is exact only when the loss curvature is about "
    "the same in every direction; the learning rate is re-tuned for each batch size; "
    "steps and examples follow S = S_min(1 + B_noise/B) and E = E_min(1 + B/B_noise), "
    "derived for SGD (Adam-type optimizers behave similarly in practice); the noise "
    "scale usually grows as the loss falls, so this holds for the measured phase of "
    "training; batch sizes are counted in the unit given to the tracker (examples, "
    "sequences or tokens).")


def advice(b_noise: float, lower: float, upper: float, batch: float) -> str:
    """Plain-words advice for a batch of ``batch`` examples at noise scale ``b_noise``
    (likely range ``lower``..``upper``)."""
    Bs = _fmt_b(batch)
    if not math.isfinite(batch) or batch <= 0:
        return "The batch size was not logged, so the noise scale cannot be compared with it."
    if not math.isfinite(b_noise):
        return (f"The noise scale could not be resolved: the estimate of |G|^2 is not clearly "
                f"positive, i.e. gradient noise hides the gradient at these batch sizes. The "
                f"batch of {Bs} is then most likely well below the noise scale; measure over "
                f"more steps (or with a larger small batch) before acting on it.")
    rng = f"likely {_fmt_n(lower)}-{_fmt_n(upper)}"
    r = b_noise / batch

    def steps_ratio(k: float) -> float:   # S(B) / S(kB)
        return (1 + b_noise / batch) / (1 + b_noise / (k * batch))

    def examples_ratio(k: float) -> float:  # E(kB) / E(B)
        return (1 + k * batch / b_noise) / (1 + batch / b_noise)
    if r >= 2:
        k = 4.0 if r >= 4 else 2.0
        return (f"The batch of {Bs} is ~{_fmt_x(r)}x below the noise scale "
                f"(~{_fmt_n(b_noise)}, {rng}): larger batches would cut the number of steps "
                f"nearly in proportion — a batch of {_fmt_b(k * batch)} would need "
                f"~{steps_ratio(k):.1f}x fewer steps for only ~{examples_ratio(k):.2f}x the "
                f"examples. Batches up to about {_fmt_n(b_noise)} use data efficiently.")
    if r > 0.5:
        return (f"The batch of {Bs} is close to the noise scale (~{_fmt_n(b_noise)}, {rng}), "
                f"the usual balance between steps and compute: doubling it would save "
                f"~{100 * (1 - 1 / steps_ratio(2.0)):.0f}% of the steps for "
                f"~{examples_ratio(2.0):.2f}x the examples.")
    k = 0.5
    return (f"The batch of {Bs} is ~{_fmt_x(1 / r)}x above the noise scale "
            f"(~{_fmt_n(b_noise)}, {rng}): larger batches would barely reduce the number of "
            f"steps (doubling saves ~{100 * (1 - 1 / steps_ratio(2.0)):.0f}%), and most "
            f"examples are spent averaging away noise that is already small. A batch of "
            f"{_fmt_b(k * batch)} would need ~{examples_ratio(k):.2f}x the examples (i.e. "
            f"~{1 / examples_ratio(k):.1f}x less compute) for ~{1 / steps_ratio(k):.2f}x "
            f"the steps; ~{_fmt_n(b_noise)}-{_fmt_n(2 * b_noise)} balances both.")


def summarize(label: str, s: NoiseSeries, window: int = WINDOW) -> NoiseSummary:
    """The final estimate (last ``window`` measured steps), its trend and the advice."""
    idx = np.flatnonzero(s.usable)
    last = idx[-window:]
    r, se, _, n = _ratio_stats(s.g2[last], s.trace[last]) if len(last) else (
        math.nan, math.nan, math.nan, 0)
    lo, hi = (max(r - 2 * se, 0.0), r + 2 * se) if math.isfinite(r) else (math.nan, math.nan)
    bb = s.b_big[last]
    bb = bb[np.isfinite(bb)]
    batch = float(np.median(bb)) if len(bb) else math.nan
    first = math.nan
    if len(idx) >= 3 * window:
        first = _ratio_stats(s.g2[idx[:window]], s.trace[idx[:window]])[0]
    return NoiseSummary(label=label, b_simple=r, lower=lo, upper=hi, batch=batch,
                        steps_used=int(n), first=first, advice=advice(r, lo, hi, batch))


def _plot(label: str, s: NoiseSeries, path: str, window: int) -> str:
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    B, lo, hi = rolling_b_simple(s, window)
    fig, ax = plt.subplots(figsize=(9, 4.2))
    ok = np.isfinite(B)
    ax.fill_between(s.steps[ok], lo[ok], hi[ok], color="#1f77b4", alpha=0.2, lw=0,
                    label=f"±2 standard errors (window {window})")
    ax.plot(s.steps[ok], B[ok], color="#1f77b4", lw=1.6,
            label=f"B_simple, last {window} steps")
    lg = np.isfinite(s.b_simple_logged) & (s.b_simple_logged > 0)
    if lg.any():
        ax.plot(s.steps[lg], s.b_simple_logged[lg], color="#ff7f0e", lw=1.0, alpha=0.8,
                label="tracker (EMA)")
    bb = np.isfinite(s.b_big)
    if bb.any():
        ax.plot(s.steps[bb], s.b_big[bb], color="k", ls="--", lw=1.0, label="batch size")
    pos = np.concatenate([B[ok], s.b_big[bb]])
    pos = pos[np.isfinite(pos) & (pos > 0)]
    if len(pos):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("examples")
    ax.set_title(f"{label}: gradient noise scale B_simple = tr(Σ) / |G|²")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@dataclass
class NoiseSection:
    """What :func:`noise_section` found and wrote."""

    markdown: str = ""
    plots: List[str] = field(default_factory=list)
    summaries: Dict[str, NoiseSummary] = field(default_factory=dict)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "run"


def noise_section(runs: Sequence[Any], out_dir: str, *, plots: bool = True,
                  window: int = WINDOW) -> NoiseSection:
    """The report's noise-scale section for the runs whose logs carry the fields.

    Args:
        runs: :class:`gradstats.report.Run` objects (their step records are read).
        out_dir: where ``<log name>_noise.png`` is written.
        plots: draw the plots (matplotlib); a plot that fails is reported in the text.
        window: trailing window of the curve and of the final estimate, in steps.

    Returns:
        NoiseSection: markdown (empty when no run has noise fields), plot paths and one
        :class:`NoiseSummary` per run with noise fields.
    """
    out = NoiseSection()
    L: List[str] = []
    for run in runs:
        records = getattr(run, "records", None) or run.log.records
        s = noise_series(records)
        if s is None or s.n_measured == 0:
            continue
        w = max(10, min(window, max(s.n_measured // 3, 10)))
        summ = summarize(run.label, s, w)
        out.summaries[run.label] = summ
        L += [f"### {run.label}", ""]
        L.append(f"- {summ.advice}")
        if math.isfinite(summ.b_simple):
            L.append(f"- Final estimate: B_simple ≈ {_fmt_n(summ.b_simple)} "
                     f"(±2 s.e. {_fmt_n(summ.lower)}-{_fmt_n(summ.upper)}) over the last "
                     f"{summ.steps_used} measured steps; batch sizes "
                     f"{_fmt_b(float(np.nanmedian(s.b_small)))} (small) and "
                     f"{_fmt_b(summ.batch)} (step).")
        if math.isfinite(summ.first) and math.isfinite(summ.b_simple) and summ.first > 0:
            g = summ.b_simple / summ.first
            if g >= 1.5 or g <= 1 / 1.5:
                L.append(f"- The noise scale {'grew' if g > 1 else 'fell'} ~{_fmt_x(max(g, 1 / g))}x "
                         f"from the first {w} measured steps (~{_fmt_n(summ.first)}) to the "
                         f"last: " + ("a batch size that grows during training (batch-size "
                                      "warm-up) would follow it." if g > 1 else
                                      "the batch that fitted early may now be too large."))
        if plots:
            stem = _safe(os.path.basename(getattr(run.log, "path", run.label)).rsplit(".", 1)[0])
            path = os.path.join(out_dir, f"{stem}_noise.png")
            try:
                summ.plot = _plot(run.label, s, path, w)
                out.plots.append(summ.plot)
                rel = os.path.relpath(summ.plot, out_dir)
                L += ["", f"![{rel}]({rel})"]
            except Exception as e:  # a plot never stops the report
                L.append(f"- (the noise-scale plot could not be drawn: {type(e).__name__}: {e})")
        L.append("")
    if out.summaries:
        head = ["## Gradient noise scale", "",
                "B_simple = tr(Σ)/|G|² estimates the batch size beyond which larger batches "
                "stop saving steps (the critical batch). Curve: ratio of the mean per-step "
                "estimates of tr(Σ) and |G|² over a trailing window, band ±2 standard errors "
                "from their spread.", ""]
        out.markdown = "\n" + "\n".join(head + L + [ASSUMPTIONS, ""])
    return out
