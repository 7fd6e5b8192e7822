"""Stats log: what every optimizer step measured and did, recorded without host syncs.

Usage::

    opt = gradstats.StableOptimizer(torch.optim.AdamW(model.parameters()), max_norm=1.0,
                                    param_names=model.named_parameters(),
                                    log="run.jsonl")          # or a writer, or a StatsLogger
    for batch in data:
        loss = model(batch).loss
        loss.backward(); opt.step(loss=loss); opt.zero_grad()
    opt.log.close()                                           # writes the last records

    records = gradstats.telemetry.read_log("run.jsonl").records

A plain training loop can log too: ``StatsLogger(path, groups=opt.param_groups,
param_names=model.named_parameters()).log_stats(gradstats.grad_stats(..., per_tensor=True),
loss=loss, clip_coef=coef)``.

How recording stays off the critical path
=========================================
Every value of a step is written, on the device, into one row of a preallocated
``[flush_every, F]`` float64 device buffer (one ``torch.cat(..., out=row)``; no host sync:
float64 holds step numbers and element counts exactly up to 2**53). When the buffer is
full (or ``flush_seconds`` have passed, checked with a host clock), the filled rows go to
the host with **one** asynchronous copy into pinned memory (``non_blocking=True``)
followed by a CUDA event. Each later :meth:`StatsLogger.record` polls that event
(``event.query()``, never a wait) and writes the batch out as soon as the copy is done;
at the next flush a batch still in flight is waited for (at most one wait per flush
interval) and written *before* the next copy starts. So a completed flush interval is in
the file, in order, before the next one begins, and the writer's ``flush()`` after each
batch hands it to the operating system: a killed run loses only rows that were not yet
due. On CPU tensors the copy is synchronous and the batch is written at once.
Host-side values (learning rates that are Python floats, names) never touch the device.
:attr:`StatsLogger.counters` counts records, device->host copies, write-outs and event
waits (the tests check there is no copy per step).

Failures never stop training
============================
Nothing the logger does raises out of the optimizer's step hook: an error while recording,
encoding or writing (a full disk, a writer that raises, a value JSON cannot hold) is
reported once as a ``RuntimeWarning`` naming the log and the error; the rows that could
not be written are counted (``counters["dropped_rows"]``, :meth:`StatsLogger.summary`) and
stored in the end record, where ``gradstats report`` shows them. Logs are also written
out when an exception leaves the training loop (the logger is a context manager, and a
chained ``sys.excepthook`` flushes open loggers) and at interpreter exit.

Resuming and distributed runs
=============================
Opening an existing log appends a new segment (a header with ``"resume": true``); the
step numbers are the optimizer's, so they continue when its state dict was restored.
``overwrite=True`` truncates instead. Under an initialised ``torch.distributed`` process
group only rank 0 writes (the statistics are global already); the other ranks' loggers
record nothing and open no file. A path containing ``{rank}`` gives one log per rank.

Log format
==========
The records (header, one per step, end) and the file formats (JSON Lines, CSV,
TensorBoard) are documented in :mod:`gradstats.telemetry.format`. The writers are in
:mod:`gradstats.telemetry.writers` and the reader :func:`read_log` in
:mod:`gradstats.telemetry.reader`; both are re-exported here, with the format constants.
"""
from __future__ import annotations

import atexit
import math
import os
import sys
import time
import warnings
import weakref
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .format import (BOOL_FIELDS, INT_FIELDS, PER_GROUP_FIELDS, SCALAR_FIELDS, end_record,
                     header_record, step_record)
# the format, the writers and the reader are public here too
from .format import FORMAT_NAME, FORMAT_VERSION  # noqa: F401
from .reader import LogData, read_log  # noqa: F401
from .writers import CSVWriter, JSONLWriter, TensorBoardWriter, open_writer  # noqa: F401

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "StatsLogger", "attach", "read_log", "LogData",
           "JSONLWriter", "CSVWriter", "TensorBoardWriter", "open_writer"]


#: names a StepRecord ``info`` entry may not take in a step record (the format's own)
_RESERVED = frozenset(SCALAR_FIELDS) | frozenset(PER_GROUP_FIELDS) | {
    "type", "skip_reason", "nonfinite_tensors", "nonfinite_tensor_count"}
_F64 = torch.float64


# ================================================================= process-wide safety
_OPEN_LOGGERS: "weakref.WeakSet[StatsLogger]" = weakref.WeakSet()
_EXCEPTHOOK_INSTALLED = False


