"""``gradstats report`` never shows a traceback (fuzzed logs, bad arguments), the report's
band is the one running-statistics rule, and no private names cross module borders."""
import ast
import contextlib
import io
import json
import math
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

import gradstats
from gradstats.core import running
from gradstats.report import build, runs
from gradstats.telemetry import read_log

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def good_log(tmp_path_factory):
    """A 40-step log of two groups with a skipped NaN step and a spike."""
    path = str(tmp_path_factory.mktemp("good") / "good.jsonl")
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = gradstats.StableOptimizer(
        torch.optim.SGD([{"params": [m[0].weight, m[2].weight], "name": "w"},
                         {"params": [m[0].bias, m[2].bias], "name": "b"}], lr=0.05),
        max_norm=0.5, param_names=m.named_parameters(),
        log=gradstats.telemetry.StatsLogger(path, flush_every=8, meta={"run": "good"}))
    g = torch.Generator().manual_seed(1)
    for s in range(1, 41):
        x = torch.randn(8, 4, generator=g)
        loss = (m(x) - 1).pow(2).mean()
        loss.backward()
        if s == 12:
            m[2].weight.grad[0, 0] = float("nan")
        if s == 30:
            m[0].weight.grad.mul_(100)
        opt.step(loss=loss)
        opt.zero_grad()
    opt.log.close()
    return path


