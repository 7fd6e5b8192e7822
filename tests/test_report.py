"""Diagnosis report: injected faults are found at the right step and tensor, clean runs are
clean, seeds are compared, broken logs are still reported."""
import math
import os

import numpy as np
import pytest
import torch

import gradstats
from gradstats import report
from gradstats.telemetry import FORMAT_NAME, FORMAT_VERSION, JSONLWriter, read_log


pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 16),
                               torch.nn.Tanh(), torch.nn.Linear(16, 1))


def train_log(path, *, seed=0, steps=100, nan_step=None, nan_param=None, spike_step=None,
              lr=5e-3, max_norm=5.0, stable=True, data_seed=0):
    """A small regression run; returns the log path. ``nan_param`` is a parameter name."""
    m = _mlp(seed)
    named = dict(m.named_parameters())
    if stable:
        opt = gradstats.StableOptimizer(torch.optim.Adam(m.parameters(), lr=lr),
                                        max_norm=max_norm, param_names=m.named_parameters(),
                                        log=str(path), spike=gradstats.policies.SpikeSkip(
                                            window=32, warmup=16))
        opt.log.meta["run"] = f"seed{seed}"
    else:
        opt = torch.optim.Adam(m.parameters(), lr=lr)
        lg = gradstats.telemetry.StatsLogger(str(path), groups=opt.param_groups,
                                             param_names=m.named_parameters(),
                                             meta={"run": f"plain{seed}"})
    g = torch.Generator().manual_seed(data_seed)
    w = torch.randn(8, 1, generator=g)
    for s in range(1, steps + 1):
        x = torch.randn(32, 8, generator=g)
        y = torch.tanh(x @ w) + 0.05 * torch.randn(32, 1, generator=g)
        loss = torch.nn.functional.mse_loss(m(x), y)
        loss.backward()
        if s == nan_step:
            named[nan_param].grad.view(-1)[-1] = float("nan")
        if s == spike_step:
            for p in m.parameters():
                p.grad.mul_(1000.0)
        if stable:
            opt.step(loss=loss)
        else:
            st = gradstats.grad_stats(opt.param_groups, per_tensor=True)
            total = torch.nn.utils.clip_grad_norm_(m.parameters(), max_norm)
            lg.log_stats(st, loss=loss.detach(),
                         clip_coef=torch.clamp(max_norm / (total + 1e-6), max=1.0))
            opt.step()
        opt.zero_grad()
    (opt.log if stable else lg).close()
    return str(path)


def _kinds(findings):
    return [f.kind for f in findings]


def test_nan_injected_into_named_parameter_is_located(tmp_path):
    log = train_log(tmp_path / "nan.jsonl", nan_step=37, nan_param="2.weight")
    rep = report.build_report([log], str(tmp_path / "out"))
    fs = rep.findings["seed0"]
    nf = [f for f in fs if f.kind == "nonfinite"]
    assert len(nf) == 1
    f = nf[0]
    assert f.steps == [37] and f.tensors == ["2.weight"] and f.groups == ["group0"]
    assert "step 37" in f.text and "`2.weight`" in f.text and "backward pass" in f.text
    assert f.severity == "warning" and "skipped" in f.text  # StableOptimizer skipped it
    md = open(rep.markdown).read()
    assert "Non-finite values first at step 37" in md and "`2.weight`" in md
    assert os.path.getsize(rep.plots[0]) > 20_000


def test_nan_applied_by_plain_loop_is_a_divergence(tmp_path):
    log = train_log(tmp_path / "plain.jsonl", nan_step=30, nan_param="4.bias", stable=False,
                    steps=60)
    fs = report.analyze(read_log(log))
    nf = [f for f in fs if f.kind == "nonfinite"][0]
    assert nf.severity == "problem" and nf.steps[0] == 30 and nf.tensors == ["4.bias"]
    assert "not** skipped" in nf.text and "diverged at step 30" in nf.text


