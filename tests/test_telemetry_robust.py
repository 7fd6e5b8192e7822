"""Stats log robustness: write errors never stop training, a killed run keeps every batch
that was due, resumed runs append segments, distributed runs log from rank 0."""
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from datetime import timedelta

import pytest
import torch

import gradstats
from gradstats import report, telemetry
from gradstats.telemetry import JSONLWriter, StatsLogger, read_log

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _opt(m, log, two_groups=False, **kw):
    params = ([{"params": [m[0].weight, m[2].weight]}, {"params": [m[0].bias, m[2].bias]}]
              if two_groups else m.parameters())
    return gradstats.StableOptimizer(torch.optim.SGD(params, lr=0.05), max_norm=1.0,
                                     param_names=m.named_parameters(), log=log, **kw)


def _train(opt, m, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 5, generator=g)
        loss = (m(x) - x[:, :1]).pow(2).mean()
        loss.backward()
        opt.step(loss=loss)
        opt.zero_grad()


def _runtime_warnings(rec):
    return [w for w in rec if issubclass(w.category, RuntimeWarning)
            and "stats log" in str(w.message)]


# ------------------------------------------------------------------ 1. write errors
@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_full_disk_never_stops_training():
    m = _model()
    w0 = m[0].weight.detach().clone()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        opt = _opt(m, "/dev/full")  # flush_every 64: batches go out at steps 64 and 128
        _train(opt, m, 150)
        opt.log.close()
    ws = _runtime_warnings(rec)
    assert len(ws) == 1, [str(w.message) for w in ws]
    assert "/dev/full" in str(ws[0].message) and "No space" in str(ws[0].message)
    assert opt.summary()["steps"] == 150 and not torch.equal(m[0].weight, w0)
    s = opt.log.summary()
    assert s["records"] == 150 and s["written"] == 0 and s["dropped_rows"] == 150
    assert "No space" in s["last_error"] and opt.log.counters["dropped_rows"] == 150


class _Flaky:
    """A writer whose ``write`` raises for every 5th step record and whose records
    go to a JSONL file otherwise."""

    def __init__(self, path):
        self.inner = JSONLWriter(path)
        self.path = path

    def write(self, rec):
        if rec.get("type") == "step" and rec["step"] % 5 == 0:
            raise ValueError(f"cannot encode step {rec['step']}")
        self.inner.write(rec)

    def flush(self):
        self.inner.flush()

    def close(self):
        self.inner.close()


def test_raising_writer_drops_rows_and_reports_them(tmp_path):
    path = str(tmp_path / "flaky.jsonl")
    m = _model()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        opt = _opt(m, _Flaky(path))
        opt.log.flush_every = 4
        _train(opt, m, 22)
        opt.log.close()
    ws = _runtime_warnings(rec)
    assert len(ws) == 1 and path in str(ws[0].message) and "cannot encode step 5" in \
        str(ws[0].message)
    s = opt.log.summary()
    assert s == {"path": path, "enabled": True, "records": 22, "written": 18, "pending": 0,
                 "dropped_rows": 4, "last_error": "ValueError: cannot encode step 20"}
    log = read_log(path)
    assert [r["step"] for r in log.records] == [k for k in range(1, 23) if k % 5]
    assert log.end["dropped_rows"] == 4 and log.end["steps"] == 18
    assert "step 20" in log.end["last_error"] and log.dropped_rows == 4
    fs = report.analyze(log)
    lost = [f for f in fs if f.kind == "dropped_rows"]
    assert lost and lost[0].title == "4 rows were lost", [(f.kind, f.title) for f in fs]
    assert "cannot encode step 20" in lost[0].text


def test_writer_that_always_raises_and_unencodable_meta(tmp_path):
    class Broken:
        def write(self, rec):
            raise OSError("disk gone")

        def flush(self):
            raise OSError("disk gone")

        def close(self):
            raise OSError("disk gone")

    m = _model()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        opt = _opt(m, Broken())
        _train(opt, m, 70)  # one full batch of 64, then 6 more
        opt.log.close()  # does not raise either
        opt2 = gradstats.StableOptimizer(torch.optim.SGD(m.parameters(), lr=0.01),
                                         log=StatsLogger(str(tmp_path / "meta.jsonl"),
                                                         flush_every=4,
                                                         meta={"bad": object()}))
        _train(opt2, m, 9)
        opt2.log.close()
    assert len(_runtime_warnings(rec)) == 2  # once per logger
    assert opt.log.summary()["dropped_rows"] == 70
    assert "disk gone" in opt.log.summary()["last_error"]
    s2 = opt2.log.summary()
    assert s2["dropped_rows"] == 9 and "not JSON serializable" in s2["last_error"]


