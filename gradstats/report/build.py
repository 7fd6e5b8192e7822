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

import argparse
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Sequence, Tuple, Union

import numpy as np

from .diagnosis import Finding, analyze_run, divergence, format_value, seed_findings
from .diagnosis import analyze  # noqa: F401  (public, re-exported)
from ..telemetry.reader import read_log
from .noise import noise_section
from .plots import plot_overlay, plot_run, plot_spread
from .runs import Run, load_run
from . import sweep as sweep_report
from .signals import (CLIP_RATE, SEED_SPREAD, SPIKE_RATIO, SPIKE_WINDOW, SPIKE_Z,
                      VANISH_FACTOR, VAR_RISE, VAR_RISE_NO_DIV, VAR_WINDOW, final_value)
from .signals import SPIKE_MIN_HISTORY  # noqa: F401  (public, re-exported)

__all__ = ["Finding", "Run", "Report", "analyze", "load_run", "build_report",
           "add_arguments", "main"]


@dataclass
class Report:
    """What :func:`build_report` wrote and found.

    Attributes:
        out_dir: the output folder.
        markdown: the path of ``report.md``.
        plots: the PNG files written.
        findings: per run label (plus ``"all runs"``), the findings.
        problems: every problem met reading the logs (one line each, naming file and
            line where it applies).
        errors: the problems that mean an input was invalid or unreadable (a log that
            does not exist or is a folder, a value of the wrong type or out of range, a
            plot that could not be drawn), as opposed to lines cut short by a crash;
            ``gradstats report`` exits with status 2 when there are any.
    """

    out_dir: str
    markdown: str
    plots: List[str]
    findings: Dict[str, List[Finding]]  # per run label, plus "all runs"
    problems: List[str]
    errors: List[str] = field(default_factory=list)

    def all_findings(self) -> List[Finding]:
        return [f for fs in self.findings.values() for f in fs]


def _safe(name: str) -> str:
    s = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return s or "run"


def build_report(paths: Sequence[str], out_dir: str, *, k: float = 3.0,
                 window: int = SPIKE_WINDOW, compare: bool = False,
                 plots: bool = True, title: str = "gradstats report") -> Report:
    """Read the logs, diagnose them, write ``report.md`` and PNG plots into ``out_dir``.

    A log that cannot be read (missing, a folder, unreadable) and every invalid line or
    value is reported in :attr:`Report.problems` / :attr:`Report.errors`; the report
    covers everything else.

    Args:
        paths: stats logs (JSONL or CSV).
        out_dir: output folder (created).
        k: width of the running-statistics band, in standard deviations.
        window: moving window (steps) of the clip activation rate.
        compare: the logs are different configurations, not seeds: overlay them and do
            not diagnose the spread across them.
        plots: write the PNG plots (needs matplotlib).

    Raises:
        OSError: ``out_dir`` cannot be created or written (e.g. it is a file).
    """
    os.makedirs(out_dir, exist_ok=True)
    logs, errors = _read_logs(paths)
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
        findings[r.label] = analyze_run(r, window)
        divs.append(divergence(r)[0] if r.n else None)
    if len(runs) >= 2 and not compare:
        findings["all runs"] = seed_findings(runs, divs)
    problems = list(errors) + [p for lg in logs for p in lg.problems]
    errors = list(errors) + [e for lg in logs for e in lg.errors]
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
            _draw(written, errors, plot_run, r, os.path.join(out_dir, f"{stem}_overview.png"),
                  k, window)
        nonempty = [r for r in runs if r.n]
        if len(nonempty) >= 2:
            if compare:
                _draw(written, errors, plot_overlay, nonempty,
                      os.path.join(out_dir, "compare.png"),
                      "runs compared: loss, total gradient norm, clipping", window)
            else:
                _draw(written, errors, plot_overlay, nonempty,
                      os.path.join(out_dir, "runs_loss.png"),
                      f"{len(nonempty)} runs overlaid", window)
                _draw(written, errors, plot_spread, nonempty,
                      os.path.join(out_dir, "seeds_spread.png"))
    problems += [e for e in errors if e not in problems]
    md = _markdown(title, runs, findings, problems, written, out_dir, k, window, compare)
    noise = noise_section(runs, out_dir, plots=plots)  # empty without noise-scale fields
    md, written = md + noise.markdown, written + noise.plots
    md_path = os.path.join(out_dir, "report.md")
    with open(md_path, "w", encoding="utf-8") as f:
        f.write(md)
    return Report(out_dir=out_dir, markdown=md_path, plots=written, findings=findings,
                  problems=problems, errors=errors)


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())


def _read_logs(paths: Sequence[str]) -> Tuple[List[Any], List[str]]:
    """The logs that could be read, and one message per log that could not."""
    logs, errors = [], []
    for p in paths:
        if not os.path.exists(p):
            errors.append(f"no such log: {p}")
        elif os.path.isdir(p):
            errors.append(f"{p}: is a directory, not a log file")
        else:
            try:
                logs.append(read_log(p))
            except (OSError, ValueError) as e:
                errors.append(f"{p}: cannot be read ({_one_line(e)})")
    return logs, errors


def _draw(written: List[str], errors: List[str], fn: Any, *args: Any) -> None:
    """Draw one plot; a plot that fails is reported and the others are still drawn."""
    path = args[1]
    try:
        written.append(fn(*args))
    except Exception as e:
        errors.append(f"{path}: could not draw this plot ({_one_line(e)})")


SEVERITY_LABEL = {"problem": "PROBLEM", "warning": "WARNING", "info": "OK"}