def test_spike_is_reported_at_its_step(tmp_path):
    log = train_log(tmp_path / "spike.jsonl", spike_step=64)
    fs = report.analyze(read_log(log))
    sp = [f for f in fs if f.kind == "grad_spike"]
    assert len(sp) == 1 and sp[0].steps == [64], [(f.kind, f.steps) for f in fs]
    assert "step 64" in sp[0].text and "skipped (spike)" in sp[0].text
    assert "nonfinite" not in _kinds(fs)
    # the same spike in a plain clip_grad_norm_ loop: clipped, not skipped
    log2 = train_log(tmp_path / "spike_plain.jsonl", spike_step=64, stable=False)
    sp2 = [f for f in report.analyze(read_log(log2)) if f.kind == "grad_spike"]
    assert sp2 and sp2[0].steps == [64] and "clipped (coefficient" in sp2[0].text


def test_clean_run_is_reported_clean(tmp_path):
    log = train_log(tmp_path / "clean.jsonl", steps=150)
    rep = report.build_report([log], str(tmp_path / "out"))
    fs = rep.findings["seed0"]
    assert _kinds(fs) == ["clean"], [(f.kind, f.title) for f in fs]
    assert "No instability signals" in open(rep.markdown).read()


def test_several_seeds_give_the_spread(tmp_path):
    logs = [train_log(tmp_path / f"s{s}.jsonl", seed=s, steps=60) for s in range(3)]
    rep = report.build_report(logs, str(tmp_path / "out"))
    assert "all runs" in rep.findings
    seeds = rep.findings["all runs"]
    assert len(seeds) == 1 and seeds[0].kind == "seed_spread"
    assert all(f"`seed{s}`" in seeds[0].text for s in range(3))
    names = {os.path.basename(p) for p in rep.plots}
    assert {"seeds_spread.png", "runs_loss.png"} <= names
    assert os.path.getsize(os.path.join(rep.out_dir, "seeds_spread.png")) > 20_000
    md = open(rep.markdown).read()
    assert "### all runs" in md and "seeds_spread.png" in md


# ------------------------------------------------------------------ synthetic logs
def write_log(path, norms, losses=None, *, clipped=None, coef=None, label="synthetic",
              groups=("g",)):
    """A log written record by record (norms: [N] or [N, G])."""
    norms = np.asarray(norms, dtype=float)
    if norms.ndim == 1:
        norms = norms[:, None]
    w = JSONLWriter(str(path))
    w.write({"type": "header", "format": FORMAT_NAME, "version": FORMAT_VERSION,
             "groups": list(groups), "params": ["w"], "param_group": [0], "norm_type": 2.0,
             "meta": {"run": label}})
    for i, nv in enumerate(norms):
        total = float(np.sqrt(np.sum(nv ** 2)))
        rec = {"type": "step", "step": i + 1, "total_norm": total, "norm": [float(v) for v in nv],
               "loss": None if losses is None else float(losses[i]),
               "skipped": False, "skip_reason": None,
               "nonfinite": not math.isfinite(total) or (losses is not None and
                                                         not math.isfinite(losses[i])),
               "nonfinite_count": [0 if math.isfinite(v) else 1 for v in nv]}
        if clipped is not None:
            rec["clipped"] = [bool(clipped[i])] * len(nv)
            rec["clip_coef"] = [float(coef[i])] * len(nv)
        w.write(rec)
    w.write({"type": "end", "steps": len(norms)})
    w.close()
    return str(path)


def test_frequent_clipping_is_flagged(tmp_path):
    rng = np.random.default_rng(0)
    norms = 3.0 * np.exp(0.1 * rng.standard_normal(200))
    coef = np.minimum(1.0, 1.0 / norms)
    path = write_log(tmp_path / "clip.jsonl", norms, 1 + 0.01 * rng.standard_normal(200),
                     clipped=norms > 1.0, coef=coef)
    fs = report.analyze(read_log(path))
    cr = [f for f in fs if f.kind == "clip_rate"]
    assert cr and cr[0].severity == "warning"
    assert "100%" in cr[0].text and "too low" in cr[0].text and "learning rate" in cr[0].text


def test_vanishing_gradients_are_flagged(tmp_path):
    steps = np.arange(300)
    norms = np.stack([np.exp(-steps / 20.0) + 1e-9, np.full(300, 0.5)], axis=1)
    norms[:, 1] *= np.exp(0.05 * np.random.default_rng(1).standard_normal(300))
    path = write_log(tmp_path / "van.jsonl", norms, np.full(300, 0.7), groups=("deep", "top"))
    fs = report.analyze(read_log(path))
    van = [f for f in fs if f.kind == "vanishing"]
    assert len(van) == 1 and van[0].groups == ["deep"], [(f.kind, f.title) for f in fs]
    assert "collapsed" in van[0].title


