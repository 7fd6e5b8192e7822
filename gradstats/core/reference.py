"""THE SPEC: gradient statistics in plain PyTorch, float64, one tensor at a time.

Every backend is tested against these functions. They are slow on purpose: no fusion,
no caching, nothing clever, so that they are easy to read and to trust.

Semantics (docs/architecture.md §4):

* ``norm[g]``: the p-norm of all gradient elements of group ``g`` viewed as one vector;
  NaN if any element is NaN, else +Inf if any is +-Inf (torch's propagation).
* ``max_abs[g]``: the largest ``|x|`` among the *finite* elements (0 if there is none).
* ``nonfinite[g]``: number of NaN or +-Inf elements. ``numel[g]``: number of elements.
* ``total_norm``: the p-norm over all groups.
* ``per_tensor_norm``: the p-norm of each gradient, in parameter order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import Tensor


@dataclass
class RefStats:
    """Reference results as float64 / int64 CPU tensors."""

    norm: Tensor
    total_norm: Tensor
    max_abs: Tensor
    nonfinite: Tensor
    numel: Tensor
    per_tensor_norm: Tensor


def ref_tensor_norm(g: Tensor, norm_type: float) -> Tensor:
    """p-norm of one tensor in float64 (``torch.linalg.vector_norm`` semantics)."""
    x = g.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
    if x.numel() == 0:
        return torch.zeros((), dtype=torch.float64)
    return torch.linalg.vector_norm(x, norm_type)


def _norm_of_norms(norms: List[Tensor], norm_type: float) -> Tensor:
    if not norms:
        return torch.zeros((), dtype=torch.float64)
    return torch.linalg.vector_norm(torch.stack(norms), norm_type)


def ref_grad_stats(groups: List[List[Tensor]], norm_type: float = 2.0) -> RefStats:
    """Reference statistics of gradient tensors given as a list of groups.

    Args:
        groups: one list of gradient tensors per group (any device, floating dtype).
        norm_type: order ``p`` of the norm (``inf`` allowed).

    Returns:
        :class:`RefStats` with float64/int64 CPU tensors.
    """
    norm_type = float(norm_type)
    norms, maxes, nonfin, numels, per_tensor, group_norms = [], [], [], [], [], []
    for grads in groups:
        tn = [ref_tensor_norm(g, norm_type) for g in grads]
        per_tensor.extend(tn)
        group_norms.append(_norm_of_norms(tn, norm_type))
        m, nf, n = 0.0, 0, 0
        for g in grads:
            x = g.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
            fin = torch.isfinite(x)
            nf += int((~fin).sum())
            n += x.numel()
            if bool(fin.any()):
                m = max(m, float(x[fin].abs().max()))
        maxes.append(m)
        nonfin.append(nf)
        numels.append(n)
    norms = group_norms
    total = _norm_of_norms(norms, norm_type)
    return RefStats(
        norm=torch.stack(norms) if norms else torch.zeros(0, dtype=torch.float64),
        total_norm=total,
        max_abs=torch.tensor(maxes, dtype=torch.float64),
        nonfinite=torch.tensor(nonfin, dtype=torch.int64),
        numel=torch.tensor(numels, dtype=torch.int64),
        per_tensor_norm=(torch.stack(per_tensor) if per_tensor
                         else torch.zeros(0, dtype=torch.float64)),
    )


def ref_clip_coef(total_norm: Tensor, max_norm: float) -> Tensor:
    """torch's clipping coefficient ``min(max_norm / (total + 1e-6), 1)`` (NaN stays NaN)."""
    return torch.clamp(max_norm / (total_norm.double() + 1e-6), max=1.0)


def rel_err(a: Tensor, b: Tensor) -> float:
    """Largest relative error of ``a`` against ``b`` (NaN/Inf must match exactly)."""
    a = a.detach().double().cpu().reshape(-1)
    b = b.detach().double().cpu().reshape(-1)
    if a.shape != b.shape:
        return math.inf
    if not torch.equal(torch.isnan(a), torch.isnan(b)):
        return math.inf
    fa, fb = torch.isfinite(a), torch.isfinite(b)
    if not torch.equal(fa, fb) or not torch.equal(a[~fa & ~torch.isnan(a)], b[~fb & ~torch.isnan(b)]):
        return math.inf
    if not bool(fa.any()):
        return 0.0
    a, b = a[fa], b[fb]
    denom = b.abs().clamp_min(1e-300)
    err = ((a - b).abs() / denom)
    err = torch.where(b == 0, (a - b).abs(), err)
    return float(err.max())


