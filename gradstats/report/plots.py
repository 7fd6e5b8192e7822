"""The PNG plots of ``gradstats report`` (matplotlib, Agg backend).

* :func:`plot_run`: one run's loss and each group's gradient norm with the running
  mean +- k std band, clipped / skipped / non-finite steps marked, and the clip activation
  rate over a moving window;
* :func:`plot_overlay`: several runs overlaid (loss, total gradient norm, clip rate);
* :func:`plot_spread`: median and min-max band across seeds.

Each writes one file and returns its path.
"""
from __future__ import annotations

from typing import List, Tuple

import numpy as np

from .runs import Run
from .signals import CLIP_RATE


_C_SKIP = "#d62728"
_C_CLIP = "#ff7f0e"
_C_NF = "#9467bd"


def _plt():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


_SKIP_STYLE = {"nonfinite": ("#9467bd", "skipped: non-finite"),
               "spike": (_C_SKIP, "skipped: spike"),
               "other": ("#8c564b", "skipped: other")}


def _mark_events(ax, run: Run) -> None:
    """Vertical lines and triangles for skipped steps (colour by reason) and crosses for
    non-finite steps that were applied."""
    import matplotlib.transforms as mt
    trans = mt.blended_transform_factory(ax.transData, ax.transAxes)
    reasons = np.array([r or "other" for r in run.reasons], dtype=object)
    for reason, (color, label) in _SKIP_STYLE.items():
        sel = run.skipped & (reasons == reason)
        sk = run.steps[sel]
        if not len(sk):
            continue
        for s in sk[:200]:
            ax.axvline(s, color=color, alpha=0.3, lw=1.0, zorder=0)
        ax.scatter(sk, np.full(len(sk), 0.95), transform=trans, marker="v", s=42,
                   color=color, edgecolor="k", lw=0.4, zorder=5, label=label, clip_on=False)
    applied = run.nonfinite & ~run.skipped
    nf = run.steps[applied]
    if len(nf) > 10:  # long stretches: shade them instead of a cross per step
        first = True
        for a, b in _stretches(applied):
            ax.axvspan(run.steps[a] - 0.5, run.steps[b] + 0.5, color="k", alpha=0.12, lw=0,
                       zorder=0, label=(f"non-finite, applied ({len(nf)} steps from "
                                        f"{nf[0]})" if first else None))
            first = False
        ax.axvline(nf[0], color="k", ls="--", lw=1.0, alpha=0.7, zorder=0)
    elif len(nf):
        ax.axvline(nf[0], color="k", ls="--", lw=1.0, alpha=0.7, zorder=0)
        ax.scatter(nf, np.full(len(nf), 0.95), transform=trans, marker="x", s=30,
                   color="k", zorder=5, label=f"non-finite, applied (from step {nf[0]})",
                   clip_on=False)


def _stretches(mask: np.ndarray) -> List[Tuple[int, int]]:
    """(first, last) index of each run of True values."""
    out: List[Tuple[int, int]] = []
    start = None
    for i, v in enumerate(mask):
        if v and start is None:
            start = i
        elif not v and start is not None:
            out.append((start, i - 1))
            start = None
    if start is not None:
        out.append((start, len(mask) - 1))
    return out


def _legend_above(ax, ncol: int = 5) -> None:
    h, lab = ax.get_legend_handles_labels()
    if h:
        ax.legend(h, lab, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=ncol,
                  fontsize=8, frameon=False, borderaxespad=0.2, handletextpad=0.4,
                  columnspacing=1.2)


