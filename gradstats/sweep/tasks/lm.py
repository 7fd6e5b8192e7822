"""Built-in tasks: tiny causal transformers on a generated next-token task (CPU, no
download), and the scenarios of the stability benchmark as options of the same trainer.

Data: sequences over a 32-token vocabulary from a fixed Markov chain (each token has 4
possible successors) in which 30% of the positions from the 9th on repeat the token 8
positions back (:func:`make_batches`). A model that learns nothing sits at ln 32 = 3.47
nats; a well-trained tiny model reaches about 1.6-1.8 in 150 steps. Batches depend only
on the seed, so every configuration and learning rate sees the same batches and the same
initial weights.

Options (``run.options``): ``d``, ``heads``, ``layers``, ``seq``, ``batch``, ``norm``
(``"pre"`` or ``"post"``: LayerNorm before each sublayer, or after the residual sum as in
the original transformer), ``warmup`` (steps of linear warm-up), ``schedule``
(``"cosine"`` to 10% or ``"constant"``), ``betas``, ``weight_decay``, ``fp16`` (see
below), ``corrupt_p`` and ``corrupt`` (``"labels"``: the batch's targets are replaced by
random tokens; ``"constant"``: the whole batch is one repeated token; ``"mixed"``: either,
at random), ``nan_steps`` (the
input embeddings of these steps' batches are NaN), ``spike_steps`` and ``spike_factor``
(every gradient of these steps is multiplied by the factor).

fp16 emulation (``fp16=True``): CPU autocast to float16 is four times slower than float32
here, so half precision is emulated by *casting*: every linear layer's output, the
attention scores, the embeddings and the logits are rounded to float16 and back in the
forward pass (range: values above 65504 become inf; precision: 11 significant bits), and
the gradient flowing back through each of these points, as well as every parameter's
gradient, is rounded to float16 (values below 6e-8 become 0) — what training in float16
without loss scaling does to activations and gradients. The arithmetic between the
rounding points (matmul accumulation, softmax, LayerNorm) stays in float32, as in
autocast; the weights and the optimizer stay in float32 (mixed precision).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from . import Task, register_task

__all__ = ["TinyLM", "make_batches", "train_lm", "DEFAULTS"]

VOCAB = 32

DEFAULTS: Dict[str, Any] = {
    "d": 32, "heads": 2, "layers": 2, "seq": 16, "batch": 16, "norm": "pre",
    "warmup": 15, "schedule": "cosine", "betas": (0.9, 0.95), "weight_decay": 0.1,
    "fp16": False, "corrupt_p": 0.0, "corrupt": "labels", "nan_steps": (),
    "spike_steps": (), "spike_factor": 1000.0, "eval_batch": 256,
}


class _Fp16Round(torch.autograd.Function):
    """Round to float16 and back, in the forward and the backward pass."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return x.half().float()

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:  # type: ignore[override]
        return g.half().float()


def _r(x: Tensor, on: bool) -> Tensor:
    return _Fp16Round.apply(x) if on else x


