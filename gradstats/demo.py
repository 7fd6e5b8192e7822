"""``gradstats demo``: train a small model with ``gradstats.clip_grad_norm_`` on the CPU
and print its per-group gradient statistics every few steps (no download needed)."""
from __future__ import annotations

import time

import torch

import gradstats


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.GELU(),
                               torch.nn.Linear(128, 128), torch.nn.GELU(),
                               torch.nn.Linear(128, 1))


def main(args=None) -> int:
    steps = getattr(args, "steps", None) or 200
    torch.manual_seed(0)
    x = torch.randn(2048, 32)
    y = (x[:, :4].sum(1, keepdim=True).sin() + 0.1 * torch.randn(2048, 1))
    model = _model()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}], lr=3e-3)
    print(f"training a {sum(p.numel() for p in model.parameters())}-parameter MLP for "
          f"{steps} steps; groups: 0 = weights, 1 = biases")
    print(f"{'step':>5} {'loss':>9} {'total':>9} {'norm[0]':>9} {'norm[1]':>9} "
          f"{'maxabs[0]':>9} {'nonfinite':>9}")
    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, 2048, (64,))
        loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        gradstats.clip_grad_norm_(model.parameters(), max_norm=1.0)
        if step % 20 == 0 or step == steps - 1:
            d = gradstats.grad_stats(opt.param_groups).to_dict()
            print(f"{step:5d} {loss.item():9.4f} {d['total_norm']:9.4f} {d['norm'][0]:9.4f} "
                  f"{d['norm'][1]:9.4f} {d['max_abs'][0]:9.4f} {sum(d['nonfinite']):9d}")
        opt.step()
    print(f"done in {time.perf_counter() - t0:.2f} s")
    return 0
