"""gradstats._C.describe (structure keys without addresses), fingerprint and
params_and_grads / grads_of (C++ readers of parameter lists)."""
import numpy as np
import pytest
import torch

from gradstats.backends import native

_WHY = native.NativeBackend().unavailable_reason()
if _WHY is not None:
    pytest.skip(f"native backend unavailable: {_WHY}", allow_module_level=True)

_C = native.extension()


def _grads(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(37, 11, generator=g).to(dtype),
            torch.randn(300, 20, generator=g).to(dtype).t(),  # transposed: not contiguous
            torch.randn(5, generator=g).to(dtype),
            torch.zeros(0, dtype=dtype)]


def _ptrs(d):
    return np.frombuffer(d[1], dtype=np.int64)


def test_reallocated_tensors_of_same_structure_share_the_key():
    a = _grads(0)
    b = [t.clone() if t.is_contiguous() else t.t().clone().t() for t in a]  # new storage
    b[2] = torch.randn(5)
    da, db = _C.describe(a), _C.describe(b)
    assert da[0] == db[0] and da[2] is True
    assert not np.array_equal(_ptrs(da)[:3], _ptrs(db)[:3])
    # fingerprint keys the addresses too: it differs
    assert _C.fingerprint(a)[0] != _C.fingerprint(b)[0]
    # deterministic, and a fresh bytes object each call
    assert _C.describe(a)[0] == da[0]


def test_ptrs_are_the_data_pointers():
    ts = _grads(1) + [torch.randn(100)[3:]]  # offset view: pointer inside the storage
    d = _C.describe(ts)
    ptrs = _ptrs(d)
    assert ptrs.dtype == np.int64 and len(ptrs) == len(ts)
    assert ptrs.tolist() == [t.data_ptr() for t in ts]
    assert len(d[1]) == 8 * len(ts)


@pytest.mark.parametrize("change", ["dtype", "numel", "strides", "alignment", "order",
                                    "dim"])
def test_structure_changes_change_the_key(change):
    base = torch.randn(64)
    ts = [base[:32], torch.randn(8, 5)]
    other = list(ts)
    if change == "dtype":
        other[1] = other[1].bfloat16()
    elif change == "numel":
        other[0] = base[:31]
    elif change == "strides":
        other[1] = torch.randn(5, 8).t()  # same shape (8, 5), other strides
    elif change == "alignment":
        other[0] = base[1:33]  # 4 bytes further: another address class modulo 16
        assert other[0].data_ptr() % 16 != ts[0].data_ptr() % 16
    elif change == "order":
        other = [ts[1], ts[0]]
    else:
        other[1] = torch.randn(40)  # contiguous both: numel and dtype equal
        assert _C.describe(other)[0] == _C.describe(ts)[0]  # shape alone is not structure
        # not contiguous: dim, sizes and strides enter the key
        ts = [ts[0], torch.randn(5, 8).t()]
        other = [ts[0], torch.randn(2, 4, 5).permute(2, 1, 0)]  # 40 elements, 3-D
    assert _C.describe(other)[0] != _C.describe(ts)[0], change


def test_alignment_class_modulo_16():
    base = torch.randn(64)
    same = _C.describe([base[4:20]])[0]  # 16 bytes further: same class
    assert same == _C.describe([base[0:16]])[0]
    assert _C.describe([base[2:18]])[0] != same


def test_device_and_same_device():
    ts = [torch.randn(3), torch.randn(4)]
    assert _C.describe(ts)[2] is True
    metas = [torch.empty(3, device="meta")]
    assert _C.describe(metas) is None  # no data to read: the caller's Python path
    if torch.cuda.is_available():
        mixed = [torch.randn(3), torch.randn(3, device="cuda")]
        k = _C.describe(mixed)
        assert k is not None and k[2] is False
        assert _C.describe([torch.randn(3, device="cuda")])[0] != _C.describe([torch.randn(3)])[0]


def test_describe_returns_none_for_other_objects():
    assert _C.describe([torch.randn(3), 1.0]) is None
    assert _C.describe([torch.randn(3).to_sparse()]) is None
    with pytest.raises(TypeError):
        _C.describe((torch.randn(3),))
    assert _C.describe([]) == (b"", b"", True)


def test_params_and_grads():
    g = torch.Generator().manual_seed(2)
    ps = [torch.nn.Parameter(torch.randn(4, generator=g)) for _ in range(5)]
    for i, p in enumerate(ps):
        if i != 2:
            p.grad = torch.randn(4, generator=g)
    plain = torch.randn(3, requires_grad=True)
    plain.grad = torch.ones(3)
    items = ps + [plain]
    params, grads = _C.params_and_grads(items)
    want = [p for p in items if p.grad is not None]
    assert len(params) == len(grads) == 5
    assert all(a is b for a, b in zip(params, want))
    assert all(g_ is p.grad for g_, p in zip(grads, want))
    assert [g_.data_ptr() for g_ in _C.grads_of(items)] == [g_.data_ptr() for g_ in grads]
    assert _C.params_and_grads([]) == ([], [])


def test_params_and_grads_rejects_subclasses():
    class MyParam(torch.nn.Parameter):
        pass

    p = MyParam(torch.randn(2))
    p.grad = torch.ones(2)
    assert _C.params_and_grads([p]) is None
    assert _C.grads_of([p]) is None
    assert _C.params_and_grads([torch.nn.Parameter(torch.zeros(1)), "x"]) is None
    with pytest.raises(TypeError):
        _C.params_and_grads((p,))