class _Block(nn.Module):
    def __init__(self, d: int, heads: int, post: bool, fp16: bool) -> None:
        super().__init__()
        self.heads, self.post, self.fp16 = heads, post, fp16
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def _attn(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        h = self.heads
        q, k, v = _r(self.qkv(x), self.fp16).split(D, dim=-1)
        q, k, v = (t.view(B, T, h, D // h).transpose(1, 2) for t in (q, k, v))
        if self.fp16:
            s = _r(q @ k.transpose(-1, -2) / math.sqrt(D // h), True)
            mask = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
            a = _r(s.masked_fill(mask, float("-inf")).softmax(-1) @ v, True)
        else:
            a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return _r(self.proj(a.transpose(1, 2).reshape(B, T, D)), self.fp16)

    def _mlp(self, x: Tensor) -> Tensor:
        return _r(self.fc2(nn.functional.gelu(_r(self.fc1(x), self.fp16))), self.fp16)

    def forward(self, x: Tensor) -> Tensor:
        if self.post:  # the original transformer: LayerNorm after the residual sum
            x = self.ln1(x + self._attn(x))
            return self.ln2(x + self._mlp(x))
        x = x + self._attn(self.ln1(x))
        return x + self._mlp(self.ln2(x))


class TinyLM(nn.Module):
    """A small causal transformer; ``norm="post"`` puts LayerNorm after each residual sum."""

    def __init__(self, vocab: int = VOCAB, d: int = 32, heads: int = 2, layers: int = 2,
                 seq: int = 16, norm: str = "pre", fp16: bool = False) -> None:
        super().__init__()
        if norm not in ("pre", "post"):
            raise ValueError(f"norm must be 'pre' or 'post', got {norm!r}")
        self.fp16 = fp16
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(seq, d) * 0.02)
        self.blocks = nn.ModuleList([_Block(d, heads, norm == "post", fp16)
                                     for _ in range(layers)])
        self.ln_f = nn.LayerNorm(d) if norm == "pre" else nn.Identity()
        self.head = nn.Linear(d, vocab)
        if fp16:
            for p in self.parameters():
                p.register_hook(lambda g: g.half().float())

    def forward(self, idx: Tensor) -> Tensor:
        x = _r(self.embed(idx) + self.pos[: idx.shape[1]], self.fp16)
        for b in self.blocks:
            x = b(x)
        return _r(self.head(self.ln_f(x)), self.fp16)


def _language() -> Tensor:
    """The generated language: the 4 possible successors of each token (fixed, seed-free)."""
    g = torch.Generator().manual_seed(12345)
    return torch.stack([torch.randperm(VOCAB, generator=g)[:4] for _ in range(VOCAB)])


_SUCC_P = (0.55, 0.25, 0.12, 0.08)


def make_batches(n: int, batch: int, seq: int, seed: int, copy: float = 0.3,
                 lag: int = 8) -> Tensor:
    """``[n, batch, seq + 1]`` token sequences of the generated task: a Markov chain in
    which each token has 4 possible successors (probabilities 0.55, 0.25, 0.12, 0.08),
    except that with probability ``copy`` a position repeats the token ``lag`` positions
    back (which needs attention)."""
    succ = _language()
    g = torch.Generator().manual_seed(seed)
    N = n * batch
    x = torch.empty(N, seq + 1, dtype=torch.long)
    x[:, 0] = torch.randint(0, VOCAB, (N,), generator=g)
    choice = torch.multinomial(torch.tensor(_SUCC_P), N * (seq + 1), replacement=True,
                               generator=g).view(N, seq + 1)
    cp = torch.rand(N, seq + 1, generator=g) < copy
    for t in range(1, seq + 1):
        nxt = succ[x[:, t - 1], choice[:, t]]
        if t >= lag:
            nxt = torch.where(cp[:, t], x[:, t - lag], nxt)
        x[:, t] = nxt
    return x.view(n, batch, seq + 1)


def _param_groups(model: nn.Module, wd: float) -> List[Dict[str, Any]]:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and n != "pos"]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and n != "pos")]
    return [{"params": decay, "weight_decay": wd, "name": "weights"},
            {"params": rest, "weight_decay": 0.0, "name": "norms_biases"}]


def _loss(model: nn.Module, b: Tensor) -> Tensor:
    logits = model(b[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB).float(), b[:, 1:].reshape(-1))


def _corrupt(b: Tensor, kind: str, g: torch.Generator) -> Tensor:
    b = b.clone()
    if kind == "mixed":
        kind = "labels" if bool(torch.rand((), generator=g) < 0.5) else "constant"
    if kind == "labels":
        b[:, 1:] = torch.randint(0, VOCAB, b[:, 1:].shape, generator=g)
    elif kind == "constant":
        b[:] = int(torch.randint(0, VOCAB, (1,), generator=g))
    else:
        raise ValueError(f"corrupt must be 'labels', 'constant' or 'mixed', got {kind!r}")
    return b


def train_lm(run: Any) -> Dict[str, float]:
    """The built-in trainer (AdamW, fused); its options are in the module docstring.
    Returns ``{"eval_loss": ...}`` (held-out batch, NaN when the weights are not finite)."""
    o = dict(DEFAULTS)
    o.update(run.options or {})
    unknown = set(o) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown options {sorted(unknown)}; options: {sorted(DEFAULTS)}")
    model = TinyLM(VOCAB, o["d"], o["heads"], o["layers"], o["seq"], o["norm"], o["fp16"])
    data = make_batches(run.steps, o["batch"], o["seq"], 1000 + run.seed)
    held = make_batches(1, o["eval_batch"], o["seq"], 5000 + run.seed)[0]
    opt = run.optimizer(_param_groups(model, o["weight_decay"]), betas=tuple(o["betas"]),
                        fused=True, param_names=model.named_parameters())
    if o["schedule"] == "cosine":
        sched: Optional[Any] = run.warmup_cosine(opt, warmup=o["warmup"])
    elif o["schedule"] == "constant":
        w = o["warmup"]
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda i: min(1.0, (i + 1) / w) if w > 0 else 1.0)
    else:
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {o['schedule']!r}")
    gc = torch.Generator().manual_seed(7000 + run.seed)
    corrupt = (torch.rand(run.steps, generator=gc) < o["corrupt_p"]).tolist()
    nan_steps, spike_steps = set(o["nan_steps"]), set(o["spike_steps"])
    for step in range(1, run.steps + 1):
        b = data[step - 1]
        if corrupt[step - 1]:
            b = _corrupt(b, o["corrupt"], gc)
        hook = None
        if step in nan_steps:
            hook = model.embed.register_forward_hook(lambda m, i, out: out * float("nan"))
        loss = _loss(model, b)
        if hook is not None:
            hook.remove()
        loss.backward()
        if step in spike_steps:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(o["spike_factor"])
        opt.step(loss=loss)
        opt.zero_grad(set_to_none=True)
        if sched is not None:
            sched.step()
    with torch.no_grad():
        ev = float(_loss(model, held))
    return {"eval_loss": ev}


