#!/usr/bin/env python
"""End-to-end training step: what the stable step costs inside a real training loop.

A GPT-2-124M-shaped decoder (written here: token + position embeddings, 12 pre-LN blocks of
causal self-attention and a 4x MLP, tied LM head; no dependency beyond torch), bf16
autocast, ``AdamW(fused=True)``, ``zero_grad(set_to_none=True)`` — so the gradients are new
tensors every step, as in a real loop. Arms:

* ``bare``: fused AdamW;
* ``torch_clip``: ``torch.nn.utils.clip_grad_norm_(1.0)`` + fused AdamW;
* ``stable``: ``gradstats.StableOptimizer(AdamW(fused=True), max_norm=1.0)``;
* ``stable_spike_log``: the same with ``spike=True`` and a JSON Lines stats log.

Steps are timed without a per-step synchronisation (one ``synchronize`` before and after
each timed run of ``--steps`` steps); the arms are interleaved (A B C D D C B A) and each
arm's figure is the best of its runs. Targets (H200, batch 8 x 1024): ``stable`` <=
``torch_clip`` and <= 1.01x ``bare``.

    python benchmarks/bench_e2e.py                     # CUDA: GPT-2 124M, batch 8 x 1024
    python benchmarks/bench_e2e.py --batch 2           # the smaller-batch case
    python benchmarks/bench_e2e.py --tiny --device cpu # the CPU mode (a few seconds)
    python benchmarks/bench_e2e.py --out DIR           # also writes DIR/bench_e2e.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the checkout's gradstats

import gradstats  # noqa: E402


@dataclass
class Config:
    vocab: int = 50257
    seq: int = 1024
    d: int = 768
    heads: int = 12
    layers: int = 12


TINY = Config(vocab=256, seq=32, d=64, heads=4, layers=2)


class Block(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(c.d)
        self.qkv = nn.Linear(c.d, 3 * c.d)
        self.proj = nn.Linear(c.d, c.d)
        self.ln2 = nn.LayerNorm(c.d)
        self.fc = nn.Linear(c.d, 4 * c.d)
        self.out = nn.Linear(4 * c.d, c.d)
        self.h = c.heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(D, dim=2)
        q, k, v = (t.view(B, T, self.h, D // self.h).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, D))
        return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
    """GPT-2-shaped decoder: 124.4M parameters in 148 tensors at the default config."""

    def __init__(self, c: Config) -> None:
        super().__init__()
        self.wte = nn.Embedding(c.vocab, c.d)
        self.wpe = nn.Embedding(c.seq, c.d)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.ln_f = nn.LayerNorm(c.d)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for b in self.blocks:
            x = b(x)
        return self.ln_f(x) @ self.wte.weight.t()  # tied LM head


def make_arm(name: str, model: nn.Module, log_dir: str) -> Callable[[torch.Tensor], None]:
    """A closure doing optimizer work for one step after backward (arm ``name``)."""
    fused = next(model.parameters()).device.type in ("cuda", "cpu")
    inner = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
    if name == "bare":
        def step(loss):
            inner.step()
            inner.zero_grad(set_to_none=True)
        return step
    if name == "torch_clip":
        params = list(model.parameters())

        def step(loss):
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            inner.step()
            inner.zero_grad(set_to_none=True)
        return step
    if name == "stable":
        opt = gradstats.StableOptimizer(inner, max_norm=1.0)
    elif name == "stable_spike_log":
        opt = gradstats.StableOptimizer(inner, max_norm=1.0, spike=True,
                                        param_names=model.named_parameters(),
                                        log=os.path.join(log_dir, "e2e.jsonl"))
    else:
        raise ValueError(f"unknown arm {name!r}")

    def step(loss):
        opt.step(loss=loss)
        opt.zero_grad(set_to_none=True)
    step.opt = opt  # type: ignore[attr-defined]
    return step


def run_arm(model: nn.Module, step: Callable, batches: List[torch.Tensor], steps: int,
            dev: torch.device, amp: bool) -> float:
    """ms per training step over ``steps`` steps (one sync before and after)."""
    def one(idx):
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(idx[:, :-1])
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                   idx[:, 1:].reshape(-1))
        loss.backward()
        step(loss.detach())
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        one(batches[i % len(batches)])
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / steps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--tiny", action="store_true", help="tiny config (the CPU mode)")
    ap.add_argument("--arms", default="bare,torch_clip,stable,stable_spike_log")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    cfg = TINY if args.tiny else Config()
    torch.manual_seed(0)
    arms = args.arms.split(",")
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, cfg.vocab, (args.batch, cfg.seq + 1), generator=g).to(dev)
               for _ in range(4)]
    amp = dev.type == "cuda"
    results: Dict[str, List[float]] = {a: [] for a in arms}
    models = {}
    with tempfile.TemporaryDirectory() as tmp:
        steps = {}
        for a in arms:  # one model per arm, identical initial weights
            torch.manual_seed(0)
            models[a] = GPT(cfg).to(dev)
            steps[a] = make_arm(a, models[a], tmp)
            run_arm(models[a], steps[a], batches, args.warmup, dev, amp)  # warm-up
        order = arms + arms[::-1]
        for a in order:
            results[a].append(run_arm(models[a], steps[a], batches, args.steps, dev, amp))
        for a in arms:
            opt = getattr(steps[a], "opt", None)
            if opt is not None and opt.log is not None and hasattr(opt.log, "close"):
                opt.log.close()
    n_params = sum(p.numel() for p in models[arms[0]].parameters())
    n_tensors = sum(1 for _ in models[arms[0]].parameters())
    best = {a: min(v) for a, v in results.items()}
    base = best.get("bare", next(iter(best.values())))
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor()
    print(f"# end-to-end step, {'tiny' if args.tiny else 'GPT-2 124M'} ({n_params / 1e6:.1f}M "
          f"params, {n_tensors} tensors), batch {args.batch} x {cfg.seq}, "
          f"{'bf16 autocast, ' if amp else ''}{dev.type} ({name}); torch {torch.__version__}, "
          f"gradstats {gradstats.__version__}")
    print("| arm | ms/step (best) | runs | ratio to bare |")
    print("|---|---|---|---|")
    for a in arms:
        runs = ", ".join(f"{x:.2f}" for x in results[a])
        print(f"| {a} | {best[a]:.2f} | {runs} | {best[a] / base:.3f} |")
    ok = all(math.isfinite(x) for v in results.values() for x in v)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_e2e.json"), "w") as f:
            json.dump({"config": asdict(cfg), "batch": args.batch, "steps": args.steps,
                       "device": name, "torch": torch.__version__, "results": results,
                       "best": best}, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