def _main(argv):
    """``main(argv)`` with stdout/stderr captured; any exception fails the test."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = build.main(argv)
    return rc, out.getvalue(), err.getvalue()


# --------------------------------------------------------------- 4. named failures
def test_huge_step_and_wrong_header_type_exit_2_with_the_line(good_log, tmp_path):
    lines = open(good_log).read().splitlines()
    bad = list(lines)
    rec = json.loads(bad[5])
    rec["step"] = 10 ** 23
    bad[5] = json.dumps(rec)
    hdr = json.loads(bad[0])
    hdr["groups"] = 5
    bad[0] = json.dumps(hdr)
    p = tmp_path / "bad.jsonl"
    p.write_text("\n".join(bad) + "\n")
    rc, out, err = _main([str(p), "--out", str(tmp_path / "o"), "--no-plots"])
    assert rc == 2
    errs = [e for e in err.splitlines() if e.startswith("gradstats report:")]
    assert len(errs) == 2, err
    assert f"{p}: line 6:" in errs[1] and "'step'" in errs[1] and "100000000000000000000000" \
        in errs[1]
    assert f"{p}: line 1:" in errs[0] and "'groups'" in errs[0] and "int 5" in errs[0]
    # the report still covers the 39 other steps (group names unknown: group0, group1)
    md = open(tmp_path / "o" / "report.md").read()
    assert "| good | " in md and "| 1-40 | group0, group1 |" in md
    assert "Non-finite values first at step 12" in md


def test_directory_as_log_and_out_is_a_file(good_log, tmp_path):
    d = tmp_path / "adir"
    d.mkdir()
    rc, out, err = _main([str(d), good_log, "--out", str(tmp_path / "o")])
    assert rc == 2 and err.strip().splitlines() == [
        f"gradstats report: {d}: is a directory, not a log file"]
    md = open(tmp_path / "o" / "report.md").read()
    assert "is a directory" in md and "| good |" in md and "good_overview.png" in md
    f = tmp_path / "afile"
    f.write_text("x")
    rc, out, err = _main([good_log, "--out", str(f)])
    assert rc == 2 and err.strip() == (f"gradstats report: --out {f} is a file, not a "
                                       f"folder; give a folder for report.md and the plots")
    assert f.read_text() == "x"
    rc, _, err = _main([str(d)])
    assert rc == 2 and "is a directory" in err
    rc, _, err = _main([good_log, "--window", "0", "--out", str(tmp_path / "o2")])
    assert rc == 2 and "--window" in err and len(err.strip().splitlines()) == 1
    rc, _, err = _main(["--bogus"])
    assert rc == 2


def test_cli_subprocess_one_line_messages(good_log, tmp_path):
    d = tmp_path / "adir"
    d.mkdir()
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("GRADSTATS_BACKEND", None)
    lines = open(good_log).read().splitlines()
    rec = json.loads(lines[7])
    rec["step"] = 10 ** 23
    lines[7] = json.dumps(rec)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    r = subprocess.run([sys.executable, "-m", "gradstats", "report", str(d), str(bad),
                        "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=300, cwd=str(tmp_path),
                       env=env)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert r.stderr.splitlines() == [
        f"gradstats report: {d}: is a directory, not a log file",
        f"gradstats report: {bad}: line 8: step record without an integer 'step' (got int "
        f"100000000000000000000000, expected an integer in [0, 2**53)); line skipped"]
    assert (tmp_path / "o" / "report.md").exists() and "report:" in r.stdout


# ----------------------------------------------------------------------- 4. fuzzing
BAD_VALUES = [5, -1, 0, 10 ** 23, -10 ** 23, 10 ** 400, 1e308, -1e308, "NaN", "Infinity",
              "-Infinity", "nan?", "x", "", True, None, [], [1, "x"], [[1]], ["NaN", None],
              [10 ** 400], [True, 2], {}, {"a": [1]}]


def _check(path, out_dir, plots=False):
    argv = [str(path), "--out", str(out_dir)] + ([] if plots else ["--no-plots"])
    rc, out, err = _main(argv)
    assert rc in (0, 2), (rc, err)
    assert "internal error" not in err and "could not draw" not in err, err
    assert all(ln.startswith(("gradstats report: ", "log problem: ")) for ln in
               err.splitlines()), err
    return rc


def test_fuzzed_logs_never_raise(good_log, tmp_path):
    rng = random.Random(0)
    lines = open(good_log).read().splitlines()
    objs = [json.loads(ln) for ln in lines]
    kinds = {o["type"]: i for i, o in enumerate(objs) if o["type"] != "step"}
    step_i = [i for i, o in enumerate(objs) if o["type"] == "step"]
    targets = [(kinds["header"], "one"), (step_i[11], "one"), (step_i[20], "all"),
               (kinds["end"], "one")]
    p = tmp_path / "f.jsonl"
    out = tmp_path / "out"
    n = exit2 = 0
    plot_cases = set(rng.sample(range(350), 3))
    for line_i, mode in targets:
        fields = [k for k in objs[line_i] if k != "type"] + ["type", "unknown_field"]
        for f in fields:
            for v in rng.sample(BAD_VALUES, 4) + [10 ** 23, "NaN"]:
                mutated = []
                for i, o in enumerate(objs):
                    o = dict(o)
                    if i == line_i or (mode == "all" and o["type"] == "step"):
                        o[f] = v
                    mutated.append(json.dumps(o))
                p.write_text("\n".join(mutated) + "\n")
                exit2 += _check(p, out, plots=n in plot_cases) == 2
                n += 1
    # truncated lines, a cut file, garbage bytes, lines of other JSON types
    for _ in range(30):
        mutated = list(lines)
        i = rng.randrange(len(mutated))
        choice = rng.randrange(4)
        if choice == 0:
            mutated[i] = mutated[i][:rng.randrange(len(mutated[i]))]
        elif choice == 1:
            mutated = mutated[:i] + [mutated[i][:rng.randrange(1, len(mutated[i]))]]
        elif choice == 2:
            mutated[i] = rng.choice(["[1,2]", "3", '"s"', "null", "\x00\xff garbage",
                                     "[" * 5000, "{" + '"a":' * 3 + "1}"])
        else:
            mutated.insert(i, json.dumps({"type": "step", "step": rng.choice(
                [0, 1, 2 ** 53 - 1, 2 ** 53]), "norm": [rng.choice([1e308, -5.0, "NaN"])] * 2}))
        text = "\n".join(mutated) + ("\n" if choice != 1 else "")
        p.write_text(text, encoding="utf-8", errors="surrogateescape")
        _check(p, out, plots=(_ == 0))
        n += 1
    assert n > 350 and exit2 > 100


def test_fuzzed_csv_cells_never_raise(tmp_path):
    path = str(tmp_path / "g.csv")
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 1)
    opt = gradstats.StableOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), max_norm=1.0,
                                    log=path)
    for _ in range(12):
        m(torch.randn(4, 3)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    opt.log.close()
    lines = open(path).read().splitlines()
    cols = lines[1].split(",")
    p = tmp_path / "f.csv"
    for c in range(len(cols)):
        for v in ("1e400", "abc", "99999999999999999999999", "", "-1", "NaN", '"a,b"'):
            mutated = list(lines)
            cells = mutated[5].split(",")
            cells[c] = v
            mutated[5] = ",".join(cells)
            p.write_text("\n".join(mutated) + "\n")
            _check(p, tmp_path / "out")
    for bad_cols in ("step,norm.99999999999999999999,x", "norm.0", ""):
        p.write_text("\n".join([lines[0], bad_cols] + lines[2:]) + "\n")
        _check(p, tmp_path / "out")


def test_reader_values_have_the_documented_types(good_log, tmp_path):
    lines = open(good_log).read().splitlines()
    rec = json.loads(lines[3])
    rec.update(loss=10 ** 400, total_norm="Infinity", norm=[1, "x"], clipped=[1, 0],
               nonfinite_count=[2, 10 ** 30], skip_reason="weird", nonfinite_tensors="a")
    lines[3] = json.dumps(rec)
    p = tmp_path / "t.jsonl"
    p.write_text("\n".join(lines) + "\n")
    log = read_log(p)
    r = log.records[2]
    assert r["step"] == 3 and "loss" not in r and r["total_norm"] == math.inf
    assert "norm" not in r and r["clipped"] == [True, False] and "nonfinite_count" not in r
    assert "skip_reason" not in r and "nonfinite_tensors" not in r
    assert len(log.errors) == 5 and all("line 4:" in e for e in log.errors)
    assert log.errors == log.problems


# --------------------------------------------------------- 6. one running rule
def test_report_band_is_the_optimizers_running_rule():
    rng = np.random.default_rng(0)
    x = np.exp(rng.standard_normal(200)).astype(np.float32)
    x[rng.choice(200, 15, replace=False)] = np.nan
    valid = rng.random(200) > 0.1  # steps the optimizer skipped
    mean_t = torch.zeros(1)
    var_t = torch.zeros(1)
    cnt_t = torch.zeros(1)
    ref_m, ref_v, seen = [], [], []
    for i in range(200):
        ref_m.append(float(mean_t))
        ref_v.append(float(var_t))
        seen.append(float(cnt_t) > 0)
        running.update_(mean_t, var_t, cnt_t, torch.tensor([x[i]]),
                        torch.tensor([bool(valid[i])]), running.DEFAULT_ALPHA)
    m, v = runs.running_stats(x.astype(np.float64)[:, None], valid[:, None])
    seen = np.array(seen)
    assert seen.sum() > 150 and np.all(np.isnan(m[~seen, 0]))
    np.testing.assert_allclose(m[seen, 0], np.array(ref_m)[seen], rtol=1e-6, atol=0)
    np.testing.assert_allclose(v[seen, 0], np.array(ref_v)[seen], rtol=1e-6, atol=1e-30)


def test_load_run_band_leaves_out_skipped_steps_and_spikes(tmp_path):
    from gradstats.telemetry import JSONLWriter
    rng = np.random.default_rng(1)
    norms = np.exp(0.1 * rng.standard_normal(120))
    norms[70] = 50.0  # a spike
    w = JSONLWriter(str(tmp_path / "b.jsonl"))
    w.write({"type": "header", "format": "gradstats-log", "version": 1, "groups": ["g"]})
    for i, v in enumerate(norms):
        w.write({"type": "step", "step": i + 1, "norm": [float(v)], "total_norm": float(v),
                 "skipped": i == 40, "skip_reason": "other" if i == 40 else None})
    w.close()
    run = runs.load_run(read_log(tmp_path / "b.jsonl"))
    assert not run.band_from_log
    vals = norms.copy()
    vals[[40, 70]] = np.nan
    m, v = running.update_numpy(vals)
    ok = np.isfinite(run.band_std[:, 0])
    assert ok.sum() >= 115
    np.testing.assert_allclose(run.band_mean[ok, 0], m[ok], rtol=1e-12)
    np.testing.assert_allclose(run.band_std[ok, 0], np.sqrt(v[ok]), rtol=1e-12)


# ------------------------------------------------------- 7. no private-name imports
def test_no_private_names_are_imported_across_modules():
    bad = []
    for pkg in ("telemetry", "report"):
        d = os.path.join(ROOT, "gradstats", pkg)
        for fn in sorted(os.listdir(d)):
            if not fn.endswith(".py"):
                continue
            tree = ast.parse(open(os.path.join(d, fn)).read())
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom):
                    bad += [f"{pkg}/{fn}: {a.name}" for a in node.names
                            if a.name.startswith("_") and a.name != "__version__"]
    assert bad == []
