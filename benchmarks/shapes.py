"""The benchmark gradient sets (GPT-2, Llama, ResNet-50, 2000 small tensors, one huge tensor), as shape lists and as tensors.

Every set is a list of ``(shape, group)`` pairs in parameter order. ``group`` follows the
usual optimizer split: 0 for weights with two or more dimensions, 1 for the 1-D rest
(biases, norm weights). ``scale`` multiplies each tensor's element count (it is applied to
the first dimension, never below 1), so a scaled set keeps its tensor count -- the thing
that drives host overhead -- and its byte proportions, while shrinking for a CPU run.

    >>> specs = gpt2_124m()
    >>> len(specs), numel(specs)
    (148, 124439808)
    >>> groups = build(specs, "cpu", torch.float32, scale=1 / 64)   # two lists of tensors

The stated tensor counts (``STATED_COUNTS``) are checked by :func:`check_counts`.
"""
from __future__ import annotations

import random
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

Shape = Tuple[int, ...]
Spec = List[Tuple[Shape, int]]

WEIGHTS, REST = 0, 1


def _g(shape: Shape) -> Tuple[Shape, int]:
    """Pair a shape with its group: >=2-D weights -> 0, 1-D rest -> 1."""
    return tuple(int(d) for d in shape), (WEIGHTS if len(shape) >= 2 else REST)


def scaled(specs: Spec, scale: float) -> Spec:
    """``specs`` with each element count multiplied by ``scale`` (first dimension, >= 1)."""
    if scale == 1.0:
        return list(specs)
    out = []
    for shape, group in specs:
        if len(shape) == 0:
            out.append((shape, group))
            continue
        d0 = max(1, int(round(shape[0] * scale)))
        out.append(((d0,) + tuple(shape[1:]), group))
    return out


# --------------------------------------------------------------------------- model sets

def gpt2_124m(scale: float = 1.0) -> Spec:
    """GPT-2 124M (HF layout, lm_head tied to wte): 148 tensors, 124.4M elements."""
    d, vocab, ctx, layers = 768, 50257, 1024, 12
    s: Spec = [_g((vocab, d)), _g((ctx, d))]
    for _ in range(layers):
        s += [_g((d,)), _g((d,)),                      # ln_1 weight, bias
              _g((d, 3 * d)), _g((3 * d,)),            # attn.c_attn (Conv1D: in x out)
              _g((d, d)), _g((d,)),                    # attn.c_proj
              _g((d,)), _g((d,)),                      # ln_2
              _g((d, 4 * d)), _g((4 * d,)),            # mlp.c_fc
              _g((4 * d, d)), _g((d,))]                # mlp.c_proj
    s += [_g((d,)), _g((d,))]                          # ln_f
    return scaled(s, scale)


def _llama(vocab: int, d: int, kv: int, ffn: int, layers: int, tied: bool) -> Spec:
    s: Spec = [_g((vocab, d))]                          # embed_tokens
    for _ in range(layers):
        s += [_g((d, d)), _g((kv, d)), _g((kv, d)), _g((d, d)),   # q, k, v, o
              _g((ffn, d)), _g((ffn, d)), _g((d, ffn)),           # gate, up, down
              _g((d,)), _g((d,))]                                 # input / post-attn RMSNorm
    s.append(_g((d,)))                                            # final norm
    if not tied:
        s.append(_g((vocab, d)))                                  # lm_head
    return s


def llama32_1b(scale: float = 1.0) -> Spec:
    """Llama-3.2-1B (tied embedding): 146 tensors, 1.236B elements."""
    return scaled(_llama(128256, 2048, 512, 8192, 16, tied=True), scale)


def llama3_8b(scale: float = 1.0) -> Spec:
    """Llama-3-8B (separate lm_head): 291 tensors, 8.03B elements."""
    return scaled(_llama(128256, 4096, 1024, 14336, 32, tied=False), scale)


def resnet50(scale: float = 1.0) -> Spec:
    """ResNet-50 (torchvision layout): 161 tensors, 25.6M elements, most of them tiny.

    Conv weights are 4-D (group 0), batch-norm weights/biases 1-D (group 1); fc weight in
    group 0, fc bias in group 1.
    """
    s: Spec = [_g((64, 3, 7, 7)), _g((64,)), _g((64,))]           # stem conv + bn
    inplanes = 64
    for planes, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            s += [_g((planes, inplanes, 1, 1)), _g((planes,)), _g((planes,)),
                  _g((planes, planes, 3, 3)), _g((planes,)), _g((planes,)),
                  _g((planes * 4, planes, 1, 1)), _g((planes * 4,)), _g((planes * 4,))]
            if b == 0:                                            # downsample conv + bn
                s += [_g((planes * 4, inplanes, 1, 1)), _g((planes * 4,)), _g((planes * 4,))]
            inplanes = planes * 4
    s += [_g((1000, 2048)), _g((1000,))]                          # fc
    return scaled(s, scale)


