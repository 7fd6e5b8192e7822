"""Acceptance tests of gradstats.StableOptimizer (CPU)."""
import copy
import io
import warnings

import pytest
import torch

from gradstats import StableOptimizer
from gradstats import policies as P

F32 = torch.float32


# --------------------------------------------------------------------------- helpers
SHAPES = [[(5, 4), (5,)], [(3, 5), (3,)]]  # two parameter groups


def make_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.nn.Parameter(torch.randn(s, generator=g)) for s in grp] for grp in SHAPES]


def grads_for(step, scale=1.0):
    g = torch.Generator().manual_seed(1000 + step)
    return [[torch.randn(s, generator=g) * scale for s in grp] for grp in SHAPES]


def set_grads(params, grads):
    for ps, gs in zip(params, grads):
        for p, gr in zip(ps, gs):
            p.grad = gr.clone()


def groups(params, **second):
    return [{"params": params[0]}, {"params": params[1], **second}]


def snapshot(params, opt):
    ps = [p.detach().clone() for grp in params for p in grp]
    st = {}
    for i, p in enumerate(p for grp in params for p in grp):
        st[i] = {k: (v.clone() if torch.is_tensor(v) else copy.deepcopy(v))
                 for k, v in opt.state[p].items()}
    return ps, st


def assert_identical(a, b):
    (pa, sa), (pb, sb) = a, b
    for x, y in zip(pa, pb):
        assert x.dtype == y.dtype and torch.equal(x, y)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].keys() == sb[k].keys()
        for n in sa[k]:
            u, v = sa[k][n], sb[k][n]
            if torch.is_tensor(u):
                assert u.dtype == v.dtype and torch.equal(u, v), (k, n)
            else:
                assert u == v, (k, n)


class PlainMomentum(torch.optim.Optimizer):
    """A third-party-style optimizer: a plain Optimizer subclass with its own state."""

    def __init__(self, params, lr=0.1, beta=0.9):
        super().__init__(params, dict(lr=lr, beta=beta))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["buf"] = torch.zeros_like(p)
                st["step"] += 1
                st["buf"].mul_(group["beta"]).add_(p.grad)
                p.add_(st["buf"], alpha=-group["lr"])


O = torch.optim
OPTIMIZERS = []
for _impl in ("forloop", "foreach", "fused"):
    _kw = {"forloop": dict(foreach=False), "foreach": dict(foreach=True),
           "fused": dict(fused=True)}[_impl]
    OPTIMIZERS += [(f"SGD-{_impl}", lambda g, kw=_kw: O.SGD(g, lr=0.1, momentum=0.9, **kw)),
                   (f"Adam-{_impl}", lambda g, kw=_kw: O.Adam(g, lr=0.01, **kw)),
                   (f"AdamW-{_impl}", lambda g, kw=_kw: O.AdamW(g, lr=0.01, **kw)),
                   (f"Adagrad-{_impl}", lambda g, kw=_kw: O.Adagrad(g, lr=0.1, **kw))]
    if _impl != "fused":  # torch has no fused variant of these
        OPTIMIZERS += [
            (f"RMSprop-{_impl}", lambda g, kw=_kw: O.RMSprop(g, lr=0.01, momentum=0.5, **kw)),
            (f"Adamax-{_impl}", lambda g, kw=_kw: O.Adamax(g, lr=0.01, **kw)),
            (f"NAdam-{_impl}", lambda g, kw=_kw: O.NAdam(g, lr=0.01, **kw)),
            (f"RAdam-{_impl}", lambda g, kw=_kw: O.RAdam(g, lr=0.01, **kw)),
            (f"Adadelta-{_impl}", lambda g, kw=_kw: O.Adadelta(g, lr=1.0, **kw))]
OPTIMIZERS.append(("PlainSubclass", lambda g: PlainMomentum(g, lr=0.1)))
OPT_IDS = [n for n, _ in OPTIMIZERS]
OPT_MAKERS = [m for _, m in OPTIMIZERS]


# --------------------------------------------------------------- max_norm == torch clip
@pytest.mark.parametrize("make", [OPT_MAKERS[OPT_IDS.index(n)] for n in
                                  ("SGD-forloop", "Adam-foreach", "AdamW-forloop",
                                   "PlainSubclass")],
                         ids=["SGD-forloop", "Adam-foreach", "AdamW-forloop", "Plain"])
