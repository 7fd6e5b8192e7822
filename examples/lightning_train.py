"""gradstats with Lightning: three ways in, on a tiny MLP regression (CPU, seconds).

1. ``gradstats.patch_torch()``: Lightning's own clipping (``gradient_clip_val``, which
   calls ``torch.nn.utils.clip_grad_norm_`` or ``clip_grad_value_``) runs through
   gradstats' fused functions. Nothing else changes.
2. ``StableOptimizer`` returned from ``configure_optimizers``: clipping and non-finite
   step skipping happen in the optimizer, so the Trainer is built without
   ``gradient_clip_val``.
3. ``GradStatsCallback``: per-group norms, max-abs, NaN/Inf counts (and, with a
   StableOptimizer, clip coefficient and skip counts) logged with ``self.log`` on
   Lightning's logging steps, so they reach every logger (here a CSVLogger).

Run: ``python examples/lightning_train.py [--steps 40]``
"""
from __future__ import annotations

import argparse
import csv
import glob
import os
import tempfile

import torch
import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger

import gradstats
from gradstats.integrations.lightning import GradStatsCallback


class Regressor(pl.LightningModule):
    """A two-layer MLP; ``stable=True`` returns a StableOptimizer from configure_optimizers."""

    def __init__(self, stable: bool = False) -> None:
        super().__init__()
        self.stable = stable
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(),
                                       torch.nn.Linear(64, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss, on_step=True, prog_bar=False)
        return loss

    def configure_optimizers(self):
        # two parameter groups: weights with weight decay, biases without
        decay = [p for n, p in self.named_parameters() if n.endswith("weight")]
        no_decay = [p for n, p in self.named_parameters() if n.endswith("bias")]
        inner = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=1e-2)
        if self.stable:
            return gradstats.StableOptimizer(inner, max_norm=0.5,
                                             param_names=self.named_parameters())
        return inner


def loader(seed: int = 0) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 16, generator=g)
    y = (x[:, :4].sum(1, keepdim=True) + 0.1 * torch.randn(512, 1, generator=g)) * 5
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)


def trainer(out: str, steps: int, **kw) -> pl.Trainer:
    return pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, log_every_n_steps=10,
                      logger=CSVLogger(out), enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, **kw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    steps = ap.parse_args().steps
    torch.set_num_threads(min(2, torch.get_num_threads()))

    with tempfile.TemporaryDirectory() as out:
        # 1. patch_torch(): Lightning clips (gradient_clip_val=0.5) through gradstats.
        pl.seed_everything(0, verbose=False)
        t = trainer(os.path.join(out, "patch"), steps, gradient_clip_val=0.5)
        with gradstats.patch_torch():
            t.fit(Regressor(), loader())
        print("1. patch_torch()      final train_loss:", float(t.logged_metrics["train_loss"]))

        # 2 + 3. StableOptimizer from configure_optimizers (no gradient_clip_val) and the
        #        callback logging its statistics.
        pl.seed_everything(0, verbose=False)
        t = trainer(os.path.join(out, "stable"), steps, callbacks=[GradStatsCallback(
            group_names=["decay", "no_decay"])])
        model = Regressor(stable=True)
        t.fit(model, loader())
        print("2. StableOptimizer    final train_loss:", float(t.logged_metrics["train_loss"]))
        print("3. GradStatsCallback  logged:", {k: round(float(v), 4)
                                                for k, v in t.logged_metrics.items()
                                                if k.startswith("gradstats/")})
        rows = list(csv.DictReader(open(glob.glob(os.path.join(
            out, "stable", "**", "metrics.csv"), recursive=True)[0])))
        n = sum(1 for r in rows if r.get("gradstats/total_norm"))
        print(f"   metrics.csv: {n} rows with gradstats/total_norm")


if __name__ == "__main__":
    main()
