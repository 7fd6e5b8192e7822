"""Stats log: round trips (JSONL, CSV, plain loops), no per-step host sync, readers that
survive corrupt lines, writers."""
import json
import math
import os

import pytest
import torch

import gradstats
from gradstats import telemetry
from gradstats.telemetry import StatsLogger, read_log


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 1))


def _groups(m):
    return [{"params": [m[0].weight, m[2].weight], "name": "weights"},
            {"params": [m[0].bias, m[2].bias], "name": "biases", "lr": 5e-3}]


def _train(opt, m, steps, nan_at=None, nan_param=None, on_step=None):
    g = torch.Generator().manual_seed(1)
    for s in range(1, steps + 1):
        x = torch.randn(16, 6, generator=g)
        loss = ((m(x) - x[:, :1]) ** 2).mean()
        loss.backward()
        if s == nan_at:
            nan_param.grad.view(-1)[0] = float("nan")
        opt.step(loss=loss)
        if on_step is not None:
            on_step(s)
        opt.zero_grad()


def _same(a, b):
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        a, b = float(a), float(b)
        return (math.isnan(a) and math.isnan(b)) or a == b
    return a == b


FIELDS = {"norm": "norm", "max_abs": "max_abs", "nonfinite_count": "nonfinite_count",
          "clip_coef": "clip_coef", "clipped": "clipped", "total_norm": "total_norm",
          "skipped": "skipped", "nonfinite": "nonfinite", "running_mean": "running_mean",
          "running_std": "running_std", "zscore": "zscore", "step": "step", "loss": "loss"}


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_stable_optimizer_log_round_trip(tmp_path, suffix):
    m = _model()
    path = str(tmp_path / f"run{suffix}")
    opt = gradstats.StableOptimizer(
        torch.optim.Adam(_groups(m), lr=1e-2), max_norm=0.5,
        param_names=m.named_parameters(), log=path)
    assert isinstance(opt.log, StatsLogger) and any(pt for _, pt in opt._step_hooks.values())
    truth = []
    _train(opt, m, 70, nan_at=23, nan_param=m[2].weight,
           on_step=lambda s: truth.append((opt.last_stats.to_dict(),
                                           [g["lr"] for g in opt.param_groups])))
    opt.log.close()
    log = read_log(path)
    assert log.problems == []
    assert log.header["version"] == telemetry.FORMAT_VERSION
    assert log.header["format"] == "gradstats-log"
    assert log.header["groups"] == ["weights", "biases"]
    assert log.header["params"] == ["0.weight", "2.weight", "0.bias", "2.bias"]
    assert log.header["norm_type"] == 2.0
    assert log.end is not None and log.end["steps"] == 70
    assert len(log.records) == 70
    for rec, (d, lrs) in zip(log.records, truth):
        for k_rec, k_true in FIELDS.items():
            assert _same(rec[k_rec], d[k_true]), (rec["step"], k_rec, rec[k_rec], d[k_true])
        assert rec["lr"] == lrs
    bad = log.records[22]
    assert bad["step"] == 23 and bad["skipped"] and bad["skip_reason"] == "nonfinite"
    assert bad["nonfinite_tensors"] == ["2.weight"] and bad["nonfinite_tensor_count"] == 1
    assert all(r["nonfinite_tensors"] == [] for r in log.records if r["step"] != 23)
    assert all(r["skip_reason"] is None for r in log.records if r["step"] != 23)