def test_max_norm_equals_clip_grad_norm_then_step(make):
    """Bit-identical to torch's clip_grads_with_norm_ at the measured norm + inner step."""
    pa, pb = make_params(), make_params()
    opt = StableOptimizer(make(groups(pa, lr=0.05)), max_norm=1.5)
    ref = make(groups(pb, lr=0.05))
    flat_b = [p for grp in pb for p in grp]
    for step in range(6):
        gr = grads_for(step, scale=[0.1, 3.0][step % 2])  # clips every other step
        set_grads(pa, gr)
        set_grads(pb, gr)
        torch_total = torch.nn.utils.get_total_norm([p.grad for p in flat_b])
        opt.step()
        total = opt.last_stats.stats.total_norm
        torch.testing.assert_close(total, torch_total, rtol=1e-5, atol=0)
        torch.nn.utils.clip_grads_with_norm_(flat_b, 1.5, total)
        ref.step()
        assert_identical(snapshot(pa, opt), snapshot(pb, ref))
        assert opt.last_stats.clipped.all().item() == (step % 2 == 1)
    assert opt.summary()["clipped"] == 3


@pytest.mark.parametrize("name", ["SGD-fused", "Adam-fused", "AdamW-fused", "Adagrad-fused"])
def test_max_norm_fused_matches_clip_grad_norm(name):
    """Folded into grad_scale: same result up to the rounding of g / (1/c) vs g * c."""
    make = OPT_MAKERS[OPT_IDS.index(name)]
    pa, pb = make_params(), make_params()
    opt = StableOptimizer(make(groups(pa)), max_norm=1.5)
    ref = make(groups(pb))
    for step in range(6):
        gr = grads_for(step, scale=[0.1, 3.0][step % 2])
        set_grads(pa, gr)
        set_grads(pb, gr)
        opt.step()
        torch.nn.utils.clip_grad_norm_([p for grp in pb for p in grp], 1.5)
        ref.step()
        for x, y in zip(snapshot(pa, opt)[0], snapshot(pb, ref)[0]):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    # with no clipping, grad_scale is exactly 1: bit-identical to the bare fused step
    pa, pb = make_params(), make_params()
    opt = StableOptimizer(make(groups(pa)), max_norm=1e6)
    ref = make(groups(pb))
    for step in range(3):
        set_grads(pa, grads_for(step))
        set_grads(pb, grads_for(step))
        opt.step()
        ref.step()
    assert_identical(snapshot(pa, opt), snapshot(pb, ref))


# ------------------------------------------------------------ lossless skip, all kinds
def _run(make, batches, wrap_kw, bad_step=None, bad=float("nan")):
    params = make_params()
    opt = StableOptimizer(make(groups(params, lr=0.05)), **wrap_kw)
    snaps = []
    for i, gr in enumerate(batches):
        set_grads(params, gr)
        if i == bad_step:
            params[1][0].grad[1, 2] = bad  # one element of one gradient of group 1
        opt.step()
        snaps.append(snapshot(params, opt))
    return params, opt, snaps


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("make", OPT_MAKERS, ids=OPT_IDS)
def test_nonfinite_step_is_skipped_losslessly(make, bad):
    batches = [grads_for(i, scale=[0.5, 2.0][i % 2]) for i in range(6)]
    kw = dict(max_norm=1.0)
    bad_batches = batches[:3] + [grads_for(99)] + batches[3:]
    _, opt, snaps = _run(make, bad_batches, kw, bad_step=3, bad=bad)
    assert_identical(snaps[2], snaps[3])  # params and every state tensor untouched
    assert opt.last_stats.skipped.item() is False
    s = opt.summary()
    assert s["skipped"] == 1 and s["skipped_by_reason"]["nonfinite"] == 1
    assert s["nonfinite"] == 1 and s["steps"] == 7
    # the run continues exactly like a run that never saw the bad batch
    _, _, ref = _run(make, batches, kw)
    assert_identical(snaps[-1], ref[-1])


