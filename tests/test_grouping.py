"""Host-side bookkeeping: gradient collection, cache keys, cached backend choice."""
import torch

from gradstats.backends import registry as _dispatch
from gradstats.core import grouping as _grouping


class _MyTensor(torch.Tensor):
    pass


def test_grads_of_native_and_python_paths_agree():
    ps = [torch.nn.Parameter(torch.zeros(3)) for _ in range(5)]
    for i in (0, 2, 3):
        ps[i].grad = torch.full((3,), float(i))
    got = _grouping.grads_of(ps)
    assert [g is ps[i].grad for g, i in zip(got, (0, 2, 3))] == [True] * 3
    t = torch.zeros(2, requires_grad=True)
    t.grad = torch.ones(2)
    sub = torch.zeros(2).as_subclass(_MyTensor).requires_grad_()
    sub.grad = torch.ones(2)
    mixed = _grouping.grads_of([ps[0], t, sub, ps[1]])  # a subclass: the Python path
    assert len(mixed) == 3 and mixed[0] is ps[0].grad and mixed[1] is t.grad
    assert _grouping.grads_of([]) == []


def test_key_stable_and_sensitive():
    gs = [torch.randn(4, 3), torch.randn(5)]
    k1 = _grouping.slices([gs])[0][0].key
    k2 = _grouping.slices([list(gs)])[0][0].key
    assert k1 == k2 and hash(k1) == hash(k2)
    assert _grouping.slices([gs[:1], gs[1:]])[0][0].key != k1  # other grouping
    assert _grouping.slices([[gs[0].t(), gs[1]]])[0][0].key != k1  # other layout
    moved = _grouping.slices([[gs[0], gs[1].clone()]])[0][0]
    assert moved.key == k1  # other memory, same structure: the same plans serve it
    assert moved.ptrs != _grouping.slices([gs])[0][0].ptrs  # ... with this call's addresses


def test_selection_cached_per_norm_type_and_request():
    gs = [torch.randn(10)]
    s = _grouping.slices([gs])[0][0]
    a = _dispatch.select(s, 2.0, "torch")
    assert a.name == "torch" and _dispatch.select(s, 2.0, "torch") is a
    default = _dispatch.select(s, 2.0, None)
    assert default.name in ("native", "torch")
    assert _dispatch.select(s, 3.0, None).name in ("native", "torch")
