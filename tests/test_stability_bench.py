"""The stability benchmark's --quick slice (benchmarks/stability/run.py) and its
update-level arm (StableAdamW)."""
import copy
import importlib.util
import json
import os
import sys

import pytest
import torch

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


def test_stable_adamw_update_clipping():
    sa = _load("stable_adamw")
    torch.manual_seed(0)
    m1 = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    m2, m3 = copy.deepcopy(m1), copy.deepcopy(m1)
    o1 = torch.optim.AdamW(m1.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    o2 = sa.StableAdamW(m2.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1,
                        clip=False)
    o3 = sa.StableAdamW(m3.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    moved = {}
    for i in range(30):
        x = torch.randn(32, 8)
        for k, (m, o) in enumerate(((m1, o1), (m2, o2), (m3, o3))):
            before = [p.detach().clone() for p in m.parameters()]
            loss = m(x).pow(2).mean() * (1000.0 if i == 20 else 1.0)
            loss.backward()
            o.step()
            o.zero_grad()
            if i == 20:
                moved[k] = max((p - b).abs().max().item() for p, b in zip(m.parameters(),
                                                                            before))
    # without clipping it is AdamW; with it, the step after a 1000x jump is much smaller
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert moved[2] < 0.35 * moved[0]
