"""Statistics backends: torch (foreach, any device), triton (fused GPU kernels), native (csrc).

See :mod:`gradstats.backends.base` for the contract each one implements.
"""
