"""Unit tests of gradstats.policies: each rule against a direct re-statement of its paper."""
import math

import pytest
import torch

from gradstats import policies as P

F32 = torch.float32


def ctx_for(norms, skip=False, params=None, grads=None, loss=None, grad_factor=None):
    """A StepContext for per-group norms (total = L2 of them)."""
    norm = torch.tensor(norms, dtype=F32)
    total = norm.pow(2).sum().sqrt()
    G = len(norms)
    return P.StepContext(norm=norm, total_norm=total, norm_type=2.0,
                         finite=torch.isfinite(total), skip=torch.tensor(bool(skip)),
                         params=params if params is not None else [[] for _ in range(G)],
                         grads=grads if grads is not None else [[] for _ in range(G)],
                         grad_factor=grad_factor,
                         loss=None if loss is None else torch.tensor(float(loss)))


def feed(policy, values, **kw):
    """Run a global-norm policy over a sequence of total norms; list of decisions."""
    if policy._device is None:
        policy.init(1, "cpu")
    return [policy.update(ctx_for([v], **kw)) for v in values]


@pytest.fixture
def no_sync(monkeypatch):
    """Fail on anything that would read a device value on the host."""
    def boom(*a, **k):
        raise AssertionError("host read of a tensor value inside a policy")
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, boom)


# ------------------------------------------------------------------------- FixedNorm
def test_fixed_norm_is_torch_coefficient():
    pol = P.FixedNorm(1.0)
    pol.init(2)
    ctx = ctx_for([3.0, 4.0])
    d = pol.update(ctx)
    expect = torch.clamp(1.0 / (ctx.total_norm + 1e-6), max=1.0)
    assert d.coef.dim() == 0 and torch.equal(d.coef, expect)
    assert d.skip is None
    small = pol.update(ctx_for([0.1, 0.2]))
    assert small.coef.item() == 1.0


def test_fixed_norm_per_group():
    pol = P.FixedNorm(2.0, per_group=True)
    pol.init(3)
    d = pol.update(ctx_for([1.0, 4.0, 8.0]))
    assert d.coef.shape == (3,)
    torch.testing.assert_close(d.coef, torch.tensor([1.0, 2 / (4 + 1e-6), 2 / (8 + 1e-6)]))


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), "x"])
def test_fixed_norm_rejects_bad_max_norm(bad):
    with pytest.raises(ValueError, match="max_norm"):
        P.FixedNorm(bad)


# ------------------------------------------------------------------------ ZScoreClip
def test_zscore_warmup_statistics_and_no_clipping():
    vals = [1.0, 2.0, 1.5, 3.0, 2.5]
    pol = P.ZScoreClip(warmup=5)
    ds = feed(pol, vals)
    assert all(d.coef.item() == 1.0 for d in ds)
    t = torch.tensor(vals, dtype=torch.float64)
    assert pol.state["count"].item() == 5
    assert pol.state["mean"].item() == pytest.approx(t.mean().item(), rel=1e-6)
    assert pol.state["var"].item() == pytest.approx(t.var(unbiased=False).item(), rel=1e-5)


def test_zscore_clips_spike_to_reciprocal_target_and_feeds_clipped_norm():
    pol = P.ZScoreClip(alpha=0.9, z_thresh=2.5, warmup=4)
    feed(pol, [1.0, 1.2, 0.8, 1.0])
    mu, var = pol.state["mean"].item(), pol.state["var"].item()
    sigma = math.sqrt(var)
    g = 50.0
    (d,) = feed(pol, [g])
    z = (g - mu) / sigma
    target = mu + 2.5 ** 2 * sigma / z
    assert d.info["zclip_z"].item() == pytest.approx(z, rel=1e-5)
    assert d.info["zclip_target"].item() == pytest.approx(target, rel=1e-5)
    assert d.coef.item() == pytest.approx(target / (g + 1e-6), rel=1e-5)
    assert mu < target < mu + 2.5 * sigma  # the reciprocal rule pulls big spikes back harder
    # fed with the clipped norm (ZClip), by the one running-statistics rule
    # (gradstats.core.running): 5th value, w = max(1/5, 1 - 0.9) = 0.2
    w = 0.2
    d_ = target - mu
    assert pol.state["mean"].item() == pytest.approx(mu + w * d_, rel=1e-5)
    assert pol.state["var"].item() == pytest.approx((1 - w) * (var + w * d_ * d_), rel=1e-4)
    # a normal step afterwards is not clipped
    (d2,) = feed(pol, [1.0])
    assert d2.coef.item() == 1.0


def test_zscore_max_norm_ceiling_applies_in_warmup():
    pol = P.ZScoreClip(warmup=10, max_norm=2.0)
    (d,) = feed(pol, [4.0])
    assert d.coef.item() == pytest.approx(2.0 / (4.0 + 1e-6))


def test_zscore_ignores_nonfinite_and_skipped_steps():
    pol = P.ZScoreClip(warmup=3)
    feed(pol, [1.0, 2.0])
    before = {k: v.clone() for k, v in pol.state.items()}
    feed(pol, [float("nan"), float("inf")])
    feed(pol, [5.0], skip=True)
    for k in before:
        assert torch.equal(before[k], pol.state[k])


