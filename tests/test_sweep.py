"""gradstats.sweep: the engine end to end (--quick, in-process and with spawned workers),
user training functions, run summaries, configuration specs, and the report's
LR-sensitivity tables on a synthetic sweep directory with known stable ranges."""
import json
import math
import os

import numpy as np
import pytest
import torch

import gradstats
from gradstats import policies as P
from gradstats.cli import main as cli_main
from gradstats.report import sweep as rs
from gradstats.optim_extras import StableAdamW
from gradstats.sweep import Arm, RunConfig, builtin_arms, parse_arm, resolve_arms
from gradstats.telemetry import read_log

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ user functions
def train_regression(run: RunConfig):
    """A small regression whose loss explodes for large learning rates under SGD."""
    torch.manual_seed(run.seed)
    m = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = run.optimizer(m.parameters(), cls=torch.optim.SGD,
                        param_names=m.named_parameters())
    g = torch.Generator().manual_seed(100 + run.seed)
    w = torch.randn(4, 1, generator=g)
    for step in range(run.steps):
        x = torch.randn(32, 4, generator=g) * 3
        loss = torch.nn.functional.mse_loss(m(x), x @ w)
        loss.backward()
        if step == run.options.get("nan_step"):
            m[0].weight.grad.view(-1)[0] = float("nan")
        opt.step(loss=loss)
        opt.zero_grad()
    return {"w0": float(m[0].weight.detach().abs().mean())}


def train_broken(run: RunConfig):
    raise RuntimeError("boom in the user's code")


def train_no_optimizer(run: RunConfig):
    return None


# -------------------------------------------------------------------------- engine
def test_quick_cli_end_to_end(tmp_path):
    out = tmp_path / "sw"
    rc = cli_main(["sweep", "--quick", "--out", str(out), "--workers", "1"])
    assert rc == 0
    data = json.loads((out / "sweep.json").read_text())
    assert data["format"] == rs.SWEEP_FORMAT
    task = data["tasks"]["tiny-lm"]
    n = len(task["lrs"]) * len(task["seeds"]) * 3
    assert len(data["runs"]) == n == 18
    for r in data["runs"]:
        assert r["status"] == "ok", r["error"]
        log = out / r["log"]
        assert log.exists()
        lg = read_log(str(log))
        assert len(lg.records) == r["steps"] == task["steps"]
        assert lg.header["meta"]["config"] == r["config"]
        assert all(rec["loss"] is not None for rec in lg.records)
    # same seed -> same batches and weights: without clipping activity the runs agree
    by = {(r["config"], r["lr"], r["seed"]): r for r in data["runs"]}
    lr0 = task["lrs"][0]
    assert by[("none", lr0, 0)]["final_loss"] == pytest.approx(
        by[("torch-clip", lr0, 0)]["final_loss"], rel=1e-3)
    md = (out / "report" / "report.md").read_text()
    assert "## LR sensitivity" in md and "#### Stable LR range" in md
    assert "#### LR sensitivity: final loss" in md and "#### Clip and skip rates" in md
    pngs = list((out / "report").glob("*.png"))
    assert pngs and all(p.stat().st_size > 10_000 for p in pngs)
    # gradstats report DIR on the sweep directory
    rc = cli_main(["report", str(out), "--out", str(tmp_path / "rep")])
    assert rc == 0
    assert "## LR sensitivity" in (tmp_path / "rep" / "report.md").read_text()


def test_spawned_workers_user_function(tmp_path):
    res = gradstats.sweep(train_regression, lrs=[0.03, 0.3], seeds=2,
                          configs={"plain": "NoClip()", "stable": {"max_norm": 1.0}},
                          steps=30, out=str(tmp_path), workers=2, progress=False,
                          report=False, options={"nan_step": 5})
    assert len(res.rows) == 8
    for r in res.rows:
        assert r["status"] in ("ok", "stopped"), r["error"]
        assert r["metrics"] or r["status"] == "stopped"
    # the NaN gradient at step 5 ruins the unprotected runs, the StableOptimizer skips it
    plain = [r for r in res.rows if r["config"] == "plain"]
    stable = [r for r in res.rows if r["config"] == "stable"]
    assert all(r["diverged"] for r in plain)
    assert all(r["status"] == "stopped" for r in plain)  # stopped early
    assert all(r["skipped_nonfinite"] == 1 for r in stable)
    low = [r for r in stable if r["lr"] == 0.03]
    assert all(not r["diverged"] and math.isfinite(r["final_loss"]) for r in low)