def max_abs_ok(got: Tensor, ref: Tensor, dtype: Optional[torch.dtype] = None) -> bool:
    """max-abs is an exact element of the input: it must match exactly."""
    return torch.equal(got.detach().double().cpu(), ref.double())


# ------------------------------------------------------------------------------------------
# The running-statistics rule and the decision program, in float64 (the spec of
# gradstats.core.running and gradstats.policies.program; see their docstrings).
# ------------------------------------------------------------------------------------------

def ref_running_update(mean: float, var: float, n: float, x: float, valid: bool,
                       alpha: float) -> "tuple[float, float, float]":
    """One step of the running-statistics rule in float64: ``(mean, var, n)`` after ``x``.

    ``n <- n + 1; w <- max(1/n, 1 - alpha); d <- x - mean; mean <- mean + w d;
    var <- (1 - w) (var + w d^2)``; nothing changes when ``valid`` is false or ``x`` is
    not finite.
    """
    if not valid or not math.isfinite(x):
        return mean, var, n
    n = n + 1.0
    w = max(1.0 / n, 1.0 - alpha)
    d = x - mean
    return mean + w * d, (1.0 - w) * (var + w * d * d), n


def ref_running_stats(values: List[float], alpha: float) -> "list[tuple[float, float]]":
    """``(mean, var)`` after each value of ``values`` (NaN values are not recorded)."""
    mean = var = n = 0.0
    out = []
    for x in values:
        mean, var, n = ref_running_update(mean, var, n, float(x), True, alpha)
        out.append((mean, var))
    return out


def _ref_clip(max_norm: float, norm: float) -> float:
    """torch's coefficient ``min(max_norm / (norm + 1e-6), 1)``; NaN stays NaN."""
    c = max_norm / (norm + 1e-6)
    return c if (math.isnan(c) or c < 1.0) else 1.0


def _ref_quantile(values: List[float], q: float) -> float:
    """Linear-interpolation quantile (``numpy.percentile``'s default) of ``values``."""
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(v) - 1)
    frac = pos - lo
    return v[lo] + frac * (v[hi] - v[lo]) if frac > 0 else v[lo]


