"""gradstats with the real transformers Trainer (accelerate underneath), tiny GPT-2 on CPU."""
import importlib
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch

from transformers import (GPT2Config, GPT2LMHeadModel, Trainer,  # noqa: E402
                          TrainerCallback, TrainingArguments)

import gradstats  # noqa: E402
from gradstats import clip as gs_clip  # noqa: E402
from gradstats.integrations import huggingface as gs_hf  # noqa: E402
from gradstats.integrations.common import DoubleClippingWarning  # noqa: E402
from gradstats.integrations.huggingface import GradStatsCallback  # noqa: E402

VOCAB, SEQ = 64, 8


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=64):
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _model():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=16, n_layer=1,
                                      n_head=2, bos_token_id=0, eos_token_id=0))


def _trainer(tmp_path, steps=6, max_grad_norm=0.3, logging_steps=1, model=None, **kw):
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=8,
        learning_rate=1e-2, logging_steps=logging_steps, max_grad_norm=max_grad_norm,
        report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
        data_seed=0)
    return Trainer(model=model if model is not None else _model(), args=args,
                   train_dataset=Tokens(), **kw)


def _train_logs(trainer):
    return [e for e in trainer.state.log_history if "loss" in e]


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


def test_patch_torch_routes_trainer_clipping(tmp_path, counters):
    """accelerate clips through get_total_norm + clip_grads_with_norm_; both land in
    gradstats under patch_torch(), and the losses are those of the unpatched run."""
    torch_fns = (torch.nn.utils.get_total_norm, torch.nn.utils.clip_grads_with_norm_)
    ref = _trainer(tmp_path / "ref")
    ref.train()
    assert sum(counters.values()) == 0
    tr = _trainer(tmp_path / "patched")
    with gradstats.patch_torch():
        tr.train()
    assert (torch.nn.utils.get_total_norm, torch.nn.utils.clip_grads_with_norm_) == torch_fns
    steps = tr.state.global_step
    assert steps == 6
    assert counters["get_total_norm"] == steps
    assert counters["clip_grads_with_norm_"] == steps
    a, b = _train_logs(ref), _train_logs(tr)
    assert len(a) == len(b) == steps
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-6)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-5)
    assert max(x["grad_norm"] for x in a) > 0.3  # the runs really clipped


def test_callback_plain_optimizer_measures_only_on_logging_steps(tmp_path, monkeypatch):
    calls = []
    real = gs_hf.grad_stats

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(gs_hf, "grad_stats", counting)
    tr = _trainer(tmp_path, steps=7, max_grad_norm=0.0, logging_steps=3,
                  callbacks=[GradStatsCallback()])
    tr.train()
    assert len(calls) == 2  # steps 3 and 6 only
    logs = _train_logs(tr)
    assert [e["step"] for e in logs] == [3, 6]
    for e in logs:
        # Trainer's default AdamW has two groups (decay / no decay)
        g0, g1 = e["gradstats/grad_norm/group0"], e["gradstats/grad_norm/group1"]
        assert e["gradstats/total_norm"] == pytest.approx((g0 ** 2 + g1 ** 2) ** 0.5, rel=1e-5)
        assert e["gradstats/total_norm"] == pytest.approx(e["grad_norm"], rel=1e-5)
        assert 0 < e["gradstats/max_abs/group0"] <= g0
        assert e["gradstats/nonfinite/group0"] == 0 and e["gradstats/nonfinite/group1"] == 0
        assert "gradstats/skipped_steps" not in e  # only for a StableOptimizer
    summary = tr.state.log_history[-1]
    assert "train_runtime" in summary and not any(k.startswith("gradstats/") for k in summary)


def _stable(model, max_norm=0.3):
    return gradstats.StableOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2),
                                     max_norm=max_norm)


def test_callback_stable_optimizer_warns_once_about_double_clipping(tmp_path):
    model = _model()
    tr = _trainer(tmp_path, steps=4, max_grad_norm=1.0, model=model,
                  optimizers=(_stable(model), None), callbacks=[GradStatsCallback()])
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        tr.train()
        tr.train()  # a second train() with the same callback: still one warning
    dbl = [w for w in rec if issubclass(w.category, DoubleClippingWarning)]
    assert len(dbl) == 1
    msg = str(dbl[0].message)
    assert "TrainingArguments(max_grad_norm=0)" in msg and "max_norm=None" in msg
    logs = _train_logs(tr)
    assert logs and all("gradstats/clip_coef/group0" in e for e in logs)