def plot_run(run: Run, path: str, k: float, window: int) -> str:
    """One run's overview PNG: loss, each group's gradient norm with the running mean
    +- ``k`` std band, clipped / skipped / non-finite steps marked, and the share of
    clipped steps over ``window`` steps. Returns ``path``."""
    plt = _plt()
    G = len(run.groups)
    show_g = list(range(min(G, 6)))
    rows = 1 + len(show_g) + (1 if run.has_clip else 0)
    heights = [1.2] + [1.2] * len(show_g) + ([0.7] if run.has_clip else [])
    fig, axes = plt.subplots(rows, 1, figsize=(11, 2.3 * sum(heights) + 0.6), sharex=True,
                             gridspec_kw={"height_ratios": heights})
    axes = np.atleast_1d(axes)
    x = run.steps
    ax = axes[0]
    if run.has_loss:
        lf = np.where(np.isfinite(run.loss), run.loss, np.nan)
        ax.plot(x, lf, color="#1f77b4", lw=1.2, label="loss")
        pos = lf[np.isfinite(lf)]
        if len(pos) and pos.min() > 0 and pos.max() / pos.min() > 30:
            ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no loss in this log (pass loss= to step())", ha="center",
                va="center", transform=ax.transAxes, color="gray")
    _mark_events(ax, run)
    ax.set_ylabel("loss")
    fig.suptitle(f"{run.label}: loss and gradient norms per step", x=0.01, ha="left",
                 fontsize=12)
    _legend_above(ax)
    ax.grid(alpha=0.3)
    for row, g in enumerate(show_g, start=1):
        ax = axes[row]
        y = run.norm[:, g]
        yf = np.where(np.isfinite(y) & (y > 0), y, np.nan)
        ax.plot(x, yf, color="#2ca02c", lw=1.0, label=f"grad norm ({run.groups[g]})")
        m, s = run.band_mean[:, g], run.band_std[:, g]
        dead = ~np.isfinite(y)
        m, s = np.where(dead, np.nan, m), np.where(dead, np.nan, s)
        lo = np.maximum(m - k * s, np.nanmin(yf) * 0.5 if np.any(np.isfinite(yf)) else 1e-12)
        ax.fill_between(x, lo, m + k * s, color="#2ca02c", alpha=0.15, lw=0,
                        label=f"running mean ± {k:g} std")
        ax.plot(x, m, color="#2ca02c", lw=0.8, ls="--", alpha=0.7)
        cl = run.clipped & ~run.skipped
        if run.has_clip and cl.any():
            ax.scatter(x[cl], np.where(np.isfinite(y[cl]), y[cl], np.nan), s=10,
                       color=_C_CLIP, zorder=4, label="clipped step")
        _mark_events(ax, run)
        if np.any(np.isfinite(yf)):
            ax.set_yscale("log")
        ax.set_ylabel(f"grad norm\n{run.groups[g]}")
        _legend_above(ax)
        ax.grid(alpha=0.3, which="both")
    if G > len(show_g):
        axes[len(show_g)].text(0.01, 0.02, f"({G - len(show_g)} more groups not shown)",
                               transform=axes[len(show_g)].transAxes, fontsize=8)
    if run.has_clip:
        ax = axes[-1]
        ok = ~run.skipped & ~run.nonfinite
        taken = ok.astype(float)
        c = (run.clipped & ok).astype(float)
        w = max(1, min(window, run.n))
        num = np.convolve(c, np.ones(w), mode="full")[:run.n]
        den = np.convolve(taken, np.ones(w), mode="full")[:run.n]
        rate = np.where((den > 0) & ok, num / np.maximum(den, 1), np.nan)
        ax.plot(x, 100 * rate, color=_C_CLIP, lw=1.2, label=f"clip rate (last {w} steps)")
        ax.axhline(100 * CLIP_RATE, color="gray", ls=":", lw=1, label="50%")
        ax.set_ylim(-3, 103)
        ax.set_ylabel("clipped %")
        _legend_above(ax)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("optimizer step")
    fig.tight_layout(h_pad=1.6)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _aligned(runs: List[Run], key: str) -> Tuple[np.ndarray, np.ndarray]:
    steps = sorted(set().union(*[set(r.steps.tolist()) for r in runs]))
    pos = {s: i for i, s in enumerate(steps)}
    M = np.full((len(runs), len(steps)), np.nan)
    for j, r in enumerate(runs):
        v = r.loss if key == "loss" else r.total
        for s, val in zip(r.steps.tolist(), v):
            M[j, pos[s]] = val if np.isfinite(val) else np.nan
    return np.array(steps), M


