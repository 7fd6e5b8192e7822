"""gradstats: fused gradient statistics and clipping for stable PyTorch training.

Importing this package needs neither a GPU, nor triton, nor the compiled extension:
backends that cannot run say why (``python -m gradstats info``).
"""
from .backends.registry import BackendUnavailableError
from .clip import clip_grad_norm_, clip_grad_value_, clip_grads_with_norm_, get_total_norm
from .core.stats import GradStats, grad_stats
from . import noise_scale, policies
from .optim import StableOptimizer
from .patch import TorchPatch, patch_torch
from . import optim_extras, presets, sweep  # sweep: callable as gradstats.sweep(...)
from .version import __version__

__all__ = [
    "BackendUnavailableError",
    "GradStats",
    "StableOptimizer",
    "TorchPatch",
    "clip_grad_norm_",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "get_total_norm",
    "grad_stats",
    "noise_scale",
    "patch_torch",
    "optim_extras",
    "policies",
    "presets",
    "sweep",
    "__version__",
]