# ============================================================================ registry
_LRS = (3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
#: a run of these tasks failed when it ends above 2.5 nats: halfway between a model that
#: has learned nothing (ln 32 = 3.47) and the 1.6-1.8 that healthy runs reach
DIVERGE_LOSS = 2.5
_QUICK = {"steps": 40, "lrs": (3e-3, 3e-2, 3e-1)}


def _task(name: str, description: str, lrs: Tuple[float, ...] = _LRS, steps: int = 100,
          cost: float = 1.0, quick: Optional[Dict[str, Any]] = None, **options: Any) -> Task:
    return register_task(Task(name=name, train=train_lm, lrs=lrs, steps=steps,
                              options=options, description=description,
                              quick=quick or _QUICK, cost=cost,
                              diverge_loss=DIVERGE_LOSS), replace=True)


_task("tiny-lm", "2-layer pre-LN transformer (d=32, 28k parameters), AdamW, 12 warm-up "
      "steps then cosine to 10%, batch 16 x 16 tokens, 100 steps.", warmup=12,
      quick=dict(_QUICK, seeds=2))
_task("high-lr", "tiny-lm without warm-up, at a constant learning rate.", warmup=0,
      schedule="constant")
_task("post-ln", "3-layer post-LN transformer (LayerNorm after each residual sum, no "
      "final LayerNorm), 3 warm-up steps then cosine.", layers=3, norm="post", warmup=3,
      cost=1.5)
_task("fp16", "tiny-lm with activations and gradients rounded to float16, no loss "
      "scaling (emulated by casting on CPU; see gradstats.sweep.tasks.lm), 3 warm-up "
      "steps.", fp16=True, warmup=3, cost=1.3)
_task("label-noise", "tiny-lm where 5% of the batches are corrupted (at random: random "
      "targets, or the whole batch one repeated token).", corrupt_p=0.05, corrupt="mixed",
      warmup=12)
_task("large-batch", "tiny-lm with batch 64 (4x) and a 2-step warm-up, 70 steps.",
      batch=64, warmup=2, steps=70, cost=2.5)
_task("nan-batch", "tiny-lm with a NaN input batch at steps 30 and 70.",
      nan_steps=(30, 70), warmup=12)
_task("spike", "tiny-lm with every gradient multiplied by 1000 at steps 30 and 70.",
      spike_steps=(30, 70), warmup=12)