class RefProgram:
    """The decision program of :class:`gradstats.StableOptimizer` in plain Python float64.

    Args:
        ops: the rules as ``(op, params)`` pairs, exactly the ``op`` and ``params`` of
            their :class:`gradstats.policies.FusedSpec` (``"skip_nonfinite"``,
            ``"fixed_norm"``, ``"zscore"``, ``"quantile"``, ``"spike"``).
        num_groups: ``G``.
        alpha: EMA factor of the per-group running statistics.
    """

    def __init__(self, ops: List["tuple[str, tuple]"], num_groups: int, alpha: float) -> None:
        self.ops = [(op, tuple(float(x) for x in params)) for op, params in ops]
        self.G = num_groups
        self.alpha = alpha
        self.running = [[0.0, 0.0, 0.0] for _ in range(num_groups)]
        self.counters = [0] * 6
        self.state: List[dict] = []
        for op, p in self.ops:
            if op == "zscore":
                self.state.append({"mean": 0.0, "var": 0.0, "n": 0.0})
            elif op == "quantile":
                self.state.append({"buf": [], "H": int(p[1])})
            elif op == "spike":
                S = int(p[3] > 0) + int(p[4] > 0)
                self.state.append({"bufs": [[] for _ in range(S)], "counts": [0] * S,
                                   "W": int(p[0])})
            else:
                self.state.append({})

    def step(self, norms: List[float], total: float, *, loss: Optional[float] = None,
             amp_scale: Optional[float] = None, amp_found: Optional[float] = None,
             has_grads: Optional[List[bool]] = None) -> dict:
        """One step: the decision and the updated state (see the program's docstring).

        Returns:
            dict with ``norm``, ``total_norm``, ``clip_coef`` (lists / floats at true
            scale), ``skipped``, ``skipped_nonfinite``, ``skipped_spike``, ``nonfinite``,
            ``clipped`` (list), ``running`` (state before the step, ``[mean, var, n]`` per
            group), ``step`` and ``info`` (dict).
        """
        G = self.G
        if amp_scale is not None:
            inv = 1.0 / amp_scale
            norms = [x * inv for x in norms]
            total = total * inv
        finite = total < math.inf and not math.isnan(total)
        if loss is not None:
            finite = finite and math.isfinite(loss)
        amp_bad = amp_found is not None and amp_found > 0
        finite = finite and not amp_bad
        skip, skip_nf, policy_skip = False, None, False
        coef = [1.0] * G
        info: dict = {}
        for (op, p), st in zip(self.ops, self.state):
            if op == "skip_nonfinite":
                bad = (not finite) if (p[0] > 0 or amp_scale is not None) else amp_bad
                skip_nf = bad
                skip = skip or bad
            elif op == "fixed_norm":
                for g in range(G):
                    coef[g] *= _ref_clip(p[0], norms[g] if p[1] > 0 else total)
            elif op == "zscore":
                alpha, zt, warm, mx = p[:4]
                mean, var, n = st["mean"], st["var"], st["n"]
                std = math.sqrt(max(var, 0.0))
                active = n >= warm
                z = (total - mean) / max(std, 1e-12) if active else 0.0
                over = active and z > zt
                target = mean + zt * zt * std / z if over else total
                c = _ref_clip(target, total) if over else 1.0
                if mx >= 0:
                    c2 = _ref_clip(mx, total)
                    c = c2 if (math.isnan(c2) or c2 < c) else c
                coef = [x * c for x in coef]
                info.update(zclip_z=z, zclip_mean=mean, zclip_std=std, zclip_target=target)
                st["mean"], st["var"], st["n"] = ref_running_update(
                    mean, var, n, target, not skip, alpha)
            elif op == "quantile":
                q, H = p[0], int(p[1])
                if not skip and math.isfinite(total):
                    st["buf"].append(total)
                    st["buf"] = st["buf"][-H:]
                if st["buf"]:
                    thr = _ref_quantile(st["buf"], q)
                    c = _ref_clip(thr, total)
                else:
                    thr, c = math.inf, 1.0
                coef = [x * c for x in coef]
                info["quantile_threshold"] = thr
            elif op == "spike":
                W, k, warm = int(p[0]), p[1], p[2]
                sig = []
                if p[5] > 0:
                    sig = [loss, total] if p[3] > 0 else [loss]
                else:
                    sig = ([total] if p[3] > 0 else []) + ([loss] if p[4] > 0 else [])
                flags, means, stds = [], [], []
                for i, (buf, x) in enumerate(zip(st["bufs"], sig)):
                    n = len(buf)
                    m = sum(buf) / max(n, 1)
                    s = math.sqrt(sum((b - m) ** 2 for b in buf) / max(n - 1, 1))
                    flags.append(st["counts"][i] >= warm and x > m + k * s)
                    means.append(m)
                    stds.append(s)
                for i, (buf, x) in enumerate(zip(st["bufs"], sig)):
                    if not skip and math.isfinite(x):
                        buf.append(x)
                        st["counts"][i] += 1
                        del buf[:-W]
                hit = any(flags)
                policy_skip = policy_skip or hit
                skip = skip or hit
                info.update(spike_mean=means, spike_std=stds, spike_flags=flags)
        taken = not skip
        before = [list(r) for r in self.running]
        for g in range(G):
            ok = taken and (has_grads is None or has_grads[g])
            m, v, n = self.running[g]
            self.running[g] = list(ref_running_update(m, v, n, norms[g], ok, self.alpha))
        clipped = [(c < 1.0) and taken for c in coef]
        skip_nf = bool(skip_nf)
        skip_spike = policy_skip and not skip_nf
        for i, v in enumerate([True, skip, skip_nf, skip_spike, any(clipped), not finite]):
            self.counters[i] += int(v)
        return {"norm": norms, "total_norm": total, "clip_coef": coef, "skipped": skip,
                "skipped_nonfinite": skip_nf, "skipped_spike": skip_spike,
                "nonfinite": not finite, "clipped": clipped, "running": before,
                "step": self.counters[0], "info": info}

