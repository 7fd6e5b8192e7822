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
full, the filled rows go to the host with **one** asynchronous copy into pinned memory
(``non_blocking=True``) followed by a CUDA event; the rows are decoded and written out at
the *next* flush (by then the copy has long finished, so the event wait is free), or on
:meth:`StatsLogger.close`. Host-side values (learning rates that are Python floats, names)
never touch the device. :attr:`StatsLogger.counters` counts records, device->host copies
and write-outs (the tests check there is no copy per step).

Log format
==========
The records (header, one per step, end) and the file formats (JSON Lines, CSV,
TensorBoard) are documented in :mod:`gradstats.telemetry.format`. The writers are in
:mod:`gradstats.telemetry.writers` and the reader :func:`read_log` in :mod:`gradstats.telemetry.reader`;
both are re-exported here, with the format constants.
"""
from __future__ import annotations

import atexit
import math
import weakref
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .format import _BOOLS, _INTS, _PER_GROUP, _SCALARS, end_record, header_record, step_record
# the format, the writers and the reader are public here too
from .format import FORMAT_NAME, FORMAT_VERSION  # noqa: F401
from .reader import LogData, read_log  # noqa: F401
from .writers import CSVWriter, JSONLWriter, TensorBoardWriter, open_writer  # noqa: F401

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "StatsLogger", "attach", "read_log", "LogData",
           "JSONLWriter", "CSVWriter", "TensorBoardWriter", "open_writer"]


_F64 = torch.float64


# ================================================================================ logger
_OPEN_LOGGERS: "weakref.WeakSet[StatsLogger]" = weakref.WeakSet()


@atexit.register
def _close_open_loggers() -> None:  # pragma: no cover - interpreter shutdown
    for lg in list(_OPEN_LOGGERS):
        try:
            lg.close()
        except Exception:
            pass


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


class StatsLogger:
    """Records per-step gradient statistics on the device and writes them in batches.

    Args:
        log: where to write: a path (``.jsonl`` default, ``.csv``, ``tensorboard:DIR``), a
            writer object with ``write(record)`` (and optionally ``flush``/``close``), or
            a list of these.
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

    The logger is a context manager; :meth:`close` writes everything still buffered.
    """

    def __init__(self, log: Any, *, flush_every: int = 64, groups: Any = None,
                 group_names: Optional[Sequence[str]] = None, param_names: Any = None,
                 max_names: int = 8, norm_type: float = 2.0,
                 meta: Optional[Dict[str, Any]] = None) -> None:
        if not isinstance(flush_every, int) or isinstance(flush_every, bool) or flush_every < 1:
            raise ValueError(f"flush_every must be an int >= 1, got {flush_every!r}")
        if not isinstance(max_names, int) or max_names < 1:
            raise ValueError(f"max_names must be an int >= 1, got {max_names!r}")
        self.writer = open_writer(log)
        self.path = getattr(self.writer, "path", None)
        self.flush_every = flush_every
        self.max_names = max_names
        self.norm_type = float(norm_type)
        self.meta = dict(meta or {})
        self.group_names: Optional[List[str]] = list(group_names) if group_names else None
        self._name_of = _names_of(param_names)
        self._groups_src = groups
        self._opt: Any = None
        self._hook_handle: Any = None
        #: ``records`` (steps recorded), ``d2h_copies`` (device->host copies),
        #: ``writes`` (batches written out), ``syncs`` (event waits).
        self.counters = {"records": 0, "d2h_copies": 0, "writes": 0, "syncs": 0}
        self._layout: Optional[Dict[str, Tuple[int, int]]] = None
        self._G = -1
        self._F = 0
        self._dev_buf: Optional[Tensor] = None
        self._host_bufs: List[Tensor] = []
        self._next_host = 0
        self._slot = 0
        self._metas: List[Dict[str, Any]] = []
        self._pending: Optional[Tuple[Tensor, int, Any, List[Dict[str, Any]],
                                      Dict[str, Any]]] = None
        self._header: Optional[Dict[str, Any]] = None
        self._param_list: List[Tensor] = []
        self._global_index: Dict[int, int] = {}
        self._gmap_key: Any = None
        self._gmap: Optional[Tensor] = None
        self._nan_cache: Dict[Tuple[torch.device, int], Tensor] = {}
        self._steps_written = 0
        self._host_step = 0
        self.closed = False
        _OPEN_LOGGERS.add(self)

    # --------------------------------------------------------------------- setup
    def bind(self, opt: Any) -> "StatsLogger":
        """Attach to a :class:`~gradstats.StableOptimizer`: per-tensor norms on, a hook
        that records every step, names from its ``param_names``."""
        self._opt = opt
        self._groups_src = opt.param_groups
        self.norm_type = float(getattr(opt, "norm_type", self.norm_type))
        names = getattr(opt, "param_names", None)
        if names and not self._name_of:
            self._name_of = dict(names)
        if self._hook_handle is not None:
            self._hook_handle.remove()
        self._hook_handle = opt.register_step_hook(lambda _opt, rec: self.record(rec),
                                                   needs_per_tensor=True)
        return self

    def _group_list(self) -> List[Dict[str, Any]]:
        src = self._groups_src
        if src is None or isinstance(src, int):
            return []
        src = list(src)
        if src and isinstance(src[0], dict):
            return src
        return [{"params": src}]  # a plain list of parameters: one group

    def _ensure_layout(self, G: int, device: torch.device) -> None:
        if self._layout is not None and G == self._G and self._dev_buf is not None \
                and self._dev_buf.device == device:
            return
        if self._layout is not None:  # the number of groups changed: new header
            self._write_all()
        self._G = G
        layout: Dict[str, Tuple[int, int]] = {}
        off = 0
        for name in _SCALARS:
            layout[name] = (off, 1)
            off += 1
        layout["nonfinite_tensors"] = (off, self.max_names)
        off += self.max_names
        for name in _PER_GROUP:
            layout[name] = (off, G)
            off += G
        self._layout, self._F = layout, off
        self._dev_buf = torch.empty((self.flush_every, off), dtype=_F64, device=device)
        pin = device.type == "cuda"
        self._host_bufs = [torch.empty((self.flush_every, off), dtype=_F64, pin_memory=pin)
                           for _ in range(2)]
        self._slot = 0
        self._metas = []
        self._write_header(G, device)

    def _write_header(self, G: int, device: torch.device) -> None:
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
        opt = self._opt
        header = header_record(
            norm_type=self.norm_type, groups=names[:G], params=params,
            param_group=param_group, flush_every=self.flush_every, device=str(device),
            optimizer=(type(opt.optimizer).__name__ if opt is not None
                       and hasattr(opt, "optimizer") else None),
            policy=(repr(getattr(opt, "policy", None)) if opt is not None else None),
            spike=(repr(getattr(opt, "spike", None)) if opt is not None else None),
            meta=self.meta)
        self._header = header
        self.writer.write(header)

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
        """Record a :class:`gradstats.optim.StepRecord` (called by the optimizer hook)."""
        st = rec.stats
        self._ensure_layout(int(st.norm.numel()), st.norm.device)
        dev: Dict[str, Any] = {
            "step": rec.step, "total_norm": st.total_norm, "skipped": rec.skipped,
            "skipped_nonfinite": rec.skipped_nonfinite, "skipped_spike": rec.skipped_spike,
            "nonfinite": rec.nonfinite, "norm": st.norm, "max_abs": st.max_abs,
            "nonfinite_count": st.nonfinite, "clip_coef": rec.clip_coef,
            "clipped": rec.clipped, "running_mean": rec.running_mean,
            "running_std": rec.running_std, "zscore": rec.zscore,
        }
        if rec.loss is not None:
            dev["loss"] = rec.loss
        if getattr(rec, "loss_scale", None) is not None:
            dev["loss_scale"] = rec.loss_scale
        if st.per_tensor_norm is not None and rec.params:
            first, count = self._bad_tensor_slots(st.per_tensor_norm, rec.params)
            dev["nonfinite_tensors"] = first
            dev["nonfinite_tensor_count"] = count
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
        """
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
            if k not in _SCALARS and k not in _PER_GROUP:
                raise ValueError(f"unknown log field {k!r}; fields: "
                                 f"{', '.join(_SCALARS + _PER_GROUP)}")
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
            if self._layout is None or self._G != G:
                self._ensure_layout(G, d)
            first, count = self._bad_tensor_slots(stats.per_tensor_norm, params_g)
            dev["nonfinite_tensors"] = first
            dev["nonfinite_tensor_count"] = count
        self._push(dev, host, d)

    def _push(self, dev: Dict[str, Any], host: Dict[str, Any], device: torch.device) -> None:
        if self.closed:
            raise RuntimeError("this StatsLogger is closed")
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
        assert self._layout is not None and self._dev_buf is not None
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
        self.counters["records"] += 1
        if self._slot == self.flush_every:
            self._flush_device()

    # ---------------------------------------------------------------------- flushing
    def _flush_device(self) -> None:
        """One asynchronous copy of the filled rows into pinned host memory."""
        if self._slot == 0 or self._dev_buf is None:
            return
        n = self._slot
        hb = self._host_bufs[self._next_host]
        self._next_host ^= 1
        if self._pending is not None and self._pending[0] is hb:  # never overwrite
            prev, self._pending = self._pending, None
            self._decode_and_write(prev)
        hb[:n].copy_(self._dev_buf[:n], non_blocking=True)
        self.counters["d2h_copies"] += 1
        event = None
        if self._dev_buf.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        new = (hb, n, event, self._metas, dict(self._layout or {}))
        self._slot = 0
        self._metas = []
        prev, self._pending = self._pending, new
        if prev is not None:
            self._decode_and_write(prev)

    def _decode_and_write(self, batch) -> None:
        hb, n, event, metas, layout = batch
        if event is not None:
            event.synchronize()
            self.counters["syncs"] += 1
        rows = hb[:n].tolist()
        for row, meta in zip(rows, metas):
            self.writer.write(self._decode(row, meta, layout))
            self._steps_written += 1
        self.counters["writes"] += 1

    def _decode(self, row: List[float], meta: Dict[str, Any],
                layout: Dict[str, Tuple[int, int]]) -> Dict[str, Any]:
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
            if name in _BOOLS:
                vals = [bool(v) if v == v else None for v in vals]
            elif name in _INTS:
                vals = [int(v) if math.isfinite(v) else None for v in vals]
            return vals[0] if name in _SCALARS else vals

        return step_record(get, self._param_names)

    def _write_all(self) -> None:
        self._flush_device()
        if self._pending is not None:
            prev, self._pending = self._pending, None
            self._decode_and_write(prev)

    def flush(self) -> None:
        """Write out everything recorded so far (waits for the device: one sync)."""
        self._write_all()
        f = getattr(self.writer, "flush", None)
        if f is not None:
            f()

    def close(self) -> None:
        """Flush and write the end record; the logger cannot record afterwards."""
        if self.closed:
            return
        self.flush()
        if self._header is not None:
            self.writer.write(end_record(self._steps_written, self.counters))
        c = getattr(self.writer, "close", None)
        if c is not None:
            c()
        self.closed = True
        _OPEN_LOGGERS.discard(self)

    def __enter__(self) -> "StatsLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"StatsLogger(path={self.path!r}, flush_every={self.flush_every}, "
                f"records={self.counters['records']})")


def attach(opt: Any, log: Any, **kwargs: Any) -> StatsLogger:
    """Create (or take) a :class:`StatsLogger` for ``log`` and attach it to ``opt``.

    Args:
        opt: a :class:`~gradstats.StableOptimizer`.
        log: a :class:`StatsLogger`, a path or a writer (see :func:`open_writer`).
        kwargs: constructor arguments of :class:`StatsLogger` (``flush_every``, ``meta``...).
    """
    logger = log if isinstance(log, StatsLogger) else StatsLogger(log, **kwargs)
    return logger.bind(opt)
