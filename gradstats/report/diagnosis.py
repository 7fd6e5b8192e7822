"""The diagnosis of a training run: the signals of unstable training, as findings.

Each signal is one function from a :class:`~gradstats.report.runs.Run` to findings
(:class:`Finding`) with plain-language evidence (step numbers, groups, tensor names): the
first non-finite step and where it came from; gradient-norm and loss spikes; clipping
active in more than half of the steps; gradient-norm variance rising before divergence;
norms collapsing toward zero; a loss that never improved; a divergence; large variation
across seeds (:func:`seed_findings`); rows the logger could not write and the segments of
a resumed run. :func:`analyze` gives the findings of one log (:func:`analyze_run` of one
:class:`~gradstats.report.runs.Run`), a ``"clean"`` finding when there are none. The
thresholds are in :mod:`gradstats.report.signals`; :func:`format_value` formats numbers
and :func:`divergence` finds where a run diverged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ..telemetry.reader import LogData
from .runs import Run, load_run
from .signals import (CLIP_RATE, SEED_SPREAD, SPIKE_RATIO, SPIKE_WINDOW, SPIKE_Z,
                      VANISH_FACTOR, VAR_RISE, VAR_RISE_NO_DIV, VAR_WINDOW, dispersion,
                      final_value, find_spikes)


@dataclass
class Finding:
    """One diagnosed signal.

    Attributes:
        kind: ``"nonfinite"``, ``"grad_spike"``, ``"loss_spike"``, ``"clip_rate"``,
            ``"variance_rising"``, ``"vanishing"``, ``"stagnation"``, ``"divergence"``,
            ``"seed_spread"``, ``"log_problem"``, ``"dropped_rows"``, ``"resumed"``,
            ``"clean"`` or ``"info"``.
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


def format_value(x: float) -> str:
    """A number as the report writes it: 4 significant digits (3 in scientific notation
    for very large or small values), ``NaN``, ``Inf``, ``-Inf``.

    Example::

        >>> format_value(0.0012345), format_value(2.5e7), format_value(float("nan"))
        ('0.001234', '2.5e+07', 'NaN')
    """
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