def test_skip_nonfinite_false_lets_nan_through():
    params = make_params()
    opt = StableOptimizer(O.SGD(groups(params), lr=0.1), skip_nonfinite=False)
    set_grads(params, grads_for(0))
    params[0][0].grad[0, 0] = float("nan")
    opt.step()
    assert torch.isnan(params[0][0]).any()
    assert opt.summary()["nonfinite"] == 1 and opt.summary()["skipped"] == 0


def test_skipped_first_step_creates_no_state():
    for make in (lambda g: O.SGD(g, lr=0.1, momentum=0.9, fused=True),
                 lambda g: O.AdamW(g, fused=True)):
        params = make_params()
        opt = StableOptimizer(make(groups(params)))
        set_grads(params, grads_for(0))
        params[0][1].grad[0] = float("inf")
        opt.step()
        assert len(opt.state) == 0  # no (uninitialised) momentum buffers were created
        set_grads(params, grads_for(1))
        opt.step()
        ref_p = make_params()
        ref = make(groups(ref_p))
        set_grads(ref_p, grads_for(1))
        ref.step()
        assert_identical(snapshot(params, opt), snapshot(ref_p, ref))


# ------------------------------------------------------------------- spikes
def _spike_run(make, wrap_kw, spike_at=14, n=18):
    params = make_params()
    opt = StableOptimizer(make(groups(params)), **wrap_kw)
    snaps, recs = [], []
    for i in range(n):
        set_grads(params, grads_for(i, scale=1000.0 if i == spike_at else 1.0))
        opt.step()
        snaps.append(snapshot(params, opt))
        recs.append(opt.last_stats)
    return params, opt, snaps, recs


@pytest.mark.parametrize("name", ["SGD-foreach", "AdamW-fused", "PlainSubclass"])
def test_spike_skip_skips_injected_spike(name):
    make = OPT_MAKERS[OPT_IDS.index(name)]
    _, opt, snaps, recs = _spike_run(make, dict(spike=P.SpikeSkip(window=16, warmup=8)))
    assert recs[14].skipped.item() and recs[14].skipped_spike.item()
    assert not recs[14].skipped_nonfinite.item()
    assert_identical(snaps[13], snaps[14])
    assert not any(r.skipped.item() for i, r in enumerate(recs) if i != 14)
    s = opt.summary()
    assert s["skipped"] == 1 and s["skipped_by_reason"] == {"nonfinite": 0, "spike": 1}


@pytest.mark.parametrize("name", ["SGD-foreach", "AdamW-fused"])
def test_zscore_clip_clips_injected_spike(name):
    make = OPT_MAKERS[OPT_IDS.index(name)]
    params, opt, snaps, recs = _spike_run(make, dict(policy=P.ZScoreClip(warmup=8)), n=15)
    r = recs[14]
    assert not r.skipped.item() and r.clipped.all().item()
    target = r.info["zclip_target"].item()
    assert target < 2 * recs[13].stats.total_norm.item()  # pulled back near the mean
    coef = r.clip_coef[0].item()
    assert coef == pytest.approx(target / r.stats.total_norm.item(), rel=1e-4)
    if not name.endswith("fused"):  # host path: gradients were scaled in place
        total_after = torch.nn.utils.get_total_norm([p.grad for grp in params for p in grp])
        assert total_after.item() == pytest.approx(target, rel=1e-4)
    assert not any(recs[i].clipped.any().item() for i in range(14))


# -------------------------------------------------------------- state_dict mid-training
def _policy_run(make, steps, state=None, n_before=0):
    params = make_params()
    opt = StableOptimizer(make(groups(params)), policy=P.ZScoreClip(warmup=5),
                          spike=P.SpikeSkip(window=8, warmup=5))
    if state is not None:
        with torch.no_grad():
            for p, v in zip([p for grp in params for p in grp], state["params"]):
                p.copy_(v)
        opt.load_state_dict(state["opt"])
    for i in range(n_before, n_before + steps):
        scale = {13: 1000.0, 16: 40.0}.get(i, 1.0)
        set_grads(params, grads_for(i, scale))
        if i == 15:
            params[0][0].grad[0, 0] = float("nan")
        opt.step()
    return params, opt


