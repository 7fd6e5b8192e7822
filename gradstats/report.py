"""``gradstats report LOG [LOG ...] --out DIR``: plots and a plain-language diagnosis.

Reads stats logs written by :mod:`gradstats.telemetry`, looks for the usual signals of
unstable training and writes ``report.md`` plus PNG plots into ``DIR``:

* ``<log name>_overview.png``: loss, each group's gradient norm with the running mean +- k std
  band, clipped / skipped / non-finite steps marked, clip activation rate over a moving
  window;
* with several logs: ``runs_loss.png`` (every run overlaid) and, when the logs are seeds
  of one configuration (the default), ``seeds_spread.png`` (median and min-max band
  across seeds). With ``--compare`` the logs are different configurations: they are
  overlaid in ``compare.png`` and not judged for seed-to-seed variation.

Signals diagnosed, each with evidence (step numbers, groups, tensor names): the first
non-finite step and where it came from; gradient-norm and loss spikes; clipping active in
more than half of the steps; gradient-norm variance rising before divergence; norms
collapsing toward zero; a loss that never improved; large variation across seeds. A log
without any of these is reported clean.

Python use: ``build_report(paths, out_dir)`` returns a :class:`Report` (findings per run,
files written); ``analyze(read_log(path))`` returns the :class:`Finding` list of one log.
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .telemetry import LogData, read_log

__all__ = ["Finding", "Run", "Report", "analyze", "load_run", "build_report", "main"]

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


# ================================================================================ data
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


@dataclass
class Finding:
    """One diagnosed signal.

    Attributes:
        kind: ``"nonfinite"``, ``"grad_spike"``, ``"loss_spike"``, ``"clip_rate"``,
            ``"variance_rising"``, ``"vanishing"``, ``"stagnation"``, ``"divergence"``,
            ``"seed_spread"``, ``"log_problem"``, ``"clean"`` or ``"info"``.
        severity: ``"problem"``, ``"warning"`` or ``"info"``.
        run: the run label (``"all runs"`` for across-run findings).
        title: one line.
        text: plain-language explanation with the evidence.
        steps: step numbers involved (first is the most important).
        groups: group names involved.
        tensors: tensor names involved.
    """

    kind: str
    severity: str
    run: str
    title: str
    text: str
    steps: List[int] = field(default_factory=list)
    groups: List[str] = field(default_factory=list)
    tensors: List[str] = field(default_factory=list)


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


# ============================================================================ diagnosis
def _fmt(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "NaN"
    if math.isinf(x):
        return "Inf" if x > 0 else "-Inf"
    if x == 0:
        return "0"
    a = abs(x)
    if a >= 1e4 or a < 1e-3:
        return f"{x:.3g}"
    return f"{x:.4g}"


def _steps_text(steps: Sequence[int], limit: int = 8) -> str:
    s = [str(int(x)) for x in steps[:limit]]
    more = len(steps) - limit
    return ", ".join(s) + (f" and {more} more" if more > 0 else "")


def _names_text(names: Sequence[str], total: Optional[int], limit: int = 5) -> str:
    shown = [f"`{n}`" for n in names[:limit]]
    txt = ", ".join(shown)
    n_total = total if total is not None else len(names)
    if n_total > len(shown):
        txt += f" (first {len(shown)} of {n_total} tensors, in parameter order)"
    return txt


def _divergence(run: Run) -> Tuple[Optional[int], str]:
    """Index where the run diverged (None if it did not), and how."""
    N = run.n
    if N < 3:
        return None, ""
    # non-finite values on every step from some point to the end (weights corrupted)
    tail = np.flip(np.cumprod(np.flip(run.nonfinite.astype(np.int64))))
    if tail.sum() >= 3 and not run.skipped[tail > 0].all():
        return int(np.argmax(tail)), "non-finite from then on"
    if run.has_loss:
        finite = np.isfinite(run.loss)
        if finite.sum() >= 10:
            lo = np.where(finite, run.loss, np.nan)
            k = 5
            sm = np.array([np.nanmedian(lo[max(0, i - k + 1):i + 1])
                           if np.any(finite[max(0, i - k + 1):i + 1]) else np.nan
                           for i in range(N)])
            best = np.fmin.accumulate(np.where(np.isnan(sm), np.inf, sm))
            if np.all(np.isfinite(best[-1:])) and best[-1] > 0:
                high = sm > 10 * best
                stays = np.flip(np.cumprod(np.flip(np.where(np.isnan(sm), 1, sm > 3 * best))))
                cand = np.where(high & (stays > 0))[0]
                if len(cand):
                    # walk back to where the rise above 3x the best began
                    i = int(cand[0])
                    while i > 0 and sm[i - 1] > 3 * best[i - 1]:
                        i -= 1
                    return i, "the loss blew up (over 10x its best value and never recovered)"
    return None, ""


def _find_nonfinite(run: Run) -> List[Finding]:
    idx = np.where(run.nonfinite)[0]
    if len(idx) == 0:
        return []
    i0 = int(idx[0])
    s0 = int(run.steps[i0])
    parts: List[str] = []
    groups = [run.groups[g] for g in range(len(run.groups))
              if np.nan_to_num(run.nf_count[i0, g]) > 0]
    counts = [int(run.nf_count[i0, g]) for g in range(len(run.groups))
              if np.nan_to_num(run.nf_count[i0, g]) > 0]
    tensors = run.nf_tensors[i0]
    tcount = run.nf_tensor_count[i0]
    n_params = len(run.log.header.get("params") or [])
    loss0 = run.loss[i0]
    parts.append(f"The first non-finite value appeared at **step {s0}**.")
    if groups:
        parts.append("Non-finite gradient elements by group: " + ", ".join(
            f"`{g}` ({c} elements)" for g, c in zip(groups, counts)) + ".")
    if tensors:
        where = _names_text(tensors, tcount)
        if tcount is not None and n_params and tcount >= n_params:
            parts.append(f"Every tensor's gradient was non-finite ({where}).")
        else:
            parts.append(f"Tensors with a NaN/Inf gradient: {where}.")
    loss_given = not (np.isnan(loss0) and run.log.records[i0].get("loss") is None)
    if loss_given and not np.isfinite(loss0):
        parts.append(f"The loss itself was {_fmt(loss0)} at that step, so the NaN/Inf came "
                     f"from the forward pass: a bad input batch (NaN/Inf in the data) or an "
                     f"overflow in the model before the loss.")
    elif loss_given and tensors and (tcount is None or not n_params or tcount < n_params):
        parts.append(f"The loss was finite ({_fmt(loss0)}), so the NaN/Inf arose in the "
                     f"backward pass of {'that tensor' if len(tensors) == 1 else 'those tensors'}"
                     f" (an overflow in the layer, a bad custom backward, or a corrupted "
                     f"gradient), not in the data.")
    if run.skipped[i0]:
        parts.append("The step was skipped (reason: "
                     f"{run.reasons[i0] or 'other'}), so the weights were not touched.")
    else:
        parts.append("The step was **not** skipped: the NaN/Inf reached the optimizer, and "
                     "with it the weights and optimizer state.")
    rest = idx[1:]
    if len(rest):
        tail_all = bool(np.all(run.nonfinite[i0:]))
        if tail_all and run.n - i0 >= 3:
            parts.append(f"Every later step ({run.n - i0 - 1} of them, through step "
                         f"{int(run.steps[-1])}) is non-finite as well: the model is corrupted "
                         f"and training has effectively diverged at step {s0}.")
        else:
            parts.append(f"Other non-finite steps: {_steps_text([int(run.steps[j]) for j in rest])}"
                         f" ({len(rest) + 1} in all, "
                         f"{int(run.skipped[idx].sum())} of them skipped).")
    sev = "problem" if not np.all(run.skipped[idx]) else "warning"
    if sev == "warning":
        parts.append("All of them were skipped, so training continued unharmed; still, find "
                     "out why the data or the model produced them.")
    return [Finding("nonfinite", sev, run.label, f"Non-finite values first at step {s0}",
                    " ".join(parts), steps=[int(run.steps[j]) for j in idx],
                    groups=groups, tensors=list(tensors))]


def _spikes(x: np.ndarray, usable: np.ndarray, ratio: float, z: float,
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


def _find_spikes(run: Run) -> List[Finding]:
    out: List[Finding] = []
    usable = ~run.nonfinite
    sp = _spikes(run.total, usable, SPIKE_RATIO, SPIKE_Z)
    if sp:
        lines = []
        groups_all: List[str] = []
        for i, v, med in sp[:8]:
            s = int(run.steps[i])
            gs = []
            for g in range(len(run.groups)):
                gsp = _spikes(run.norm[:i + 1, g], usable[:i + 1], SPIKE_RATIO, SPIKE_Z)
                if gsp and gsp[-1][0] == i:
                    gs.append(run.groups[g])
            groups_all += [g for g in gs if g not in groups_all]
            if run.skipped[i]:
                fate = f"skipped ({run.reasons[i] or 'other'})"
            elif run.clipped[i]:
                c = np.nanmin(run.clip_coef[i]) if np.any(np.isfinite(run.clip_coef[i])) \
                    else math.nan
                fate = f"clipped (coefficient {_fmt(c)})"
            elif run.has_clip:
                fate = "applied **unclipped**"
            else:
                fate = "applied"
            lines.append(f"step {s}: total gradient norm {_fmt(v)}, {v / med:.0f}x the "
                         f"typical {_fmt(med)}" + (f"; groups {', '.join(f'`{g}`' for g in gs)}"
                                                   if gs else "") + f"; {fate}")
        more = f" ({len(sp) - 8} more not listed)" if len(sp) > 8 else ""
        steps = [int(run.steps[i]) for i, _, _ in sp]
        text = (f"{len(sp)} gradient-norm spike{'s' if len(sp) > 1 else ''} (at least "
                f"{SPIKE_RATIO:g}x the median of the previous {SPIKE_WINDOW} steps and "
                f"{SPIKE_Z:g} robust standard deviations above it){more}:\n" +
                "\n".join(f"  - {ln}" for ln in lines) +
                "\n\n  A single spike usually comes from one unusual batch (outliers, label "
                "noise, a data bug); repeated spikes point to a learning rate that is too "
                "high for the current loss curvature, or to missing warm-up.")
        sev = "warning" if all(run.skipped[i] or run.clipped[i] for i, _, _ in sp) else "problem"
        title = (f"Gradient spike at step {steps[0]}" if len(steps) == 1 else
                 f"Gradient spikes at steps {_steps_text(steps, 4)}")
        out.append(Finding("grad_spike", sev, run.label, title, text, steps=steps,
                           groups=groups_all))
    if run.has_loss:
        lsp = _spikes(run.loss, usable, 1.5, SPIKE_Z)
        if lsp:
            gsteps = [int(run.steps[i]) for i, _, _ in sp]
            lines = []
            for i, v, med in lsp[:8]:
                s = int(run.steps[i])
                near = [g for g in gsteps if 0 <= s - g <= 3]
                rel = (f"; {s - near[0]} step(s) after the gradient spike at step {near[0]}"
                       if near else "")
                lines.append(f"step {s}: loss {_fmt(v)} vs. typical {_fmt(med)}{rel}")
            steps = [int(run.steps[i]) for i, _, _ in lsp]
            text = (f"{len(lsp)} loss spike{'s' if len(lsp) > 1 else ''} (at least 1.5x and "
                    f"{SPIKE_Z:g} robust standard deviations above the median of the previous "
                    f"{SPIKE_WINDOW} steps):\n" + "\n".join(f"  - {ln}" for ln in lines) +
                    "\n\n  A loss spike right after an applied gradient spike means that update "
                    "threw the weights off; on its own it is more often one hard batch.")
            title = (f"Loss spike at step {steps[0]}" if len(steps) == 1 else
                     f"Loss spikes at steps {_steps_text(steps, 4)}")
            out.append(Finding("loss_spike", "warning", run.label, title, text, steps=steps))
    return out


def _find_clip_rate(run: Run, window: int) -> List[Finding]:
    if not run.has_clip:
        return []
    taken = ~run.skipped & ~run.nonfinite
    n = int(taken.sum())
    if n < 10:
        return []
    c = run.clipped[taken]
    rate = float(c.mean())
    steps_taken = run.steps[taken]
    if rate > CLIP_RATE:
        coef = run.clip_coef[taken]
        tot = run.total[taken]
        target = tot * np.nanmin(np.where(np.isfinite(coef), coef, np.nan), axis=1)
        thr = float(np.nanmedian(target[c])) if c.any() else math.nan
        med = float(np.nanmedian(tot))
        last = c[-min(window, len(c)):]
        text = (f"Clipping was active in {int(c.sum())} of {n} applied steps "
                f"({100 * rate:.0f}%; {100 * last.mean():.0f}% in the last {len(last)}). "
                f"The median gradient norm is {_fmt(med)} while the clipped norm is about "
                f"{_fmt(thr)}: the threshold sits below the typical gradient norm, so clipping "
                f"no longer removes outliers, it rescales almost every step (an implicit, "
                f"varying learning-rate cut). Either the threshold is too low for this model "
                f"(raise `max_norm` to around the typical norm, or use an adaptive policy such "
                f"as `ZScoreClip`) or the learning rate is too high and the norms grew because "
                f"of it.")
        return [Finding("clip_rate", "warning", run.label,
                        f"Clipping active in {100 * rate:.0f}% of steps", text,
                        steps=[int(s) for s in steps_taken[c][:20]])]
    # a stretch where more than half of a window was clipped
    if len(c) >= window:
        roll = np.convolve(c.astype(float), np.ones(window) / window, mode="valid")
        if roll.max() > CLIP_RATE:
            j = int(np.argmax(roll))
            a, b = int(steps_taken[j]), int(steps_taken[j + window - 1])
            return [Finding("clip_rate", "info", run.label,
                            f"Clipping busy between steps {a} and {b}",
                            f"Overall clipping was active in {100 * rate:.0f}% of applied "
                            f"steps, but in {100 * roll.max():.0f}% of the {window} steps "
                            f"from {a} to {b}: a phase of large gradients (check the learning "
                            f"rate schedule around there).", steps=[a, b])]
    return []


def _dispersion(x: np.ndarray, w: int) -> np.ndarray:
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


def _find_variance(run: Run, div: Optional[int], how: str) -> List[Finding]:
    w = VAR_WINDOW
    usable = np.where(run.nonfinite | run.skipped, np.nan, run.total)
    if div is not None:
        end = div
        if end < 3 * w:
            return []
        disp = _dispersion(usable[:end], w)
        early = disp[w - 1: max(w, end // 2)]
        early = early[np.isfinite(early)]
        late = disp[end - 1] if np.isfinite(disp[end - 1]) else np.nan
        if len(early) == 0 or not np.isfinite(late):
            return []
        base = float(np.median(early))
        if base > 0 and late >= VAR_RISE * base:
            # when did it start rising?
            above = np.where(np.isfinite(disp) & (disp >= 0.5 * (base + late)))[0]
            s_rise = int(run.steps[above[0]]) if len(above) else int(run.steps[end - 1])
            groups = []
            for g in range(len(run.groups)):
                gd = _dispersion(np.where((run.nonfinite | run.skipped)[:end], np.nan,
                                          run.norm[:end, g]), w)
                ge = gd[w - 1:max(w, end // 2)]
                ge = ge[np.isfinite(ge)]
                if len(ge) and np.isfinite(gd[end - 1]) and np.median(ge) > 0 and \
                        gd[end - 1] >= VAR_RISE * np.median(ge):
                    groups.append(run.groups[g])
            text = (f"The step-to-step variability of the gradient norm (robust spread of the "
                    f"change in log norm over {w} steps) rose from {_fmt(base)} (typical in "
                    f"steps {int(run.steps[w - 1])}-{int(run.steps[max(w, end // 2) - 1])}) to "
                    f"{_fmt(late)} ({late / base:.1f}x) in the {w} steps before the run "
                    f"diverged at step {int(run.steps[div])} ({how}); it began rising around "
                    f"step {s_rise}." + (f" Groups where it rose: "
                                         f"{', '.join(f'`{g}`' for g in groups)}." if groups
                                         else "") +
                    " Rising gradient noise is the usual early warning of an unstable learning "
                    "rate: lower it, lengthen warm-up, or clip adaptively before it diverges.")
            return [Finding("variance_rising", "problem", run.label,
                            f"Gradient-norm variance rising before divergence at step "
                            f"{int(run.steps[div])}", text,
                            steps=[s_rise, int(run.steps[div])], groups=groups)]
        return []
    N = run.n
    if N < 8 * w:
        return []
    disp = _dispersion(usable, w)
    q = N // 4
    a = disp[w - 1:q]
    b = disp[N - q:]
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if len(a) and len(b) and np.median(a) > 0 and np.median(b) >= VAR_RISE_NO_DIV * np.median(a):
        ma, mb = float(np.median(a)), float(np.median(b))
        return [Finding("variance_rising", "warning", run.label,
                        "Gradient-norm variance rising",
                        f"The step-to-step variability of the gradient norm grew from "
                        f"{_fmt(ma)} in the first quarter of the run to {_fmt(mb)} in the last "
                        f"quarter (steps {int(run.steps[N - q])}-{int(run.steps[-1])}, "
                        f"{mb / ma:.1f}x). The run has not diverged, but this is how "
                        f"instability usually starts; watch the loss and consider a lower "
                        f"learning rate.", steps=[int(run.steps[N - q])])]
    return []


def _find_vanishing(run: Run, div: Optional[int]) -> List[Finding]:
    out: List[Finding] = []
    end = run.n if div is None else div
    if end < 20:
        return out
    ok = ~(run.nonfinite | run.skipped)[:end]
    a0, a1 = max(1, end // 10), max(2, (3 * end) // 10)
    late0 = end - max(5, end // 5)
    for g, name in enumerate(run.groups):
        x = run.norm[:end, g]
        e = x[a0:a1][ok[a0:a1] & np.isfinite(x[a0:a1])]
        lt = x[late0:][ok[late0:] & np.isfinite(x[late0:])]
        if len(e) < 3 or len(lt) < 3:
            continue
        me, ml = float(np.median(e)), float(np.median(lt))
        if me <= 0:
            continue
        if ml < VANISH_FACTOR * me or ml < 1e-12:
            below = np.where(np.isfinite(x) & (x < 0.01 * me))[0]
            s = int(run.steps[below[0]]) if len(below) else int(run.steps[late0])
            loss_txt = ""
            if run.has_loss:
                l_seg = run.loss[late0:end]
                l_seg = l_seg[np.isfinite(l_seg)]
                if len(l_seg) >= 2 and abs(l_seg[0]) > 0:
                    ch = (l_seg[-1] - l_seg[0]) / abs(l_seg[0])
                    loss_txt = (f" Over the same final stretch the loss changed by "
                                f"{100 * ch:+.1f}%.")
            out.append(Finding(
                "vanishing", "warning", run.label,
                f"Gradient norm of `{name}` collapsed toward zero",
                f"The gradient norm of group `{name}` fell from a median of {_fmt(me)} early in "
                f"the run to {_fmt(ml)} at the end ({me / max(ml, 1e-300):.2g}x smaller), below "
                f"1% of its early value from step {s} on.{loss_txt} Vanishing gradients mean this "
                f"part of the model has stopped learning: saturated activations, dead ReLUs, "
                f"a learning rate decayed to nothing, or weights driven to zero by weight "
                f"decay.", steps=[s], groups=[name]))
    return out


def _find_stagnation(run: Run, div: Optional[int]) -> List[Finding]:
    """The loss never got meaningfully below where it started."""
    if not run.has_loss:
        return []
    end = run.n if div is None else div
    lo = run.loss[:end]
    ok = np.isfinite(lo) & ~run.skipped[:end]
    if ok.sum() < 50:
        return []
    vals = lo[ok]
    steps = run.steps[:end][ok]
    k = max(5, len(vals) // 10)
    first, last = float(np.min(vals[:5])), float(np.median(vals[-k:]))
    best = float(np.min(vals))
    if not (first > 0 and last >= 0.9 * first and best >= 0.8 * first):
        return []
    norm_txt = ""
    tot = run.total[:end][ok]
    tot = tot[np.isfinite(tot)]
    if len(tot) >= 10:
        a, b = float(np.median(tot[:len(tot) // 5 or 1])), float(np.median(tot[-k:]))
        norm_txt = (f" Meanwhile the gradient norm went from a median of {_fmt(a)} to "
                    f"{_fmt(b)}.")
    return [Finding(
        "stagnation", "warning", run.label, "The loss barely improved",
        f"The loss started at {_fmt(first)} (lowest of the first 5 steps) and ended at "
        f"{_fmt(last)} (median of the last {k}, step {int(steps[-k])} on), "
        f"{100 * (1 - last / first):.0f}% lower; it was never more than 20% below its "
        f"start.{norm_txt} Training is stuck: a learning rate so high "
        f"that the model collapsed to a trivial solution (e.g. predicting the average), so "
        f"low that nothing moves, vanishing gradients, or a bug in the data or loss.",
        steps=[int(steps[0]), int(steps[-1])])]


def analyze(log: LogData, *, window: int = SPIKE_WINDOW) -> List[Finding]:
    """The findings of one log (a ``"clean"`` finding when there are none)."""
    run = load_run(log)
    return _analyze_run(run, window)


def _analyze_run(run: Run, window: int) -> List[Finding]:
    out: List[Finding] = []
    for p in run.log.problems:
        out.append(Finding("log_problem", "warning", run.label, "Unreadable log line", p))
    if run.n == 0:
        out.append(Finding("info", "warning", run.label, "No step records",
                           "The log holds no step records to analyse."))
        return out
    div, how = _divergence(run)
    out += _find_nonfinite(run)
    out += _find_spikes(run)
    out += _find_clip_rate(run, window)
    out += _find_variance(run, div, how)
    out += _find_vanishing(run, div)
    out += _find_stagnation(run, div)
    if div is not None and not any(f.kind == "nonfinite" and f.severity == "problem"
                                   for f in out) and how.startswith("the loss"):
        out.append(Finding("divergence", "problem", run.label,
                           f"Training diverged at step {int(run.steps[div])}",
                           f"The loss {how[9:]} from step {int(run.steps[div])} on.",
                           steps=[int(run.steps[div])]))
    if run.log.end is None and run.log.header:
        out.append(Finding("info", "info", run.label, "Log not closed",
                           "The log has no end record: the run crashed, was killed, or is "
                           "still running (records buffered on the device at that time are "
                           "missing)."))
    if not any(f.severity in ("problem", "warning") and f.kind != "log_problem" for f in out):
        fin_loss = _final(run.loss)
        out.insert(0, Finding(
            "clean", "info", run.label, "No instability signals",
            f"No problems found in {run.n} steps (steps {int(run.steps[0])}-"
            f"{int(run.steps[-1])}): no non-finite values, no gradient or loss spikes, "
            f"clipping active in {100 * float(run.clipped[~run.skipped].mean()):.0f}% of steps"
            f", no rising gradient variance, no collapsing norms." +
            (f" Final loss {_fmt(fin_loss)}." if np.isfinite(fin_loss) else "")))
    return out


def _final(x: np.ndarray) -> float:
    """Median of the last 10% (at least 5) of the values; NaN if the last one is NaN/Inf."""
    if len(x) == 0 or np.all(np.isnan(x)):
        return math.nan
    k = max(5, len(x) // 10)
    tail = x[-k:]
    if not np.isfinite(tail[-1]):
        return float(tail[-1])
    return float(np.nanmedian(tail[np.isfinite(tail)]))


def _seed_findings(runs: List[Run], divs: List[Optional[int]]) -> List[Finding]:
    if len(runs) < 2:
        return []
    use_loss = all(r.has_loss for r in runs)
    what = "final loss" if use_loss else "final gradient norm"
    finals = [_final(r.loss if use_loss else r.total) for r in runs]
    diverged = [r.label for r, d, f in zip(runs, divs, finals)
                if d is not None or not np.isfinite(f)]
    ok = [(r.label, f) for r, f in zip(runs, finals) if np.isfinite(f)]
    table = "; ".join(f"`{r.label}`: {_fmt(f)}" for r, f in zip(runs, finals))
    if diverged and len(diverged) < len(runs):
        return [Finding("seed_spread", "problem", "all runs",
                        f"{len(diverged)} of {len(runs)} seeds diverged",
                        f"Runs differ only by seed, yet {', '.join(f'`{d}`' for d in diverged)} "
                        f"diverged while the others did not ({what}: {table}). Training sits "
                        f"on a knife edge: results hinge on the seed. Lower the learning rate "
                        f"or add clipping/skipping until every seed trains.")]
    if len(ok) >= 2:
        vals = np.array([f for _, f in ok])
        med = float(np.median(vals))
        spread = float(vals.max() - vals.min())
        rel = spread / abs(med) if med != 0 else math.inf
        if rel > SEED_SPREAD:
            lo = ok[int(np.argmin(vals))]
            hi = ok[int(np.argmax(vals))]
            return [Finding("seed_spread", "warning", "all runs",
                            "Large variation across seeds",
                            f"The {what} ranges from {_fmt(lo[1])} (`{lo[0]}`) to "
                            f"{_fmt(hi[1])} (`{hi[0]}`), a spread of {100 * rel:.0f}% of the "
                            f"median {_fmt(med)} ({table}). Results depend strongly on the "
                            f"seed: an unstable learning rate or too few steps; compare more "
                            f"seeds before drawing conclusions.")]
        return [Finding("seed_spread", "info", "all runs", "Seeds agree",
                        f"The {what} of the {len(ok)} runs spans {_fmt(vals.min())}-"
                        f"{_fmt(vals.max())} ({100 * rel:.0f}% of the median): little "
                        f"variation across seeds ({table}).")]
    return []


# ================================================================================ plots
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


def _plot_run(run: Run, path: str, k: float, window: int) -> str:
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


def _plot_overlay(runs: List[Run], path: str, title: str, window: int) -> str:
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


def _plot_spread(runs: List[Run], path: str) -> str:
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


# ================================================================================ report
@dataclass
class Report:
    """What :func:`build_report` wrote and found."""

    out_dir: str
    markdown: str
    plots: List[str]
    findings: Dict[str, List[Finding]]  # per run label, plus "all runs"
    problems: List[str]

    def all_findings(self) -> List[Finding]:
        return [f for fs in self.findings.values() for f in fs]


def _safe(name: str) -> str:
    s = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return s or "run"


def build_report(paths: Sequence[str], out_dir: str, *, k: float = 3.0,
                 window: int = SPIKE_WINDOW, compare: bool = False,
                 plots: bool = True, title: str = "gradstats report") -> Report:
    """Read the logs, diagnose them, write ``report.md`` and PNG plots into ``out_dir``.

    Args:
        paths: stats logs (JSONL or CSV).
        out_dir: output folder (created).
        k: width of the running-statistics band, in standard deviations.
        window: moving window (steps) of the clip activation rate.
        compare: the logs are different configurations, not seeds: overlay them and do
            not diagnose the spread across them.
        plots: write the PNG plots (needs matplotlib).

    Raises:
        FileNotFoundError: a log does not exist.
    """
    os.makedirs(out_dir, exist_ok=True)
    logs = [read_log(p) for p in paths]
    runs = [load_run(lg) for lg in logs]
    # unique labels
    seen: Dict[str, int] = {}
    for r in runs:
        n = seen.get(r.label, 0)
        seen[r.label] = n + 1
        if n:
            r.label = f"{r.label}#{n + 1}"
    findings: Dict[str, List[Finding]] = {}
    divs = []
    for r in runs:
        findings[r.label] = _analyze_run(r, window)
        divs.append(_divergence(r)[0] if r.n else None)
    if len(runs) >= 2 and not compare:
        findings["all runs"] = _seed_findings(runs, divs)
    problems = [p for lg in logs for p in lg.problems]
    written: List[str] = []
    plot_of: Dict[str, str] = {}
    if plots:
        stems: Dict[str, int] = {}
        for r in runs:
            if not r.n:
                continue
            # files are named after the log file (run.jsonl -> run_overview.png)
            stem = _safe(os.path.basename(r.log.path).rsplit(".", 1)[0])
            stems[stem] = stems.get(stem, 0) + 1
            if stems[stem] > 1:
                stem = f"{stem}_{stems[stem]}"
            plot_of[r.label] = _plot_run(r, os.path.join(out_dir, f"{stem}_overview.png"),
                                         k, window)
            written.append(plot_of[r.label])
        nonempty = [r for r in runs if r.n]
        if len(nonempty) >= 2:
            if compare:
                written.append(_plot_overlay(nonempty, os.path.join(out_dir, "compare.png"),
                                             "runs compared: loss, total gradient norm, "
                                             "clipping", window))
            else:
                written.append(_plot_overlay(nonempty, os.path.join(out_dir, "runs_loss.png"),
                                             f"{len(nonempty)} runs overlaid", window))
                written.append(_plot_spread(nonempty, os.path.join(out_dir,
                                                                    "seeds_spread.png")))
    md = _markdown(title, runs, findings, problems, written, out_dir, k, window, compare)
    md_path = os.path.join(out_dir, "report.md")
    with open(md_path, "w", encoding="utf-8") as f:
        f.write(md)
    return Report(out_dir=out_dir, markdown=md_path, plots=written, findings=findings,
                  problems=problems)


_ICON = {"problem": "PROBLEM", "warning": "WARNING", "info": "OK"}


def _markdown(title: str, runs: List[Run], findings: Dict[str, List[Finding]],
              problems: List[str], plots: List[str], out_dir: str, k: float, window: int,
              compare: bool) -> str:
    L: List[str] = [f"# {title}", ""]
    L.append("| run | log | steps | groups | skipped | clipped | non-finite | final loss |")
    L.append("|---|---|---|---|---|---|---|---|")
    for r in runs:
        steps = f"{int(r.steps[0])}-{int(r.steps[-1])}" if r.n else "none"
        L.append(f"| {r.label} | `{r.log.path}` | {steps} | {', '.join(r.groups)} | "
                 f"{int(r.skipped.sum())} | {int((r.clipped & ~r.skipped).sum()) if r.has_clip else '-'} | "
                 f"{int(r.nonfinite.sum())} | {_fmt(_final(r.loss)) if r.has_loss else '-'} |")
    L += ["", "## Diagnosis", ""]
    order = {"problem": 0, "warning": 1, "info": 2}
    for label, fs in findings.items():
        L.append(f"### {label}")
        L.append("")
        if not fs:
            L.append("Nothing to report.")
        for f in sorted(fs, key=lambda f: order.get(f.severity, 3)):
            L.append(f"- **{_ICON.get(f.severity, f.severity.upper())} — {f.title}.** "
                     f"{f.text}")
        L.append("")
    if problems:
        L += ["## Problems reading the logs", ""]
        L += [f"- {p}" for p in problems]
        L += ["", "The other lines of these logs were used.", ""]
    if plots:
        L += ["## Plots", ""]
        for p in plots:
            rel = os.path.relpath(p, out_dir)
            L.append(f"![{rel}]({rel})")
            L.append("")
    L += ["## How to read this", "",
          f"- Grad-norm panels: the green band is the running mean ± {k:g} running standard "
          f"deviations (EMA, as StableOptimizer keeps it; for logs without it the report "
          f"computes it the same way, leaving out spikes); orange dots are clipped steps; triangles "
          f"and vertical lines are skipped steps (purple: non-finite, red: spike, brown: "
          f"other); black crosses or grey shading are non-finite steps that were applied "
          f"(the dashed line marks the first). The bottom panel is the share of clipped steps over the last "
          f"{window} steps.",
          f"- A spike is a value at least {SPIKE_RATIO:g}x the median of the previous "
          f"{SPIKE_WINDOW} steps and {SPIKE_Z:g} robust standard deviations above it. "
          f"Clipping is flagged when active in more than {100 * CLIP_RATE:.0f}% of steps. "
          f"Rising variance compares the robust spread of the step-to-step change in log "
          f"gradient norm over {VAR_WINDOW} steps with its early value "
          f"({VAR_RISE:g}x before a divergence, {VAR_RISE_NO_DIV:g}x otherwise). A norm has "
          f"collapsed when its late median is below {VANISH_FACTOR:g}x its early median. The "
          f"loss has stalled when it never got 20% below its start and ended less than 10% "
          f"below it." +
          ("" if compare else f" Seeds vary too much when the final losses spread over "
                              f"more than {100 * SEED_SPREAD:.0f}% of their median."), ""]
    return "\n".join(L)


def print_summary(rep: Report, file=None) -> None:
    file = file or sys.stdout
    for label, fs in rep.findings.items():
        for f in fs:
            if f.kind == "log_problem":
                continue
            print(f"[{_ICON.get(f.severity, f.severity)}] {label}: {f.title}", file=file)
    for p in rep.problems:
        print(f"log problem: {p}", file=sys.stderr)
    print(f"report: {rep.markdown}", file=file)
    if rep.plots:
        print(f"plots:  {', '.join(rep.plots)}", file=file)


def main(args: Any) -> int:
    """``gradstats report`` entry point (``args`` from the CLI parser)."""
    missing = [p for p in args.logs if not os.path.exists(p)]
    if missing:
        print(f"gradstats report: no such log: {', '.join(missing)}", file=sys.stderr)
        return 2
    rep = build_report(args.logs, args.out, k=args.k, window=args.window,
                       compare=args.compare)
    print_summary(rep)
    return 0
