"""``gradstats demo`` (``make demo``): the same tiny transformer trained twice, once with
torch's AdamW + ``torch.nn.utils.clip_grad_norm_`` and once with ``StableOptimizer``, under
an aggressive learning rate with two injected faults (a NaN batch and a 1000x gradient
spike). Both runs write a stats log; the report with plots and a diagnosis goes to
``<out>/report``. CPU only, no download: the data is generated (a next-token task whose
token follows from the two before it).
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
from torch import nn

import gradstats
from gradstats import policies, report, telemetry

VOCAB, SEQ, BATCH = 32, 32, 32
DEFAULT_STEPS = 400
LR = 1e-2          # aggressive: ten times the usual AdamW rate, and no warm-up
MAX_NORM = 1.0


# ============================================================================ model, data
class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(D, dim=-1)
        sh = (B, T, self.heads, D // self.heads)
        q, k, v = (t.view(sh).transpose(1, 2) for t in (q, k, v))
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, D))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))


class TinyTransformer(nn.Module):
    """A 2-layer causal transformer (about 110k parameters)."""

    def __init__(self, vocab: int = VOCAB, d: int = 64, heads: int = 4, layers: int = 2,
                 seq: int = SEQ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(seq, d) * 0.02)
        self.blocks = nn.ModuleList([Block(d, heads) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx) + self.pos[: idx.shape[1]]
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln_f(x))


def make_data(n: int, seed: int) -> torch.Tensor:
    """``n`` sequences of ``SEQ + 1`` tokens: x[t] = (3 x[t-1] + x[t-2] + noise) mod VOCAB."""
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(n, SEQ + 1, dtype=torch.long)
    x[:, :2] = torch.randint(0, VOCAB, (n, 2), generator=g)
    noise = (torch.rand(n, SEQ + 1, generator=g) < 0.1).long() * \
        torch.randint(1, VOCAB, (n, SEQ + 1), generator=g)
    for t in range(2, SEQ + 1):
        x[:, t] = (3 * x[:, t - 1] + x[:, t - 2] + noise[:, t]) % VOCAB
    return x


def param_groups(model: nn.Module) -> List[Dict[str, Any]]:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and n != "pos"]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and n != "pos")]
    return [{"params": decay, "weight_decay": 0.1, "name": "weights"},
            {"params": rest, "weight_decay": 0.0, "name": "biases_norms"}]


# ================================================================================ progress
class _Progress:
    def __init__(self, total: int, desc: str) -> None:
        self.total, self.desc, self.n, self.t0 = total, desc, 0, time.perf_counter()
        self.post = ""
        try:
            from tqdm import tqdm
            self._bar = tqdm(total=total, desc=desc, unit="step", leave=True,
                             dynamic_ncols=True, file=sys.stderr)
        except Exception:
            self._bar = None
        self._last = 0.0

    def update(self, loss: Optional[float] = None) -> None:
        self.n += 1
        if loss is not None:
            self.post = f"loss {loss:.3f}" if math.isfinite(loss) else f"loss {loss}"
        if self._bar is not None:
            if loss is not None:
                self._bar.set_postfix_str(self.post, refresh=False)
            self._bar.update(1)
            return
        now = time.perf_counter()
        if now - self._last > 0.2 or self.n == self.total:
            self._last = now
            w = 30
            fill = int(w * self.n / max(1, self.total))
            sys.stderr.write(f"\r{self.desc}: [{'#' * fill}{'.' * (w - fill)}] "
                             f"{self.n}/{self.total} {self.post}   ")
            sys.stderr.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        else:
            sys.stderr.write("\n")


# ================================================================================ training
@dataclass
class RunResult:
    name: str
    log: str
    losses: List[float]
    eval_loss: float
    skipped: int
    skipped_nonfinite: int
    skipped_spike: int
    clipped: int
    nonfinite: int
    ms_per_step: float
    ms_opt: float


def _eval(model: nn.Module, data: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(data[:, :-1])
        return float(nn.functional.cross_entropy(logits.reshape(-1, VOCAB),
                                                 data[:, 1:].reshape(-1)))


def train(kind: str, steps: int, out: str, *, seed: int = 0, lr: float = LR,
          nan_step: Optional[int] = None, spike_step: Optional[int] = None,
          spike_factor: float = 1000.0, flush_every: int = 64,
          progress: bool = True) -> RunResult:
    """Train the tiny transformer; ``kind`` is ``"torch"`` (AdamW + clip_grad_norm_) or
    ``"stable"`` (StableOptimizer). Steps are numbered from 1 like ``opt.step()`` calls;
    at ``nan_step`` the input batch is NaN-poisoned, at ``spike_step`` all gradients are
    multiplied by ``spike_factor``."""
    torch.manual_seed(seed)
    model = TinyTransformer()
    data = make_data(steps * BATCH, seed + 1)
    held_out = make_data(256, seed + 2)
    groups = param_groups(model)
    inner = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=True)
    names = list(model.named_parameters())
    path = os.path.join(out, f"{kind}.jsonl")
    title = ("torch AdamW + clip_grad_norm_" if kind == "torch"
             else "StableOptimizer(AdamW)")
    meta = {"run": title, "seed": seed, "lr": lr, "nan_step": nan_step,
            "spike_step": spike_step}
    if kind == "stable":
        opt = gradstats.StableOptimizer(
            inner, policy=policies.ZScoreClip(alpha=0.97, z_thresh=2.5, warmup=25,
                                              max_norm=MAX_NORM * 5),
            spike=policies.SpikeSkip(window=64, k=6.0, warmup=min(32, max(2, steps // 6))),
            param_names=names)
        logger = telemetry.attach(opt, path, flush_every=flush_every, meta=meta, overwrite=True)
    else:
        opt = inner
        logger = telemetry.StatsLogger(path, flush_every=flush_every, groups=inner.param_groups,
                                       param_names=names, meta=meta, overwrite=True)
    bar = _Progress(steps, f"{title:31s}") if progress else None
    losses_t: List[torch.Tensor] = []
    t_opt = 0.0
    # CPU time of this (the only torch) thread: steady even when other jobs share the CPU
    t0 = time.thread_time()
    for step in range(1, steps + 1):
        batch = data[(step - 1) * BATCH: step * BATCH]
        emb_hook = None
        if step == nan_step:  # a poisoned batch: NaN in the input embeddings
            emb_hook = model.embed.register_forward_hook(
                lambda m, i, o: o * torch.tensor(float("nan")))
        logits = model(batch[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
        if emb_hook is not None:
            emb_hook.remove()
        loss.backward()
        if step == spike_step:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(spike_factor)
        ts = time.thread_time()
        if kind == "stable":
            opt.step(loss=loss)
        else:
            # what clip_grad_norm_ is about to see, logged with the fused statistics pass
            st = gradstats.grad_stats(inner.param_groups, per_tensor=True)
            total = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
            coef = torch.clamp(MAX_NORM / (total + 1e-6), max=1.0)
            logger.log_stats(st, step=step, loss=loss, clip_coef=coef,
                             clipped=(total > MAX_NORM), skipped=False)
            opt.step()
        t_opt += time.thread_time() - ts
        opt.zero_grad(set_to_none=True)
        losses_t.append(loss.detach())
        if bar is not None:
            bar.update(loss.item() if step % 20 == 0 or step == steps else None)
    elapsed = time.thread_time() - t0
    if bar is not None:
        bar.close()
    logger.close()
    losses = torch.stack(losses_t).tolist() if losses_t else []
    if kind == "stable":
        s = opt.summary()
        sk, sk_nf, sk_sp = s["skipped"], s["skipped_by_reason"]["nonfinite"], \
            s["skipped_by_reason"]["spike"]
        clipped, nonfinite = s["clipped"], s["nonfinite"]
    else:
        lg = telemetry.read_log(path)
        sk = sk_nf = sk_sp = 0
        clipped = sum(1 for r in lg.records if any(r.get("clipped") or []))
        nonfinite = sum(1 for r in lg.records if r.get("nonfinite"))
    return RunResult(kind, path, losses, _eval(model, held_out), sk, sk_nf, sk_sp, clipped,
                     nonfinite, 1000 * elapsed / max(1, steps), 1000 * t_opt / max(1, steps))


def _final(losses: List[float]) -> float:
    if not losses:
        return math.nan
    tail = losses[-max(1, min(20, len(losses) // 10)):]
    if not all(math.isfinite(v) for v in tail):
        return math.nan
    return sum(tail) / len(tail)


def table(a: RunResult, b: RunResult, steps: int) -> str:
    def f(v: float) -> str:
        return f"{v:.4f}" if math.isfinite(v) else str(v)
    rows = [
        ("final train loss (last steps)", f(_final(a.losses)), f(_final(b.losses))),
        ("held-out loss", f(a.eval_loss), f(b.eval_loss)),
        ("skipped steps", str(a.skipped),
         f"{b.skipped} ({b.skipped_nonfinite} non-finite, {b.skipped_spike} spike)"),
        ("clipped steps", f"{a.clipped} of {steps}", f"{b.clipped} of {steps}"),
        ("steps that saw NaN/Inf", str(a.nonfinite), str(b.nonfinite)),
        ("CPU ms per step (all)", f"{a.ms_per_step:.2f}", f"{b.ms_per_step:.2f}"),
        ("  of which optimizer step", f"{a.ms_opt:.2f}", f"{b.ms_opt:.2f}"),
    ]
    h = ("", "torch AdamW + clip_grad_norm_", "StableOptimizer(AdamW)")
    w0 = max(len(r[0]) for r in rows + [h])
    w1 = max(len(r[1]) for r in rows + [h])
    w2 = max(len(r[2]) for r in rows + [h])
    out = [f"| {h[0]:<{w0}} | {h[1]:<{w1}} | {h[2]:<{w2}} |",
           f"|{'-' * (w0 + 2)}|{'-' * (w1 + 2)}|{'-' * (w2 + 2)}|"]
    out += [f"| {r[0]:<{w0}} | {r[1]:<{w1}} | {r[2]:<{w2}} |" for r in rows]
    out += ["", "CPU ms: CPU time of the training thread (steady when other jobs share the "
            "machine). Optimizer step: clip_grad_norm_ + AdamW step (+ the same stats "
            "logging) vs. StableOptimizer.step() with its log."]
    return "\n".join(out)


def main(args: Any = None) -> int:
    steps = getattr(args, "steps", None) or DEFAULT_STEPS
    if steps < 1:
        print("gradstats demo: --steps must be >= 1", file=sys.stderr)
        return 2
    out = getattr(args, "out", None) or "demo_out"
    seed = getattr(args, "seed", None) or 0
    os.makedirs(out, exist_ok=True)
    # one thread: for a model this small, thread hand-offs cost more than they save, and
    # with other jobs on the machine extra threads only spin
    torch.set_num_threads(1)
    spike_step = max(2, int(steps * 0.35)) if steps >= 5 else None
    nan_step = max(3, int(steps * 0.6)) if steps >= 5 else None
    print(f"gradstats demo: a {sum(p.numel() for p in TinyTransformer().parameters()):,}"
          f"-parameter transformer, {steps} steps of AdamW at lr={LR:g} (aggressive, no "
          f"warm-up), trained twice with seed {seed}.")
    print(f"Injected faults: 1000x gradient spike at step {spike_step}, "
          f"NaN input batch at step {nan_step}.")
    t0 = time.perf_counter()
    a = train("torch", steps, out, seed=seed, nan_step=nan_step, spike_step=spike_step)
    b = train("stable", steps, out, seed=seed, nan_step=nan_step, spike_step=spike_step)
    print()
    print(table(a, b, steps))
    rep_dir = os.path.join(out, "report")
    rep = report.build_report([a.log, b.log], rep_dir, compare=True,
                              title="gradstats demo: torch clip_grad_norm_ vs StableOptimizer")
    print()
    print("Diagnosis:")
    for label, fs in rep.findings.items():
        for fnd in fs:
            if fnd.kind != "log_problem":
                print(f"  [{report.SEVERITY_LABEL.get(fnd.severity, fnd.severity)}] {label}: {fnd.title}")
    print()
    print(f"Logs:   {a.log}, {b.log}")
    print(f"Report: {rep.markdown}")
    print(f"Plots:  {', '.join(rep.plots)}")
    print(f"Done in {time.perf_counter() - t0:.1f} s.")
    return 0
