"""gradstats with the transformers Trainer: three ways in, on a tiny GPT-2 (CPU, seconds).

1. ``gradstats.patch_torch()``: the Trainer's own clipping (``max_grad_norm``, done by
   accelerate through ``torch.nn.utils.get_total_norm`` + ``clip_grads_with_norm_``)
   runs through gradstats' fused functions. Nothing else changes.
2. ``StableOptimizer`` in the Trainer's optimizer slot (``optimizers=(opt, None)``):
   clipping and non-finite step skipping happen in the optimizer, so the Trainer's
   clipping is turned off with ``max_grad_norm=0``.
3. ``GradStatsCallback``: per-group norms, max-abs, NaN/Inf counts (and, with a
   StableOptimizer, clip coefficient and skip counts) in the Trainer's logs.

The model is randomly initialised from a small ``GPT2Config`` and trained on random
tokens: nothing is downloaded.

Run: ``python examples/hf_trainer.py [--steps 20]``
"""
from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

import gradstats
from gradstats.integrations.huggingface import GradStatsCallback

VOCAB, SEQ = 128, 16


class RandomTokens(torch.utils.data.Dataset):
    """Fixed random token sequences (language modelling: labels are the inputs)."""

    def __init__(self, n: int = 256, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2,
                     bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)
    return GPT2LMHeadModel(cfg)


def args(out: str, steps: int, max_grad_norm: float) -> TrainingArguments:
    return TrainingArguments(
        output_dir=out, max_steps=steps, per_device_train_batch_size=8, learning_rate=3e-3,
        logging_steps=5, max_grad_norm=max_grad_norm, report_to="none",
        save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0, data_seed=0)


def losses(trainer: Trainer):
    return [round(e["loss"], 4) for e in trainer.state.log_history if "loss" in e]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    steps = ap.parse_args().steps
    ds = RandomTokens()
    torch.set_num_threads(min(2, torch.get_num_threads()))

    with tempfile.TemporaryDirectory() as out:
        # 1. patch_torch(): the Trainer clips (max_grad_norm=1.0) through gradstats.
        trainer = Trainer(model=tiny_gpt2(), args=args(out, steps, 1.0), train_dataset=ds)
        with gradstats.patch_torch():
            trainer.train()
        print("1. patch_torch()          losses:", losses(trainer))

        # 2 + 3. StableOptimizer in the optimizer slot, the Trainer's clipping off,
        #        and the callback logging gradstats' statistics.
        model = tiny_gpt2()
        opt = gradstats.StableOptimizer(torch.optim.AdamW(model.parameters(), lr=3e-3),
                                        max_norm=1.0, param_names=model.named_parameters())
        trainer = Trainer(model=model, args=args(out, steps, 0.0), train_dataset=ds,
                          optimizers=(opt, None))
        GradStatsCallback().attach(trainer)  # before any report_to loggers
        trainer.train()
        print("2. StableOptimizer        losses:", losses(trainer))
        last = [e for e in trainer.state.log_history if "gradstats/total_norm" in e][-1]
        print("3. GradStatsCallback  last log:",
              {k: round(v, 4) for k, v in last.items() if k.startswith("gradstats/")})
        print("   StableOptimizer summary:", opt.summary())


if __name__ == "__main__":
    main()
