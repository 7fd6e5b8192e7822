"""The gradient noise scale (McCandlish et al., 2018), measured where training already
has two batch sizes.

``B_simple = tr(Sigma) / |G|^2`` estimates the critical batch size: below it, larger
batches cut the number of optimizer steps nearly in proportion; above it, they mostly
waste examples. Everything here is opt-in: training without a tracker pays nothing.

* :func:`estimate` — the unbiased two-batch estimator (:mod:`~gradstats.noise_scale.estimate`);
* :class:`NoiseScaleTracker` — ``|G|^2`` and ``tr(Sigma)`` smoothed separately on the
  device, with ``state_dict`` (:mod:`~gradstats.noise_scale.tracker`);
* gradient accumulation: :meth:`NoiseScaleTracker.attach` to a
  :class:`gradstats.StableOptimizer` and :meth:`NoiseScaleTracker.observe_micro_batch`
  after the first micro-batch (:mod:`~gradstats.noise_scale.binding`);
* DDP: :func:`register_ddp_noise_hook` / :func:`ddp_comm_hook`
  (:mod:`~gradstats.noise_scale.ddp`).

The per-step values go into ``StepRecord.info`` (:data:`FIELD_NAMES`) for the stats log;
``gradstats report`` plots ``B_simple`` and turns it into advice. See docs/noise_scale.md.
"""
from .binding import LOSS_REDUCTIONS, OptimizerBinding, reduction_scales
from .ddp import NoiseScaleDDPState, ddp_comm_hook, register_ddp_noise_hook
from .estimate import NoiseScaleEstimate, check_batch_sizes, estimate
from .tracker import FIELD_NAMES, NoiseScaleTracker

__all__ = ["FIELD_NAMES", "LOSS_REDUCTIONS", "NoiseScaleDDPState", "NoiseScaleEstimate",
           "NoiseScaleTracker", "OptimizerBinding", "check_batch_sizes", "ddp_comm_hook",
           "estimate", "reduction_scales", "register_ddp_noise_hook"]