@pytest.mark.parametrize("name", ["Adam-foreach", "AdamW-fused", "SGD-forloop"])
def test_state_dict_resume_matches_uninterrupted_run(name):
    make = OPT_MAKERS[OPT_IDS.index(name)]
    full_p, full = _policy_run(make, 22)
    half_p, half = _policy_run(make, 11)
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for grp in half_p for p in grp],
                "opt": half.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    res_p, res = _policy_run(make, 11, state=state, n_before=11)
    assert_identical(snapshot(full_p, full), snapshot(res_p, res))
    assert full.summary() == res.summary()
    assert full.summary()["skipped"] == 2  # the spike at 13 and the NaN at 15
    a, b = full.state_dict()["stable_optimizer"], res.state_dict()["stable_optimizer"]
    assert repr(a) == repr(b)


def test_load_plain_inner_state_dict_and_mismatch():
    params = make_params()
    inner = O.Adam(groups(params))
    set_grads(params, grads_for(0))
    inner.step()
    opt = StableOptimizer(O.Adam(groups(make_params())), max_norm=1.0)
    opt.load_state_dict(inner.state_dict())  # a plain optimizer checkpoint loads
    assert len(opt.state) == 4
    other = StableOptimizer(O.Adam(groups(make_params())))
    with pytest.raises(ValueError, match="policy"):
        other.load_state_dict(opt.state_dict())


# ------------------------------------------------------------------ LR schedulers etc.
@pytest.mark.parametrize("target", ["wrapper", "inner"])
def test_lr_scheduler_given_wrapper_or_inner(target):
    params = make_params()
    inner = O.SGD(groups(params), lr=1.0, momentum=0.9)
    opt = StableOptimizer(inner, max_norm=1.0)
    assert opt.param_groups is inner.param_groups and opt.state is inner.state
    sched = O.lr_scheduler.StepLR(opt if target == "wrapper" else inner, step_size=2,
                                  gamma=0.5)
    lrs = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i in range(5):
            set_grads(params, grads_for(i))
            opt.step()
            sched.step()
            lrs.append(inner.param_groups[0]["lr"])
    assert lrs == [1.0, 0.5, 0.5, 0.25, 0.25]


def test_one_cycle_scheduler_and_defaults_shared():
    params = make_params()
    opt = StableOptimizer(O.AdamW(groups(params), lr=1e-3), max_norm=1.0)
    assert opt.defaults is opt.optimizer.defaults
    sched = O.lr_scheduler.OneCycleLR(opt, max_lr=0.01, total_steps=10)
    for i in range(4):
        set_grads(params, grads_for(i))
        opt.step()
        sched.step()
    assert opt.optimizer.param_groups[0]["lr"] != 1e-3


def test_zero_grad_add_param_group_hooks_closure_and_loss():
    params = make_params()
    opt = StableOptimizer(O.SGD([{"params": params[0]}], lr=0.1), max_norm=1.0,
                          spike=P.SpikeSkip(window=4, warmup=2, on=("grad_norm", "loss")))
    seen = []
    opt.register_step_hook(lambda _o, rec: seen.append(rec))
    calls = []
    opt.register_step_post_hook(lambda o, a, k: calls.append(1))
    set_grads([params[0]], [grads_for(0)[0]])
    opt.step(loss=torch.tensor(1.0))
    opt.add_param_group({"params": params[1], "lr": 0.01})
    assert opt.last_stats.stats.norm.shape == (1,)
    set_grads(params, grads_for(1))
    opt.step(loss=1.0)
    assert opt.last_stats.stats.norm.shape == (2,) and opt.last_stats.running_mean.shape == (2,)
    opt.zero_grad()
    assert all(p.grad is None for grp in params for p in grp)

    def closure():
        opt.zero_grad()
        loss = sum((p ** 2).sum() for grp in params for p in grp)
        loss.backward()
        return loss
    out = opt.step(closure)
    assert torch.is_tensor(out) and opt.last_stats.loss.item() == pytest.approx(out.item())
    assert len(seen) == 3 and seen[-1] is opt.last_stats and len(calls) == 3
    with pytest.raises(ValueError, match="loss"):
        opt.step()