@pytest.mark.parametrize("kw", [dict(alpha=1.0), dict(alpha=0.0), dict(z_thresh=0),
                                dict(warmup=0), dict(warmup=2.5), dict(max_norm=-1)])
def test_zscore_rejects_bad_args(kw):
    with pytest.raises(ValueError):
        P.ZScoreClip(**kw)


# ---------------------------------------------------------------------- QuantileClip
def test_quantile_clip_matches_percentile_of_history():
    torch.manual_seed(0)
    vals = (torch.rand(30) * 10 + 1).tolist()
    pol = P.QuantileClip(quantile=0.3, history=12)
    for i, v in enumerate(vals):
        (d,) = feed(pol, [v])
        hist = torch.tensor(vals[max(0, i - 11):i + 1], dtype=torch.float64)
        thr = torch.quantile(hist, 0.3).item()  # linear interpolation, like numpy
        assert d.info["quantile_threshold"].item() == pytest.approx(thr, rel=1e-5)
        assert d.coef.item() == pytest.approx(min(thr / (v + 1e-6), 1.0), rel=1e-5)


def test_quantile_clip_skips_nonfinite_and_first_value_unclipped():
    pol = P.QuantileClip(quantile=0.1, history=4)
    (d,) = feed(pol, [3.0])
    assert d.coef.item() == pytest.approx(1.0, abs=1e-6)
    feed(pol, [float("nan")])
    assert pol.state["count"].item() == 1


@pytest.mark.parametrize("kw", [dict(quantile=0), dict(quantile=90), dict(history=0)])
def test_quantile_clip_rejects_bad_args(kw):
    args = dict(quantile=0.5, history=8)
    args.update(kw)
    with pytest.raises(ValueError):
        P.QuantileClip(**args)


# -------------------------------------------------------------------------------- AGC
def _agc_reference(p, g, lam, eps):
    """NFNets' rule written out unit by unit (units = slices along dim 0)."""
    g = g.clone()
    if sum(1 for d in p.shape if d > 1) <= 1:
        units = [(...,)]
    else:
        units = [(i,) for i in range(p.shape[0])]
    for u in units:
        wn = p[u].norm().clamp_min(eps)
        gn = g[u].norm()
        if gn > lam * wn:
            g[u] = g[u] * (lam * wn / gn)
    return g


def test_agc_matches_unitwise_reference():
    torch.manual_seed(0)
    shapes = [(6, 5), (6,), (4, 3, 3, 3), (1, 7), ()]
    ps = [torch.randn(s) for s in shapes]
    ps[1] = torch.zeros(6)  # zero weights: the eps floor matters
    gs = [torch.randn(s) * 0.05 for s in shapes]
    gs[0][2] *= 100  # one unit far beyond the ratio
    expect = [_agc_reference(p, g, 0.01, 1e-3) for p, g in zip(ps, gs)]
    pol = P.AdaptiveGradClip(clipping=0.01, eps=1e-3)
    pol.init(1)
    d = pol.update(ctx_for([1.0], params=[ps], grads=[gs]))
    for g, e in zip(gs, expect):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)
    assert d.coef is None and d.clipped.tolist() == [True]


def test_agc_exclude_groups_and_grad_factor():
    p1, p2 = torch.ones(4, 4), torch.ones(4, 4)
    g1, g2 = torch.full((4, 4), 10.0), torch.full((4, 4), 10.0)
    pol = P.AdaptiveGradClip(clipping=0.1, exclude_groups=[1])
    pol.init(2)
    d = pol.update(ctx_for([1.0, 1.0], params=[[p1], [p2]], grads=[[g1], [g2]]))
    assert d.clipped.tolist() == [True, False]
    assert torch.equal(g2, torch.full((4, 4), 10.0))
    torch.testing.assert_close(g1.norm(dim=1), torch.full((4,), 0.2))
    # grads carrying a loss scale of 1000: the true ratio (0.02 < 0.1) is not clipped
    g3 = torch.full((4, 4), 10.0)
    d = pol.update(ctx_for([1.0, 1.0], params=[[p1], [p2]], grads=[[g3], []],
                           grad_factor=torch.tensor(1e-3)))
    assert d.clipped.tolist() == [False, False] and torch.equal(g3, torch.full((4, 4), 10.0))


# --------------------------------------------------------------------------- SpikeSkip
def test_spike_skip_threshold_uses_previous_window():
    pol = P.SpikeSkip(window=8, k=3.0, warmup=5)
    hist = [1.0, 1.1, 0.9, 1.05, 0.95]
    ds = feed(pol, hist)
    assert not any(d.skip.item() for d in ds)
    t = torch.tensor(hist, dtype=torch.float64)
    thr = (t.mean() + 3.0 * t.std()).item()  # sample std of the previous values
    (below,) = feed(P.SpikeSkip(window=8, k=3.0, warmup=5), hist + [thr * 0.999])[-1:]
    (above,) = feed(P.SpikeSkip(window=8, k=3.0, warmup=5), hist + [thr * 1.001])[-1:]
    assert not below.skip.item() and above.skip.item()
    assert above.info["spike_mean"].item() == pytest.approx(t.mean().item(), rel=1e-6)


