"""Importing works without triton / the extension / a GPU; the CLI reports why."""
import os
import subprocess
import sys

import pytest

CODE = r"""
import sys
sys.modules["triton"] = None          # import triton -> ImportError
sys.modules["gradstats._C"] = None    # no compiled extension
import torch, gradstats
from gradstats.backends import registry as _dispatch
p = torch.nn.Parameter(torch.ones(3)); p.grad = torch.full((3,), 2.0)
st = gradstats.grad_stats([p])
assert abs(float(st.norm[0]) - 12 ** 0.5) < 1e-6
assert _dispatch.unavailable_reason("triton") is not None
assert _dispatch.unavailable_reason("native") is not None
try:
    gradstats.grad_stats([p], backend="triton")
except gradstats.BackendUnavailableError as e:
    assert "unavailable because" in str(e) and "triton" in str(e), e
else:
    raise SystemExit("forced triton did not raise")
print("OK")
"""


def _run(args, **kw):
    env = dict(os.environ)
    env.pop("GRADSTATS_BACKEND", None)
    env.update(kw.pop("env", {}))
    return subprocess.run([sys.executable] + args, capture_output=True, text=True, timeout=120,
                          env=env, **kw)


def test_import_without_triton_and_extension():
    r = _run(["-c", CODE])
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr


def test_cli_info():
    r = _run(["-m", "gradstats", "info"])
    assert r.returncode == 0, r.stderr
    assert "torch" in r.stdout and "backends:" in r.stdout
    for name in ("triton", "native", "torch"):
        assert f"  {name}" in r.stdout


def test_env_backend_bad_value():
    r = _run(["-c", "import torch, gradstats; p=torch.nn.Parameter(torch.ones(2)); "
                    "p.grad=torch.ones(2); gradstats.grad_stats([p])"],
             env={"GRADSTATS_BACKEND": "bogus"})
    assert r.returncode != 0 and "GRADSTATS_BACKEND must be one of" in r.stderr


@pytest.mark.parametrize("mod", [["-m", "gradstats", "demo", "--steps", "5"]])
def test_cli_demo_runs(mod, tmp_path):
    r = _run(mod + ["--out", str(tmp_path)], cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