def test_failures_are_recorded(tmp_path):
    res = gradstats.sweep(train_broken, lrs=[0.1], seeds=1, configs=["torch-clip"],
                          steps=3, out=str(tmp_path / "a"), workers=1, progress=False)
    (r,) = res.rows
    assert r["status"] == "error" and "boom in the user's code" in r["error"]
    assert "failed: RuntimeError" in open(res.report.markdown).read()
    res = gradstats.sweep(train_no_optimizer, lrs=[0.1], seeds=1, configs=["none"],
                          steps=3, out=str(tmp_path / "b"), workers=1, progress=False,
                          report=False)
    assert "run.optimizer" in res.rows[0]["error"]


def test_resume_keeps_done_runs(tmp_path):
    kw = dict(lrs=[1e-2], configs=["fixed"], steps=5, out=str(tmp_path), workers=1,
              progress=False, report=False)
    gradstats.sweep(train_regression, seeds=[0], **kw)
    res = gradstats.sweep(train_regression, seeds=[0, 1], resume=True, **kw)
    assert sorted(r["seed"] for r in res.rows) == [0, 1]
    lines = (tmp_path / rs.RUNS_FILE).read_text().splitlines()
    assert len(lines) == 2


def test_sweep_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="lrs"):
        gradstats.sweep(task="tiny-lm", lrs=[-1.0], out=str(tmp_path))
    with pytest.raises(ValueError, match="unknown task"):
        gradstats.sweep(task="no-such-task", out=str(tmp_path))
    with pytest.raises(TypeError, match="either train"):
        gradstats.sweep(train_regression, task="tiny-lm", out=str(tmp_path))
    with pytest.raises(ValueError, match="duplicate"):
        gradstats.sweep(task="tiny-lm", configs=["none", "none"], out=str(tmp_path))
    assert cli_main(["sweep", "--task", "nope", "--out", str(tmp_path)]) == 2


# ----------------------------------------------------------------------- configs
def test_parse_arm_specs():
    a = parse_arm("zs=ZScoreClip(warmup=10, z_thresh=2.0)+SpikeSkip(warmup=16, k=4)")
    assert a.name == "zs" and a.clip == "stable"
    kw = a.stable_kwargs()
    assert isinstance(kw["policy"], P.ZScoreClip) and kw["policy"].warmup == 10
    assert kw["spike"].warmup == 16 and kw["spike"].k == 4.0
    assert kw["policy"] is not a.stable_kwargs()["policy"]  # fresh copies per run
    chain = parse_arm("FixedNorm(1.0)+QuantileClip(0.5)").kwargs["policy"]
    assert [type(p).__name__ for p in chain] == ["FixedNorm", "QuantileClip"]
    t = parse_arm("tc=TorchClip(0.5)")
    assert (t.clip, t.max_norm) == ("torch", 0.5)
    assert parse_arm("NoClip()").clip == "none"
    assert parse_arm("x=NoSkip()+FixedNorm(2.0)").kwargs["skip_nonfinite"] is False
    assert parse_arm("zscore").name == "zscore"
    assert parse_arm("mine=recommended").name == "mine"
    rec = parse_arm("r=Recommended(max_norm=2.0)")
    assert rec.kwargs["policy"].max_norm == 2.0 and rec.inner is StableAdamW
    assert parse_arm("RecommendedGrad(spike_k=6)").inner is None
    for bad, msg in [("ZScoreClip(warmup=x)", "literals"), ("Foo()", "unknown item"),
                     ("TorchClip(1.0)+FixedNorm(1.0)", "cannot be combined"),
                     ("1+", "cannot parse"), ("ZScoreClip(warmup=-1)", "warmup")]:
        with pytest.raises(ValueError, match=msg):
            parse_arm(bad)
    with pytest.raises(ValueError, match="clip must be"):
        Arm("x", clip="sometimes")
    with pytest.raises(TypeError):
        resolve_arms({"x": 3})