def test_last_stats_and_summary_contents(tmp_path):
    params = make_params()
    names = [(f"p{i}", p) for i, p in enumerate(p for grp in params for p in grp)]
    log = str(tmp_path / "log.jsonl")
    opt = StableOptimizer(O.SGD(groups(params), lr=0.1), max_norm=0.5, param_names=names,
                          log=log)
    assert opt.log.path == log and opt.param_name(params[1][0]) == "p2"
    for i in range(30):
        set_grads(params, grads_for(i))
        opt.step()
    r = opt.last_stats
    d = r.to_dict()
    for key in ("norm", "total_norm", "max_abs", "nonfinite_count", "clip_coef", "clipped",
                "skipped", "running_mean", "running_std", "zscore", "step"):
        assert key in d
    assert d["step"] == 30 and len(d["norm"]) == 2 and d["clipped"] == [True, True]
    assert all(0 < c < 1 for c in d["clip_coef"])
    # running statistics match a plain EMA of the norms (warm-up 25, alpha 0.97)
    assert d["running_std"][0] > 0 and abs(d["zscore"][0]) < 5
    assert opt.summary() == {"steps": 30, "skipped": 0,
                             "skipped_by_reason": {"nonfinite": 0, "spike": 0},
                             "clipped": 30, "nonfinite": 0}


def test_constructor_errors():
    params = make_params()
    inner = O.SGD(groups(params), lr=0.1)
    with pytest.raises(ValueError, match="max_norm or policy"):
        StableOptimizer(inner, max_norm=1.0, policy=P.ZScoreClip())
    with pytest.raises(ValueError, match="max_norm"):
        StableOptimizer(inner, max_norm=-1.0)
    with pytest.raises(ValueError, match="norm_type"):
        StableOptimizer(inner, norm_type=0)
    with pytest.raises(TypeError, match="Optimizer"):
        StableOptimizer([p for grp in params for p in grp])
    with pytest.raises(TypeError, match="policy"):
        StableOptimizer(inner, policy="zclip")
    with pytest.raises(TypeError, match="already"):
        StableOptimizer(StableOptimizer(inner))
    with pytest.raises(TypeError, match="param_names"):
        StableOptimizer(inner, param_names=[1, 2])


def _spy_reads(monkeypatch):
    """Record host reads of tensor values made by gradstats' optimizer/policies or by
    torch.optim (the CPU statistics backends may take host shortcuts on CPU tensors,
    which are not device syncs, so reads from gradstats/backends are not counted)."""
    import os
    import sys
    reads = []

    def spy(name, orig):
        def f(self, *a, **k):
            fn = sys._getframe(1).f_code.co_filename.replace(os.sep, "/")
            if "/gradstats/optim/" in fn or "/gradstats/policies/" in fn or \
                    "torch/optim/" in fn:
                reads.append((name, fn))
            return orig(self, *a, **k)
        return f
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, spy(name, getattr(torch.Tensor, name)))
    return reads


def test_no_host_read_on_folded_path(monkeypatch):
    """Fused AdamW + max_norm + skipping: after the first step, nothing reads the device."""
    params = make_params()
    opt = StableOptimizer(O.AdamW(groups(params), fused=True), max_norm=1.0,
                          spike=P.SpikeSkip(window=8, warmup=4))
    set_grads(params, grads_for(0))
    opt.step()  # the first step decides on the host (no optimizer state yet)
    reads = _spy_reads(monkeypatch)
    for i in range(1, 6):
        set_grads(params, grads_for(i, scale=3.0))
        if i == 3:
            params[1][1].grad[0] = float("nan")
        opt.step()
    assert reads == []
    monkeypatch.undo()
    assert opt.summary()["skipped"] == 1 and opt.summary()["clipped"] == 5


def test_exactly_one_host_read_on_host_path(monkeypatch):
    params = make_params()
    opt = StableOptimizer(PlainMomentum(groups(params)), max_norm=1.0)
    reads = _spy_reads(monkeypatch)
    for i in range(3):
        set_grads(params, grads_for(i))
        opt.step()
    assert len(reads) == 3  # one per step: the skip flag
    # clipping only, no skip possible: no read at all
    reads.clear()
    params = make_params()
    opt = StableOptimizer(PlainMomentum(groups(params)), max_norm=1.0, skip_nonfinite=False)
    set_grads(params, grads_for(0))
    opt.step()
    assert reads == []