# --------------------------------------------------------- 2. crashes lose little
_KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import torch
    import gradstats
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 1)
    opt = gradstats.StableOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), max_norm=1.0,
                                    log=gradstats.telemetry.StatsLogger(sys.argv[1],
                                                                        flush_every=8))
    for step in range(1, 100):
        loss = m(torch.randn(8, 4)).pow(2).mean()
        loss.backward()
        opt.step(loss=loss)
        opt.zero_grad()
        if step == 20:
            os.kill(os.getpid(), signal.SIGKILL)
""")

_EXCEPT_SCRIPT = textwrap.dedent("""
    import os, sys
    import torch
    import gradstats

    def hard_exit(*exc):  # the previous hook: exits without running atexit
        sys.__excepthook__(*exc)
        sys.stderr.flush()
        os._exit(3)
    sys.excepthook = hard_exit
    m = torch.nn.Linear(4, 1)
    opt = gradstats.StableOptimizer(torch.optim.SGD(m.parameters(), lr=0.1),
                                    log=sys.argv[1])  # flush_every 64: nothing due yet
    for step in range(1, 6):
        loss = m(torch.randn(8, 4)).pow(2).mean()
        loss.backward()
        opt.step(loss=loss)
        opt.zero_grad()
    raise RuntimeError("training loop failed")
