"""``StepRecord``: what one :meth:`StableOptimizer.step` measured and did (device tensors)."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from torch import Tensor

from ..core.stats import GradStats
from ..policies.program import Fields

__all__ = ["StepRecord"]


class StepRecord:
    """What the last :meth:`StableOptimizer.step` measured and did, as device tensors.

    Fields are views of the step's output buffers, made on first access (a step nobody
    inspects creates none). Nothing here reads a device value on the host except
    :meth:`to_dict`.

    Attributes:
        stats: the step's :class:`gradstats.GradStats` (true scale: AMP scale divided out).
        clip_coef: float32 ``[G]``, factor applied to each group's gradients (1: untouched).
        clipped: bool ``[G]``, groups whose gradients were clipped.
        skipped: bool 0-dim, the optimizer step was skipped.
        skipped_nonfinite: bool 0-dim, skipped for non-finite gradients/loss/AMP overflow.
        skipped_spike: bool 0-dim, skipped by a policy (spike), gradients finite.
        nonfinite: bool 0-dim, some gradient (or the loss) was NaN/Inf this step.
        running: float32 ``[3, G]``, (mean, variance, count) of each group's norm before
            this step; ``running_mean``, ``running_std`` and ``zscore`` derive from it.
        step: int64 0-dim, number of ``step()`` calls so far, this one included.
        loss: the loss given to ``step`` (0-dim float32) or ``None``.
        loss_scale: the AMP loss scale of the step, or ``None``.
        info: policy extras (``zclip_z``, ``quantile_threshold``, ``spike_flags``, ...).
        params: per group, the parameters that had a gradient (host objects, in the
            order of ``stats.per_tensor_norm``).
    """

    __slots__ = ("_fields", "_stats_src", "_stats", "loss", "loss_scale", "params",
                 "_info_names", "_info_direct", "norm_type")

    def __init__(self, fields: Fields, stats_src: Dict[str, Any], *, loss: Optional[Tensor],
                 loss_scale: Optional[Tensor], params: List[List[Tensor]], norm_type: float,
                 info_names: Optional[List[str]] = None,
                 info: Optional[Dict[str, Tensor]] = None) -> None:
        self._fields = fields
        self._stats_src = stats_src
        self._stats: Optional[GradStats] = None
        self.loss = loss
        self.loss_scale = loss_scale
        self.params = params
        self.norm_type = norm_type
        self._info_names = list(info_names or [])
        self._info_direct = dict(info or {})

    # ------------------------------------------------------------------ fields
    @property
    def stats(self) -> GradStats:
        if self._stats is None:
            f, s = self._fields, self._stats_src
            self._stats = GradStats(
                norm=f.get("norm"), total_norm=f.get("total_norm"), max_abs=f.get("max_abs"),
                nonfinite=s["nonfinite"], numel=s["numel"],
                per_tensor_norm=s.get("per_tensor_norm"), norm_type=self.norm_type)
        return self._stats

    @property
    def clip_coef(self) -> Tensor:
        return self._fields.get("clip_coef")

    @property
    def clipped(self) -> Tensor:
        return self._fields.get("clipped")

    @property
    def skipped(self) -> Tensor:
        return self._fields.get("skipped")

    @property
    def skipped_nonfinite(self) -> Tensor:
        return self._fields.get("skipped_nonfinite")

    @property
    def skipped_spike(self) -> Tensor:
        return self._fields.get("skipped_spike")

    @property
    def nonfinite(self) -> Tensor:
        return self._fields.get("nonfinite")

    @property
    def running(self) -> Tensor:
        return self._fields.get("running")

    @property
    def step(self) -> Tensor:
        return self._fields.get("step")

    @property
    def info(self) -> Dict[str, Tensor]:
        out = dict(self._info_direct)
        for n in self._info_names:
            if n not in out:
                t = self._fields.get(n)
                if t is not None:
                    out[n] = t
        return out

    def add_info(self, name: str, value: Tensor) -> None:
        """Add an entry to :attr:`info` (a step hook's extra field, e.g. the noise scale;
        telemetry logs ``info``). An existing entry of that name is replaced.

        Raises:
            TypeError: ``name`` is not a string or ``value`` not a tensor.
        """
        if not isinstance(name, str) or not isinstance(value, Tensor):
            raise TypeError(f"add_info takes a str name and a tensor value, got "
                            f"({type(name).__name__}, {type(value).__name__})")
        self._info_direct[name] = value

    @property
    def running_mean(self) -> Tensor:
        return self.running[0]

    @property
    def running_std(self) -> Tensor:
        return self.running[1].clamp_min(0).sqrt()

    @property
    def zscore(self) -> Tensor:
        mean, var, n = self.running[0], self.running[1], self.running[2]
        z = (self.stats.norm - mean) / var.clamp_min(0).sqrt().clamp_min(1e-12)
        return torch.where(n >= 2, z, torch.zeros_like(z))

    # ----------------------------------------------------------------- export
    def tensors(self) -> Dict[str, Tensor]:
        """Every device tensor of the record by name (for loggers; no sync)."""
        st = self.stats
        out = {
            "norm": st.norm, "total_norm": st.total_norm,
            "max_abs": st.max_abs, "nonfinite_count": st.nonfinite,
            "numel": st.numel, "clip_coef": self.clip_coef, "clipped": self.clipped,
            "skipped": self.skipped, "skipped_nonfinite": self.skipped_nonfinite,
            "skipped_spike": self.skipped_spike, "nonfinite": self.nonfinite,
            "running_mean": self.running_mean, "running_std": self.running_std,
            "zscore": self.zscore, "step": self.step,
        }
        if st.per_tensor_norm is not None:
            out["per_tensor_norm"] = st.per_tensor_norm
        if self.loss is not None:
            out["loss"] = self.loss
        if self.loss_scale is not None:
            out["loss_scale"] = self.loss_scale
        for k, v in self.info.items():
            out.setdefault(k, v)
        return out

    def to_dict(self) -> Dict[str, Any]:
        """Everything as plain Python values, with one device->host transfer."""
        ts = {k: v for k, v in self.tensors().items() if isinstance(v, Tensor)}
        dev = self.stats.norm.device
        flat = [v.detach().reshape(-1).to(dev, torch.float64) for v in ts.values()]
        vals = torch.cat(flat).cpu().tolist() if flat else []
        out: Dict[str, Any] = {}
        off = 0
        for (k, v) in ts.items():
            n = v.numel()
            chunk = vals[off:off + n]
            off += n
            if v.dtype == torch.bool:
                chunk = [bool(x) for x in chunk]
            elif not v.is_floating_point():
                chunk = [int(x) for x in chunk]
            out[k] = chunk[0] if v.dim() == 0 else chunk
        out["norm_type"] = self.norm_type
        return out

    def __repr__(self) -> str:
        return f"StepRecord(fields={self._fields.names()})"