def divergence(run: Run) -> Tuple[Optional[int], str]:
    """Where a run diverged.

    Returns:
        ``(index, how)``: the index into the run's arrays where it diverged (``None`` if
        it did not) and a short description (non-finite from then on, or a loss that
        blew up and never recovered); ``(None, "")`` for runs under 3 steps.
    """
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
    loss_given = not (np.isnan(loss0) and run.records[i0].get("loss") is None)
    if loss_given and not np.isfinite(loss0):
        parts.append(f"The loss itself was {format_value(loss0)} at that step, so the NaN/Inf came "
                     f"from the forward pass: a bad input batch (NaN/Inf in the data) or an "
                     f"overflow in the model before the loss.")
    elif loss_given and tensors and (tcount is None or not n_params or tcount < n_params):
        parts.append(f"The loss was finite ({format_value(loss0)}), so the NaN/Inf arose in the "
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



def _find_spikes(run: Run) -> List[Finding]:
    out: List[Finding] = []
    usable = ~run.nonfinite
    sp = find_spikes(run.total, usable, SPIKE_RATIO, SPIKE_Z)
    if sp:
        lines = []
        groups_all: List[str] = []
        for i, v, med in sp[:8]:
            s = int(run.steps[i])
            gs = []
            for g in range(len(run.groups)):
                gsp = find_spikes(run.norm[:i + 1, g], usable[:i + 1], SPIKE_RATIO, SPIKE_Z)
                if gsp and gsp[-1][0] == i:
                    gs.append(run.groups[g])
            groups_all += [g for g in gs if g not in groups_all]
            if run.skipped[i]:
                fate = f"skipped ({run.reasons[i] or 'other'})"
            elif run.clipped[i]:
                c = np.nanmin(run.clip_coef[i]) if np.any(np.isfinite(run.clip_coef[i])) \
                    else math.nan
                fate = f"clipped (coefficient {format_value(c)})"
            elif run.has_clip:
                fate = "applied **unclipped**"
            else:
                fate = "applied"
            gtxt = f"; groups {', '.join(f'`{g}`' for g in gs)}" if gs else ""
            lines.append(f"step {s}: total gradient norm {format_value(v)}, {v / med:.0f}x the "
                         f"typical {format_value(med)}{gtxt}; {fate}")
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
        lsp = find_spikes(run.loss, usable, 1.5, SPIKE_Z)
        if lsp:
            gsteps = [int(run.steps[i]) for i, _, _ in sp]
            lines = []
            for i, v, med in lsp[:8]:
                s = int(run.steps[i])
                near = [g for g in gsteps if 0 <= s - g <= 3]
                rel = (f"; {s - near[0]} step(s) after the gradient spike at step {near[0]}"
                       if near else "")
                lines.append(f"step {s}: loss {format_value(v)} vs. typical "
                             f"{format_value(med)}{rel}")
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
                f"The median gradient norm is {format_value(med)} while the clipped norm is "
                f"about {format_value(thr)}: the threshold sits below the typical gradient norm, "
                f"so clipping no longer removes outliers, it rescales almost every step (an "
                f"implicit, "
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



def _find_variance(run: Run, div: Optional[int], how: str) -> List[Finding]:
    w = VAR_WINDOW
    usable = np.where(run.nonfinite | run.skipped, np.nan, run.total)
    if div is not None:
        end = div
        if end < 3 * w:
            return []
        disp = dispersion(usable[:end], w)
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
                gd = dispersion(np.where((run.nonfinite | run.skipped)[:end], np.nan,
                                          run.norm[:end, g]), w)
                ge = gd[w - 1:max(w, end // 2)]
                ge = ge[np.isfinite(ge)]
                if len(ge) and np.isfinite(gd[end - 1]) and np.median(ge) > 0 and \
                        gd[end - 1] >= VAR_RISE * np.median(ge):
                    groups.append(run.groups[g])
            text = (f"The step-to-step variability of the gradient norm (robust spread of the "
                    f"change in log norm over {w} steps) rose from {format_value(base)} "
                    f"(typical in steps {int(run.steps[w - 1])}-"
                    f"{int(run.steps[max(w, end // 2) - 1])}) to "
                    f"{format_value(late)} ({late / base:.1f}x) in the {w} steps before the run "
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
    disp = dispersion(usable, w)
    q = N // 4
    a = disp[w - 1:q]
    b = disp[N - q:]
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if len(a) and len(b) and np.median(a) > 0 and np.median(b) >= VAR_RISE_NO_DIV * np.median(a):
        ma, mb = float(np.median(a)), float(np.median(b))
        return [Finding("variance_rising", "warning", run.label,
                        "Gradient-norm variance rising",
                        f"The step-to-step variability of the gradient norm grew from "
                        f"{format_value(ma)} in the first quarter of the run to "
                        f"{format_value(mb)} in the last quarter (steps "
                        f"{int(run.steps[N - q])}-{int(run.steps[-1])}, "
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
                f"The gradient norm of group `{name}` fell from a median of {format_value(me)} "
                f"early in the run to {format_value(ml)} at the end "
                f"({me / max(ml, 1e-300):.2g}x smaller), below 1% of its early value from "
                f"step {s} on.{loss_txt} Vanishing gradients mean this "
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
        norm_txt = (f" Meanwhile the gradient norm went from a median of {format_value(a)} to "
                    f"{format_value(b)}.")
    return [Finding(
        "stagnation", "warning", run.label, "The loss barely improved",
        f"The loss started at {format_value(first)} (lowest of the first 5 steps) and ended at "
        f"{format_value(last)} (median of the last {k}, step {int(steps[-k])} on), "
        f"{100 * (1 - last / first):.0f}% lower; it was never more than 20% below its "
        f"start.{norm_txt} Training is stuck: a learning rate so high "
        f"that the model collapsed to a trivial solution (e.g. predicting the average), so "
        f"low that nothing moves, vanishing gradients, or a bug in the data or loss.",
        steps=[int(steps[0]), int(steps[-1])])]


def _find_log_losses(run: Run) -> List[Finding]:
    """Rows the logger could not write, and the segments of a resumed run."""
    out: List[Finding] = []
    lost = run.log.dropped_rows
    if lost:
        err = next((e.get("last_error") for e in reversed(run.log.ends)
                    if e and e.get("last_error")), None)
        out.append(Finding(
            "dropped_rows", "warning", run.label,
            f"{lost} row{'s were' if lost != 1 else ' was'} lost",
            f"The logger could not write {lost} step record{'s' if lost != 1 else ''}"
            + (f" (last error: {err})" if err else "") + "; those steps are missing from "
            "this report. Training was not affected. Check the disk space or the writer."))
    segs = run.segments
    if len(segs) > 1:
        parts = []
        for k, sg in enumerate(segs[1:], start=2):
            txt = f"segment {k} holds steps {sg['first']}-{sg['last']}"
            if sg["replaced"]:
                txt += (f"; it went back to an earlier checkpoint and replaces the "
                        f"{sg['replaced']} records of the segment before from step "
                        f"{sg['first']} on")
            if sg["shift"]:
                txt += (f"; it started again at step 1 without the optimizer's state, so "
                        f"its steps are shown after the segment before (shifted by "
                        f"{sg['shift']})")
            parts.append(txt)
        unclosed = [str(k) for k, sg in enumerate(segs[:-1], start=1) if not sg["closed"]]
        text = (f"The log holds {len(segs)} segments of one run (a run resumed into the "
                f"same file), shown as one run with continuing steps: " + "; ".join(parts)
                + "." + (f" Segment{'s' if len(unclosed) > 1 else ''} "
                         f"{', '.join(unclosed)} ended without an end record (the run "
                         f"crashed or was killed)." if unclosed else ""))
        out.append(Finding("resumed", "info", run.label,
                           f"Resumed {len(segs) - 1} time{'s' if len(segs) > 2 else ''}",
                           text, steps=[sg["first"] for sg in segs[1:]]))
    return out


def analyze(log: LogData, *, window: int = SPIKE_WINDOW) -> List[Finding]:
    """The findings of one log (a ``"clean"`` finding when there are none)."""
    run = load_run(log)
    return analyze_run(run, window)


def analyze_run(run: Run, window: int) -> List[Finding]:
    """The findings of one run (see :func:`analyze` for a log read from a file).

    Args:
        run: the run's arrays (:func:`~gradstats.report.runs.load_run`).
        window: moving window (steps) of the clip activation rate.

    Returns:
        the findings, with a ``"clean"`` one first when there is nothing to report.
    """
    out: List[Finding] = []
    for p in run.log.problems:
        out.append(Finding("log_problem", "warning", run.label, "Unreadable log line", p))
    if run.n == 0:
        out.append(Finding("info", "warning", run.label, "No step records",
                           "The log holds no step records to analyse."))
        return out + _find_log_losses(run)
    div, how = divergence(run)
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
    out += _find_log_losses(run)
    if run.log.end is None and run.log.header:
        out.append(Finding("info", "info", run.label, "Log not closed",
                           "The log has no end record: the run crashed, was killed, or is "
                           "still running (records buffered on the device at that time are "
                           "missing)."))
    if not any(f.severity in ("problem", "warning") and f.kind != "log_problem" for f in out):
        fin_loss = final_value(run.loss)
        out.insert(0, Finding(
            "clean", "info", run.label, "No instability signals",
            f"No problems found in {run.n} steps (steps {int(run.steps[0])}-"
            f"{int(run.steps[-1])}): no non-finite values, no gradient or loss spikes, "
            f"clipping active in {100 * float(run.clipped[~run.skipped].mean()):.0f}% of steps"
            f", no rising gradient variance, no collapsing norms." +
            (f" Final loss {format_value(fin_loss)}." if np.isfinite(fin_loss) else "")))
    return out



def seed_findings(runs: List[Run], divs: List[Optional[int]]) -> List[Finding]:
    """Across-run findings for runs that are seeds of one configuration.

    Args:
        runs: two or more runs.
        divs: each run's divergence index (:func:`divergence`), ``None`` if none.

    Returns:
        one ``"seed_spread"`` finding: some seeds diverged (problem), the final losses
        (or gradient norms) spread too much (warning), or the seeds agree (info); ``[]``
        for fewer than two runs.
    """
    if len(runs) < 2:
        return []
    use_loss = all(r.has_loss for r in runs)
    what = "final loss" if use_loss else "final gradient norm"
    finals = [final_value(r.loss if use_loss else r.total) for r in runs]
    diverged = [r.label for r, d, f in zip(runs, divs, finals)
                if d is not None or not np.isfinite(f)]
    ok = [(r.label, f) for r, f in zip(runs, finals) if np.isfinite(f)]
    table = "; ".join(f"`{r.label}`: {format_value(f)}" for r, f in zip(runs, finals))
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
                            f"The {what} ranges from {format_value(lo[1])} (`{lo[0]}`) to "
                            f"{format_value(hi[1])} (`{hi[0]}`), a spread of "
                            f"{100 * rel:.0f}% of the median {format_value(med)} ({table}). "
                            f"Results depend strongly on the "
                            f"seed: an unstable learning rate or too few steps; compare more "
                            f"seeds before drawing conclusions.")]
        return [Finding("seed_spread", "info", "all runs", "Seeds agree",
                        f"The {what} of the {len(ok)} runs spans {format_value(vals.min())}-"
                        f"{format_value(vals.max())} ({100 * rel:.0f}% of the median): little "
                        f"variation across seeds ({table}).")]
    return []

