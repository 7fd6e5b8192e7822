"""benchmarks/bench_noise_scale.py runs (quick, no DDP) and reports the structural costs:
one extra statistics pass per optimizer step under gradient accumulation, an idle hook
that does nothing, a bounded number of device ops per measured step."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_noise_scale_quick(tmp_path):
    out = tmp_path / "b.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_noise_scale.py"),
                        "--quick", "--no-ddp", "--dim", "64", "--layers", "1",
                        "--json", str(out)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    res = json.loads(out.read_text())["single"]
    assert all(r["extra_stats_passes_per_step"] == 1 for r in res["accumulation"])
    assert res["hook_measuring_device_ops"] <= 25
    assert res["hook_idle_us"] < res["hook_measuring_us"]
    assert "GPU: not measured" in p.stdout
