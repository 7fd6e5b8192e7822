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

The work is split by job: :mod:`gradstats.report.runs` turns a log into arrays,
:mod:`gradstats.report.diagnosis` finds the signals (thresholds in :mod:`gradstats.report.signals`),
:mod:`gradstats.report.plots` draws the PNGs; this module reads the logs, writes ``report.md`` and
is the command's entry point. The public names of those modules are re-exported here.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence

from .diagnosis import Finding, _analyze_run, _divergence, _fmt, _seed_findings
from .diagnosis import analyze  # noqa: F401  (public, re-exported)
from ..telemetry.reader import read_log
from .plots import _plot_overlay, _plot_run, _plot_spread
from .runs import Run, load_run
from . import sweep as sweep_report
from .signals import (CLIP_RATE, SEED_SPREAD, SPIKE_RATIO, SPIKE_WINDOW, SPIKE_Z,
                      VANISH_FACTOR, VAR_RISE, VAR_RISE_NO_DIV, VAR_WINDOW, _final)
from .signals import SPIKE_MIN_HISTORY  # noqa: F401  (public, re-exported)

__all__ = ["Finding", "Run", "Report", "analyze", "load_run", "build_report", "main"]


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


SEVERITY_LABEL = {"problem": "PROBLEM", "warning": "WARNING", "info": "OK"}


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
            L.append(f"- **{SEVERITY_LABEL.get(f.severity, f.severity.upper())} — {f.title}.** "
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
            print(f"[{SEVERITY_LABEL.get(f.severity, f.severity)}] {label}: {f.title}", file=file)
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
    sweeps = [p for p in args.logs if sweep_report.is_sweep_dir(p)]
    if sweeps:  # a sweep directory (gradstats sweep): the LR-sensitivity report
        if len(args.logs) > 1:
            print("gradstats report: give one sweep directory, or stats logs",
                  file=sys.stderr)
            return 2
        srep = sweep_report.build_sweep_report(sweeps[0], args.out)
        print(f"report: {srep.markdown}\nplots:  {', '.join(srep.plots)}")
        return 0
    rep = build_report(args.logs, args.out, k=args.k, window=args.window,
                       compare=args.compare)
    print_summary(rep)
    return 0