@atexit.register
def _close_open_loggers() -> None:  # pragma: no cover - interpreter shutdown
    for lg in list(_OPEN_LOGGERS):
        try:
            lg.close()
        except Exception:
            pass


def _install_excepthook() -> None:
    """Chain a ``sys.excepthook`` (once per process) that writes out every open logger
    before the previous hook prints the traceback."""
    global _EXCEPTHOOK_INSTALLED
    if _EXCEPTHOOK_INSTALLED:
        return
    _EXCEPTHOOK_INSTALLED = True
    previous = sys.excepthook

    def gradstats_excepthook(tp: Any, value: Any, tb: Any) -> None:
        for lg in list(_OPEN_LOGGERS):
            try:
                lg.flush()
            except Exception:
                pass
        previous(tp, value, tb)

    sys.excepthook = gradstats_excepthook


def _dist_rank() -> Tuple[int, Optional[int]]:
    """(rank, world size) under an initialised process group, else (0, None)."""
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return int(dist.get_rank()), int(dist.get_world_size())
    except Exception:  # pragma: no cover - a broken distributed build
        pass
    return 0, None


def _for_rank(spec: Any, rank: int) -> Tuple[Any, bool]:
    """``spec`` with ``{rank}`` in paths replaced by the rank, and whether it had one."""
    if isinstance(spec, (list, tuple)):
        parts = [_for_rank(s, rank) for s in spec]
        return [p for p, _ in parts], any(h for _, h in parts)
    if isinstance(spec, (str, os.PathLike)) and not hasattr(spec, "write"):
        s = os.fspath(spec)
        if isinstance(s, str) and "{rank}" in s:
            return s.replace("{rank}", str(rank)), True
    return spec, False


def _names_of(param_names: Any) -> Dict[int, str]:
    if param_names is None:
        return {}
    if isinstance(param_names, dict) and all(isinstance(k, int) for k in param_names):
        return dict(param_names)  # already {id(p): name}
    items = param_names.items() if isinstance(param_names, dict) else param_names
    out: Dict[int, str] = {}
    for name, p in items:
        out[id(p)] = str(name)
    return out


class _Batch:
    """Rows on their way to the host: the host buffer, the event that says they are
    there (``None``: already there), and what decoding them needs."""

    __slots__ = ("host", "n", "event", "metas", "layout", "names")

    def __init__(self, host: Tensor, n: int, event: Any, metas: List[Dict[str, Any]],
                 layout: Dict[str, Tuple[int, int]], names: List[str]) -> None:
        self.host, self.n, self.event = host, n, event
        self.metas, self.layout, self.names = metas, layout, names


