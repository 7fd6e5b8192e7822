"""A process that used every backend exits cleanly (exit code 0, no fatal signal).

On the first GPU host, scripts that had used the native CUDA backend finished their work
and then died at interpreter exit with SIGSEGV (rc 139): the CUDA plan cache was a static
object destroyed after torch's CUDA allocators (csrc/cuda/stats_cuda.cu, PlanCache). The
child below uses the torch, native and Triton backends (Triton under its interpreter on
CPU), reallocates its gradients between calls (new plans, more than the cache holds) and
clips, on CUDA when there is a GPU, else on the CPU; run with -X faulthandler so that a
crash at exit prints where it happened.
"""
import os
import subprocess
import sys

import torch

_CHILD = r"""
import os
import torch
import gradstats
from gradstats.backends import registry

dev = "cuda" if torch.cuda.is_available() else "cpu"
names = [n for n in ("torch", "native", "triton") if registry.unavailable_reason(n) is None]
g = torch.Generator().manual_seed(0)
used = []
for name in names:
    os.environ["GRADSTATS_BACKEND"] = name
    for step in range(12):  # 12 structures: more than the CUDA plan cache keeps (8)
        ps = [torch.nn.Parameter(torch.zeros(n + step, device=dev)) for n in (300, 70, 5)]
        for _ in range(2):  # set_to_none + backward: same structure, new addresses
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g).to(dev)
            st = gradstats.grad_stats(ps, per_tensor=True, backend=name)
            total = gradstats.clip_grad_norm_(ps, 0.1)  # clips: the scale path
        assert bool(torch.isfinite(st.total_norm)) and float(total) > 0
    used.append(name)
if dev == "cuda":
    torch.cuda.synchronize()
print("used", " ".join(used), "on", dev, flush=True)
"""


def test_exit_is_clean_after_every_backend():
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    env.pop("GRADSTATS_BACKEND", None)
    out = subprocess.run([sys.executable, "-X", "faulthandler", "-c", _CHILD], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.returncode, out.stdout[-2000:], out.stderr[-4000:])
    assert "Fatal Python error" not in out.stderr
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("used")][-1]
    assert "torch" in line and "native" in line, line
