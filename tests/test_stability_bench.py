"""The stability benchmark's --quick slice (benchmarks/stability/run.py) and its
experimental SpikeSkip variant."""
import importlib.util
import json
import os
import sys

import pytest
import torch

from gradstats.policies import SpikeSkip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks", "stability")

pytestmark = pytest.mark.usefixtures("one_thread")


def _load(name):
    if BENCH not in sys.path:
        sys.path.insert(0, BENCH)
    spec = importlib.util.spec_from_file_location(f"stability_{name}",
                                                  os.path.join(BENCH, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quick_slice(tmp_path):
    bench = _load("run")
    out = str(tmp_path / "stab")
    v = bench.run(out, quick=True, workers=1, progress=False)
    data = json.load(open(os.path.join(out, "sweep.json")))
    rows = data["runs"]
    assert len(rows) == 18 and all(r["status"] in ("ok", "stopped") for r in rows)
    nan = {r["config"]: [] for r in rows}
    for r in rows:
        if r["task"] == "nan-batch":
            nan[r["config"]].append(r)
    # the NaN batch (step 30) kills both torch arms and is skipped by the preset
    assert all(r["diverged"] for r in nan["torch-clip"] + nan["none"])
    assert all(not r["diverged"] and r["skipped_nonfinite"] == 1 for r in nan["recommended"])
    text = open(v).read()
    assert "## spike" in text and "## nan-batch" in text and "`recommended`" in text
    md = open(os.path.join(out, "report", "report.md")).read()
    assert "### Task `spike`" in md and "### Task `nan-batch`" in md
    assert os.path.exists(os.path.join(out, "report", "sweep_spike.png"))


def test_clamped_spike_record_catches_repeated_spikes():
    """SpikeSkip records a skipped outlier raw, which hides a second one in the window;
    the experimental variant records it at the threshold."""
    exp = _load("spike_clamped")
    from gradstats import StableOptimizer
    counts = {}
    for name, pol in (("raw", SpikeSkip(window=64, warmup=8, k=6.0)),
                      ("clamped", exp.SpikeSkipClamped(window=64, warmup=8, k=6.0))):
        torch.manual_seed(0)
        m = torch.nn.Linear(16, 4)
        opt = StableOptimizer(torch.optim.SGD(m.parameters(), lr=1e-3), spike=pol)
        g = torch.Generator().manual_seed(0)
        for s in range(1, 41):
            m(torch.randn(32, 16, generator=g)).pow(2).mean().backward()
            if s in (15, 25):
                for p in m.parameters():
                    p.grad.mul_(100.0 if s == 15 else 30.0)
            opt.step()
            opt.zero_grad()
        counts[name] = opt.summary()["skipped_by_reason"]["spike"]
    assert counts == {"raw": 1, "clamped": 2}