def test_pickle_and_deepcopy():
    params = make_params()
    opt = StableOptimizer(O.Adam(groups(params)), policy=P.QuantileClip(0.5, 8))
    set_grads(params, grads_for(0))
    opt.step()
    cp = copy.deepcopy(opt)
    assert cp.summary() == opt.summary() and cp.optimizer is not opt.optimizer


# ------------------------------------------------------------------------- AMP
def _amp_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _amp_batches(n=8):
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(16, 6, generator=g), torch.randn(16, 1, generator=g))
            for _ in range(n)]


def _amp_train(mode, make, inf_at=3, n=8):
    m = _amp_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=3)
    inner = make(m.parameters())
    opt = None
    if mode != "torch":
        opt = StableOptimizer(inner, max_norm=0.5,
                              grad_scaler=scaler if mode == "folded" else None)
    scales = []
    for i, (x, y) in enumerate(_amp_batches(n)):
        loss = torch.nn.functional.mse_loss(m(x), y)
        (inner if opt is None else opt).zero_grad()
        scaler.scale(loss).backward()
        if i == inf_at:
            next(m.parameters()).grad[0, 0] = float("inf")
        if mode == "torch":
            scaler.unscale_(inner)
            torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5)
            scaler.step(inner)
        elif mode == "standard":
            scaler.unscale_(opt)
            scaler.step(opt)
        elif mode == "no_unscale":
            scaler.step(opt)
        else:  # folded: no unscale_, no scaler.step
            opt.step()
        scaler.update()
        scales.append(scaler.get_scale())
    return m, opt, scales


@pytest.mark.parametrize("make", [lambda p: O.SGD(p, lr=0.1, momentum=0.9, foreach=True),
                                  lambda p: O.AdamW(p, lr=0.01, fused=True)],
                         ids=["SGD-foreach", "AdamW-fused"])
@pytest.mark.parametrize("mode", ["standard", "no_unscale", "folded"])
def test_grad_scaler_recipes(mode, make):
    ref_m, _, ref_scales = _amp_train("torch", make)
    m, opt, scales = _amp_train(mode, make)
    assert scales == ref_scales  # same backoff at the overflow, same growth
    for a, b in zip(m.parameters(), ref_m.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    s = opt.summary()
    assert s["skipped"] == 1 and s["skipped_by_reason"]["nonfinite"] == 1
    if mode != "standard":  # the loss scale was divided out of the reported norms
        assert opt.last_stats.loss_scale is not None
    assert opt.last_stats.stats.total_norm.item() < 100


def test_grad_scaler_folded_is_bit_identical_for_host_path():
    make = lambda p: O.SGD(p, lr=0.1, momentum=0.9, foreach=True)  # noqa: E731
    a, _, _ = _amp_train("standard", make)
    b, _, _ = _amp_train("folded", make)
    for x, y in zip(a.parameters(), b.parameters()):
        assert torch.equal(x, y)


# ------------------------------------------------------------------------- efficacy
def _data(seed=0, n=256):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 8, generator=g)
    w = torch.randn(8, 1, generator=g)
    return X, torch.tanh(X @ w) + 0.1 * torch.randn(n, 1, generator=g)


def _train(make_model, lr, wrap=None, steps=200, faults=None, n=256, seed=0):
    faults = faults or {}
    X, y = _data(seed, n)
    torch.manual_seed(seed)
    m = make_model()
    inner = O.SGD(m.parameters(), lr=lr, momentum=0.9)
    opt = wrap(inner) if wrap else inner
    for i in range(steps):
        idx = torch.arange(i * 32, i * 32 + 32) % n
        xb = X[idx]
        if faults.get(i) == "nan":
            xb = xb.clone()
            xb[0, 0] = float("nan")
        loss = torch.nn.functional.mse_loss(m(xb), y[idx])
        opt.zero_grad()
        loss.backward()
        if faults.get(i) == "spike":
            for p in m.parameters():
                p.grad.mul_(1000.0)
        opt.step()
    with torch.no_grad():
        return torch.nn.functional.mse_loss(m(X), y).item()


def _relu_mlp():
    L = torch.nn.Linear
    return torch.nn.Sequential(L(8, 32), torch.nn.ReLU(), L(32, 32), torch.nn.ReLU(), L(32, 1))