def small_2000(scale: float = 1.0, seed: int = 0, count: int = 2000) -> Spec:
    """``count`` small tensors of 256..65536 elements (seeded, uniform element counts).

    Even positions are 2-D (rows x a width from a fixed list), odd ones 1-D, so both
    groups hold about half the tensors. Sizes are irregular on purpose (odd lengths).
    """
    rng = random.Random(seed)
    widths = (16, 32, 48, 64, 96, 128, 256)
    s: Spec = []
    for i in range(count):
        n = rng.randint(256, 65536)
        if i % 2 == 0:
            w = rng.choice(widths)
            s.append(_g((max(256 // w, n // w), w)))
        else:
            s.append(_g((n,)))
    return scaled(s, scale)


def huge_tensor(scale: float = 1.0) -> Spec:
    """One 1-D tensor of 2**31 + 1031 elements (int64 indexing; 4.3 GB in bf16; GPU only)."""
    return scaled([_g((2 ** 31 + 1031,))], scale)


# name -> (function, stated tensor count, GPU only)
SETS: Dict[str, Tuple[Callable[..., Spec], int, bool]] = {
    "gpt2-124M": (gpt2_124m, 148, False),
    "llama-3.2-1B": (llama32_1b, 146, False),
    "llama-3-8B": (llama3_8b, 291, False),
    "resnet50": (resnet50, 161, False),
    "small-2000": (small_2000, 2000, False),
    "huge-2^31": (huge_tensor, 1, True),
}
STATED_COUNTS = {k: v[1] for k, v in SETS.items()}


def get(name: str, scale: float = 1.0) -> Spec:
    """The set called ``name`` (a key of :data:`SETS`), scaled."""
    try:
        fn = SETS[name][0]
    except KeyError:
        raise ValueError(f"unknown gradient set {name!r}; one of {sorted(SETS)}") from None
    return fn(scale=scale)


def check_counts() -> Dict[str, int]:
    """Tensor count of every set at full size; raises if one differs from the stated one."""
    got = {name: len(fn()) for name, (fn, _, _) in SETS.items()}
    bad = {k: (got[k], STATED_COUNTS[k]) for k in got if got[k] != STATED_COUNTS[k]}
    if bad:
        raise AssertionError(f"tensor counts differ from the stated ones (got, stated): {bad}")
    return got


# --------------------------------------------------------------------------- sizes

def _prod(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def numel(specs: Spec) -> int:
    """Total element count of a set."""
    return sum(_prod(s) for s, _ in specs)


def nbytes(specs: Spec, dtype: torch.dtype) -> int:
    """Bytes of one copy of the set's gradients in ``dtype`` (one read moves this much)."""
    return numel(specs) * torch.empty((), dtype=dtype).element_size()


def num_groups(specs: Spec) -> int:
    return 1 + max((g for _, g in specs), default=0)


# --------------------------------------------------------------------------- tensors

def build(specs: Spec, device="cpu", dtype: torch.dtype = torch.float32, seed: int = 0,
          std: float = 1e-2, scale: float = 1.0) -> List[List[torch.Tensor]]:
    """Random gradient tensors for ``specs``, one list per group (normal, std ``std``).

    Data are drawn on ``device`` with a seeded generator, in float32 then cast (random,
    never zeros: zeros hide indexing bugs and can time faster than real data).
    """
    specs = scaled(specs, scale)
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    G = num_groups(specs)
    groups: List[List[torch.Tensor]] = [[] for _ in range(G)]
    for shape, g in specs:
        if dtype == torch.float32:
            t = torch.randn(shape, generator=gen, device=device, dtype=dtype).mul_(std)
        elif _prod(shape) > 2 ** 28:  # large low-precision tensors: fill in pieces
            t = torch.empty(shape, device=device, dtype=dtype)
            flat = t.view(-1)
            step = 2 ** 26
            for i in range(0, flat.numel(), step):
                n = min(step, flat.numel() - i)
                flat[i:i + n].copy_(torch.randn(n, generator=gen, device=device).mul_(std))
        else:
            t = torch.randn(shape, generator=gen, device=device).mul_(std).to(dtype)
        groups[g].append(t)
    return groups


def flat_order(specs: Spec, groups: List[List[torch.Tensor]]) -> List[torch.Tensor]:
    """The tensors of ``groups`` back in parameter order (as in ``specs``)."""
    it = [iter(g) for g in groups]
    return [next(it[g]) for _, g in specs]


def params_for(groups: List[List[torch.Tensor]], weights_too: bool = False
               ) -> List[List[torch.nn.Parameter]]:
    """Parameters whose ``.grad`` are the given tensors, one list per group.

    By default the parameter data are a zero-stride view of one element (no memory): enough
    for clipping and statistics, which read only ``.grad``. ``weights_too=True`` gives real
    parameter storage (for optimizer steps).
    """
    out = []
    for grads in groups:
        ps = []
        for g in grads:
            if weights_too:
                data = torch.randn(g.shape, device=g.device).mul_(0.02).to(g.dtype)
            else:
                data = torch.zeros((), device=g.device, dtype=g.dtype).expand(g.shape)
            p = torch.nn.Parameter(data, requires_grad=True)
            p.grad = g
            ps.append(p)
        out.append(ps)
    return out


def param_groups(params: List[List[torch.nn.Parameter]]) -> List[dict]:
    """Optimizer-style param-group dicts (``[{"params": [...]}, ...]``)."""
    return [{"params": ps} for ps in params]


def describe(name: str, specs: Spec, dtype: Optional[torch.dtype] = None) -> str:
    size = f"{numel(specs) / 1e6:.1f}M elements"
    if dtype is not None:
        size += f", {nbytes(specs, dtype) / 1e9:.3f} GB {str(dtype).replace('torch.', '')}"
    return f"{name}: {len(specs)} tensors, {size}"


if __name__ == "__main__":
    counts = check_counts()
    for name, (fn, stated, gpu_only) in SETS.items():
        sp = fn()
        print(f"{describe(name, sp, torch.bfloat16)} (stated: {stated})"
              + (" [GPU only]" if gpu_only else ""))
