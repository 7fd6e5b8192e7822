"""The *measure* and *decide* stages of the step: one statistics pass, one decision program.

Where the backend of the gradients can run the program inside its finalize kernel (one
device, no cross-rank reduction, the chain's fusable prefix), measuring and deciding is one
call: the statistics kernel(s) plus one finalize launch that also updates the running
statistics, runs every fused rule, and writes the coefficients, the skip flag and the
``grad_scale`` / ``found_inf`` of a fused optimizer. Otherwise the statistics come from
:func:`gradstats.core.stats.compute_groups` (which reduces across ranks when needed) and the
program runs on the reduced statistics — in a backend's decide kernel when it has one, else
as torch code (:func:`gradstats.policies.program.run_torch`). Rules after the fusable prefix
always run as torch code.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ..backends import registry
from ..core import grouping
from ..core.stats import compute_groups, numel_tensor
from ..policies.program import Fields, Program, run_torch

__all__ = ["StepResult", "measure_decide"]

_F32 = torch.float32


class StepResult:
    """The outputs of measure + decide.

    Attributes:
        fields: the named outputs (:class:`gradstats.policies.program.Fields`).
        stats_src: ``nonfinite``, ``numel`` and ``per_tensor_norm`` of the statistics.
        info: policy extras computed by torch code (the kernel's are in ``fields``).
    """

    __slots__ = ("fields", "stats_src", "info")

    def __init__(self, fields: Fields, stats_src: Dict[str, Any],
                 info: Dict[str, Tensor]) -> None:
        self.fields, self.stats_src, self.info = fields, stats_src, info


def measure_decide(prog: Program, params: List[List[Tensor]], grads: List[List[Tensor]], *,
                   norm_type: float, per_tensor: bool, loss: Optional[Tensor],
                   amp_scale: Optional[Tensor], amp_found: Optional[Tensor],
                   has_grads: Optional[Tensor], pp_group: Any = None,
                   backend: Optional[str] = None, stats_hooks=(), opt: Any = None
                   ) -> StepResult:
    """Measure the gradients and run the decision program (see the module docstring)."""
    if pp_group is None and not stats_hooks and not grouping.first_is_dtensor(grads):
        slices, _ = grouping.slices(grads)
        if len(slices) == 1:
            s = slices[0]
            be = registry.select(s, norm_type, backend)
            run = getattr(be, "compute_step", None)
            if run is not None and be.supports_program(s, norm_type, prog):
                res = run(s, norm_type, per_tensor, prog, loss=loss, amp_scale=amp_scale,
                          amp_found=amp_found, has_grads=has_grads)
                src = {"nonfinite": res.nonfinite,
                       "numel": numel_tensor(grads, slices, s.device),
                       "per_tensor_norm": res.per_tensor_norm}
                if prog.fully_fused:
                    return StepResult(prog.fields(res.outf, res.outi,
                                                  getattr(res, "direct", None)), src, {})
                return _finish_in_torch(prog, res, src, norm_type, loss, amp_scale,
                                        amp_found, has_grads, params, grads)
    st, _, _ = compute_groups(grads, norm_type, per_tensor=per_tensor, full=True,
                              backend=backend, pp_group=pp_group)
    for hook in stats_hooks:
        hook(opt, st)
    out = run_torch(prog, st.norm, st.total_norm, st.max_abs, norm_type=norm_type, loss=loss,
                    amp_scale=amp_scale, amp_found=amp_found, has_grads=has_grads,
                    params=params, grads=grads)
    ptn = st.per_tensor_norm
    if ptn is not None and amp_scale is not None:
        ptn = ptn * amp_scale.to(ptn.device).double().reciprocal().float()
    src = {"nonfinite": st.nonfinite, "numel": st.numel, "per_tensor_norm": ptn}
    info = out.pop("info")
    out.pop("coef")
    return StepResult(Fields(out), src, info)


def _finish_in_torch(prog: Program, res: Any, src: Dict[str, Any], norm_type: float,
                     loss: Optional[Tensor], amp_scale: Optional[Tensor],
                     amp_found: Optional[Tensor], has_grads: Optional[Tensor],
                     params: List[List[Tensor]], grads: List[List[Tensor]]) -> StepResult:
    """The kernel ran the fused prefix (no epilogue); the rest of the chain and the
    epilogue run as torch code on its intermediate results."""
    f = prog.fields(res.outf, res.outi)
    carry = {"norm": f.get("norm"), "total_norm": f.get("total_norm"),
             "max_abs": f.get("max_abs"), "finite": ~f.get("nonfinite"),
             "skip": f.get("skipped"),
             "skip_nf": f.get("skipped_nonfinite") if prog.has_nonfinite_rule else None,
             "policy_skip": f.get("skipped_spike"), "coef": f.get("clip_coef"),
             "info": {n: f.get(n) for n in prog.info_names}}
    out = run_torch(prog, carry["norm"], carry["total_norm"], carry["max_abs"],
                    norm_type=norm_type, loss=loss, amp_scale=amp_scale, amp_found=amp_found,
                    has_grads=has_grads, params=params, grads=grads,
                    first=len(prog.fused), carry=carry)
    info = out.pop("info")
    out.pop("coef")
    return StepResult(Fields(out), src, info)
