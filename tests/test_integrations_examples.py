"""The integration examples run end to end (CPU, no downloads) and show all three ways in."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, *args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", script), *args],
                       capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def _losses(out, tag):
    line = next(x for x in out.splitlines() if x.startswith(tag))
    return line.split(":", 1)[1].strip()


def test_hf_trainer_example():
    out = _run("hf_trainer.py", "--steps", "10")
    # patch_torch() + Trainer clipping at 1.0 and StableOptimizer(max_norm=1.0) with the
    # Trainer's clipping off are the same computation
    assert _losses(out, "1. patch_torch()") == _losses(out, "2. StableOptimizer")
    assert "gradstats/total_norm" in out and "'steps': 10" in out


def test_lightning_example():
    out = _run("lightning_train.py", "--steps", "20")
    a = float(_losses(out, "1. patch_torch()"))
    b = float(_losses(out, "2. StableOptimizer"))
    assert b == pytest.approx(a, rel=1e-5)
    assert "gradstats/clip_coef/decay" in out and "2 rows with gradstats/total_norm" in out
