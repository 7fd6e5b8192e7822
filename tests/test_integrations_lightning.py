"""gradstats with the real Lightning Trainer, tiny MLP on CPU."""
import csv
import glob
import importlib
import os
import sys
import warnings

import pytest
import torch
import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger

import gradstats
from gradstats import clip as gs_clip
from gradstats.integrations import lightning as gs_pl
from gradstats.integrations.common import DoubleClippingWarning
from gradstats.integrations.lightning import GradStatsCallback


class Regressor(pl.LightningModule):
    def __init__(self, stable=None):
        super().__init__()
        self.stable = stable  # None, or StableOptimizer keyword arguments
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(),
                                       torch.nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        w = [p for n, p in self.named_parameters() if n.endswith("weight")]
        b = [p for n, p in self.named_parameters() if n.endswith("bias")]
        inner = torch.optim.AdamW([{"params": w, "weight_decay": 0.01},
                                   {"params": b, "weight_decay": 0.0}], lr=1e-2)
        if self.stable is None:
            return inner
        return gradstats.StableOptimizer(inner, **self.stable)


def _loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = x[:, :2].sum(1, keepdim=True) * 4 + 0.1 * torch.randn(256, 1, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)


class Probe(pl.Callback):
    """Losses of every step and torch's pre-clipping norm seen before each optimizer step."""

    def __init__(self):
        self.losses, self.norms = [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"]
                 if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g) for g in grads]))))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def _fit(tmp_path, steps=6, module=None, callbacks=(), **kw):
    pl.seed_everything(0, verbose=False)
    module = module if module is not None else Regressor()
    probe = Probe()
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1,
                         logger=CSVLogger(str(tmp_path)), enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[probe, *callbacks], **kw)
    trainer.fit(module, _loader())
    return trainer, probe


def _csv_rows(tmp_path):
    path = glob.glob(os.path.join(str(tmp_path), "**", "metrics.csv"), recursive=True)
    assert len(path) == 1
    with open(path[0]) as f:
        return list(csv.DictReader(f))


pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers"),
    pytest.mark.filterwarnings("ignore:.*smaller than the logging interval"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*is deprecated"),
]


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