def _tanh_mlp():
    L = torch.nn.Linear
    return torch.nn.Sequential(L(8, 32), torch.nn.Tanh(), L(32, 32), torch.nn.Tanh(), L(32, 1))


@pytest.mark.parametrize("policy", [P.AdaptiveGradClip(0.01), P.FixedNorm(0.1)],
                         ids=["AGC", "FixedNorm"])
def test_efficacy_diverging_lr_is_tamed(policy, one_thread):
    X, y = _data()
    torch.manual_seed(0)
    with torch.no_grad():
        initial = torch.nn.functional.mse_loss(_relu_mlp()(X), y).item()
    plain = _train(_relu_mlp, lr=1.0)
    assert not (plain < initial)  # NaN or exploded
    stable = _train(_relu_mlp, lr=1.0,
                    wrap=lambda o: StableOptimizer(o, policy=copy.deepcopy(policy)))
    assert stable == stable and stable < initial / 4


@pytest.mark.parametrize("kw", [dict(policy=P.ZScoreClip()),
                                dict(policy=P.ZScoreClip(), spike=P.SpikeSkip())],
                         ids=["ZScoreClip", "ZScoreClip+SpikeSkip"])
def test_efficacy_faults_are_absorbed(kw, one_thread):
    faults = {40: "nan", 120: "spike"}
    plain = _train(_tanh_mlp, lr=0.05, faults={120: "spike"}, n=512)
    clean = _train(_tanh_mlp, lr=0.05, n=512,
                   wrap=lambda o: StableOptimizer(o, **copy.deepcopy(kw)))
    faulty = _train(_tanh_mlp, lr=0.05, faults=faults, n=512,
                    wrap=lambda o: StableOptimizer(o, **copy.deepcopy(kw)))
    assert plain > 10 * clean  # the spike alone wrecks the plain run
    assert abs(faulty / clean - 1) < 0.05


# ------------------------------------------------------------------ more wrapper paths
def test_running_statistics_follow_sample_then_ema():
    params = make_params()
    opt = StableOptimizer(O.SGD(groups(params), lr=0.01))
    norms = []
    for i in range(50):
        set_grads(params, grads_for(i, scale=1.0 + 0.1 * (i % 7)))
        if i == 20:
            params[0][0].grad[0, 0] = float("nan")  # skipped: not recorded
        opt.step()
        if i != 20:
            norms.append(opt.last_stats.stats.norm.double())
    a = StableOptimizer.running_alpha
    mean = torch.zeros(2, dtype=torch.float64)
    var = torch.zeros(2, dtype=torch.float64)
    for n, x in enumerate(norms, 1):
        w = max(1.0 / n, 1.0 - a)
        d = x - mean
        mean, var = mean + w * d, (1 - w) * (var + w * d * d)
        if n == 25:  # still the plain sample statistics during the warm-up
            t = torch.stack(norms[:25])
            torch.testing.assert_close(mean, t.mean(0))
            torch.testing.assert_close(var, t.var(0, unbiased=False))
    run = opt._running.double()
    torch.testing.assert_close(run[0], mean, rtol=1e-5, atol=0)
    torch.testing.assert_close(run[1], var, rtol=1e-4, atol=0)
    assert run[2].tolist() == [49.0, 49.0]


@pytest.mark.parametrize("name", ["AdamW-fused", "AdamW-foreach"])
def test_per_group_fixed_norm(name):
    make = OPT_MAKERS[OPT_IDS.index(name)]
    pa, pb = make_params(), make_params()
    opt = StableOptimizer(make(groups(pa)), policy=P.FixedNorm(1.0, per_group=True))
    ref = make(groups(pb))
    for i in range(3):
        set_grads(pa, grads_for(i, scale=[0.05, 2.0, 1.0][i]))
        set_grads(pb, grads_for(i, scale=[0.05, 2.0, 1.0][i]))
        opt.step()
        for grp in pb:
            torch.nn.utils.clip_grad_norm_(grp, 1.0)
        ref.step()
        for x, y in zip(snapshot(pa, opt)[0], snapshot(pb, ref)[0]):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
    assert opt.last_stats.clip_coef.shape == (2,)