""")


def _script(tmp_path, text, *args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("GRADSTATS_BACKEND", None)
    f = tmp_path / "script.py"
    f.write_text(text)
    return subprocess.run([sys.executable, str(f)] + [str(a) for a in args],
                          capture_output=True, text=True, timeout=120, env=env)


def test_sigkill_keeps_every_completed_flush_interval(tmp_path):
    path = tmp_path / "killed.jsonl"
    r = _script(tmp_path, _KILL_SCRIPT, path)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    log = read_log(path)
    assert log.problems == [] and log.end is None and log.header["flush_every"] == 8
    assert [rec["step"] for rec in log.records] == list(range(1, 17))


class _FakeEvent:
    """Stands in for the CUDA event of an asynchronous copy: done when released."""

    def __init__(self, log):
        self.done, self.log = False, log

    def query(self):
        self.log.append("query")
        return self.done

    def synchronize(self):
        self.log.append("wait")
        self.done = True


def test_async_batches_are_written_when_copied_and_before_the_next_copy(tmp_path):
    """The CUDA protocol, with the copy's event simulated on CPU: a record polls (never
    waits) and writes a finished batch; a flush waits for a batch still in flight and
    writes it before the next copy starts."""
    path = tmp_path / "a.jsonl"
    m = _model()
    lg = StatsLogger(path, flush_every=4, flush_seconds=None)
    opt = _opt(m, lg)
    calls, events = [], []

    def start_copy(n):
        calls.append(("copy", lg.summary()["written"]))
        events.append(_FakeEvent(calls))
        return lg._dev_buf[:n].clone(), events[-1]
    lg._start_copy = start_copy
    written = lambda: [r["step"] for r in read_log(path).records]  # noqa: E731
    _train(opt, m, 4)  # batch 1 copy starts at step 4
    assert calls == [("copy", 0)] and written() == []
    _train(opt, m, 2)  # steps 5, 6 poll: copy not done, nothing written, no wait
    assert calls == [("copy", 0), "query", "query"] and written() == []
    events[0].done = True
    _train(opt, m, 1)  # step 7 finds it done and writes it
    assert written() == [1, 2, 3, 4] and lg.counters["syncs"] == 0
    _train(opt, m, 1)  # step 8: batch 2 copy starts
    _train(opt, m, 4)  # steps 9..12: still in flight; the flush at 12 waits, writes it,
    # and only then starts batch 3's copy
    assert calls[-3:] == ["query", "wait", ("copy", 8)]
    assert written() == list(range(1, 9)) and lg.counters["syncs"] == 1
    lg.close()
    assert written() == list(range(1, 13)) and lg.counters["syncs"] == 2


def test_uncaught_exception_flushes_through_the_chained_excepthook(tmp_path):
    path = tmp_path / "exc.jsonl"
    r = _script(tmp_path, _EXCEPT_SCRIPT, path)
    assert r.returncode == 3 and "training loop failed" in r.stderr, r.stderr[-2000:]
    log = read_log(path)
    assert [rec["step"] for rec in log.records] == [1, 2, 3, 4, 5] and log.end is None


def test_context_manager_closes_on_exception(tmp_path):
    path = tmp_path / "ctx.jsonl"
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    with pytest.raises(KeyError):
        with StatsLogger(path, groups=opt.param_groups, flush_every=64) as lg:
            for _ in range(5):
                m(torch.randn(4, 5)).pow(2).mean().backward()
                lg.log_stats(gradstats.grad_stats(opt.param_groups))
                opt.step()
                opt.zero_grad()
            raise KeyError("boom")
    log = read_log(path)
    assert [r["step"] for r in log.records] == [1, 2, 3, 4, 5]
    assert log.end is not None and log.end["dropped_rows"] == 0 and lg.closed


def test_time_interval_flush(tmp_path, monkeypatch):
    from gradstats.telemetry import logger as logger_mod

    class Clock:  # the host clock the logger reads, moved by hand
        now = 1000.0

        @classmethod
        def monotonic(cls):
            return cls.now
    monkeypatch.setattr(logger_mod, "time", Clock)
    path = tmp_path / "t.jsonl"
    m = _model()
    opt = _opt(m, StatsLogger(path, flush_every=1000, flush_seconds=30.0))
    _train(opt, m, 3)
    Clock.now += 29.0
    _train(opt, m, 1)
    assert read_log(path).records == []  # nothing due yet
    Clock.now += 1.5
    _train(opt, m, 1)  # this record finds the interval passed: rows 1..5 go out
    assert [r["step"] for r in read_log(path).records] == [1, 2, 3, 4, 5]
    assert opt.log.summary()["pending"] == 0
    _train(opt, m, 2)
    assert len(read_log(path).records) == 5  # the interval starts again
    opt.log.close()
    assert len(read_log(path).records) == 7
    with pytest.raises(ValueError, match="flush_seconds"):
        StatsLogger(os.devnull, flush_seconds=-1)


# ------------------------------------------------------------------- 3. resuming
def _resume_case(tmp_path, suffix):
    path = str(tmp_path / f"run{suffix}")
    m = _model()
    opt = _opt(m, path)
    _train(opt, m, 30)
    ckpt = {"model": {k: v.clone() for k, v in m.state_dict().items()},
            "opt": opt.state_dict()}
    opt.log.close()
    m2 = _model(seed=5)
    m2.load_state_dict(ckpt["model"])
    opt2 = _opt(m2, path)  # the same path: a new segment, nothing erased
    opt2.load_state_dict(ckpt["opt"])
    _train(opt2, m2, 20, seed=2)
    opt2.log.close()
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_resume_appends_a_segment_with_continuing_steps(tmp_path, suffix):
    path = _resume_case(tmp_path, suffix)
    log = read_log(path)
    assert log.problems == []
    assert log.segments == 2 and log.segment_starts == [0, 30]
    assert [r["step"] for r in log.records] == list(range(1, 51))
    assert "resume" not in log.headers[0]
    assert log.headers[1]["resume"] is True and log.headers[1]["resume_step"] == 30
    assert [e["steps"] for e in log.ends] == [30, 20] and log.end["steps"] == 20
    run = report.load_run(log)
    assert run.steps.tolist() == list(range(1, 51))
    res = [f for f in report.analyze(log) if f.kind == "resumed"]
    assert res and res[0].steps == [31] and "steps 31-50" in res[0].text
    assert not [f for f in report.analyze(log) if f.kind == "log_problem"]
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(path)]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_overwrite_truncates(tmp_path, suffix):
    path = str(tmp_path / f"o{suffix}")
    m = _model()
    opt = _opt(m, path)
    _train(opt, m, 10)
    opt.log.close()
    opt2 = gradstats.StableOptimizer(torch.optim.SGD(m.parameters(), lr=0.01))
    lg = telemetry.attach(opt2, path, overwrite=True, flush_every=4)
    _train(opt2, m, 6)
    lg.close()
    log = read_log(path)
    assert log.segments == 1 and [r["step"] for r in log.records] == list(range(1, 7))
    assert "resume" not in log.header
    opt3 = _opt(m, StatsLogger(path, overwrite=True))
    _train(opt3, m, 2)
    opt3.log.close()
    assert len(read_log(path).records) == 2


def test_resume_from_an_older_checkpoint_after_a_crash(tmp_path):
    """Run 1 logged 30 steps and was killed mid-line; the checkpoint is from step 20.
    The resumed segment replaces steps 21-30 in the report; the cut line is reported."""
    path = str(tmp_path / "crash.jsonl")
    m = _model()
    opt = _opt(m, StatsLogger(path, flush_every=5))
    _train(opt, m, 20)
    ckpt = {"model": {k: v.clone() for k, v in m.state_dict().items()},
            "opt": opt.state_dict()}
    _train(opt, m, 10)
    opt.log.flush()
    opt.log._hook_handle.remove()
    opt.log.closed = True  # as if killed: no end record, and a cut last line
    with open(path, "a") as f:
        f.write('{"type":"step","step":31,"lo')
    m2 = _model()
    m2.load_state_dict(ckpt["model"])
    opt2 = _opt(m2, path)
    opt2.load_state_dict(ckpt["opt"])
    _train(opt2, m2, 15)
    opt2.log.close()
    log = read_log(path)
    assert len(log.problems) == 1 and "line 32: not valid JSON" in log.problems[0]
    assert log.segments == 2 and log.ends[0] is None and log.end is not None
    assert log.headers[1]["resume_step"] == 20
    run = report.load_run(log)
    assert run.steps.tolist() == list(range(1, 36))
    assert [r["step"] for r in run.records[20:]] == list(range(21, 36))
    assert run.records[20] is log.records[30]  # the resumed segment's step 21
    res = [f for f in report.analyze(log) if f.kind == "resumed"][0]
    assert "replaces the 10 records" in res.text and "Segment 1 ended without" in res.text


def test_restart_without_optimizer_state_continues_after_the_first_segment(tmp_path):
    path = str(tmp_path / "again.jsonl")
    for _ in range(2):
        m = _model()
        opt = _opt(m, path)
        _train(opt, m, 12)
        opt.log.close()
    log = read_log(path)
    assert [r["step"] for r in log.records] == list(range(1, 13)) * 2
    assert log.headers[1]["resume_step"] == 0
    run = report.load_run(log)
    assert run.steps.tolist() == list(range(1, 25))
    assert run.segments[1]["shift"] == 12


def test_csv_resume_with_other_columns_goes_to_a_new_file(tmp_path):
    path = str(tmp_path / "c.csv")
    m = _model()
    opt = _opt(m, path)
    _train(opt, m, 6)
    opt.log.close()
    before = open(path).read()
    with pytest.warns(RuntimeWarning, match=r"c\.1\.csv"):
        opt2 = _opt(m, path, two_groups=True)  # 2 groups: other columns
        _train(opt2, m, 4)
        opt2.log.close()
    assert open(path).read() == before and opt2.log.path == str(tmp_path / "c.1.csv")
    log2 = read_log(tmp_path / "c.1.csv")
    assert log2.problems == [] and len(log2.records) == 4 and len(log2.groups) == 2
    assert log2.header["resume"] is True
    # a third run with 2 groups appends to c.1.csv (same columns), with the same warning
    with pytest.warns(RuntimeWarning, match=r"c\.1\.csv"):
        opt3 = _opt(m, path, two_groups=True)
        _train(opt3, m, 3)
        opt3.log.close()
    log2 = read_log(tmp_path / "c.1.csv")
    assert log2.segments == 2 and len(log2.records) == 7 and log2.problems == []
    assert read_log(path).segments == 1


# ---------------------------------------------------------------- 5. distributed
def _dist_entry(rank, world, init, outdir):
    import torch.distributed as dist
    torch.set_num_threads(1)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        logdir = os.path.join(outdir, "logs")
        m = _model()
        opt = _opt(m, os.path.join(logdir, "run.jsonl"))
        m2 = _model()
        per = _opt(m2, os.path.join(logdir, "rank{rank}.jsonl"))
        _train(opt, m, 5)
        _train(per, m2, 3, seed=10 + rank)
        out = {"enabled": opt.log.enabled, "path": opt.log.path,
               "records": opt.log.summary()["records"], "per_path": per.log.path,
               "per_records": per.log.summary()["records"], "repr": repr(opt.log)}
        opt.log.close()
        per.log.close()
    except BaseException:
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    with open(os.path.join(outdir, f"{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # torch 2.13's gloo teardown can abort at exit; the results are on disk


@pytest.mark.skipif(not torch.distributed.is_available() or
                    not torch.distributed.is_gloo_available(), reason="needs gloo")
def test_distributed_logs_from_rank_zero_only():
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:
        init = "file://" + os.path.join(tmp, "store")
        ctx = mp.start_processes(_dist_entry, args=(2, init, tmp), nprocs=2, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + 150
        try:
            while not ctx.join(timeout=5):
                if time.monotonic() > deadline:
                    pytest.fail("the 2 processes did not finish in 150 s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                    p.join(5)
        res = [json.load(open(os.path.join(tmp, f"{r}.json"))) for r in range(2)]
        logdir = os.path.join(tmp, "logs")
        assert sorted(os.listdir(logdir)) == ["rank0.jsonl", "rank1.jsonl", "run.jsonl"]
        assert res[0]["enabled"] and res[0]["records"] == 5
        assert res[0]["path"] == os.path.join(logdir, "run.jsonl")
        assert not res[1]["enabled"] and res[1]["records"] == 0 and res[1]["path"] is None
        assert "disabled on rank 1" in res[1]["repr"]
        log = read_log(os.path.join(logdir, "run.jsonl"))
        assert [r["step"] for r in log.records] == [1, 2, 3, 4, 5] and log.problems == []
        assert log.header["rank"] == 0 and log.header["world_size"] == 2
        for r in range(2):
            assert res[r]["per_path"] == os.path.join(logdir, f"rank{r}.jsonl")
            assert res[r]["per_records"] == 3
            lr = read_log(os.path.join(logdir, f"rank{r}.jsonl"))
            assert len(lr.records) == 3 and lr.header["rank"] == r