@pytest.fixture
def counters(monkeypatch):
    calls = {n: 0 for n in ("clip_grad_norm_", "get_total_norm", "clip_grads_with_norm_",
                            "clip_grad_value_")}
    for name in calls:
        real = getattr(gs_clip, name)

        def wrapped(*a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(*a, **k)

        monkeypatch.setattr(gs_clip, name, wrapped)
    return calls


@pytest.mark.parametrize("algorithm,clip_val,fn", [("norm", 0.5, "clip_grad_norm_"),
                                                   ("value", 0.05, "clip_grad_value_")])
def test_patch_torch_routes_lightning_clipping(tmp_path, counters, algorithm, clip_val, fn):
    kw = dict(gradient_clip_val=clip_val, gradient_clip_algorithm=algorithm)
    _, ref = _fit(tmp_path / "ref", **kw)
    assert sum(counters.values()) == 0
    with gradstats.patch_torch():
        trainer, got = _fit(tmp_path / "patched", **kw)
    assert trainer.global_step == 6
    assert counters[fn] == 6
    assert len(ref.losses) == len(got.losses) == 6
    for a, b in zip(ref.losses, got.losses):
        assert b == pytest.approx(a, rel=1e-6)
    if algorithm == "norm":
        assert max(ref.norms) > clip_val  # the runs really clipped
    assert not gradstats.patch.is_patched()


def test_callback_plain_optimizer_logs_pre_clip_stats_on_logging_steps(tmp_path, monkeypatch):
    calls = []
    real = gs_pl.grad_stats

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(gs_pl, "grad_stats", counting)
    trainer, probe = _fit(tmp_path, steps=7, log_every_n_steps=3, gradient_clip_val=0.1,
                          callbacks=[GradStatsCallback(group_names=["w", "b"])])
    assert len(calls) == 2  # logging steps only (3 and 6)
    rows = [r for r in _csv_rows(tmp_path) if r.get("gradstats/total_norm")]
    assert [int(r["step"]) for r in rows] == [2, 5]  # CSVLogger's 0-based step index
    for r, i in zip(rows, (2, 5)):
        total = float(r["gradstats/total_norm"])
        assert total == pytest.approx(probe.norms[i], rel=1e-5)  # before Lightning's clip
        assert total > 0.1
        w, b = float(r["gradstats/grad_norm/w"]), float(r["gradstats/grad_norm/b"])
        assert total == pytest.approx((w * w + b * b) ** 0.5, rel=1e-5)
        assert 0 < float(r["gradstats/max_abs/w"]) <= w
        assert float(r["gradstats/nonfinite/w"]) == 0
    assert "gradstats/total_norm" in trainer.logged_metrics
    assert not any(k.endswith("skipped_steps") for k in trainer.logged_metrics)


def test_callback_stable_optimizer_keys_and_double_clipping_warning(tmp_path):
    module = Regressor(stable={"max_norm": 0.5})
    cb = GradStatsCallback()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        trainer, probe = _fit(tmp_path / "a", steps=4, module=module, log_every_n_steps=2,
                              gradient_clip_val=1.0, callbacks=[cb])
        # a second fit with the same callback: no second warning
        _fit(tmp_path / "b", steps=2, module=Regressor(stable={"max_norm": 0.5}),
             gradient_clip_val=1.0, callbacks=[cb])
    dbl = [w for w in rec if issubclass(w.category, DoubleClippingWarning)]
    assert len(dbl) == 1
    msg = str(dbl[0].message)
    assert "Trainer(gradient_clip_val=None)" in msg and "max_norm=None" in msg
    m = trainer.logged_metrics
    for k in ("gradstats/total_norm", "gradstats/grad_norm/group0", "gradstats/grad_norm/group1",
              "gradstats/clip_coef/group0", "gradstats/clipped", "gradstats/skipped",
              "gradstats/skipped_steps", "gradstats/clipped_steps", "gradstats/nonfinite_steps"):
        assert k in m, k
    opt = trainer.optimizers[0]
    assert float(m["gradstats/skipped_steps"]) == opt.summary()["skipped"] == 0
    rows = [r for r in _csv_rows(tmp_path / "a") if r.get("gradstats/total_norm")]
    assert len(rows) == 2
    # StableOptimizer measures after Lightning's clipping here (that is the double clipping)
    assert all(float(r["gradstats/total_norm"]) <= 1.0 + 1e-5 for r in rows)


def test_no_warning_without_double_clipping(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DoubleClippingWarning)
        # a StableOptimizer that only skips, with Lightning clipping: nothing clips twice
        _fit(tmp_path / "a", steps=2, module=Regressor(stable={"spike": True}),
             gradient_clip_val=1.0, callbacks=[GradStatsCallback()])
        # a clipping StableOptimizer, Lightning not clipping
        trainer, probe = _fit(tmp_path / "b", steps=4, log_every_n_steps=2,
                              module=Regressor(stable={"max_norm": 0.5}),
                              callbacks=[GradStatsCallback()])
    rows = [r for r in _csv_rows(tmp_path / "b") if r.get("gradstats/total_norm")]
    for r, i in zip(rows, (1, 3)):
        total = float(r["gradstats/total_norm"])
        assert total == pytest.approx(probe.norms[i], rel=1e-5)
        assert float(r["gradstats/clip_coef/group0"]) == pytest.approx(
            min(1.0, 0.5 / (total + 1e-6)), rel=1e-5)


def test_import_error_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
    monkeypatch.delitem(sys.modules, "gradstats.integrations.lightning")
    with pytest.raises(ImportError, match="pip install lightning"):
        importlib.import_module("gradstats.integrations.lightning")
