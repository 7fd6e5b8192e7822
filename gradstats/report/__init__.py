"""``gradstats report``: plots and a plain-language diagnosis of stats logs.

* :mod:`~gradstats.report.runs` — a log as numpy arrays (:class:`Run`);
* :mod:`~gradstats.report.signals` — thresholds and robust statistics;
* :mod:`~gradstats.report.diagnosis` — the instability signals as :class:`Finding`;
* :mod:`~gradstats.report.plots` — the PNG plots (matplotlib);
* :mod:`~gradstats.report.build` — :func:`build_report` and the command's entry point.

numpy and matplotlib only: nothing here imports the training-side modules.
"""
from .build import SEVERITY_LABEL, Report, build_report, main
from .diagnosis import Finding, analyze
from .runs import Run, load_run

__all__ = ["SEVERITY_LABEL", "Finding", "Run", "Report", "analyze", "load_run", "build_report",
           "main"]