# ================================================================================ logger
class StatsLogger:
    """Records per-step gradient statistics on the device and writes them in batches.

    Args:
        log: where to write: a path (``.jsonl`` default, ``.csv``, ``tensorboard:DIR``), a
            writer object with ``write(record)`` (and optionally ``flush``/``close``), or
            a list of these. ``{rank}`` in a path is replaced by the process rank.
        flush_every: rows buffered on the device between two device->host copies.
        groups: the parameter groups (``optimizer.param_groups``) or their number; taken
            from the optimizer when attached to a :class:`~gradstats.StableOptimizer`.
        group_names: a name per group (default: each group's ``"name"`` key, else
            ``group0``, ``group1``, ...).
        param_names: ``model.named_parameters()`` or ``{name: param}``: names used for
            non-finite tensors (default: ``group<g>.param<i>``).
        max_names: how many non-finite tensor names to keep per step.
        norm_type: order of the norms (taken from the optimizer when attached).
        meta: a dict stored in the header, e.g. ``{"run": "lr=1e-3", "seed": 0}``.
        flush_seconds: also copy the rows to the host when this many seconds (host clock)
            have passed since the last copy, even if fewer than ``flush_every`` were
            recorded; ``None`` or ``0`` turns this off.
        overwrite: truncate an existing log file; by default a new segment is appended
            (its header says ``"resume": true``).
        all_ranks: under an initialised ``torch.distributed`` process group, record on
            every rank. By default only rank 0 records (unless the path contains
            ``{rank}``); the other ranks' loggers are disabled (:attr:`enabled` is
            ``False``): they record nothing and open no file. The rank is read when the
            logger is created (for ``StableOptimizer(log=path)``: when the optimizer is).

    Raises:
        ValueError: ``flush_every``, ``max_names`` or ``flush_seconds`` out of range.
        TypeError: ``log`` is none of the accepted kinds.
        OSError: the log file cannot be opened.

    The logger is a context manager; :meth:`close` writes everything still buffered (also
    when the ``with`` block is left by an exception).
    """

    def __init__(self, log: Any, *, flush_every: int = 64, groups: Any = None,
                 group_names: Optional[Sequence[str]] = None, param_names: Any = None,
                 max_names: int = 8, norm_type: float = 2.0,
                 meta: Optional[Dict[str, Any]] = None,
                 flush_seconds: Optional[float] = 30.0, overwrite: bool = False,
                 all_ranks: bool = False) -> None:
        if not isinstance(flush_every, int) or isinstance(flush_every, bool) or flush_every < 1:
            raise ValueError(f"flush_every must be an int >= 1, got {flush_every!r}")
        if not isinstance(max_names, int) or max_names < 1:
            raise ValueError(f"max_names must be an int >= 1, got {max_names!r}")
        if flush_seconds is not None and (isinstance(flush_seconds, bool) or
                                          not isinstance(flush_seconds, (int, float)) or
                                          not flush_seconds >= 0):
            raise ValueError(f"flush_seconds must be None or a number >= 0, got "
                             f"{flush_seconds!r}")
        rank, world = _dist_rank()
        spec, per_rank = _for_rank(log, rank)
        #: rank of this process (0 without a process group) and the world size (``None``
        #: without a process group)
        self.rank, self.world_size = rank, world
        #: ``False`` on the ranks that do not write (see ``all_ranks``)
        self.enabled = bool(all_ranks or per_rank or world is None or rank == 0)
        if not self.enabled:
            if not (isinstance(spec, (str, os.PathLike, list, tuple)) or
                    hasattr(spec, "write")):
                open_writer(spec)  # raises the TypeError of a bad spec on every rank
        self.writer = open_writer(spec, overwrite=overwrite) if self.enabled else None
        self.flush_every = flush_every
        self.flush_seconds = float(flush_seconds) if flush_seconds else None
        self.max_names = max_names
        self.norm_type = float(norm_type)
        self.meta = dict(meta or {})
        self.group_names: Optional[List[str]] = list(group_names) if group_names else None
        self._name_of = _names_of(param_names)
        self._groups_src = groups
        self._opt: Any = None
        self._hook_handle: Any = None
        #: ``records`` (steps recorded), ``d2h_copies`` (device->host copies),
        #: ``writes`` (batches written out), ``syncs`` (event waits), ``dropped_rows``
        #: (step records that could not be recorded or written).
        self.counters = {"records": 0, "d2h_copies": 0, "writes": 0, "syncs": 0,
                         "dropped_rows": 0}
        self.last_error: Optional[str] = None
        self._warned = False
        self._layout: Optional[Dict[str, Tuple[int, int]]] = None
        #: extra 0-dim fields of the StepRecord's ``info`` (policy and tracker values)
        self._info_names: Tuple[str, ...] = ()
        self._G = -1
        self._F = 0
        self._dev_buf: Optional[Tensor] = None
        self._host_buf: Optional[Tensor] = None
        self._slot = 0
        self._metas: List[Dict[str, Any]] = []
        self._pending: Optional[_Batch] = None
        self._header: Optional[Dict[str, Any]] = None
        self._header_due: Optional[Dict[str, Any]] = None
        self._header_written = False
        self._resume = bool(getattr(self.writer, "resumed", False))
        self._param_list: List[Tensor] = []
        self._param_names: List[str] = []
        self._global_index: Dict[int, int] = {}
        self._gmap_key: Any = None
        self._gmap: Optional[Tensor] = None
        self._nan_cache: Dict[Tuple[torch.device, int], Tensor] = {}
        self._steps_written = 0
        self._host_step = 0
        self._last_flush = time.monotonic()
        self.closed = False
        if self.enabled:
            _OPEN_LOGGERS.add(self)
            _install_excepthook()

    @property
    def path(self) -> Optional[str]:
        """The log file (``None`` for writer objects without one, and when disabled)."""
        return getattr(self.writer, "path", None) if self.writer is not None else None

    def summary(self) -> Dict[str, Any]:
        """What the logger did so far, read on the host (no device sync).

        Returns:
            ``{"path", "enabled", "records", "written", "pending", "dropped_rows",
            "last_error"}``: steps recorded, step records written, recorded but not yet
            written, records lost to errors, and the last error as text (or ``None``).
        """
        c = self.counters
        return {"path": self.path, "enabled": self.enabled, "records": c["records"],
                "written": self._steps_written,
                "pending": c["records"] - self._steps_written - c["dropped_rows"],
                "dropped_rows": c["dropped_rows"], "last_error": self.last_error}

    # --------------------------------------------------------------------- failures
    def _fail(self, err: BaseException, rows: int = 0) -> None:
        """Count ``rows`` lost to ``err`` and warn (once per logger)."""
        self.counters["dropped_rows"] += rows
        self.last_error = f"{type(err).__name__}: {err}"
        if not self._warned:
            self._warned = True
            where = self.path or type(self.writer).__name__
            try:
                warnings.warn(f"gradstats: could not write the stats log {where} "
                              f"({self.last_error}); training goes on, and the step records "
                              f"that cannot be written are counted in "
                              f"StatsLogger.summary()['dropped_rows'] and in the log's end "
                              f"record", RuntimeWarning, stacklevel=3)
            except Exception:  # warnings turned into errors must not stop training
                pass

    # --------------------------------------------------------------------- setup
    def bind(self, opt: Any) -> "StatsLogger":
        """Attach to a :class:`~gradstats.StableOptimizer`: per-tensor norms on, a hook
        that records every step, names from its ``param_names``. A disabled logger (a
        rank that does not write) registers no hook."""
        self._opt = opt
        self._groups_src = opt.param_groups
        self.norm_type = float(getattr(opt, "norm_type", self.norm_type))
        names = getattr(opt, "param_names", None)
        if names and not self._name_of:
            self._name_of = dict(names)
        if self._hook_handle is not None:
            self._hook_handle.remove()
            self._hook_handle = None
        if self.enabled and not self.closed:
            self._hook_handle = opt.register_step_hook(self._on_step, needs_per_tensor=True)
        return self

    def _on_step(self, _opt: Any, rec: Any) -> None:
        try:
            self.record(rec)
        except BaseException as e:  # record() does not raise; this is the last guard
            if not isinstance(e, Exception):
                raise
            self._fail(e, 0)

    def _group_list(self) -> List[Dict[str, Any]]:
        src = self._groups_src
        if src is None or isinstance(src, int):
            return []
        src = list(src)
        if src and isinstance(src[0], dict):
            return src
        return [{"params": src}]  # a plain list of parameters: one group

    def _ensure_layout(self, G: int, device: torch.device,
                       info: Optional[Tuple[str, ...]] = None) -> None:
        if info is not None and info != self._info_names and self._layout is not None \
                and G == self._G and self._dev_buf is not None \
                and self._dev_buf.device == device:
            # new policy extras (0-dim info fields): same header, wider rows
            self._write_all()
            self._info_names = info
            self._build_layout(G, device)
            return
        if self._layout is not None and G == self._G and self._dev_buf is not None \
                and self._dev_buf.device == device:
            return
        if self._layout is not None:  # the groups or the device changed: new header
            self._write_all()
        if info is not None:
            self._info_names = info
        self._build_layout(G, device)
        self._make_header(G, device)

    def _build_layout(self, G: int, device: torch.device) -> None:
        self._G = G
        layout: Dict[str, Tuple[int, int]] = {}
        off = 0
        for name in SCALAR_FIELDS:
            layout[name] = (off, 1)
            off += 1
        layout["nonfinite_tensors"] = (off, self.max_names)
        off += self.max_names
        for name in PER_GROUP_FIELDS:
            layout[name] = (off, G)
            off += G
        for name in self._info_names:  # policy/tracker extras: one value each
            layout[name] = (off, 1)
            off += 1
        self._layout, self._F = layout, off
        self._dev_buf = torch.empty((self.flush_every, off), dtype=_F64, device=device)
        self._host_buf = (torch.empty((self.flush_every, off), dtype=_F64, pin_memory=True)
                          if device.type == "cuda" else None)
        self._slot = 0
        self._metas = []

    def _make_header(self, G: int, device: torch.device) -> None:
        """The header of the rows to come; written just before the first of them (then
        a resumed segment's header can say which step it continues from)."""
        groups = self._group_list()
        names = list(self.group_names or [])
        for g in range(len(names), G):
            gn = groups[g].get("name") if g < len(groups) else None
            names.append(str(gn) if gn is not None else f"group{g}")
        params: List[str] = []
        param_group: List[int] = []
        self._param_list = []
        self._global_index = {}
        for g, grp in enumerate(groups):
            for i, p in enumerate(grp["params"]):
                self._global_index[id(p)] = len(params)
                self._param_list.append(p)
                params.append(self._name_of.get(id(p), f"group{g}.param{i}"))
                param_group.append(g)
        self._param_names = params
        extra: Dict[str, Any] = {}
        if self._resume and self._header is None:
            extra["resume"] = True
        if self.world_size is not None:
            extra["rank"], extra["world_size"] = self.rank, self.world_size
        opt = self._opt
        header = header_record(
            norm_type=self.norm_type, groups=names[:G], params=params,
            param_group=param_group, flush_every=self.flush_every, device=str(device),
            optimizer=(type(opt.optimizer).__name__ if opt is not None
                       and hasattr(opt, "optimizer") else None),
            policy=(repr(getattr(opt, "policy", None)) if opt is not None else None),
            spike=(repr(getattr(opt, "spike", None)) if opt is not None else None),
            meta=self.meta, extra=extra)
        self._header = header
        self._header_due = header

    def _nan(self, device: torch.device, n: int) -> Tensor:
        key = (device, n)
        t = self._nan_cache.get(key)
        if t is None:
            t = torch.full((n,), math.nan, dtype=_F64, device=device)
            self._nan_cache[key] = t
        return t

    def _bad_tensor_slots(self, ptn: Tensor, params: List[List[Tensor]]) -> Tuple[Tensor, Tensor]:
        """First ``max_names`` global indices (parameter order) of tensors whose norm is
        NaN/Inf, padded with -1, and their count; on the device."""
        dev = ptn.device
        K = self.max_names
        key = tuple(id(p) for grp in params for p in grp)
        if key != self._gmap_key or self._gmap is None or self._gmap.device != dev:
            T_all = len(self._param_list)
            idx = [self._global_index.get(k, T_all) for k in key]
            self._gmap = torch.tensor(idx, dtype=torch.int64, device=dev)
            self._gmap_key = key
            self._sentinel = max(T_all, len(idx)) + 1
        bad = ~torch.isfinite(ptn)
        keyed = torch.where(bad, self._gmap, self._sentinel)
        T = keyed.numel()
        if T >= K:
            first = torch.topk(keyed, K, largest=False, sorted=True).values
        else:
            first = torch.sort(keyed).values
            first = torch.cat([first, torch.full((K - T,), self._sentinel, dtype=torch.int64,
                                                 device=dev)])
        first = torch.where(first >= self._sentinel, -1, first)
        return first, bad.sum()

    # ------------------------------------------------------------------- recording
    def record(self, rec: Any) -> None:
        """Record a :class:`gradstats.optim.StepRecord` (called by the optimizer hook).

        Never raises: a failure is counted in ``counters["dropped_rows"]`` and warned
        about once. Does nothing on a closed or disabled logger.
        """
        if not self.enabled or self.closed:
            return
        try:
            st = rec.stats
            extras = {k: v for k, v in rec.info.items()
                      if isinstance(v, Tensor) and v.numel() == 1 and k not in _RESERVED}
            names = tuple(sorted(set(self._info_names) | set(extras)))
            self._ensure_layout(int(st.norm.numel()), st.norm.device, names)
            dev: Dict[str, Any] = dict(extras)
            dev.update({
                "step": rec.step, "total_norm": st.total_norm, "skipped": rec.skipped,
                "skipped_nonfinite": rec.skipped_nonfinite,
                "skipped_spike": rec.skipped_spike, "nonfinite": rec.nonfinite,
                "norm": st.norm, "max_abs": st.max_abs, "nonfinite_count": st.nonfinite,
                "clip_coef": rec.clip_coef, "clipped": rec.clipped,
                "running_mean": rec.running_mean, "running_std": rec.running_std,
                "zscore": rec.zscore,
            })
            if rec.loss is not None:
                dev["loss"] = rec.loss
            if getattr(rec, "loss_scale", None) is not None:
                dev["loss_scale"] = rec.loss_scale
            if st.per_tensor_norm is not None and rec.params:
                first, count = self._bad_tensor_slots(st.per_tensor_norm, rec.params)
                dev["nonfinite_tensors"] = first
                dev["nonfinite_tensor_count"] = count
        except Exception as e:
            self.counters["records"] += 1
            self._fail(e, 1)
            return
        self._push(dev, {}, st.norm.device)

    def log_stats(self, stats: Any, *, step: Optional[int] = None, loss: Any = None,
                  clip_coef: Any = None, clipped: Any = None, skipped: Any = None,
                  lr: Any = None, params: Optional[Sequence[Tensor]] = None,
                  **extra: Any) -> None:
        """Record one step of a plain training loop (no host sync).

        Args:
            stats: the step's :class:`gradstats.GradStats` (``per_tensor=True`` to get
                non-finite tensor names).
            step: the step number (default: one more than the previous).
            loss: 0-dim tensor or float.
            clip_coef: clipping coefficient, 0-dim or ``[G]`` tensor (or float).
            clipped: bool tensor (0-dim or ``[G]``): the gradients were clipped. Default:
                ``clip_coef < 1``.
            skipped: bool tensor or bool: the step was skipped.
            lr: learning rate(s); default: from ``groups`` given to the constructor.
            params: the parameters that had a gradient, in the order of
                ``stats.per_tensor_norm`` (default: every parameter of ``groups``).
            extra: other per-group or scalar fields of the format (``running_mean``, ...).

        Raises:
            RuntimeError: the logger is closed.
            ValueError: an unknown field in ``extra``.

        Any other failure (a value that cannot be recorded, a write error) is counted in
        ``counters["dropped_rows"]`` and warned about once, never raised.
        """
        if self.closed:
            raise RuntimeError("this StatsLogger is closed")
        for k in extra:
            if k not in SCALAR_FIELDS and k not in PER_GROUP_FIELDS:
                raise ValueError(f"unknown log field {k!r}; fields: "
                                 f"{', '.join(SCALAR_FIELDS + PER_GROUP_FIELDS)}")
        if not self.enabled:
            return
        try:
            dev, host, d = self._plain_row(stats, step, loss, clip_coef, clipped, skipped,
                                           lr, params, extra)
        except Exception as e:
            self.counters["records"] += 1
            self._fail(e, 1)
            return
        self._push(dev, host, d)

    def _plain_row(self, stats: Any, step: Optional[int], loss: Any, clip_coef: Any,
                   clipped: Any, skipped: Any, lr: Any, params: Optional[Sequence[Tensor]],
                   extra: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any],
                                                   torch.device]:
        G = stats.norm.numel()
        d = stats.norm.device
        host: Dict[str, Any] = {}
        self._host_step = self._host_step + 1 if step is None else int(step)
        host["step"] = self._host_step
        dev: Dict[str, Any] = {"total_norm": stats.total_norm, "norm": stats.norm,
                               "max_abs": stats.max_abs, "nonfinite_count": stats.nonfinite}
        nf = ~torch.isfinite(stats.total_norm)
        if stats.nonfinite is not None:
            nf = nf | (stats.nonfinite.sum() > 0)

        def as_dev(v: Any, n: int) -> Tensor:
            if isinstance(v, Tensor):
                return v.detach().to(d).reshape(-1).expand(n) if v.numel() == 1 else \
                    v.detach().to(d).reshape(-1)
            return torch.full((n,), float(v), dtype=_F64, device=d)
        if loss is not None:
            if isinstance(loss, Tensor):
                lt = loss.detach().reshape(())
                dev["loss"] = lt
                nf = nf | ~torch.isfinite(lt.to(d))
            else:
                host["loss"] = float(loss)
        dev["nonfinite"] = nf
        if clip_coef is not None:
            c = as_dev(clip_coef, G)
            dev["clip_coef"] = c
            dev["clipped"] = (c < 1) if clipped is None else as_dev(clipped, G)
        elif clipped is not None:
            dev["clipped"] = as_dev(clipped, G)
        if skipped is not None:
            if isinstance(skipped, Tensor):
                dev["skipped"] = skipped
            else:
                host["skipped"] = bool(skipped)
        if lr is not None:
            host["lr"] = ([float(x) for x in lr] if isinstance(lr, (list, tuple))
                          else [float(lr)] * G)
        for k, v in extra.items():
            if isinstance(v, Tensor):
                dev[k] = v
            else:
                host[k] = v
        if stats.per_tensor_norm is not None:
            if params is None:
                groups = self._group_list()
                params_g = [[p for p in g["params"]] for g in groups]
                if sum(len(p) for p in params_g) != stats.per_tensor_norm.numel():
                    params_g = [[p for p in g["params"] if p.grad is not None] for g in groups]
            else:
                params_g = [list(params)]
            self._ensure_layout(G, d)
            first, count = self._bad_tensor_slots(stats.per_tensor_norm, params_g)
            dev["nonfinite_tensors"] = first
            dev["nonfinite_tensor_count"] = count
        return dev, host, d

    def _push(self, dev: Dict[str, Any], host: Dict[str, Any], device: torch.device) -> None:
        """Write one row on the device; then the host-side work that is due (never
        raises: failures are counted as dropped rows)."""
        self.counters["records"] += 1
        try:
            self._store_row(dev, host, device)
        except Exception as e:
            self._fail(e, 1)
            return
        try:
            if self._pending is not None:
                self._write_pending(wait=False)
            if self._slot == self.flush_every or (
                    self.flush_seconds is not None and
                    time.monotonic() - self._last_flush >= self.flush_seconds):
                self._flush_device()
        except Exception as e:  # pragma: no cover - the steps above count their own
            self._fail(e, 0)

    def _store_row(self, dev: Dict[str, Any], host: Dict[str, Any],
                   device: torch.device) -> None:
        G = int(dev["norm"].numel())
        self._ensure_layout(G, device)
        if "lr" not in host and "lr" not in dev:
            lrs: List[Any] = []
            for grp in self._group_list()[:G]:
                lr = grp.get("lr")
                if isinstance(lr, Tensor):
                    # a device LR (capturable optimizers): keep a copy, read it at write-out
                    lr = float(lr) if lr.device.type == "cpu" else lr.detach().clone()
                lrs.append(lr)
            host["lr"] = lrs
        if self._layout is None or self._dev_buf is None:
            raise RuntimeError("the logger's device buffer was not set up")
        pieces: List[Tensor] = []
        absent: List[str] = []
        for name, (off, width) in self._layout.items():
            v = dev.get(name)
            if v is None:
                pieces.append(self._nan(device, width))
                if name not in host:
                    absent.append(name)
                continue
            v = v.detach()
            if v.device != device:
                v = v.to(device)
            v = v.reshape(-1)
            if v.numel() != width:
                v = v.expand(width) if v.numel() == 1 else v[:width]
            pieces.append(v)
        torch.cat(pieces, out=self._dev_buf[self._slot])
        self._metas.append({"host": host, "absent": absent})
        self._slot += 1

    # ---------------------------------------------------------------------- flushing
    def _flush_device(self) -> None:
        """Start the device->host copy of the filled rows (after writing out the batch
        before, waiting for it if its copy is still in flight)."""
        self._last_flush = time.monotonic()
        if self._slot == 0 or self._dev_buf is None:
            return
        if self._pending is not None:
            self._write_pending(wait=True)
        n, metas = self._slot, self._metas
        self._slot, self._metas = 0, []
        layout = dict(self._layout or {})
        try:
            rows, event = self._start_copy(n)
            self.counters["d2h_copies"] += 1
        except Exception as e:
            self._fail(e, n)
            return
        batch = _Batch(rows, n, event, metas, layout, self._param_names)
        if event is None:  # already on the host: write it at once
            self._emit(batch)
        else:
            self._pending = batch

    def _start_copy(self, n: int) -> Tuple[Tensor, Any]:
        """Start copying the first ``n`` device rows to the host.

        Returns:
            ``(rows, event)``: the host rows and the CUDA event recorded after the
            asynchronous copy, or ``event=None`` when the rows are on the host already
            (CPU tensors; other devices copy synchronously).
        """
        buf = self._dev_buf
        assert buf is not None
        if buf.device.type == "cuda" and self._host_buf is not None:
            hb = self._host_buf
            hb[:n].copy_(buf[:n], non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(buf.device))
            return hb, event
        return (buf[:n] if buf.device.type == "cpu" else buf[:n].cpu()), None

    def _write_pending(self, wait: bool) -> None:
        """Write out the batch in flight if its copy is done (or, with ``wait``, after
        waiting for it)."""
        b = self._pending
        if b is None:
            return
        try:
            if b.event is not None and not b.event.query():
                if not wait:
                    return
                b.event.synchronize()
                self.counters["syncs"] += 1
        except Exception as e:
            self._pending = None
            self._fail(e, b.n)
            return
        self._pending = None
        self._emit(b)

    def _emit(self, b: _Batch) -> None:
        """Decode a batch that is on the host and write it: header first if one is due,
        then the records, then the writer's ``flush()``. Failures drop rows, never
        raise."""
        self.counters["writes"] += 1
        try:
            rows = b.host[:b.n].tolist()
        except Exception as e:
            self._fail(e, b.n)
            return
        recs: List[Dict[str, Any]] = []
        for row, meta in zip(rows, b.metas):
            try:
                recs.append(self._decode(row, meta, b.layout, b.names))
            except Exception as e:
                self._fail(e, 1)
        try:
            self._write_header_due(recs[0]["step"] if recs else None)
        except Exception as e:
            self._fail(e, len(recs))
            return
        ok = 0
        for r in recs:
            try:
                self.writer.write(r)
                ok += 1
            except Exception as e:
                self._fail(e, 1)
        try:
            f = getattr(self.writer, "flush", None)
            if f is not None:
                f()
        except Exception as e:  # what the writer still buffers is lost, as far as we know
            self._fail(e, ok)
            ok = 0
        self._steps_written += ok

    def _write_header_due(self, first_step: Any) -> None:
        h = self._header_due
        if h is None:
            return
        h = dict(h)
        if h.get("resume") and isinstance(first_step, int):
            h["resume_step"] = max(0, first_step - 1)
        self.writer.write(h)
        self._header_due = None
        self._header_written = True

    def _decode(self, row: List[float], meta: Dict[str, Any],
                layout: Dict[str, Tuple[int, int]], names: List[str]) -> Dict[str, Any]:
        host, absent = meta["host"], set(meta["absent"])

        def get(name: str) -> Any:
            if name in host:
                v = host[name]
                if isinstance(v, list):
                    v = [float(x) if isinstance(x, Tensor) else x for x in v]
                return v
            if name in absent:
                return None
            off, w = layout[name]
            vals = row[off:off + w]
            if name in BOOL_FIELDS:
                vals = [bool(v) if v == v else None for v in vals]
            elif name in INT_FIELDS:
                vals = [int(v) if math.isfinite(v) else None for v in vals]
            return vals[0] if name in SCALAR_FIELDS else vals

        rec = step_record(get, names)
        for name in layout:
            if name in self._info_set_of(layout):
                off, _ = layout[name]
                v = row[off]
                rec[name] = v if math.isfinite(v) else None
        return rec

    @staticmethod
    def _info_set_of(layout: Dict[str, Tuple[int, int]]) -> frozenset:
        """The extra (info) fields of a row layout: those not in the format's own."""
        return frozenset(n for n in layout if n not in _RESERVED)

    def _write_all(self) -> None:
        self._flush_device()
        self._write_pending(wait=True)

    def flush(self) -> None:
        """Write out everything recorded so far (waits for the device: one sync). Never
        raises: a failure is counted and warned about once."""
        if not self.enabled or self.closed:
            return
        try:
            self._write_all()
            f = getattr(self.writer, "flush", None)
            if f is not None:
                f()
        except Exception as e:
            self._fail(e, 0)

    def close(self) -> None:
        """Flush, write the end record and close the writer; the logger records nothing
        afterwards (its optimizer hook is removed). Never raises for a write error: it
        is counted and warned about once."""
        if self.closed:
            return
        if self._hook_handle is not None:
            self._hook_handle.remove()
            self._hook_handle = None
        _OPEN_LOGGERS.discard(self)
        if not self.enabled:
            self.closed = True
            return
        try:
            self._write_all()
        except Exception as e:  # pragma: no cover - _write_all counts its own failures
            self._fail(e, 0)
        self.closed = True
        try:
            if self.counters["records"] or self._header_written:
                self._write_header_due(None)
                self.writer.write(end_record(self._steps_written, self.counters,
                                             dropped_rows=self.counters["dropped_rows"],
                                             last_error=self.last_error))
        except Exception as e:
            self._fail(e, 0)
        try:
            c = getattr(self.writer, "close", None)
            if c is not None:
                c()
        except Exception as e:
            self._fail(e, 0)

    def __enter__(self) -> "StatsLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"StatsLogger(path={self.path!r}, flush_every={self.flush_every}, "
                f"records={self.counters['records']}"
                + ("" if self.enabled else f", disabled on rank {self.rank}") + ")")


def attach(opt: Any, log: Any, **kwargs: Any) -> StatsLogger:
    """Create (or take) a :class:`StatsLogger` for ``log`` and attach it to ``opt``.

    Under an initialised ``torch.distributed`` process group the logger writes on rank 0
    only (the statistics are global already) unless the path contains ``{rank}`` or
    ``all_ranks=True``; on the other ranks it is disabled and opens no file.

    Args:
        opt: a :class:`~gradstats.StableOptimizer`.
        log: a :class:`StatsLogger`, a path or a writer (see :func:`open_writer`).
        kwargs: constructor arguments of :class:`StatsLogger` (``flush_every``, ``meta``,
            ``overwrite``, ``flush_seconds``, ``all_ranks``...).

    Returns:
        the logger, attached.
    """
    logger = log if isinstance(log, StatsLogger) else StatsLogger(log, **kwargs)
    return logger.bind(opt)