def test_callback_stable_optimizer_keys_and_values(tmp_path):
    model = _model()
    opt = _stable(model)
    cb = GradStatsCallback()
    tr = _trainer(tmp_path, steps=5, max_grad_norm=0.0, logging_steps=2, model=model,
                  optimizers=(opt, None), callbacks=[cb])
    with warnings.catch_warnings():
        warnings.simplefilter("error", DoubleClippingWarning)  # max_grad_norm=0: no warning
        tr.train()
    logs = _train_logs(tr)
    assert [e["step"] for e in logs] == [2, 4]
    s = opt.summary()
    for e in logs:
        # the StableOptimizer measured the same gradients the Trainer's grad_norm did
        assert e["gradstats/total_norm"] == pytest.approx(e["grad_norm"], rel=1e-5)
        coef = min(1.0, 0.3 / (e["gradstats/total_norm"] + 1e-6))
        assert e["gradstats/clip_coef/group0"] == pytest.approx(coef, rel=1e-5)
        assert e["gradstats/clipped"] == float(coef < 1)
        assert e["gradstats/skipped"] == 0.0
        assert e["gradstats/nonfinite/group0"] == 0.0
    assert logs[-1]["gradstats/skipped_steps"] == s["skipped"] == 0
    # cumulative counts: after 2 and 4 of the 5 steps
    c2, c4 = (e["gradstats/clipped_steps"] for e in logs)
    assert 0 < c2 <= 2 and c2 <= c4 <= c2 + 2 and s["clipped"] - 1 <= c4 <= s["clipped"]


class Recorder(TrainerCallback):
    """Stands for a report_to logger (TensorBoard, W&B): records the keys it is given."""

    def __init__(self):
        self.keys = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.keys.append(set(logs))


def test_attach_puts_callback_before_report_to_loggers(tmp_path):
    tr = _trainer(tmp_path, steps=2, max_grad_norm=0.0)
    rec = Recorder()
    tr.callback_handler.callbacks.insert(1, rec)  # where report_to loggers go
    cb = GradStatsCallback().attach(tr)
    cbs = tr.callback_handler.callbacks
    assert cbs.index(cb) < cbs.index(rec)
    assert cb.attach(tr) is cb and cbs.count(cb) == 1  # attaching again moves, not adds
    tr.train()
    assert "gradstats/total_norm" in rec.keys[0]


def test_report_to_without_attach_warns_once():
    cb = GradStatsCallback()
    args = SimpleNamespace(max_grad_norm=1.0, report_to=["tensorboard"])
    state = SimpleNamespace(log_history=[])
    with pytest.warns(UserWarning, match=r"attach\(trainer\)"):
        cb.on_train_begin(args, state, None, optimizer=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cb.on_train_begin(args, state, None, optimizer=None)


def test_import_error_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "gradstats.integrations.huggingface")
    with pytest.raises(ImportError, match="pip install transformers"):
        importlib.import_module("gradstats.integrations.huggingface")


def test_callback_plain_optimizer_epoch_logging(tmp_path):
    """logging_strategy="epoch": the epoch's last step is not known in advance, so the
    statistics are measured every step (no device read) and logged at the epoch's end."""
    args = TrainingArguments(
        output_dir=str(tmp_path), num_train_epochs=1, per_device_train_batch_size=16,
        learning_rate=1e-2, logging_strategy="epoch", max_grad_norm=0.0, report_to="none",
        save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
    tr = Trainer(model=_model(), args=args, train_dataset=Tokens(),
                 callbacks=[GradStatsCallback()])
    tr.train()
    logs = _train_logs(tr)
    assert [e["step"] for e in logs] == [4]
    assert logs[0]["gradstats/total_norm"] == pytest.approx(logs[0]["grad_norm"], rel=1e-5)


def test_measures_in_on_optimizer_step_when_pre_hook_is_absent(monkeypatch):
    """Older transformers call on_optimizer_step but not on_pre_optimizer_step."""
    calls = []
    real = gs_hf.grad_stats
    monkeypatch.setattr(gs_hf, "grad_stats", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = torch.nn.Linear(4, 3)
    model(torch.randn(5, 4)).pow(2).sum().backward()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    args = SimpleNamespace(logging_first_step=False, logging_strategy="steps")
    state = SimpleNamespace(global_step=4, logging_steps=5, log_history=[])
    cb = GradStatsCallback()
    cb.on_optimizer_step(args, state, None, optimizer=opt)  # step 5: a logging step
    assert len(calls) == 1
    state.global_step = 5
    logs = {"loss": 1.0}
    cb.on_log(args, state, None, logs=logs, optimizer=opt)
    ref = torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()
    assert logs["gradstats/total_norm"] == pytest.approx(ref, rel=1e-5)
    # with both hooks called, the statistics are measured once (in the pre hook)
    state.global_step = 9
    cb.on_pre_optimizer_step(args, state, None, optimizer=opt)
    cb.on_optimizer_step(args, state, None, optimizer=opt)
    assert len(calls) == 2