def _markdown(title: str, runs: List[Run], findings: Dict[str, List[Finding]],
              problems: List[str], plots: List[str], out_dir: str, k: float, window: int,
              compare: bool) -> str:
    L: List[str] = [f"# {title}", ""]
    L.append("| run | log | steps | groups | skipped | clipped | non-finite | final loss |")
    L.append("|---|---|---|---|---|---|---|---|")
    for r in runs:
        steps = f"{int(r.steps[0])}-{int(r.steps[-1])}" if r.n else "none"
        clipped = int((r.clipped & ~r.skipped).sum()) if r.has_clip else "-"
        final = format_value(final_value(r.loss)) if r.has_loss else "-"
        L.append(f"| {r.label} | `{r.log.path}` | {steps} | {', '.join(r.groups)} | "
                 f"{int(r.skipped.sum())} | {clipped} | {int(r.nonfinite.sum())} | {final} |")
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
          f"computes it by the same rule, leaving out skipped steps and spikes); orange dots "
          f"are clipped steps; triangles and vertical lines are skipped steps (purple: "
          f"non-finite, red: spike, brown: other); black crosses or grey shading are "
          f"non-finite steps that were applied (the dashed line marks the first). The bottom "
          f"panel is the share of clipped steps over the last {window} steps.",
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
    """Print the findings and where the report is (stdout), and the problems met
    reading the logs (stderr, one line each; invalid inputs as ``gradstats report:``
    errors)."""
    file = file or sys.stdout
    for label, fs in rep.findings.items():
        for f in fs:
            if f.kind == "log_problem":
                continue
            print(f"[{SEVERITY_LABEL.get(f.severity, f.severity)}] {label}: {f.title}", file=file)
    for p in rep.problems:
        if p in rep.errors:
            print(f"gradstats report: {p}", file=sys.stderr)
        else:
            print(f"log problem: {p}", file=sys.stderr)
    print(f"report: {rep.markdown}", file=file)
    if rep.plots:
        print(f"plots:  {', '.join(rep.plots)}", file=file)


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the options of ``gradstats report`` to a parser (the CLI's sub-command or the
    stand-alone parser of :func:`main`)."""
    p.add_argument("logs", nargs="+", metavar="LOG", help="stats log (.jsonl or .csv)")
    p.add_argument("--out", default="gradstats_out", help="output folder (default: "
                   "gradstats_out)")
    p.add_argument("--k", type=float, default=3.0, help="band width in running standard "
                   "deviations (default 3)")
    p.add_argument("--window", type=int, default=SPIKE_WINDOW, help="moving window of the "
                   "clip activation rate, in steps (default 50)")
    p.add_argument("--compare", action="store_true", help="the logs are different "
                   "configurations, not seeds: overlay them, no seed-spread diagnosis")
    p.add_argument("--no-plots", action="store_true", help="write report.md only")
    return p


def main(args: Union[argparse.Namespace, Sequence[str], None] = None) -> int:
    """``gradstats report`` entry point.

    Args:
        args: the parsed options (from the ``gradstats`` CLI parser), or the command-line
            arguments after ``report`` as strings (default: ``sys.argv[1:]``).

    Returns:
        0 when every log was read; 2 when an input was invalid or unreadable (a log that
        does not exist or is a folder, a value of the wrong type or out of range, an
        ``--out`` that is not a folder): a one-line message names each on stderr, and
        the report still covers whatever could be read. Never raises.
    """
    if not isinstance(args, argparse.Namespace):
        parser = add_arguments(argparse.ArgumentParser(
            prog="gradstats report", description="plots and a diagnosis from stats logs"))
        try:
            args = parser.parse_args(list(sys.argv[1:] if args is None else args))
        except SystemExit as e:  # argparse printed the usage and the error
            return 0 if e.code in (0, None) else 2
    try:
        return _run(args)
    except Exception as e:  # a bug, not a bad input: still no traceback for the user
        print(f"gradstats report: internal error ({_one_line(e)}); please report it",
              file=sys.stderr)
        return 2


def _fail(msg: str) -> int:
    print(f"gradstats report: {msg}", file=sys.stderr)
    return 2


def _run(args: argparse.Namespace) -> int:
    k, window = getattr(args, "k", 3.0), getattr(args, "window", SPIKE_WINDOW)
    if not (isinstance(k, (int, float)) and k > 0 and k < float("inf")):
        return _fail(f"--k must be a positive number, got {k!r}")
    if not (isinstance(window, int) and window >= 1):
        return _fail(f"--window must be an integer >= 1, got {window!r}")
    out = args.out
    if os.path.exists(out) and not os.path.isdir(out):
        return _fail(f"--out {out} is a file, not a folder; give a folder for report.md "
                     f"and the plots")
    logs = list(args.logs)
    sweeps = [p for p in logs if sweep_report.is_sweep_dir(p)]
    if sweeps:  # a sweep directory (gradstats sweep): the LR-sensitivity report
        if len(logs) > 1:
            return _fail("give one sweep directory, or stats logs")
        try:
            srep = sweep_report.build_sweep_report(sweeps[0], out)
        except (OSError, ValueError) as e:
            return _fail(f"cannot report on the sweep {sweeps[0]} ({_one_line(e)})")
        print(f"report: {srep.markdown}\nplots:  {', '.join(srep.plots)}")
        return 0
    usable = [p for p in logs if os.path.isfile(p)]
    if not usable:  # nothing to report on: say why, write nothing
        _, errors = _read_logs(logs)
        for e in errors:
            _fail(e)
        return 2
    try:
        # numpy's warnings about NaN/Inf in a log are noise here: the report says what
        # is wrong with the values
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            rep = build_report(logs, out, k=float(k), window=window,
                               compare=bool(getattr(args, "compare", False)),
                               plots=not getattr(args, "no_plots", False))
    except OSError as e:
        return _fail(f"cannot write the report into {out} ({_one_line(e)})")
    print_summary(rep)
    return 2 if rep.errors else 0