def test_baseline_matches_torch_clip_bitwise():
    """The torch-clip configuration is torch's clip_grad_norm_ + step (logging only
    measures)."""
    torch.manual_seed(0)
    m1 = torch.nn.Linear(8, 4)
    m2 = torch.nn.Linear(8, 4)
    m2.load_state_dict(m1.state_dict())
    o1 = torch.optim.AdamW(m1.parameters(), lr=0.1)
    o2 = gradstats.sweep.BaselineOptimizer(torch.optim.AdamW(m2.parameters(), lr=0.1),
                                           max_norm=0.5)
    for i in range(5):
        x = torch.randn(16, 8) * (10 if i == 2 else 1)
        for m, o in ((m1, None), (m2, o2)):
            loss = m(x).pow(2).mean()
            loss.backward()
            if o is None:
                torch.nn.utils.clip_grad_norm_(m1.parameters(), 0.5)
                o1.step()
                o1.zero_grad()
            else:
                o.step(loss=loss)
                o.zero_grad()
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    s = o2.summary()
    assert s["steps"] == 5 and s["clipped"] >= 1 and s["skipped"] == 0


# ------------------------------------------------------------------- summaries
def test_summarize_losses_rules():
    good = list(np.linspace(3.5, 1.5, 50))
    s = rs.summarize_losses(good)
    assert not s["diverged"] and s["first_bad_step"] is None
    assert s["final_loss"] == pytest.approx(np.median(good[-5:]))
    # a median: two bad batches among the last five do not decide
    assert rs.summarize_losses(good[:-2] + [9.0, good[-1]])["final_loss"] < 2.0
    assert s["initial_loss"] == pytest.approx(np.mean(good[:3]))
    assert s["best_loss"] == pytest.approx(np.mean(good[-5:]))
    up = good[:20] + [6.0] * 30
    s = rs.summarize_losses(up)
    assert s["diverged"] and s["first_bad_step"] == 21 and s["max_loss"] == 6.0
    nan = good[:40] + [float("nan")] * 10
    s = rs.summarize_losses(nan)
    assert s["diverged"] and math.isinf(s["final_loss"]) and s["first_bad_step"] == 41
    assert s["best_loss"] < 2.5  # best loss ignores the NaN tail
    # absolute threshold (the built-in tasks use 2.5 nats)
    plateau = list(np.linspace(3.5, 2.9, 50))
    assert not rs.summarize_losses(plateau)["diverged"]
    assert rs.summarize_losses(plateau, diverge_loss=2.5)["diverged"]
    assert rs.summarize_losses([])["diverged"]


def test_stable_range():
    lrs = [1e-3, 1e-2, 1e-1, 1.0, 3e-3]
    assert rs.stable_range(lrs, [True, True, False, False, True]) == (1e-3, 1e-2, 3)
    assert rs.stable_range(lrs, [False] * 5) is None
    assert rs.stable_range([0.1, 1.0], [True, True]) == (0.1, 1.0, 2)
    # tie: the range at higher LRs
    assert rs.stable_range([1, 2, 3, 4, 5], [True, False, False, False, True]) == (5, 5, 1)