def plot_overlay(runs: List[Run], path: str, title: str, window: int) -> str:
    """Several runs overlaid in one PNG (loss, total gradient norm, clip rate over
    ``window`` steps), titled ``title``. Returns ``path``."""
    import matplotlib.transforms as mt
    plt = _plt()
    has_clip = any(r.has_clip for r in runs)
    rows = 3 if has_clip else 2
    fig, axes = plt.subplots(rows, 1, figsize=(11, 2.6 * rows + 1.0), sharex=True,
                             gridspec_kw={"height_ratios": [1.2, 1.2, 0.7][:rows]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    many = len(runs) > 4
    for j, r in enumerate(runs):
        c = colors[j % len(colors)]
        lw = 1.0 if many else (2.4 if j == 0 else 1.2)
        alpha = 0.85 if many else (0.55 if j == 0 else 1.0)
        for ax, v, lab in ((axes[0], r.loss, r.label), (axes[1], r.total, None)):
            vf = np.where(np.isfinite(v) & ((v > 0) if ax is axes[1] else True), v, np.nan)
            ax.plot(r.steps, vf, color=c, lw=lw, alpha=alpha, label=lab)
        cl = r.clipped & ~r.skipped
        if r.has_clip and cl.any() and not many:
            axes[1].scatter(r.steps[cl], np.where(np.isfinite(r.total[cl]), r.total[cl],
                                                  np.nan), s=12, color=c, edgecolor="k",
                            lw=0.3, zorder=4, label=f"{r.label}: clipped step")
        for ax in axes[:2]:
            trans = mt.blended_transform_factory(ax.transData, ax.transAxes)
            sk = r.steps[r.skipped]
            first_ax = ax is axes[0]
            if len(sk):
                ax.scatter(sk, np.full(len(sk), 0.95 - 0.07 * j), transform=trans,
                           marker="v", s=46, color=c, edgecolor="k", lw=0.5, zorder=5,
                           label=f"{r.label}: skipped step" if first_ax else None,
                           clip_on=False)
            nf = r.steps[r.nonfinite & ~r.skipped]
            if len(nf):
                ax.axvline(nf[0], color=c, ls="--", lw=1.3, alpha=0.9,
                           label=(f"{r.label}: NaN/Inf applied, from step {nf[0]}"
                                  if first_ax else None))
        if has_clip and r.has_clip:
            ok = ~r.skipped & ~r.nonfinite
            taken = ok.astype(float)
            clf = (cl & ok).astype(float)
            w = max(1, min(window, r.n))
            num = np.convolve(clf, np.ones(w), mode="full")[:r.n]
            den = np.convolve(taken, np.ones(w), mode="full")[:r.n]
            axes[2].plot(r.steps, 100 * np.where((den > 0) & ok, num / np.maximum(den, 1),
                                                 np.nan),
                         color=c, lw=1.2, alpha=alpha)
    axes[0].set_ylabel("loss")
    lossv = np.concatenate([r.loss[np.isfinite(r.loss)] for r in runs])
    if len(lossv) and lossv.min() > 0 and lossv.max() / lossv.min() > 30:
        axes[0].set_yscale("log")
    axes[1].set_ylabel("total grad norm")
    axes[1].set_yscale("log")
    fig.suptitle(title, x=0.01, ha="left", fontsize=12)
    _legend_above(axes[0], ncol=2)
    _legend_above(axes[1], ncol=3)
    for ax in axes[:2]:
        ax.grid(alpha=0.3, which="both")
    if has_clip:
        axes[2].axhline(100 * CLIP_RATE, color="gray", ls=":", lw=1)
        axes[2].set_ylabel(f"clipped %\n(last {window} steps)")
        axes[2].set_ylim(-3, 103)
        axes[2].grid(alpha=0.3)
    axes[-1].set_xlabel("optimizer step")
    fig.tight_layout(h_pad=1.6)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_spread(runs: List[Run], path: str) -> str:
    """Median and min-max band across seeds (loss and total gradient norm) in one PNG.
    Returns ``path``."""
    plt = _plt()
    fig, axes = plt.subplots(2, 1, figsize=(11, 6.4), sharex=True)
    for ax, key, lab in ((axes[0], "loss", "loss"), (axes[1], "total", "total grad norm")):
        steps, M = _aligned(runs, key)
        if key == "loss" and np.all(np.isnan(M)):
            ax.text(0.5, 0.5, "no loss in these logs", transform=ax.transAxes, ha="center")
            continue
        for j, r in enumerate(runs):
            ax.plot(steps, M[j], lw=0.6, alpha=0.45, color="gray",
                    label="individual seeds" if j == 0 else None)
        with np.errstate(all="ignore"):
            import warnings
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                med = np.nanmedian(M, axis=0)
                lo, hi = np.nanmin(M, axis=0), np.nanmax(M, axis=0)
        ax.fill_between(steps, lo, hi, color="#1f77b4", alpha=0.2, lw=0,
                        label=f"min-max across {len(runs)} seeds")
        ax.plot(steps, med, color="#1f77b4", lw=1.6, label="median across seeds")
        ax.set_ylabel(lab)
        v = M[np.isfinite(M)]
        if len(v) and v.min() > 0 and v.max() / v.min() > 30:
            ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
        ax.legend(loc="upper right", fontsize=8, ncol=3, framealpha=0.9)
    axes[0].set_title(f"spread across {len(runs)} seeds", loc="left", fontsize=12)
    axes[-1].set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

