"""Build script. Metadata lives in pyproject.toml; this file only adds the C++/CUDA extension.

Environment:
    GRADSTATS_NO_EXT=1       install pure Python (no compiled extension).
    GRADSTATS_BUILD_CUDA=0/1 force the CUDA part off/on (default: on when torch has CUDA
                             and nvcc is found).
A failed extension build never fails the install: ``import gradstats`` then reports the
native backend as unavailable, with the reason.
"""
import os
import sys

from setuptools import setup


def _ext_modules():
    if os.environ.get("GRADSTATS_NO_EXT") == "1" or not os.path.isdir("csrc"):
        return [], {}
    try:
        from csrc_build import extension  # noqa: F401  (provided by the native-kernels work)
    except Exception:
        return [], {}
    return extension()


ext_modules, cmdclass = _ext_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