def test_plain_loop_log_stats_round_trip(tmp_path):
    m = _model()
    opt = torch.optim.SGD(_groups(m), lr=1e-2)
    path = tmp_path / "plain.jsonl"
    truth = []
    with StatsLogger(path, groups=opt.param_groups, param_names=m.named_parameters(),
                     flush_every=4, meta={"run": "plain", "seed": 3}) as lg:
        g = torch.Generator().manual_seed(0)
        for s in range(1, 11):
            x = torch.randn(8, 6, generator=g)
            loss = m(x).pow(2).mean()
            loss.backward()
            loss = loss.detach()
            if s == 5:
                m[0].bias.grad[1] = float("inf")
            st = gradstats.grad_stats(opt.param_groups, per_tensor=True)
            total = torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            coef = torch.clamp(1.0 / (total + 1e-6), max=1.0)
            lg.log_stats(st, loss=loss, clip_coef=coef)
            truth.append((st.to_dict(), loss.item(), coef.item()))
            opt.step()
            opt.zero_grad()
    log = read_log(path)
    assert log.problems == [] and log.label == "plain" and log.header["meta"]["seed"] == 3
    assert [r["step"] for r in log.records] == list(range(1, 11))
    for r, (d, loss, coef) in zip(log.records, truth):
        assert _same(r["norm"], d["norm"]) and _same(r["total_norm"], d["total_norm"])
        assert _same(r["max_abs"], d["max_abs"]) and r["nonfinite_count"] == d["nonfinite"]
        assert _same(r["loss"], loss) and _same(r["clip_coef"], [coef, coef])
        assert r["lr"] == [1e-2, 5e-3]
        assert r["running_mean"] is None and r["skipped"] is False
    assert log.records[4]["nonfinite"] and log.records[4]["nonfinite_tensors"] == ["0.bias"]
    assert not log.records[3]["nonfinite"]


