"""The benchmarks run: the GPU script in its CPU smoke mode, the CPU suite once per benchmark.

Both run as subprocesses (the GPU script picks the Triton interpreter before importing
gradstats; the suite is its own pytest session). Together they take about 30 s on two cores.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")


def _env():
    env = dict(os.environ)
    env.pop("GRADSTATS_BACKEND", None)
    env["TRITON_INTERPRET"] = "1"
    env["CUDA_VISIBLE_DEVICES"] = ""
    # one intra-op thread: on a shared 2-core machine OpenMP spinning can make tiny ops
    # 100x slower when the other core is busy
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run(cmd, timeout):
    p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=timeout)
    out = (p.stdout + p.stderr)[-6000:]
    return p.returncode, out


def test_gpu_check_cpu_smoke(tmp_path):
    rc, out = _run([sys.executable, os.path.join(BENCH, "gpu_check.py"), "--cpu-smoke",
                    "--out", str(tmp_path)], timeout=600)
    assert rc == 0, out
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert res["meta"]["mode"] == "cpu-smoke"
    status = res["status"]
    assert status["correctness"] == "ok", out
    assert status["perf"] == "ok" and status["host"] == "ok", out
    for name in ("sync", "graphs"):
        assert status[name] == "skipped"  # CUDA only, with a printed note
        assert "CUDA" in res["sections"][name]["note"]
    rows = res["sections"]["perf"]["rows"]
    assert any(r["method"].startswith("gradstats grad_stats [torch]") for r in rows)
    assert any(r["method"].startswith("torch clip_grad_norm_ foreach") for r in rows)
    assert all(r["us"] > 0 for r in rows)
    assert (tmp_path / "gpu_check.md").read_text().count("|") > 20


def test_cpu_bench_suite_runs_once():
    pytest.importorskip("pytest_benchmark")
    rc, out = _run([sys.executable, "-m", "pytest", os.path.join(BENCH, "test_bench_cpu.py"),
                    "--benchmark-disable", "-q", "-p", "no:cacheprovider"], timeout=150)
    assert rc == 0, out
    assert " passed" in out and "failed" not in out, out


def test_step_host_benchmarks_run_once():
    pytest.importorskip("pytest_benchmark")
    rc, out = _run([sys.executable, "-m", "pytest", os.path.join(BENCH, "test_bench_step.py"),
                    "--benchmark-disable", "-q", "-p", "no:cacheprovider"], timeout=300)
    assert rc == 0, out
    assert " passed" in out and "failed" not in out, out


def test_end_to_end_step_cpu_mode(tmp_path):
    """The GPT-2-shaped end-to-end benchmark in its tiny CPU mode: every arm trains."""
    rc, out = _run([sys.executable, os.path.join(BENCH, "bench_e2e.py"), "--tiny", "--device",
                    "cpu", "--steps", "3", "--warmup", "2", "--out", str(tmp_path)], timeout=300)
    assert rc == 0, out
    res = json.loads((tmp_path / "bench_e2e.json").read_text())
    assert set(res["best"]) == {"bare", "torch_clip", "stable", "stable_spike_log"}
    assert all(v > 0 for v in res["best"].values())
    assert "| stable |" in out
