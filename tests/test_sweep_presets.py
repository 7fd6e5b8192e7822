"""gradstats.presets: the one-line constructor, its overrides, and what the preset does in
training (skips NaN steps and spikes, otherwise steps exactly like torch's clip)."""
import copy

import pytest
import torch

import gradstats
from gradstats import policies as P
from gradstats import presets

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))


def test_recommended_constructor_and_overrides(tmp_path):
    m = _model()
    opt = presets.recommended(torch.optim.AdamW(m.parameters(), lr=1e-3))
    assert isinstance(opt, gradstats.StableOptimizer)
    kw = presets.recommended_kwargs()
    assert repr(opt.policy) == repr(kw["policy"]) and repr(opt.spike) == repr(kw["spike"])
    assert opt.skip_nonfinite is True
    # fresh policy objects every call: two optimizers never share policy state
    assert presets.recommended_kwargs()["spike"] is not kw["spike"]
    # preset knobs and StableOptimizer arguments
    log = tmp_path / "r.jsonl"
    opt = presets.recommended(torch.optim.AdamW(m.parameters()), max_norm=2.0, spike=False,
                              param_names=m.named_parameters(), log=str(log))
    assert isinstance(opt.policy, P.FixedNorm) and opt.policy.max_norm == 2.0
    assert opt.spike is None
    assert opt.param_name(m[0].weight) == "0.weight"
    opt.log.close()
    opt = presets.recommended(torch.optim.SGD(m.parameters(), lr=0.1), max_norm=None,
                              spike_warmup=5, spike_k=3.0)
    assert opt.policy is None and opt.spike.warmup == 5 and opt.spike.k == 3.0
    opt = presets.recommended(torch.optim.SGD(m.parameters(), lr=0.1),
                              policy=P.ZScoreClip())  # replaces the preset's policy
    assert isinstance(opt.policy, P.ZScoreClip)
    with pytest.raises(ValueError, match="max_norm"):
        presets.recommended(torch.optim.SGD(m.parameters(), lr=0.1), max_norm=-1.0)
    with pytest.raises(TypeError):
        presets.recommended(m)
    assert "SpikeSkip" in presets.describe()


def _train(opt, m, steps, nan_step=None, spike_step=None, clip=None):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 1, generator=g)
    losses = []
    for s in range(1, steps + 1):
        x = torch.randn(32, 8, generator=g)
        loss = torch.nn.functional.mse_loss(m(x), torch.tanh(x @ w))
        loss.backward()
        if s == nan_step:
            m[0].weight.grad.view(-1)[3] = float("nan")
        if s == spike_step:
            for p in m.parameters():
                p.grad.mul_(1000.0)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(m.parameters(), clip)
            opt.step()
        else:
            opt.step(loss=loss)
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def test_preset_skips_nan_and_spike_and_otherwise_equals_torch_clip():
    kw = presets.recommended_kwargs()
    warm = kw["spike"].warmup
    m1 = _model()
    m2 = copy.deepcopy(m1)
    # plain AdamW (host decision path): bit for bit torch's clip + step on normal steps
    ref = torch.optim.AdamW(m1.parameters(), lr=1e-2)
    opt = presets.recommended(torch.optim.AdamW(m2.parameters(), lr=1e-2))
    l1 = _train(ref, m1, warm + 20, clip=kw["policy"].max_norm)
    l2 = _train(opt, m2, warm + 20)
    assert opt.summary()["skipped"] == 0
    assert l1 == l2
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    # a NaN gradient (any step) and a 1000x spike after the spike warm-up are skipped
    m3 = _model()
    opt = presets.recommended(torch.optim.AdamW(m3.parameters(), lr=1e-2, fused=True))
    _train(opt, m3, warm + 20, nan_step=3, spike_step=warm + 10)
    s = opt.summary()
    assert s["skipped_by_reason"]["nonfinite"] == 1
    assert s["skipped_by_reason"]["spike"] == 1
    assert all(torch.isfinite(p).all() for p in m3.parameters())