def test_flush_is_one_copy_per_batch_and_no_sync_per_step(tmp_path, monkeypatch):
    """Between flushes a record is device work only: no item/tolist/bool/cpu/numpy calls,
    and exactly one device->host copy per ``flush_every`` steps."""
    m = _model()
    opt = gradstats.StableOptimizer(torch.optim.Adam(_groups(m), lr=1e-2), max_norm=1.0,
                                    param_names=m.named_parameters())
    N = 8
    lg = StatsLogger(tmp_path / "s.jsonl", flush_every=N, flush_seconds=None).bind(opt)
    lg._hook_handle.remove()  # record by hand below, under the sync counters
    calls = []
    real = {}

    def counting(name):
        fn = getattr(torch.Tensor, name)
        real[name] = fn

        def wrapper(self, *a, **k):
            calls.append((name, lg.counters["records"]))
            return fn(self, *a, **k)
        return wrapper
    g = torch.Generator().manual_seed(0)
    copies = []
    for s in range(1, 5 * N + 4):
        x = torch.randn(16, 6, generator=g)
        m(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        with monkeypatch.context() as mp:
            for name in ("item", "tolist", "__bool__", "cpu", "numpy", "__float__",
                         "__int__", "__index__"):
                mp.setattr(torch.Tensor, name, counting(name))
            lg.record(opt.last_stats)
        copies.append(lg.counters["d2h_copies"])
    # a copy exactly when a batch of N rows is full
    assert copies == [s // N for s in range(1, 5 * N + 4)]
    # host reads only while writing out a batch (at a flush, when the N-th row of a batch
    # has just been counted), never in between
    assert calls and all(rec % N == 0 for _, rec in calls), calls
    # CPU rows are on the host at once: each batch is written (and handed to the OS) at
    # its flush, so the file already holds every completed batch, in order
    assert lg.counters["writes"] == 5
    assert [r["step"] for r in read_log(tmp_path / "s.jsonl").records] == \
        list(range(1, 5 * N + 1))
    lg.close()
    assert lg.counters["d2h_copies"] == 6 and lg.counters["writes"] == 6
    assert len(read_log(tmp_path / "s.jsonl").records) == 5 * N + 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_record_has_no_sync(tmp_path):
    """Recording (copy start, event polls, write-outs of finished copies) never syncs;
    a finished copy is written by the next record without waiting."""
    path = tmp_path / "c.jsonl"
    m = _model().cuda()
    opt = gradstats.StableOptimizer(torch.optim.AdamW(_groups(m), lr=1e-2, fused=True),
                                    max_norm=1.0, param_names=m.named_parameters(),
                                    log=StatsLogger(path, flush_every=8))
    x = torch.randn(16, 6, device="cuda")

    def step():
        m(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    for _ in range(3):  # warm-up (first steps decide on the host); the hook records them
        step()
    lg = opt.log
    lg._hook_handle.remove()  # record by hand below, under the sync check

    def record():
        torch.cuda.set_sync_debug_mode("error")
        try:
            lg.record(opt.last_stats)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    while lg.counters["records"] < 8:
        step()
        record()
    assert lg.counters["d2h_copies"] == 1 and lg.summary()["written"] == 0
    torch.cuda.synchronize()  # the copy is done: the next record writes it, no wait
    step()
    record()
    assert lg.summary()["written"] == 8 and lg.counters["syncs"] == 0
    assert [r["step"] for r in read_log(path).records] == list(range(1, 9))
    while lg.counters["records"] < 27:
        step()
        record()
    assert lg.counters["dropped_rows"] == 0
    lg.close()
    assert [r["step"] for r in read_log(path).records] == list(range(1, 28))


def _write_good_log(path, steps=20):
    m = _model()
    opt = gradstats.StableOptimizer(torch.optim.SGD(_groups(m), lr=1e-2), max_norm=1.0,
                                    param_names=m.named_parameters(), log=str(path))
    _train(opt, m, steps)
    opt.log.close()


def test_corrupt_and_truncated_lines_are_reported_by_number(tmp_path):
    path = tmp_path / "c.jsonl"
    _write_good_log(path, 20)
    lines = path.read_text().splitlines()
    assert len(lines) == 22  # header, 20 steps, end
    lines[5] = lines[5][:40] + "#garbage#" + lines[5][60:]
    lines[9] = "[1, 2]"
    text = "\n".join(lines[:-1]) + "\n" + lines[-2][:30]  # drop end, truncate a copy
    path.write_text(text)
    log = read_log(path)
    msgs = "\n".join(log.problems)
    assert "line 6: not valid JSON" in msgs
    assert "line 10: expected a JSON object" in msgs
    assert "line 22: truncated" in msgs
    assert len(log.problems) == 3
    assert len(log.records) == 18 and log.end is None
    steps = [r["step"] for r in log.records]
    assert 5 not in steps and 9 not in steps and steps[-1] == 20


def test_missing_header_and_bad_step_record(tmp_path):
    path = tmp_path / "h.jsonl"
    path.write_text('{"type":"step","step":"x"}\n{"type":"step","step":3,"norm":[1.0],'
                    '"total_norm":"NaN"}\n{"type":"weird"}\n')
    log = read_log(path)
    msgs = "\n".join(log.problems)
    assert "line 1: step record without an integer 'step'" in msgs
    assert "line 3: unknown record type 'weird'" in msgs
    assert "no header record" in msgs
    assert len(log.records) == 1 and math.isnan(log.records[0]["total_norm"])


def test_jsonl_is_strict_json(tmp_path):
    path = tmp_path / "n.jsonl"
    m = _model()
    opt = gradstats.StableOptimizer(torch.optim.SGD(_groups(m), lr=1e-2),
                                    param_names=m.named_parameters(), log=str(path))
    _train(opt, m, 5, nan_at=2, nan_param=m[0].weight)
    opt.log.close()
    for line in path.read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}"))
    assert read_log(path).records[1]["total_norm"] != read_log(path).records[1]["total_norm"]


def test_writer_objects_and_lists(tmp_path):
    class Sink:
        def __init__(self):
            self.records = []

        def write(self, rec):
            self.records.append(rec)

    sink = Sink()
    m = _model()
    opt = gradstats.StableOptimizer(torch.optim.SGD(_groups(m), lr=1e-2), max_norm=1.0,
                                    log=[sink, str(tmp_path / "x.csv")])
    _train(opt, m, 6)
    opt.log.close()
    kinds = [r["type"] for r in sink.records]
    assert kinds == ["header"] + ["step"] * 6 + ["end"]
    assert sink.records[0]["params"][0] == "group0.param0"  # no names given
    assert len(read_log(tmp_path / "x.csv").records) == 6


def test_tensorboard_writer_optional(tmp_path):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install tensorboard"):
            telemetry.open_writer(f"tensorboard:{tmp_path}")
        return
    m = _model()
    opt = gradstats.StableOptimizer(torch.optim.SGD(_groups(m), lr=1e-2), max_norm=1.0,
                                    log=f"tensorboard:{tmp_path / 'tb'}")
    _train(opt, m, 4)
    opt.log.close()
    assert os.listdir(tmp_path / "tb")


def test_bad_arguments():
    with pytest.raises(ValueError, match="flush_every"):
        StatsLogger(os.devnull, flush_every=0)
    with pytest.raises(TypeError, match="log must be"):
        StatsLogger(123)
    lg = StatsLogger(os.devnull)
    lg.close()
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.ones(2)
    with pytest.raises(RuntimeError, match="closed"):
        lg.log_stats(gradstats.grad_stats([p]))
