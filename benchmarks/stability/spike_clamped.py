"""An experimental variant of ``gradstats.policies.SpikeSkip`` for the benchmark's
``--study spike-record``: a skipped outlier enters the rolling window *clamped* to the
threshold (``mean + k * std``) instead of at its own value.

``SpikeSkip`` records every finite value, the skipped outlier included (as OLMo-core's
``SkipStepOptimizer`` does, so that a lasting change of scale is learnt). One 1000x value
then inflates the window's standard deviation for ``window`` steps, and later spikes
inside that span are not recognised. Clamping keeps the adaptation (a lasting change of
scale still raises the window, by up to ``k`` std per step) without the inflation. Runs
as torch code (no fused spec); the statistics are those of ``SpikeSkip.update``.
"""
from __future__ import annotations

import math

import torch

from gradstats.policies import Decision, SpikeSkip, StepContext

F32 = torch.float32


class SpikeSkipClamped(SpikeSkip):
    """``SpikeSkip`` whose skipped outliers are recorded at the threshold."""

    def fused_spec(self):
        return None  # torch code only (an experiment)

    def update(self, ctx: StepContext) -> Decision:
        buf, count = self.state["buffer"], self.state["count"]
        dev = buf.device
        x = torch.stack([ctx.total_norm.to(dev, F32) if s == "grad_norm" else
                         ctx.loss.detach().to(dev, F32).reshape(()) for s in self.on])
        W = self.window
        n = count.clamp(max=W)
        mask = torch.arange(W, device=dev).unsqueeze(0) < n.unsqueeze(1)
        nf = n.to(F32)
        mean = torch.where(mask, buf, 0.0).sum(1) / nf.clamp_min(1.0)
        dev2 = torch.where(mask, (buf - mean.unsqueeze(1)) ** 2, 0.0).sum(1)
        std = (dev2 / (nf - 1.0).clamp_min(1.0)).sqrt()
        active = count >= self.warmup
        thr = mean + self.k * std
        flags = active & (x > thr)
        skip = flags.any()
        valid = (~ctx.skip) & (x.abs() < math.inf)
        rec = torch.where(flags, thr, x)  # the only change: clamp what is recorded
        slot = torch.remainder(count, W).unsqueeze(1)
        old = buf.gather(1, slot)
        buf.scatter_(1, slot, torch.where(valid.unsqueeze(1), rec.unsqueeze(1), old))
        count.add_(valid.to(count.dtype))
        return Decision(skip=skip, info={"spike_mean": mean, "spike_std": std,
                                         "spike_flags": flags})
