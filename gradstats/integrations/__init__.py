"""Training-framework integrations.

* :mod:`gradstats.integrations.huggingface`: ``GradStatsCallback`` for the transformers
  ``Trainer``.
* :mod:`gradstats.integrations.lightning`: ``GradStatsCallback`` for Lightning.
* :mod:`gradstats.integrations.common`: the shared, framework-free parts (log keys,
  double-clipping warning).

Nothing here is imported by ``import gradstats``; each framework module imports its
framework only when it is itself imported. See also :func:`gradstats.patch_torch`, which
makes any framework that clips through ``torch.nn.utils`` use gradstats.
"""
