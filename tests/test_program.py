"""Every built-in rule three ways — kernel (Triton finalize, native decide), torch ``update``,
float64 reference — and the one running-statistics rule everywhere."""
import copy
import math
import random

import numpy as np
import pytest
import torch

from gradstats import policies as P
from gradstats.backends import registry
from gradstats.core import reference as R
from gradstats.core import running
from gradstats.optim.measure import measure_decide
from gradstats.policies.program import Program

from conftest import available_backends

EXECUTORS = available_backends()  # torch (run_torch), native (decide op), triton (kernel)


# ------------------------------------------------------------------ the running rule
def _sequence(n=200, seed=0):
    rng = random.Random(seed)
    vals = [abs(rng.gauss(1.0, 0.3)) * (20.0 if i % 37 == 36 else 1.0) for i in range(n)]
    for i in range(5, n, 23):
        vals[i] = float("nan")  # not recorded
    return vals


@pytest.mark.parametrize("alpha", [0.9, 0.97, 0.99])
def test_running_rule_is_the_same_in_torch_numpy_and_the_reference(alpha):
    vals = _sequence()
    mean = torch.zeros(()); var = torch.zeros(()); cnt = torch.zeros(())  # noqa: E702
    torch_seq = []
    for x in vals:
        torch_seq.append((float(mean), float(var)))
        running.update_(mean, var, cnt, torch.tensor(x), torch.tensor(True), alpha)
    np_mean, np_var = running.update_numpy(np.asarray(vals), alpha)
    ref = R.ref_running_stats(vals, alpha)
    ref_before = [(0.0, 0.0)] + ref[:-1]
    for i, ((tm, tv), (rm, rv)) in enumerate(zip(torch_seq, ref_before)):
        assert tm == pytest.approx(rm, rel=1e-5, abs=1e-7), i
        assert tv == pytest.approx(rv, rel=1e-4, abs=1e-7), i
        if i > 0 and not math.isnan(np_mean[i]):
            assert np_mean[i] == pytest.approx(tm, rel=1e-6, abs=1e-7), i
            assert np_var[i] == pytest.approx(tv, rel=1e-5, abs=1e-7), i


# --------------------------------------------------------------- the program, 3 ways
CHAINS = {
    "fixed": lambda: [P.FixedNorm(1.5)],
    "fixed_per_group": lambda: [P.FixedNorm(0.8, per_group=True)],
    "zscore": lambda: [P.ZScoreClip(alpha=0.9, z_thresh=2.0, warmup=4, max_norm=5.0)],
    "quantile": lambda: [P.QuantileClip(0.3, history=8)],
    "spike": lambda: [P.SpikeSkip(window=6, k=2.5, warmup=3, on=("loss", "grad_norm"))],
    "all": lambda: [P.SpikeSkip(window=8, k=3.0, warmup=3), P.ZScoreClip(warmup=3),
                    P.QuantileClip(0.5, history=6), P.FixedNorm(3.0, per_group=True)],
    "skip_off": lambda: [P.FixedNorm(1.0)],
}


def _steps(n=24, G=2, seed=1):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        norms = [abs(rng.gauss(1.0, 0.2)) * (g + 1) for g in range(G)]
        if i in (9, 17):
            norms = [x * 40 for x in norms]  # a spike
        if i == 12:
            norms[1] = float("nan")
        if i == 20:
            norms[0] = float("inf")
        loss = abs(rng.gauss(2.0, 0.1)) * (30.0 if i == 14 else 1.0)
        out.append((norms, loss))
    return out


def _grads_for(norms):
    """One one-element gradient per group whose 2-norm is the wanted norm."""
    return [[torch.tensor([x], dtype=torch.float32)] for x in norms]


def _close(a, b, rel=2e-5):
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y, rel) for x, y in zip(a, b))
    a, b = float(a), float(b)
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= rel * max(1.0, abs(a), abs(b))


@pytest.mark.parametrize("amp", [False, True])
@pytest.mark.parametrize("chain", list(CHAINS))
@pytest.mark.parametrize("executor", EXECUTORS)
def test_program_matches_the_float64_reference(executor, chain, amp):
    G = 2
    skip_nf = chain != "skip_off"
    rules = [P.SkipNonFinite(any_nonfinite=skip_nf)] + CHAINS[chain]()
    prog = Program(rules, G, torch.device("cpu"), 0.97)
    ops = [(s.op, s.params) for _, s in prog.fused]
    assert prog.fully_fused and len(ops) == len(rules)
    ref = R.RefProgram(ops, G, 0.97)
    scale = 256.0 if amp else None
    for i, (norms, loss) in enumerate(_steps(G=G)):
        grads = _grads_for([x * (scale or 1.0) for x in norms])
        res = measure_decide(prog, [[]] * G, grads, norm_type=2.0, per_tensor=False,
                             loss=torch.tensor(loss), backend=executor,
                             amp_scale=None if scale is None else torch.tensor(scale),
                             amp_found=None, has_grads=None)
        total = math.sqrt(sum(x * x for x in norms)) if all(map(math.isfinite, norms)) \
            else (float("nan") if any(map(math.isnan, norms)) else float("inf"))
        want = ref.step([x * (scale or 1.0) for x in norms], total * (scale or 1.0),
                        loss=loss, amp_scale=scale)
        f = res.fields
        for name in ("skipped", "skipped_nonfinite", "skipped_spike", "nonfinite"):
            assert bool(f.get(name)) == want[name], (i, name)
        assert [bool(x) for x in f.get("clipped")] == want["clipped"], i
        assert _close(f.get("clip_coef").tolist(), want["clip_coef"]), (i, f.get("clip_coef"),
                                                                      want["clip_coef"])
        assert _close(f.get("norm").tolist(), want["norm"]), i
        run = f.get("running")
        for g in range(G):
            assert _close([float(run[0, g]), float(run[1, g]), float(run[2, g])],
                          want["running"][g], rel=1e-4), (i, g)
        assert int(f.get("step")) == want["step"]
    assert prog.counters.tolist() == ref.counters


@pytest.mark.parametrize("executor", [e for e in EXECUTORS if e != "torch"])
def test_each_rule_torch_update_matches_the_kernel_executor(executor):
    """The same chain run by the torch executor and by a kernel executor: same state."""
    rules = CHAINS["all"]()
    a = Program([P.SkipNonFinite()] + copy.deepcopy(rules), 2, torch.device("cpu"), 0.97)
    b = Program([P.SkipNonFinite()] + copy.deepcopy(rules), 2, torch.device("cpu"), 0.97)
    for norms, loss in _steps():
        for prog, be in ((a, "torch"), (b, executor)):
            measure_decide(prog, [[], []], _grads_for(norms), norm_type=2.0,
                           per_tensor=False, loss=torch.tensor(loss), backend=be,
                           amp_scale=None, amp_found=None, has_grads=None)
    assert torch.allclose(a.fstate, b.fstate, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert torch.equal(a.istate, b.istate)


def test_optimizer_running_statistics_follow_the_rule():
    ps = [torch.nn.Parameter(torch.zeros(1))]
    import gradstats
    opt = gradstats.StableOptimizer(torch.optim.SGD(ps, lr=0.0))
    vals = [abs(v) for v in _sequence(60) if not math.isnan(v)]
    for v in vals:
        ps[0].grad = torch.tensor([v])
        opt.step()
    ref = R.ref_running_stats(vals, opt.running_alpha)[-1]
    assert float(opt._running[0, 0]) == pytest.approx(ref[0], rel=1e-5)
    assert float(opt._running[1, 0]) == pytest.approx(ref[1], rel=1e-4)
