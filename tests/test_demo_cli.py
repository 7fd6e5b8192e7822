"""The ``gradstats`` command end to end: demo, report, bench (subprocesses)."""
import json
import os
import subprocess
import sys

import pytest


def _run(args, cwd, timeout=300):
    env = dict(os.environ)
    env.pop("GRADSTATS_BACKEND", None)
    return subprocess.run([sys.executable, "-m", "gradstats"] + args, cwd=str(cwd),
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    r = _run(["demo", "--steps", "60", "--out", str(out)], cwd=out)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


def test_demo_writes_logs_report_and_table(demo_dir):
    out, r = demo_dir
    text = r.stdout
    for row in ("final train loss", "skipped steps", "clipped steps", "CPU ms per step"):
        assert row in text
    assert "torch AdamW + clip_grad_norm_" in text and "StableOptimizer(AdamW)" in text
    # faults at steps 21 (spike) and 36 (NaN batch): the plain run is NaN afterwards,
    # the stable run skipped both
    assert "spike at step 21" in text and "NaN input batch at step 36" in text
    assert "2 (1 non-finite, 1 spike)" in text
    assert "Non-finite values first at step 36" in text
    for f in ("torch.jsonl", "stable.jsonl", "report/report.md", "report/compare.png"):
        assert (out / f).exists(), f
    pngs = [p for p in os.listdir(out / "report") if p.endswith(".png")]
    assert len(pngs) == 3 and all(os.path.getsize(out / "report" / p) > 20_000 for p in pngs)
    assert str(out / "report" / "report.md") in text  # tells the user where


def test_report_command(demo_dir, tmp_path):
    out, _ = demo_dir
    log = out / "stable.jsonl"
    lines = log.read_text().splitlines()
    lines[7] = lines[7][:25]
    bad = tmp_path / "broken.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    r = _run(["report", str(log), str(bad), "--out", str(tmp_path / "rep")], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "line 8: not valid JSON" in r.stderr
    assert "report:" in r.stdout and (tmp_path / "rep" / "report.md").exists()
    assert (tmp_path / "rep" / "seeds_spread.png").exists()
    r = _run(["report", str(tmp_path / "missing.jsonl")], cwd=tmp_path)
    assert r.returncode == 2 and "no such log" in r.stderr


def test_bench_quick(tmp_path):
    js = tmp_path / "b.json"
    r = _run(["bench", "--quick", "--reps", "3", "--json", str(js)], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| set | dtype | tensors |" in r.stdout and "ratio to torch" in r.stdout
    data = json.loads(js.read_text())
    ops = {(row["set"].split()[0], row["op"], row["method"]) for row in data["rows"]}
    for s in ("gpt2-124m", "resnet50-like", "2000-small"):
        for op in ("clip (no-op)", "clip (scales)", "total norm", "all stats"):
            assert (s, op, "torch") in ops and (s, op, "gradstats") in ops
    assert all(row["time_s"] > 0 and row["gb_s"] > 0 for row in data["rows"])
    assert data["env"]["quick"] is True


def test_help_lists_subcommands(tmp_path):
    r = _run(["--help"], cwd=tmp_path)
    assert r.returncode == 0
    for cmd in ("info", "demo", "bench", "report"):
        assert cmd in r.stdout
