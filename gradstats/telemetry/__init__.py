"""The stats log: what every optimizer step measured and did, recorded without host syncs.

* :mod:`~gradstats.telemetry.logger` — :class:`StatsLogger` (device-side rows, async flush;
  write errors never stop training, a resumed run appends a segment, rank 0 writes under
  ``torch.distributed``);
* :mod:`~gradstats.telemetry.format` — the records and their fields (the format's docs);
* :mod:`~gradstats.telemetry.writers` — JSON Lines, CSV and TensorBoard writers;
* :mod:`~gradstats.telemetry.reader` — :func:`read_log`, which names bad lines and checks
  every field.
"""
from .format import FORMAT_NAME, FORMAT_VERSION
from .logger import StatsLogger, attach
from .reader import LogData, read_log
from .writers import CSVWriter, JSONLWriter, TensorBoardWriter, open_writer

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "StatsLogger", "attach", "read_log", "LogData",
           "JSONLWriter", "CSVWriter", "TensorBoardWriter", "open_writer"]