def test_variance_rising_before_divergence(tmp_path):
    rng = np.random.default_rng(2)
    n = 240
    sigma = np.where(np.arange(n) < 150, 0.05, 0.05 * np.exp((np.arange(n) - 150) / 25.0))
    norms = np.exp(sigma * rng.standard_normal(n))
    losses = 1.0 + 0.01 * rng.standard_normal(n)
    norms[220:] = np.nan
    losses[220:] = np.nan
    path = write_log(tmp_path / "var.jsonl", norms, losses)
    fs = report.analyze(read_log(path))
    vr = [f for f in fs if f.kind == "variance_rising"]
    assert vr and vr[0].severity == "problem", [(f.kind, f.title) for f in fs]
    assert vr[0].steps[-1] == 221 and "diverged at step 221" in vr[0].text
    assert 150 <= vr[0].steps[0] <= 220


def test_diverging_seed_and_large_spread(tmp_path):
    rng = np.random.default_rng(3)
    base = np.exp(0.1 * rng.standard_normal(100))
    good = [write_log(tmp_path / f"g{i}.jsonl", base, np.linspace(2, 0.5 + 0.01 * i, 100),
                      label=f"g{i}") for i in range(2)]
    bad_loss = np.linspace(2, 0.5, 100)
    bad_loss[70:] = np.nan
    bad_norm = base.copy()
    bad_norm[70:] = np.nan
    bad = write_log(tmp_path / "bad.jsonl", bad_norm, bad_loss, label="bad")
    fs = report.build_report(good + [bad], str(tmp_path / "o1"), plots=False).findings
    assert fs["all runs"][0].severity == "problem" and "`bad`" in fs["all runs"][0].text
    far = write_log(tmp_path / "far.jsonl", base, np.linspace(2, 1.5, 100), label="far")
    fs2 = report.build_report(good + [far], str(tmp_path / "o2"), plots=False).findings
    assert fs2["all runs"][0].kind == "seed_spread" and fs2["all runs"][0].severity == "warning"
    assert "Large variation" in fs2["all runs"][0].title
    # --compare: different configurations are not judged as seeds
    fs3 = report.build_report(good + [far], str(tmp_path / "o3"), plots=False,
                              compare=True).findings
    assert "all runs" not in fs3


def test_corrupt_log_is_still_reported(tmp_path):
    log = train_log(tmp_path / "c.jsonl", nan_step=40, nan_param="0.bias", steps=80)
    lines = open(log).read().splitlines()
    lines[10] = lines[10][: len(lines[10]) // 2]  # a cut line in the middle of the file
    with open(log, "w") as f:
        f.write("\n".join(lines[:-1]) + "\n" + lines[-1][:15])  # and a truncated end
    rep = report.build_report([log], str(tmp_path / "out"))
    assert any("line 11" in p for p in rep.problems)
    assert any(f"line {len(lines)}: truncated" in p for p in rep.problems)
    fs = rep.findings["seed0"]
    assert [f.steps[0] for f in fs if f.kind == "nonfinite"] == [40]
    md = open(rep.markdown).read()
    assert "Problems reading the logs" in md and "line 11" in md


def test_csv_log_reports_the_same(tmp_path):
    log = train_log(tmp_path / "r.csv", nan_step=25, nan_param="2.bias", steps=50)
    fs = report.analyze(read_log(log))
    nf = [f for f in fs if f.kind == "nonfinite"][0]
    assert nf.steps == [25] and nf.tensors == ["2.bias"]


def test_stagnating_loss_is_flagged(tmp_path):
    rng = np.random.default_rng(4)
    n = 200
    losses = np.log(32) + 0.02 * rng.standard_normal(n)
    losses[:3] += [0.2, 0.6, 0.9]  # a bump at the start does not hide it
    path = write_log(tmp_path / "flat.jsonl", 0.2 * np.exp(0.1 * rng.standard_normal(n)),
                     losses)
    fs = report.analyze(read_log(path))
    st = [f for f in fs if f.kind == "stagnation"]
    assert st and st[0].steps == [1, n] and "barely improved" in st[0].title