def test_policy_list_and_quantile_clip_in_wrapper():
    params = make_params()
    opt = StableOptimizer(O.SGD(groups(params), lr=0.01),
                          policy=[P.AdaptiveGradClip(0.01), P.QuantileClip(0.5, 16)])
    assert isinstance(opt.policy, P.Chain)
    for i in range(6):
        set_grads(params, grads_for(i, scale=10.0 if i == 5 else 1.0))
        opt.step()
    r = opt.last_stats
    assert r.clipped.all().item() and "quantile_threshold" in r.info
    assert 0 < r.clip_coef[0].item() < 1


def test_grads_without_any_group_and_empty_groups():
    params = make_params()
    opt = StableOptimizer(O.Adam(groups(params)), max_norm=1.0)
    opt.step()  # no gradients at all: behaves like the inner optimizer
    assert opt.summary()["steps"] == 1 and opt.last_stats is None
    set_grads([params[0], []], [grads_for(0)[0], []])
    for i in range(3):
        opt.step()
    run = opt._running
    assert run[2].tolist() == [3.0, 0.0]  # the empty group records nothing


# ------------------------------------------------------------------------- CUDA only
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _cuda_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(),
                               torch.nn.Linear(64, 8)).cuda()


def _cuda_batches(n):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(16, 32, generator=g).cuda(), torch.randn(16, 8, generator=g).cuda())
            for _ in range(n)]


@cuda
def test_cuda_fused_step_makes_no_host_sync():
    m = _cuda_model()
    opt = StableOptimizer(O.AdamW(m.parameters(), fused=True), max_norm=1.0,
                          spike=P.SpikeSkip(window=8, warmup=4))
    batches = _cuda_batches(12)
    nan_at = torch.tensor([float("nan")], device="cuda")
    try:
        for i, (x, y) in enumerate(batches):
            if i == 2:  # warm-up done: from here on, any synchronisation is an error
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
            loss = torch.nn.functional.mse_loss(m(x), y)
            opt.zero_grad()  # set_to_none: backward() allocates new gradients (they move)
            loss.backward()
            if i == 6:
                next(m.parameters()).grad[0, :1].copy_(nan_at)
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert opt.summary()["skipped_by_reason"]["nonfinite"] == 1


@cuda
def test_cuda_graph_capture_matches_eager():
    batches = _cuda_batches(10)
    faults = {6: "nan", 8: "spike"}

    def make(m):
        return StableOptimizer(O.AdamW(m.parameters(), lr=1e-2, fused=True, capturable=True),
                               max_norm=1.0, spike=P.SpikeSkip(window=8, warmup=3))
    # eager reference
    ref = _cuda_model()
    ropt = make(ref)
    for i, (x, y) in enumerate(batches):
        ropt.zero_grad()
        loss = torch.nn.functional.mse_loss(ref(x), y)
        loss.backward()
        if faults.get(i) == "nan":
            next(ref.parameters()).grad[0, 0] = float("nan")
        if faults.get(i) == "spike":
            for p in ref.parameters():
                p.grad.mul_(1000.0)
        ropt.step()
    # captured: 3 eager warm-up steps on a side stream, then one graph per kind of batch
    m = _cuda_model()
    opt = make(m)
    sx, sy = batches[0][0].clone(), batches[0][1].clone()
    nan_mask = torch.ones(1, device="cuda")  # multiplied into one gradient element
    grad_mul = torch.ones((), device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(3):
            sx.copy_(batches[i][0])
            sy.copy_(batches[i][1])
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.mse_loss(m(sx), sy).backward()
            opt.step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(g):
        torch.nn.functional.mse_loss(m(sx), sy).backward()
        first = next(m.parameters()).grad
        first.view(-1)[:1].mul_(nan_mask)
        for p in m.parameters():
            p.grad.mul_(grad_mul)
        opt.step()
    for i in range(3, len(batches)):
        sx.copy_(batches[i][0])
        sy.copy_(batches[i][1])
        nan_mask.fill_(float("nan") if faults.get(i) == "nan" else 1.0)
        grad_mul.fill_(1000.0 if faults.get(i) == "spike" else 1.0)
        g.replay()
    torch.cuda.synchronize()
    for a, b in zip(m.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert opt.summary()["skipped"] == ropt.summary()["skipped"] == 2
