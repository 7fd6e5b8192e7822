"""The noise-scale section of ``gradstats report``: the curve, its band, the advice."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

import gradstats
from gradstats.noise_scale import NoiseScaleTracker
from gradstats.report.build import build_report
from gradstats.report.noise import (advice, noise_series, rolling_b_simple, summarize)
from gradstats.telemetry.format import header_record

torch.set_num_threads(1)


def _simulated_log(path, b_true_fn, steps=600, bs=32, bb=256, d=128, seed=0, skip_every=0):
    """A stats log with the tracker's fields, from the synthetic oracle g_i = G + xi_i
    (|G|^2 = 1, tr(Sigma) = b_true_fn(step)), written as telemetry would write it."""
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(d, generator=g, dtype=torch.float64)
    G /= G.norm()
    tr = NoiseScaleTracker(alpha=0.99)
    with open(path, "w") as f:
        f.write(json.dumps(header_record(
            norm_type=2.0, groups=["group0"], params=["w"], param_group=[0], flush_every=64,
            device="cpu", optimizer="SGD", policy=None, spike=None,
            meta={"run": os.path.basename(path)})) + "\n")
        for step in range(1, steps + 1):
            sd = math.sqrt(b_true_fn(step) / d)
            xi = torch.randn(bb, d, generator=g, dtype=torch.float64) * sd
            small, big = G + xi[:bs].mean(0), G + xi.mean(0)
            skipped = bool(skip_every and step % skip_every == 0)
            tr.update(small.pow(2).sum(), big.pow(2).sum(), bs, bb,
                      valid=torch.tensor(not skipped))
            rec = {"type": "step", "step": step, "loss": 1.0, "total_norm": float(big.norm()),
                   "skipped": skipped, "skip_reason": "spike" if skipped else None,
                   "nonfinite": False, "norm": [float(big.norm())], "clip_coef": [1.0],
                   "clipped": [False]}
            rec.update({k: float(v) for k, v in tr.fields().items()})
            f.write(json.dumps(rec) + "\n")
    return path


def test_section_below_noise_scale_with_growth(tmp_path):
    # noise scale grows from 500 to 2,000 during training; batch 256
    log = _simulated_log(str(tmp_path / "grow.jsonl"),
                         lambda s: 500.0 if s <= 300 else 2000.0, skip_every=50)
    rep = build_report([log], str(tmp_path / "out"))
    md = open(rep.markdown).read()
    assert "## Gradient noise scale" in md
    png = str(tmp_path / "out" / "grow_noise.png")
    assert png in rep.plots and os.path.getsize(png) > 10_000
    assert "grow_noise.png" in md
    assert "The batch of 256 is ~" in md and "below the noise scale" in md
    assert "grew ~" in md                     # early ~500 -> late ~2,000
    assert "Assumptions" in md and "learning rate is re-tuned" in md
    # the final estimate is close to the truth and its band contains it
    s = noise_series([json.loads(x) for x in open(log)][1:])
    summ = summarize("grow", s, 100)
    assert abs(summ.b_simple - 2000) / 2000 < 0.25
    assert summ.lower < 2000 < summ.upper
    assert summ.batch == 256


def test_section_above_noise_scale(tmp_path):
    log = _simulated_log(str(tmp_path / "small.jsonl"), lambda s: 40.0, steps=300)
    rep = build_report([log], str(tmp_path / "out"), plots=False)
    md = open(rep.markdown).read()
    assert "above the noise scale" in md and "less compute" in md
    assert rep.plots == [] or all("noise" not in p for p in rep.plots)


def test_rolling_band_covers_truth_and_tracks_change(tmp_path):
    log = _simulated_log(str(tmp_path / "r.jsonl"), lambda s: 300.0 if s <= 400 else 1200.0,
                         steps=800)
    s = noise_series([json.loads(x) for x in open(log)][1:])
    B, lo, hi = rolling_b_simple(s, 100)
    assert np.all(np.isnan(B[:49]))          # too few steps in the window
    early, late = slice(150, 400), slice(550, 800)
    assert abs(np.median(B[early]) - 300) / 300 < 0.2
    assert abs(np.median(B[late]) - 1200) / 1200 < 0.25
    cover = np.mean((lo[early] <= 300) & (300 <= hi[early]))
    assert cover > 0.7                         # a ±2 s.e. band mostly covers the truth
    assert np.all(lo[np.isfinite(lo)] >= 0)


def test_advice_words():
    a = advice(2000.0, 1500.0, 2600.0, 256.0)
    assert a.startswith("The batch of 256 is ~7.8x below the noise scale (~2,000")
    assert "fewer steps" in a
    b = advice(300.0, 250.0, 350.0, 256.0)
    assert "close to the noise scale" in b
    c = advice(20.0, 15.0, 25.0, 1024.0)
    assert "~51x above the noise scale" in c
    assert "not be resolved" in advice(math.nan, math.nan, math.nan, 256.0)
    assert "not logged" in advice(100.0, 50.0, 150.0, math.nan)


def test_no_section_without_noise_fields(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    path = str(tmp_path / "plain.jsonl")
    opt = gradstats.StableOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), log=path)
    for _ in range(5):
        model(torch.randn(8, 4)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    opt.log.close()
    rep = build_report([path], str(tmp_path / "out"), plots=False)
    assert "noise scale" not in open(rep.markdown).read()


def test_end_to_end_through_telemetry(tmp_path):
    """Tracker + StableOptimizer(log=...): the fields reach the log once telemetry writes
    ``StepRecord.info`` (skipped until it does)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 1)
    path = str(tmp_path / "run.jsonl")
    opt = gradstats.StableOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), log=path)
    tr = NoiseScaleTracker()
    tr.attach(opt, batch_size=32)
    for _ in range(120):
        for i in range(4):
            x = torch.randn(8, 16)
            (0.5 * (model(x).squeeze(-1) - x.sum(1)).pow(2).mean() / 4).backward()
            if i == 0:
                tr.observe_micro_batch(8)
        opt.step()
        opt.zero_grad()
    assert "noise_b_simple" in opt.last_stats.info
    opt.log.close()
    recs = gradstats.telemetry.read_log(path).records
    if "noise_g2" not in recs[-1]:
        pytest.skip("telemetry does not write StepRecord.info entries yet")
    rep = build_report([path], str(tmp_path / "out"))
    assert "## Gradient noise scale" in open(rep.markdown).read()
