"""The noise scale under DDP, measured inside the gradient communication hook.

Each rank's local gradient (the mean over its ``b_local`` examples) is the small batch;
the all-reduced gradient (the mean over ``world * b_local`` examples), which the
optimizer's statistics pass reads anyway, is the big one. :func:`ddp_comm_hook` wraps a
communication hook (default: torch's ``allreduce_hook``): before handing each bucket to it,
it adds the squared norm of the bucket's flat buffer (``bucket.buffer()``, the rank's
local gradients, not yet reduced) into a device scalar — one read of the bucket while it
is hot, overlapped with the rest of the backward pass, and no pass over the parameters.
After the last bucket of the iteration the scalar is averaged across ranks with **one
asynchronous all-reduce of one float** (issued on the same process group, after the last
bucket's own all-reduce) and handed to the tracker, which waits for it only when the
optimizer step combines it with the big batch (on NCCL a stream dependency, not a host
synchronisation). Averaging the ranks' local squared norms keeps the estimator unbiased
(each has expectation ``|G|^2 + tr(Sigma)/b_local``) and divides its variance by about
the number of ranks; ``average_ranks=False`` skips the collective and uses the rank's own
local norm (no communication at all; each rank then has its own estimate).

Assumes every rank processes the same number of examples per step (``b_local``) and
that the wrapped hook averages (DDP's default). ``no_sync()`` micro-batches are fine: the
hook runs on the synchronising backward, when the local gradient holds all the rank's
micro-batches (then ``b_local`` counts them all).

Usage::

    ddp = DDP(model)
    opt = gradstats.StableOptimizer(torch.optim.AdamW(ddp.parameters()))
    tracker = gradstats.noise_scale.NoiseScaleTracker()
    tracker.attach(opt)                                   # big batch: the step's norm
    gradstats.noise_scale.register_ddp_noise_hook(ddp, tracker, local_batch_size=32)
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .estimate import TensorOrNumber

__all__ = ["NoiseScaleDDPState", "ddp_comm_hook", "register_ddp_noise_hook"]

_F32 = torch.float32


def _default_hook() -> Callable:
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    return allreduce_hook


class NoiseScaleDDPState:
    """State of :func:`ddp_comm_hook` (pass it to ``ddp.register_comm_hook``).

    Args:
        tracker: the :class:`~gradstats.noise_scale.NoiseScaleTracker` to feed (attach it
            to the :class:`gradstats.StableOptimizer` too: that gives the big batch).
        local_batch_size: examples each rank backpropagates per optimizer step.
        process_group: DDP's process group (default: the default group).
        hook: the communication hook to wrap, ``hook(hook_state, bucket) -> Future``;
            default: ``torch.distributed.algorithms.ddp_comm_hooks.default_hooks.allreduce_hook``.
            Hooks that compress (``fp16_compress_hook``, ...) work too: the norm is taken
            before them. The hook must average across ranks like the default one.
        hook_state: the wrapped hook's state (default: ``process_group``).
        average_ranks: average the local squared norms across ranks (one all-reduce of
            one float per step). ``False``: use this rank's own (no communication).
        loss_reduction: ``"mean"`` (each rank's loss is the mean over its examples) or
            ``"sum"``.

    Attributes:
        counters: host counts: ``buckets`` seen, ``steps`` (last buckets) and
            ``collectives`` this hook issued besides the wrapped hook's.

    Raises:
        ValueError: fewer than 2 ranks, invalid ``local_batch_size`` or
            ``loss_reduction``.
    """

    def __init__(self, tracker: Any, local_batch_size: TensorOrNumber, *,
                 process_group: Any = None, hook: Optional[Callable] = None,
                 hook_state: Any = None, average_ranks: bool = True,
                 loss_reduction: str = "mean") -> None:
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum' under DDP, got "
                             f"{loss_reduction!r}")
        if not callable(getattr(tracker, "observe_small", None)):
            raise TypeError(f"tracker must be a NoiseScaleTracker, got {type(tracker).__name__}")
        self.tracker = tracker
        self.process_group = process_group
        world = dist.get_world_size(process_group)
        if world < 2:
            raise ValueError(f"the DDP noise scale needs at least 2 ranks (the local and the "
                             f"all-reduced gradient must differ in size), got world size {world}")
        self.world_size = world
        self.hook = hook if hook is not None else _default_hook()
        if not callable(self.hook):
            raise TypeError(f"hook must be callable, got {type(self.hook).__name__}")
        self.hook_state = process_group if hook_state is None else hook_state
        self.average_ranks = bool(average_ranks)
        self.loss_reduction = loss_reduction
        self.local_batch_size: TensorOrNumber = 0
        self.set_batch_size(local_batch_size)
        self._acc: Optional[Tensor] = None
        self.counters: Dict[str, int] = {"buckets": 0, "steps": 0, "collectives": 0}

    def set_batch_size(self, local_batch_size: TensorOrNumber) -> None:
        """Change the examples per rank per step (e.g. a smaller last batch).

        Raises:
            ValueError: not a positive number.
        """
        b = local_batch_size
        if isinstance(b, Tensor):
            if b.numel() != 1:
                raise ValueError(f"local_batch_size must be one number, got shape "
                                 f"{tuple(b.shape)}")
            if self.loss_reduction == "sum":
                raise ValueError("loss_reduction='sum' needs a number local_batch_size")
        elif isinstance(b, bool) or not isinstance(b, (int, float)) or not b > 0:
            raise ValueError(f"local_batch_size must be a positive number of examples, "
                             f"got {b!r}")
        self.local_batch_size = b

    # ------------------------------------------------------------------ per bucket
    def add_bucket(self, buf: Tensor) -> None:
        """Add the squared norm of one bucket's local gradients (device op, no sync)."""
        acc = self._acc
        if acc is None or acc.device != buf.device:
            acc = self._acc = torch.zeros((), dtype=_F32, device=buf.device)
        n = torch.linalg.vector_norm(buf, dtype=_F32)
        acc.addcmul_(n, n)
        self.counters["buckets"] += 1

    def finish_step(self) -> None:
        """After the last bucket: average across ranks (asynchronously) and hand the
        local squared norm to the tracker as the step's small batch."""
        local, self._acc = self._acc, None
        if local is None:
            return
        self.counters["steps"] += 1
        b = self.local_batch_size
        world = self.world_size
        work = None
        if self.average_ranks:
            work = dist.all_reduce(local, group=self.process_group, async_op=True)
            self.counters["collectives"] += 1
        # "sum": both gradients are sums over b examples per rank -> divide by b^2
        inv_b2 = 1.0 / (float(b) * float(b)) if self.loss_reduction == "sum" else 1.0

        def small() -> Tensor:
            if work is not None:
                work.wait()  # NCCL: the current stream waits; no host sync
            v = local / world if work is not None else local
            return v * inv_b2 if inv_b2 != 1.0 else v

        self.tracker.observe_small(small, b, b * world, big_scale=inv_b2)


def ddp_comm_hook(state: NoiseScaleDDPState, bucket):  # no annotations: DDP checks them
    """DDP communication hook: measure the bucket's local squared norm, then run the
    wrapped hook (default: all-reduce and average).

    Register with ``ddp.register_comm_hook(state, ddp_comm_hook)`` (or use
    :func:`register_ddp_noise_hook`).

    Args:
        state: a :class:`NoiseScaleDDPState`.
        bucket: the ``torch.distributed.GradBucket`` DDP hands the hook.

    Returns:
        the wrapped hook's future.
    """
    state.add_bucket(bucket.buffer())
    fut = state.hook(state.hook_state, bucket)
    if bucket.is_last():
        state.finish_step()
    return fut


def register_ddp_noise_hook(ddp_model: Any, tracker: Any, local_batch_size: TensorOrNumber,
                            **kwargs: Any) -> NoiseScaleDDPState:
    """Measure the noise scale of a DDP model in its communication hook.

    Builds a :class:`NoiseScaleDDPState` (``kwargs``: its keyword arguments; the process
    group defaults to the model's) and registers :func:`ddp_comm_hook`. DDP accepts one
    communication hook per model: to keep another one, pass it as ``hook=``.

    Args:
        ddp_model: a ``torch.nn.parallel.DistributedDataParallel`` model.
        tracker: the :class:`~gradstats.noise_scale.NoiseScaleTracker`, attached to the
            model's :class:`gradstats.StableOptimizer` (:meth:`NoiseScaleTracker.attach`).
        local_batch_size: examples per rank per optimizer step.

    Returns:
        the hook state (``set_batch_size``, ``counters``).

    Raises:
        TypeError: ``ddp_model`` has no ``register_comm_hook``.
        ValueError: as :class:`NoiseScaleDDPState`.

    Example::

        >>> tracker = gradstats.noise_scale.NoiseScaleTracker()
        >>> tracker.attach(opt)
        >>> gradstats.noise_scale.register_ddp_noise_hook(ddp, tracker, local_batch_size=32)
    """
    if not callable(getattr(ddp_model, "register_comm_hook", None)):
        raise TypeError(f"ddp_model must be a DistributedDataParallel model, got "
                        f"{type(ddp_model).__name__}")
    kwargs.setdefault("process_group", getattr(ddp_model, "process_group", None))
    state = NoiseScaleDDPState(tracker, local_batch_size, **kwargs)
    ddp_model.register_comm_hook(state, ddp_comm_hook)
    return state