# ---------------------------------------------------------- report on synthetic data
def _synthetic_sweep(path):
    """Two configurations on a 5-LR grid with 3 seeds; 'a' diverges from 0.3 on (all
    seeds), 'b' only at 1.0 (one seed) and at 1e-3 (all seeds, far from the rest)."""
    lrs = [1e-3, 1e-2, 1e-1, 0.3, 1.0]
    rows = []
    for cfg in ("a", "b"):
        for lr in lrs:
            for s in range(3):
                div = (cfg == "a" and lr >= 0.3) or (cfg == "b" and lr == 1.0 and s == 0) \
                    or (cfg == "b" and lr == 1e-3)
                final = float("inf") if div else 1.0 + 0.01 * s + 0.1 * abs(math.log10(lr) + 2)
                rows.append({"task": "t", "config": cfg, "lr": lr, "seed": s,
                             "status": "ok", "diverged": div, "final_loss": final,
                             "best_loss": 0.9 if not div else 2.0, "initial_loss": 3.0,
                             "max_loss": 3.0, "first_bad_step": 7 if div else None,
                             "steps": 100, "clipped": 10 if cfg == "b" else 0,
                             "skipped": 2 if cfg == "b" else 0, "skipped_nonfinite": 0,
                             "skipped_spike": 2 if cfg == "b" else 0, "nonfinite": 0,
                             "clip_rate": 0.1 if cfg == "b" else 0.0,
                             "skip_rate": 0.02 if cfg == "b" else 0.0, "wall_s": 1.0})
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, rs.SWEEP_FILE), "w") as f:
        json.dump({"format": rs.SWEEP_FORMAT, "version": 1,
                   "tasks": {"t": {"description": "synthetic"}},
                   "configs": {"a": "A", "b": "B"},
                   "runs": [{k: ("Infinity" if isinstance(v, float) and math.isinf(v) else v)
                             for k, v in r.items()} for r in rows]}, f)
    return lrs


def test_report_tables_on_synthetic_sweep(tmp_path):
    _synthetic_sweep(str(tmp_path / "sw"))
    assert rs.is_sweep_dir(str(tmp_path / "sw"))
    rep = rs.build_sweep_report(str(tmp_path / "sw"), str(tmp_path / "out"), baseline="a")
    assert rep.stable["t"]["a"] == (1e-3, 0.1, 3)
    assert rep.stable["t"]["b"] == (1e-2, 0.3, 3)
    md = open(rep.markdown).read()
    lines = md.splitlines()
    row_a = next(l for l in lines if l.startswith("| `a` | 0.001 .. 0.1"))
    assert "| 3 |" in row_a and "6/15" in row_a
    row_b = next(l for l in lines if l.startswith("| `b` | 0.01 .. 0.3"))
    assert "4/15" in row_b
    # divergence counts per cell, seed bands, clip/skip rates, paired difference
    assert "| `a` | 0/3 | 0/3 | 0/3 | 3/3 | 3/3 |" in md
    assert "| `b` | 3/3 | 0/3 | 0/3 | 0/3 | 1/3 |" in md
    assert "**3/3 div**" in md and "1.010 [1.000, 1.020]" in md
    assert "| `a` | 0% / 0% | 0% / 0% |" in md and "| `b` | 10% / 2% | 10% / 2% |" in md
    assert "#### Paired difference with `a`" in md and "(div: +3/-0)" in md
    assert "(div: +0/-3)" in md
    assert rep.plots and os.path.getsize(rep.plots[0]) > 10_000


def test_report_reads_unfinished_sweep(tmp_path):
    d = tmp_path / "sw"
    d.mkdir()
    row = {"task": "t", "config": "c", "lr": 0.1, "seed": 0, "status": "ok",
           "diverged": False, "final_loss": 1.0, "best_loss": 0.9, "initial_loss": 3.0}
    (d / rs.RUNS_FILE).write_text(json.dumps(row) + "\n{broken\n")
    rep = rs.build_sweep_report(str(d), plots=False)
    assert rep.stable["t"]["c"] == (0.1, 0.1, 1)
    assert any("did not finish" in p for p in rep.problems)
    assert any("line 2" in p for p in rep.problems)
    with pytest.raises(FileNotFoundError):
        rs.load_sweep(str(tmp_path))


def test_inner_substitution_only_replaces_adamw(tmp_path):
    arm = builtin_arms()["recommended"]
    m = torch.nn.Linear(4, 2)
    for cls, want in ((None, StableAdamW), (torch.optim.AdamW, StableAdamW),
                      (torch.optim.SGD, torch.optim.SGD)):
        rc = RunConfig("t", arm.name, 0.1, 0, 5, {}, str(tmp_path / f"{want.__name__}.jsonl"),
                       arm)
        opt = rc.optimizer(m.parameters(), cls=cls)
        assert type(opt.optimizer) is want
        rc.close()