def test_spike_skip_warmup_and_window_wrap():
    pol = P.SpikeSkip(window=4, k=2.0, warmup=3)
    (d,) = feed(pol, [1.0, 1000.0])[-1:]
    assert not d.skip.item()  # not warmed up yet
    feed(pol, [1.0, 1.0, 1.0, 1.0, 1.0])  # the 1000 leaves the 4-slot window
    assert pol.state["buffer"][0].tolist() == [1.0] * 4
    (d,) = feed(pol, [50.0])
    assert d.skip.item()
    assert pol.state["count"].item() == 8  # the spike itself is recorded, as OLMo-core


def test_spike_skip_on_loss_and_nonfinite():
    pol = P.SpikeSkip(window=16, k=4.0, warmup=4, on=("grad_norm", "loss"))
    assert pol.needs_loss and pol.may_skip
    pol.init(1)
    for v in [1.0, 1.1, 0.9, 1.0]:
        pol.update(ctx_for([1.0], loss=v))
    d = pol.update(ctx_for([1.0], loss=30.0))
    assert d.skip.item() and d.info["spike_flags"].tolist() == [False, True]
    before = pol.state["count"].clone()
    pol.update(ctx_for([float("nan")], loss=float("nan")))
    assert torch.equal(pol.state["count"], before)
    with pytest.raises(ValueError, match="loss"):
        pol.update(ctx_for([1.0]))


@pytest.mark.parametrize("kw", [dict(window=1), dict(k=0), dict(warmup=1), dict(on=()),
                                dict(on=("grad",)), dict(on=("loss", "loss"))])
def test_spike_skip_rejects_bad_args(kw):
    with pytest.raises(ValueError):
        P.SpikeSkip(**kw)


# ------------------------------------------------------------------------------ Chain
def test_chain_multiplies_coefs_and_ors_skips():
    spike = P.SpikeSkip(window=8, k=2.0, warmup=3)
    z = P.ZScoreClip(warmup=3)
    ch = P.Chain(spike, z, P.FixedNorm(100.0))
    assert ch.may_skip and not ch.needs_loss
    ch.init(1)
    for v in [1.0, 1.1, 0.9]:
        ch.update(ctx_for([v]))
    zc = z.state["count"].item()
    d = ch.update(ctx_for([40.0]))
    assert d.skip.item()
    assert z.state["count"].item() == zc  # skipped by the spike rule: not fed to ZClip
    assert d.coef.item() < 1.0
    assert "spike_mean" in d.info and "zclip_z" in d.info
    with pytest.raises(TypeError):
        P.Chain(P.FixedNorm(1.0), "nope")


# ------------------------------------------------------------------ state and syncs
def _policies():
    return [P.FixedNorm(1.0), P.ZScoreClip(warmup=4), P.QuantileClip(0.5, 8),
            P.SpikeSkip(window=8, warmup=4), P.Chain(P.SpikeSkip(window=8, warmup=3),
                                                     P.ZScoreClip(warmup=3))]


@pytest.mark.parametrize("make", range(5))
def test_state_dict_roundtrip_continues_identically(make):
    torch.manual_seed(1)
    vals = (torch.rand(20) * 3 + 1).tolist()
    vals[12] = 80.0
    a = _policies()[make]
    feed(a, vals[:10])
    b = _policies()[make]
    b.init(1)
    b.load_state_dict(a.state_dict())
    da, db = feed(a, vals[10:]), feed(b, vals[10:])
    for x, y in zip(da, db):
        for f in ("coef", "skip"):
            u, v = getattr(x, f), getattr(y, f)
            assert (u is None) == (v is None)
            if u is not None:
                assert torch.equal(u, v)
    sa, sb = a.state_dict(), b.state_dict()
    assert repr(sa) == repr(sb)


def test_load_state_dict_keeps_tensor_addresses_and_checks_type():
    a = P.ZScoreClip(warmup=2)
    feed(a, [1.0, 2.0, 3.0])
    b = P.ZScoreClip(warmup=2)
    b.init(1)
    ptr = b.state["mean"].data_ptr()
    b.load_state_dict(a.state_dict())
    assert b.state["mean"].data_ptr() == ptr and b.state["mean"].item() == a.state["mean"].item()
    with pytest.raises(ValueError, match="QuantileClip"):
        b.load_state_dict(P.QuantileClip(0.5, 4).state_dict())


@pytest.mark.parametrize("make", range(5))
def test_policies_never_read_device_values(make, no_sync):
    pol = _policies()[make]
    pol.init(1)
    for v in [1.0, 2.0, 1.5, 1.2, 1.1, 90.0, float("nan"), 1.0]:
        pol.update(ctx_for([v]))


def test_agc_never_reads_device_values(no_sync):
    ps, gs = [torch.ones(3, 3), torch.ones(3)], [torch.ones(3, 3), torch.ones(3)]
    pol = P.AdaptiveGradClip()
    pol.init(1)
    pol.update(ctx_for([1.0], params=[ps], grads=[gs]))
