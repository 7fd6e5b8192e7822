"""A step's decision chain compiled into one program for the finalize kernel.

:class:`Program` takes the policies of a :class:`gradstats.StableOptimizer` (the implicit
:class:`~gradstats.policies.rules.SkipNonFinite` first, then ``spike``, then ``policy``),
splits them into the longest prefix of built-in rules that declare a
:class:`~gradstats.policies.base.FusedSpec` (at most :data:`MAX_OPS`) and the rest, and lays
out everything the kernels need:

* ``fstate`` (float32) and ``istate`` (int64): one packed buffer each, holding the running
  statistics of every group's norm, the step counters and the state of every fused rule.
  The rules' ``state`` dicts are *views* into these buffers, so the torch implementation,
  the kernels, ``state_dict`` and CUDA-graph replay all see the same memory.
* ``table`` (int32, per op: code, param offset, fstate offset, istate offset, info offset)
  and ``params`` (float32): the program itself.
* the named layout of the two output buffers (``outf`` float32, ``outi`` int64) that a
  decision writes: statistics at true scale, coefficients, flags, the running statistics
  before the step, logging extras — names, never raw offsets, on the Python side.

One step of the program, the semantics every executor implements (:func:`run_torch` with the
rules' torch code; the Triton and native kernels; :func:`gradstats.core.reference.ref_program_step`
in float64):

1. *prelude*: divide norms and max-abs by the AMP loss scale when it is still in the
   gradients; ``finite = total < inf and |loss| < inf and not amp_found``;
2. each rule in order (coefficients multiply; a rule sees the skip flag of the rules before
   it; the first op, ``skip_nonfinite``, gives the non-finite skip);
3. *epilogue*: ``taken = not skip``; each group's running statistics record its norm when
   taken, finite and the group has gradients (:mod:`gradstats.core.running`);
   ``clipped = coef < 1 and taken``; counters ``steps, skipped, skipped_nonfinite,
   skipped_spike, clipped, nonfinite`` advance; ``found_inf = skip`` and
   ``grad_scale = amp_scale / coef`` for fused optimizers.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..core import running
from ..core.layout import Layout
from .base import F32, Decision, FusedSpec, Policy, Rule, StepContext
from .rules import SkipNonFinite, SpikeSkip

__all__ = ["COUNTER_NAMES", "Layout", "MAX_OPS", "OP_CODES", "Fields", "Program", "run_torch"]

#: Op codes shared by the Triton and native kernels.
OP_CODES = {"skip_nonfinite": 1, "fixed_norm": 2, "zscore": 3, "quantile": 4, "spike": 5}
#: Fused op slots of the kernels; later rules run as torch code.
MAX_OPS = 6
#: Entries of the int64 step counters.
COUNTER_NAMES = ("steps", "skipped", "skipped_nonfinite", "skipped_spike", "clipped",
                 "nonfinite")
#: Ints per op in ``Program.table``.
OP_WORDS = 5
#: Flag fields stored as 0.0 / 1.0 in the float output buffer.
BOOL_FIELDS = ("skipped", "skipped_nonfinite", "skipped_spike", "nonfinite", "clipped",
               "spike_flags")


class Fields:
    """The named outputs of one step: tensors given directly, or views of the output
    buffers of a kernel (made lazily, on first access, so that a step that nobody
    inspects creates no views)."""

    __slots__ = ("_direct", "_outf", "_outi", "_flayout", "_ilayout", "_shapes", "_cache")

    def __init__(self, direct: Optional[Dict[str, Tensor]] = None, outf: Optional[Tensor] = None,
                 outi: Optional[Tensor] = None, flayout: Optional[Layout] = None,
                 ilayout: Optional[Layout] = None,
                 shapes: Optional[Dict[str, Tuple[int, ...]]] = None) -> None:
        self._direct = direct or {}
        self._outf, self._outi = outf, outi
        self._flayout, self._ilayout = flayout, ilayout
        self._shapes = shapes or {}
        self._cache: Dict[str, Tensor] = {}

    def get(self, name: str) -> Optional[Tensor]:
        t = self._direct.get(name)
        if t is not None:
            return t
        t = self._cache.get(name)
        if t is not None:
            return t
        if self._flayout is not None and name in self._flayout:
            t = self._flayout.view(self._outf, name)
            if name in BOOL_FIELDS:
                t = t > 0.5
        elif self._ilayout is not None and name in self._ilayout:
            t = self._ilayout.view(self._outi, name)
        else:
            return None
        shape = self._shapes.get(name)
        if shape is not None:
            t = t.view(shape)
        self._cache[name] = t
        return t

    def names(self) -> List[str]:
        out = list(self._direct)
        for lay in (self._flayout, self._ilayout):
            if lay is not None:
                out += [n for n in lay.entries if n not in self._direct]
        return out


def _kernel_ok(spec: FusedSpec, before: Sequence[FusedSpec]) -> bool:
    """Whether the kernels can run ``spec`` after ``before`` (one ring-buffer rule each)."""
    if spec.op not in OP_CODES:
        return False
    if spec.op == "skip_nonfinite" and before:
        return False  # only as the first op
    if spec.op in ("quantile", "spike") and any(b.op == spec.op for b in before):
        return False
    return True


class Program:
    """The decision chain of one optimizer, compiled for ``num_groups`` groups on ``device``.

    Args:
        policies: the rules and transforms in order (nested chains already flattened).
        num_groups: ``G``.
        device: where the state lives.
        alpha: EMA factor of the per-group running statistics.
        old: the program this one replaces (its running statistics and counters are
            carried over, resized to ``num_groups``).
    """

    def __init__(self, policies: Sequence[Policy], num_groups: int, device: torch.device,
                 alpha: float, old: Optional["Program"] = None) -> None:
        G = int(num_groups)
        self.G = G
        self.device = torch.device(device)
        self.alpha = float(alpha)
        self.policies = list(policies)
        fused: List[Tuple[Rule, FusedSpec]] = []
        for p in self.policies:
            spec = p.fused_spec() if isinstance(p, Rule) else None
            if spec is None or len(fused) >= MAX_OPS or not _kernel_ok(spec,
                                                                        [s for _, s in fused]):
                break
            fused.append((p, spec))
        self.fused = fused
        self.rest: List[Policy] = self.policies[len(fused):]
        #: the whole chain runs in the kernel (prelude, rules and epilogue)
        self.fully_fused = not self.rest
        self.may_skip = any(p.may_skip for p in self.policies)
        self.needs_loss = any(p.needs_loss for p in self.policies)
        self.has_nonfinite_rule = bool(fused) and fused[0][1].op == "skip_nonfinite"
        #: a rule other than the non-finite check may skip (host-side knowledge)
        self.may_skip_beyond_nonfinite = any(p.may_skip for p in self.policies
                                             if not isinstance(p, SkipNonFinite))
        #: some policy may produce a clip coefficient other than 1
        self.has_clip = any(not isinstance(p, (SkipNonFinite, SpikeSkip))
                            for p in self.policies)

        # ---- state layouts and buffers
        fl, il = Layout(), Layout()
        fl.add("running", 3 * G)
        il.add("counters", len(COUNTER_NAMES))
        op_state: List[Tuple[Dict[str, Tuple[str, int]], Dict[str, Tuple[str, int]]]] = []
        for k, (_, spec) in enumerate(fused):
            fmap = {n: (f"op{k}.{n}", m) for n, m in spec.fstate}
            imap = {n: (f"op{k}.{n}", m) for n, m in spec.istate}
            for key, m in fmap.values():
                fl.add(key, m)
            for key, m in imap.values():
                il.add(key, m)
            op_state.append((fmap, imap))
        self.flayout_state, self.ilayout_state = fl, il
        self.fstate = torch.zeros(max(fl.size, 1), dtype=F32, device=self.device)
        self.istate = torch.zeros(max(il.size, 1), dtype=torch.int64, device=self.device)
        self.running = fl.view(self.fstate, "running").view(3, G)
        self.counters = il.view(self.istate, "counters")
        if old is not None:
            k = min(G, old.G)
            self.running[:, :k].copy_(old.running[:, :k].to(self.device))
            self.counters.copy_(old.counters.to(self.device))
        for (rule, spec), (fmap, imap) in zip(fused, op_state):
            if rule.device is None:  # fresh rule: its own initial values
                rule.init(G, self.device)
            views = {n: fl.view(self.fstate, key) for n, (key, _) in fmap.items()}
            views.update({n: il.view(self.istate, key) for n, (key, _) in imap.items()})
            for n, v in list(views.items()):
                cur = rule.state.get(n)
                if cur is not None and cur.dim() == 0:
                    views[n] = v.view(())
            rule.bind_state(views, G, self.device)
        for p in self.rest:
            p.ensure_state(G, self.device)

        # ---- the op table and parameters
        table: List[int] = []
        params: List[float] = []
        of = Layout()
        for name, n in (("norm", G), ("total_norm", 1), ("max_abs", G), ("clip_coef", G),
                        ("grad_scale", 1), ("found_inf", 1), ("skipped", 1),
                        ("skipped_nonfinite", 1), ("skipped_spike", 1), ("nonfinite", 1),
                        ("clipped", G), ("running", 3 * G)):
            of.add(name, n)
        self.info_names: List[str] = []
        for k, ((_, spec), (fmap, imap)) in enumerate(zip(fused, op_state)):
            info_off = of.size
            for n, m in spec.info:
                of.add(n if n not in of else f"op{k}.{n}", m)
                self.info_names.append(n)
            f_off = fl.offset(next(iter(fmap.values()))[0]) if fmap else 0
            i_off = il.offset(next(iter(imap.values()))[0]) if imap else 0
            table += [OP_CODES[spec.op], len(params), f_off, i_off, info_off]
            params += list(spec.params)
        self.table_host = table
        self.params_host = params
        self.table = torch.tensor(table or [0], dtype=torch.int32, device=self.device)
        self.params = torch.tensor(params or [0.0], dtype=F32, device=self.device)
        self.out_layout = of
        oi = Layout()
        oi.add("step", 1)
        self.outi_layout = oi
        self.shapes: Dict[str, Tuple[int, ...]] = {
            "total_norm": (), "grad_scale": (), "found_inf": (), "skipped": (),
            "skipped_nonfinite": (), "skipped_spike": (), "nonfinite": (), "running": (3, G),
            "step": ()}
        for _, spec in fused:
            for n, m in spec.info:
                if m == 1:
                    self.shapes.setdefault(n, ())
        #: op codes of the fused rules, in order (what a kernel specialises on)
        self.op_codes = tuple(OP_CODES[s.op] for _, s in fused)
        #: some fused rule gives one coefficient per group
        self.per_group_coef = any(s.op == "fixed_norm" and s.params[1] > 0 for _, s in fused)
        self.quantile_history = next((int(s.params[1]) for _, s in fused
                                      if s.op == "quantile"), 0)
        self.spike_window = next((int(s.params[0]) for _, s in fused if s.op == "spike"), 0)
        self.spike_signals = next((len([x for x in s.params[3:5] if x > 0])
                                   for _, s in fused if s.op == "spike"), 0)
        self._native_meta = None

    def fields(self, outf: Tensor, outi: Tensor,
               direct: Optional[Dict[str, Tensor]] = None) -> Fields:
        """Lazy named views of a kernel's output buffers (``direct``: fields a kernel
        returned as tensors of their own)."""
        return Fields(direct, outf, outi, self.out_layout, self.outi_layout, self.shapes)

    @property
    def native_meta(self) -> List[int]:
        """The ``meta`` argument of ``torch.ops.gradstats.decide`` (sizes and the output
        offsets, in the order of csrc/decide/decide_op.h)."""
        e = self.out_layout.entries
        return ([self.G, len(self.fused), int(self.fully_fused), self.out_layout.size,
                 max(self.quantile_history, 1)]
                + [e[n][0] for n in ("norm", "total_norm", "max_abs", "clip_coef",
                                     "grad_scale", "found_inf", "skipped",
                                     "skipped_nonfinite", "skipped_spike", "nonfinite",
                                     "clipped", "running")])


def run_torch(prog: Program, norm: Tensor, total: Tensor, max_abs: Optional[Tensor], *,
              norm_type: float, loss: Optional[Tensor], amp_scale: Optional[Tensor],
              amp_found: Optional[Tensor], has_grads: Optional[Tensor],
              params: List[List[Tensor]], grads: List[List[Tensor]],
              first: int = 0, carry: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Run the program with torch ops (the rules' ``update`` methods).

    Args:
        prog: the program.
        norm, total, max_abs: the step's statistics as measured (AMP scale still in).
        first: index of the first policy to run (the kernel ran ``prog.fused`` already
            when ``first = len(prog.fused)``; then ``carry`` holds its results).
        carry: the kernel's intermediate results (``norm``, ``total_norm``, ``max_abs``,
            ``finite``, ``skip``, ``skip_nf``, ``policy_skip``, ``coef``, ``info``).

    Returns:
        dict of named tensors: every field of the output layout, plus ``info`` (dict).
    """
    dev = total.device
    false = torch.zeros((), dtype=torch.bool, device=dev)
    if carry is None:
        inv = None
        amp_bad = None
        if amp_scale is not None:
            inv = amp_scale.to(dev).double().reciprocal().float()
            norm, total = norm * inv, total * inv
            max_abs = None if max_abs is None else max_abs * inv
        finite = total < math.inf  # a norm is >= 0 or NaN
        if loss is not None:
            finite = finite & (loss.abs() < math.inf)
        if amp_found is not None:
            amp_bad = amp_found.to(dev) > 0
            finite = finite & ~amp_bad
        skip, skip_nf, policy_skip = false, None, None
        coef: Optional[Tensor] = None
        clipped_g: Optional[Tensor] = None
        info: Dict[str, Tensor] = {}
    else:
        norm, total, max_abs = carry["norm"], carry["total_norm"], carry["max_abs"]
        finite, skip = carry["finite"], carry["skip"]
        skip_nf, policy_skip = carry["skip_nf"], carry["policy_skip"]
        coef, clipped_g, info = carry["coef"], None, dict(carry["info"])
        inv = None if amp_scale is None else amp_scale.to(dev).double().reciprocal().float()
        amp_bad = None if amp_found is None else amp_found.to(dev) > 0
    ctx = StepContext(norm=norm, total_norm=total, norm_type=norm_type, finite=finite,
                      skip=skip, params=params, grads=grads, grad_factor=inv, loss=loss,
                      amp_overflow=amp_bad, amp_scaled=amp_scale is not None)
    for i, p in enumerate(prog.policies[first:], start=first):
        d: Decision = p.update(ctx)
        if d.skip is not None:
            if i == 0 and prog.has_nonfinite_rule:
                skip_nf = d.skip
            else:
                policy_skip = d.skip if policy_skip is None else policy_skip | d.skip
            ctx.skip = ctx.skip | d.skip
        if d.coef is not None:
            coef = d.coef if coef is None else coef * d.coef
        if d.clipped is not None:
            clipped_g = d.clipped if clipped_g is None else clipped_g | d.clipped
        for k, v in d.info.items():
            info.setdefault(k, v)
    G = prog.G
    skip = ctx.skip
    taken = ~skip
    run_before = prog.running.clone()
    valid = taken & (norm < math.inf)
    if has_grads is not None:
        valid = valid & has_grads
    running.update_(prog.running[0], prog.running[1], prog.running[2], norm, valid,
                    prog.alpha)
    if coef is None:
        coef_g = torch.ones(G, dtype=F32, device=dev)
    else:
        coef_g = coef.to(F32).expand(G)
    clipped = (coef_g < 1) & taken
    if clipped_g is not None:
        clipped = clipped | (clipped_g & taken)
    skip_nf = false if skip_nf is None else skip_nf
    skip_spike = false if policy_skip is None else policy_skip & ~skip_nf
    nonfinite = ~finite
    prog.counters.add_(torch.stack([torch.ones((), dtype=torch.bool, device=dev), skip, skip_nf,
                                    skip_spike, clipped.any(), nonfinite]))
    c0 = coef_g[0] if G else torch.ones((), dtype=F32, device=dev)
    grad_scale = (c0.reciprocal() if amp_scale is None else amp_scale.to(dev, F32) / c0).to(F32)
    return {"norm": norm, "total_norm": total, "max_abs": max_abs, "clip_coef": coef_g,
            "grad_scale": grad_scale, "found_inf": skip.to(F32), "skipped": skip,
            "skipped_nonfinite": skip_nf, "skipped_spike": skip_spike,
            "nonfinite": nonfinite, "clipped": clipped, "running": run_before,
            "step": prog.counters[0].clone(), "info": info,
            "coef": coef}
