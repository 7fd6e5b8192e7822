"""TritonBackend against a float64 computation, under the Triton interpreter on CPU tensors."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from gradstats.core.grouping import slices  # noqa: E402
from gradstats.backends.triton import TritonBackend  # noqa: E402
from gradstats.backends.triton import launcher  # noqa: E402

INF = math.inf
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NORMS = [1.0, 2.0, INF]

if not launcher.INTERPRET:
    pytest.skip("the triton kernels were loaded without TRITON_INTERPRET=1; these tests run "
                "them on CPU tensors under the interpreter", allow_module_level=True)


@pytest.fixture
def backend():
    return TritonBackend()


@pytest.fixture
def small_chunks(monkeypatch):
    """Tiny chunks so that tensors of a few hundred elements span several chunks."""
    monkeypatch.setattr(launcher, "CHUNK", 64)
    monkeypatch.setattr(launcher, "BLOCK", 16)
    monkeypatch.setattr(launcher, "FINAL_BLOCK", 16)


def rand(gen, shape, dtype, scale=1.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def one_slice(groups):
    sl, flat = slices(groups)
    assert len(sl) == 1
    return sl[0], flat


# ---------------------------------------------------------------------------------------
# float64 reference
# ---------------------------------------------------------------------------------------

def _raw(x, p):
    """(acc over finite elements, max |finite|, n_nan, n_inf) in float64."""
    x = x.detach().double().flatten()
    n_nan = int(torch.isnan(x).sum())
    n_inf = int(torch.isinf(x).sum())
    fin = x[torch.isfinite(x)].abs()
    mx = float(fin.max()) if fin.numel() else 0.0
    if math.isinf(p):
        acc = mx
    else:
        acc = float((fin ** p).sum())
    return acc, mx, n_nan, n_inf


def _norm(acc, n_nan, n_inf, p):
    if n_nan:
        return math.nan
    if n_inf:
        return math.inf
    return acc if (math.isinf(p) or p == 1) else acc ** (1.0 / p)


def reference(groups, p):
    norms, maxs, accs, nans, infs = [], [], [], [], []
    for g in groups:
        raws = [_raw(t, p) for t in g]
        acc = (max([r[0] for r in raws], default=0.0) if math.isinf(p)
               else sum(r[0] for r in raws))
        mx = max([r[1] for r in raws], default=0.0)
        nn, ni = sum(r[2] for r in raws), sum(r[3] for r in raws)
        accs.append(acc), maxs.append(mx), nans.append(nn), infs.append(ni)
        norms.append(_norm(acc, nn, ni, p))
    tot_acc = max(accs, default=0.0) if math.isinf(p) else sum(accs)
    total = _norm(tot_acc, sum(nans), sum(infs), p)
    per_tensor = [_norm(r[0], r[2], r[3], p) for r in (_raw(t, p) for g in groups for t in g)]
    f64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return dict(norm=f64(norms), acc=f64(accs), max_abs=f64(maxs), total=f64(total),
                n_nan=torch.tensor(nans, dtype=torch.int64),
                n_inf=torch.tensor(infs, dtype=torch.int64),
                per_tensor=f64(per_tensor))


def close(actual, expected):
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=0, equal_nan=True)


def check(parts, groups, p, per_tensor=True):
    ref = reference(groups, p)
    G = len(groups)
    f = parts.final
    assert f is not None
    assert f.norm.shape == (G,) and f.total_norm.shape == ()
    close(f.norm, ref["norm"])
    close(f.total_norm, ref["total"])
    close(parts.acc, ref["acc"])
    # max over exactly representable values: exact
    assert torch.equal(f.max_abs.double(), ref["max_abs"])
    assert torch.equal(parts.max_abs, f.max_abs)
    assert f.nonfinite.dtype == torch.int64
    assert torch.equal(parts.n_nan, ref["n_nan"])
    assert torch.equal(parts.n_inf, ref["n_inf"])
    assert torch.equal(f.nonfinite, ref["n_nan"] + ref["n_inf"])
    if per_tensor:
        close(f.per_tensor_norm, ref["per_tensor"])
        T = ref["per_tensor"].numel()
        assert parts.t_acc.shape == (T,) and parts.t_nan.shape == (T,)
    else:
        assert f.per_tensor_norm is None and parts.t_acc is None
    return ref


def bits(t):
    """Bit pattern of a tensor (NaN-safe exact comparison)."""
    t = t.detach().contiguous()
    return t.view({4: torch.int32, 2: torch.int16, 8: torch.int64}[t.element_size()]).clone()


def torch_clip_coef(total, max_norm):
    return torch.clamp(max_norm / (total + 1e-6), max=1.0)


# ---------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", NORMS)
def test_norms_match_float64(backend, dtype, p):
    gen = torch.Generator().manual_seed(1)
    groups = [
        [rand(gen, (1,), dtype, 3.0), rand(gen, (7,), dtype, 0.01), rand(gen, (1000,), dtype),
         rand(gen, (3, 5, 7), dtype, 10.0)],
        [],
        [rand(gen, (0,), dtype), rand(gen, (2500,), dtype, 0.5), rand(gen, (4, 0), dtype)],
    ]
    ds, _ = one_slice(groups)
    assert backend.unsupported_reasons(ds, p) == []
    parts = backend.compute(ds, p, per_tensor=True, full=True, max_norm=1.0)
    ref = check(parts, groups, p)
    assert parts.final.per_tensor_norm[4].item() == 0.0  # zero-size tensors
    assert parts.final.norm[1].item() == 0.0  # empty group
    assert ref["total"].item() > 1.0
    coef = parts.final.clip_coef
    assert coef.shape == () and coef.dtype == torch.float32
    assert torch.equal(coef, torch_clip_coef(parts.final.total_norm, 1.0))


@pytest.mark.parametrize("p", NORMS)
def test_multi_chunk_mixed_dtypes(backend, small_chunks, p):
    gen = torch.Generator().manual_seed(2)
    groups = [
        [rand(gen, (300,), torch.float32), rand(gen, (17, 9), torch.bfloat16, 4.0)],
        [rand(gen, (129,), torch.float16, 0.1), rand(gen, (64,), torch.float32),
         rand(gen, (65,), torch.float32, 100.0)],
        [rand(gen, (1,), torch.bfloat16), rand(gen, (200,), torch.float16, 2.0)],
    ]
    ds, flat = one_slice(groups)
    parts = backend.compute(ds, p, per_tensor=True, full=True)
    check(parts, groups, p)
    plan = launcher.get_plan(ds)
    assert plan.C == sum(-(-t.numel() // 64) for t in flat)
    # one stats launch per dtype when every chunk is aligned
    assert sorted(str(L.dtype) for L in plan.stats_launches) == ["bf16", "fp16", "fp32"]
    assert all(L.aligned for L in plan.stats_launches)
    assert parts.final.clip_coef is None


def test_per_tensor_off(backend, small_chunks):
    gen = torch.Generator().manual_seed(3)
    groups = [[rand(gen, (100,), torch.float32)], [rand(gen, (70,), torch.bfloat16)]]
    ds, _ = one_slice(groups)
    check(backend.compute(ds, 2.0, per_tensor=False, full=False), groups, 2.0,
          per_tensor=False)


def test_single_group_and_many_empty_groups(backend, small_chunks):
    gen = torch.Generator().manual_seed(4)
    a = rand(gen, (150,), torch.float32)
    for groups in ([[a]], [[], [a]], [[a], [], []], [[], [], []] + [[a]]):
        ds, _ = one_slice(groups)
        parts = backend.compute(ds, 2.0, per_tensor=True, full=True)
        check(parts, groups, 2.0)


def test_zero_size_only(backend):
    groups = [[torch.zeros(0), torch.zeros(3, 0, dtype=torch.bfloat16)], []]
    ds, _ = one_slice(groups)
    parts = backend.compute(ds, 2.0, per_tensor=True, full=True, max_norm=1.0)
    assert launcher.get_plan(ds).C == 0
    f = parts.final
    assert f.norm.tolist() == [0.0, 0.0] and f.total_norm.item() == 0.0
    assert f.max_abs.tolist() == [0.0, 0.0] and f.nonfinite.tolist() == [0, 0]
    assert f.per_tensor_norm.tolist() == [0.0, 0.0]
    assert f.clip_coef.item() == 1.0


def test_noncontiguous(backend, small_chunks):
    gen = torch.Generator().manual_seed(5)
    a = rand(gen, (20, 30), torch.float32).t()
    b = rand(gen, (100,), torch.float32)[::3]
    c = rand(gen, (8, 10), torch.float16)[:, 2:7]
    d = rand(gen, (50,), torch.float32)
    e = rand(gen, (16, 12), torch.bfloat16, 3.0).t()
    f = rand(gen, (5, 6, 7), torch.float32).permute(2, 0, 1)
    groups = [[a, d], [b, c, e, f]]
    assert not any(t.is_contiguous() for t in (a, b, c, e, f))
    ds, _ = one_slice(groups)
    for p in NORMS:
        check(backend.compute(ds, p, per_tensor=True, full=True), groups, p)
    plan = launcher.get_plan(ds)
    assert len(plan.copies) == 5
    # values change in place: the next call must see them (scratch is refreshed per call)
    a.mul_(2.0)
    c[1, 1] = float("nan")
    ds2, _ = one_slice(groups)
    parts = backend.compute(ds2, 2.0, per_tensor=True, full=True)
    assert launcher.get_plan(ds2) is plan
    check(parts, groups, 2.0)


def test_misaligned_contiguous(backend, small_chunks):
    gen = torch.Generator().manual_seed(6)
    buf32 = rand(gen, (301,), torch.float32)
    buf16 = rand(gen, (203,), torch.bfloat16)
    x, y = buf32[1:], buf16[3:]  # contiguous views whose data_ptr is not 16-byte aligned
    z = rand(gen, (100,), torch.float32)
    assert x.data_ptr() % 16 and y.data_ptr() % 16
    groups = [[x, z], [y]]
    ds, _ = one_slice(groups)
    for p in NORMS:
        check(backend.compute(ds, p, per_tensor=True, full=True), groups, p)
    plan = launcher.get_plan(ds)
    assert {(str(L.dtype), L.aligned) for L in plan.stats_launches} == {
        ("fp32", True), ("fp32", False), ("bf16", False)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("p", NORMS)
def test_nonfinite(backend, small_chunks, dtype, p):
    gen = torch.Generator().manual_seed(7)
    t_nan = rand(gen, (300,), dtype, 5.0)
    t_nan[250] = float("nan")  # in a later chunk
    t_nan[10] = float("inf")
    t_ninf = rand(gen, (130,), dtype)
    t_ninf[129] = -float("inf")
    t_ok = rand(gen, (90,), dtype)
    t_allnan = torch.full((5,), float("nan"), dtype=dtype)
    groups = [[t_nan, t_ok], [t_ninf], [rand(gen, (40,), dtype)], [], [t_allnan]]
    ds, _ = one_slice(groups)
    parts = backend.compute(ds, p, per_tensor=True, full=True, max_norm=1.0)
    check(parts, groups, p)
    f = parts.final
    assert math.isnan(f.norm[0].item()) and f.norm[1].item() == INF
    assert math.isfinite(f.norm[2].item()) and f.norm[3].item() == 0.0
    assert math.isnan(f.norm[4].item()) and f.max_abs[4].item() == 0.0
    assert f.nonfinite.tolist() == [2, 1, 0, 0, 5]
    assert math.isnan(f.total_norm.item())
    assert math.isnan(f.clip_coef.item())  # NaN propagates through the clamp
    pt = f.per_tensor_norm.tolist()
    assert math.isnan(pt[0]) and math.isfinite(pt[1]) and pt[2] == INF

    # Inf but no NaN: total Inf, clip coefficient 0 (as torch)
    groups = [[t_ninf, t_ok]]
    ds, _ = one_slice(groups)
    parts = backend.compute(ds, p, per_tensor=False, full=True, max_norm=1.0)
    check(parts, groups, p, per_tensor=False)
    assert parts.final.total_norm.item() == INF
    assert parts.final.clip_coef.item() == 0.0


def test_clip_coef(backend):
    gen = torch.Generator().manual_seed(8)
    groups = [[rand(gen, (500,), torch.float32)], [rand(gen, (77,), torch.float16)]]
    ds, _ = one_slice(groups)
    for max_norm in (1e-3, 0.5, 3.0, 1e6, 0.0):
        f = backend.compute(ds, 2.0, per_tensor=False, full=True, max_norm=max_norm).final
        expect = torch_clip_coef(f.total_norm, max_norm)
        assert torch.equal(f.clip_coef, expect), (max_norm, f.clip_coef, expect)
    assert backend.compute(ds, 2.0, False, True, max_norm=1e6).final.clip_coef.item() == 1.0


def test_deterministic_and_fresh_outputs(backend, small_chunks):
    gen = torch.Generator().manual_seed(9)
    groups = [[rand(gen, (1000,), torch.float32), rand(gen, (300,), torch.bfloat16).t()],
              [rand(gen, (10, 33), torch.float16).t()]]
    ds, flat = one_slice(groups)
    p1 = backend.compute(ds, 2.0, per_tensor=True, full=True, max_norm=0.1)
    p2 = backend.compute(ds, 2.0, per_tensor=True, full=True, max_norm=0.1)
    for name in ("norm", "total_norm", "max_abs", "per_tensor_norm", "clip_coef"):
        a, b = getattr(p1.final, name), getattr(p2.final, name)
        assert torch.equal(bits(a), bits(b)), name
        assert a.data_ptr() != b.data_ptr(), name  # fresh outputs per call
    assert torch.equal(p1.final.nonfinite, p2.final.nonfinite)
    kept = p1.final.norm.clone()
    flat[0].mul_(3.0)
    backend.compute(ds, 2.0, per_tensor=True, full=True)
    assert torch.equal(p1.final.norm, kept)  # old results untouched by later calls


# ---------------------------------------------------------------------------------------
# scale_
# ---------------------------------------------------------------------------------------

def _scale_groups(gen):
    return [
        [rand(gen, (300,), torch.float32), rand(gen, (17, 9), torch.bfloat16, 4.0),
         rand(gen, (20, 6), torch.float32).t()],
        [],
        [rand(gen, (129,), torch.float16, 0.1), rand(gen, (60,), torch.bfloat16)[::2],
         rand(gen, (0,), torch.float32)],
        [rand(gen, (7,), torch.float32)],
    ]


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # inf * 0 under numpy
@pytest.mark.parametrize("c", [0.37, 1e-3, 0.0])
def test_scale_scalar_coef(backend, small_chunks, c):
    gen = torch.Generator().manual_seed(10)
    groups = _scale_groups(gen)
    groups[0][0][5] = float("nan")
    groups[2][0][3] = -float("inf")
    ds, flat = one_slice(groups)
    coef = torch.tensor(c, dtype=torch.float32)
    expect = [t.clone().mul_(coef) for t in flat]  # torch's clip: g.mul_(coef)
    backend.scale_(ds, coef)
    for t, e in zip(flat, expect):
        assert torch.equal(bits(t), bits(e))


@pytest.mark.parametrize("c", [1.0, 2.0, INF])
def test_scale_coef_ge_one_untouched(backend, small_chunks, c):
    gen = torch.Generator().manual_seed(11)
    groups = _scale_groups(gen)
    groups[0][0][5] = float("nan")
    groups[0][2][1, 1] = float("nan")  # non-contiguous one
    ds, flat = one_slice(groups)
    before = [bits(t) for t in flat]
    backend.scale_(ds, torch.tensor(c))
    for t, b in zip(flat, before):
        assert torch.equal(bits(t), b)


def test_scale_nan_coef(backend, small_chunks):
    gen = torch.Generator().manual_seed(12)
    groups = _scale_groups(gen)
    ds, flat = one_slice(groups)
    backend.scale_(ds, torch.tensor(float("nan")))
    for t in flat:
        assert torch.isnan(t).all()


def test_scale_per_group(backend, small_chunks):
    gen = torch.Generator().manual_seed(13)
    groups = _scale_groups(gen)
    ds, flat = one_slice(groups)
    coef = torch.tensor([0.25, 0.5, float("nan"), 1.0], dtype=torch.float32)
    before = [t.clone() for t in flat]
    backend.scale_(ds, coef)
    for t, b, g in zip(flat, before, ds.group_of):
        if g == 0:
            assert torch.equal(bits(t), bits(b.mul_(coef[0])))
        elif g == 2:
            assert torch.isnan(t).all()
        else:
            assert torch.equal(bits(t), bits(b))
    # then stats of the scaled gradients still match the reference
    groups2 = [groups[0], groups[3]]
    ds2, _ = one_slice(groups2)
    check(backend.compute(ds2, 2.0, per_tensor=True, full=True), groups2, 2.0)


def test_scale_with_device_coefficient_from_compute(backend, small_chunks):
    """The intended flow: clip_coef from compute() feeds scale_ without leaving the device."""
    gen = torch.Generator().manual_seed(14)
    groups = [[rand(gen, (400,), torch.float32), rand(gen, (90,), torch.bfloat16)]]
    ds, flat = one_slice(groups)
    f = backend.compute(ds, 2.0, per_tensor=False, full=True, max_norm=1.0).final
    expect = [t.clone().mul_(f.clip_coef) for t in flat]
    backend.scale_(ds, f.clip_coef)
    for t, e in zip(flat, expect):
        assert torch.equal(bits(t), bits(e))
    after = backend.compute(ds, 2.0, per_tensor=False, full=True).final.total_norm.item()
    assert after == pytest.approx(1.0, rel=1e-3)  # bf16 rounding of the scaled values


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_scale_16bit_rounding_matches_torch(backend, dtype):
    """Round-to-nearest-even of x * coef, over a wide range of magnitudes and specials."""
    gen = torch.Generator().manual_seed(16)
    info = torch.finfo(dtype)
    mag = torch.randn(3000, generator=gen, dtype=torch.float64)
    lo, hi = math.log2(info.smallest_normal) - 8, math.log2(info.max)
    mag = mag * torch.exp2(torch.empty(3000, dtype=torch.float64).uniform_(lo, hi, generator=gen))
    specials = torch.tensor([0.0, -0.0, 1.0, -1.0, 3.0, info.max, -info.max, info.tiny,
                             info.smallest_normal / 4, INF, -INF, math.nan], dtype=torch.float64)
    x = torch.cat([mag, specials]).to(dtype)
    tie = 0.5 + 2.0 ** -9 if dtype == torch.bfloat16 else 0.5 + 2.0 ** -12  # 1.0 * tie
    for c in (tie, 0.3, 0.9999, 1e-30):
        g = x.clone()
        ds, _ = one_slice([[g]])
        coef = torch.tensor(c, dtype=torch.float32)
        backend.scale_(ds, coef)
        e = x.clone().mul_(coef)
        nan = torch.isnan(e)
        assert torch.equal(torch.isnan(g), nan)
        assert torch.equal(bits(g)[~nan], bits(e)[~nan]), c


# ---------------------------------------------------------------------------------------
# plans
# ---------------------------------------------------------------------------------------

def test_plan_cache(backend, small_chunks, monkeypatch):
    launcher.clear_cache()
    gen = torch.Generator().manual_seed(15)
    a, b = rand(gen, (100,), torch.float32), rand(gen, (50,), torch.bfloat16)
    ds, _ = one_slice([[a, b]])
    backend.compute(ds, 2.0, per_tensor=False, full=True)
    plan = launcher.get_plan(ds)
    ds_again, _ = one_slice([[a, b]])  # a new slice of the same gradients
    backend.compute(ds_again, INF, per_tensor=True, full=True)
    assert launcher.get_plan(ds_again) is plan
    # gradients that moved (same structure, other memory) keep the plan; the pointer
    # table follows them, and the results are those of the new tensors
    c = rand(gen, (100,), torch.float32)
    ds_c, _ = one_slice([[c, b]])
    assert launcher.get_plan(ds_c) is plan
    assert plan.ptrs.tolist() == [c.data_ptr(), b.data_ptr()]
    check(backend.compute(ds_c, 2.0, per_tensor=True, full=True), [[c, b]], 2.0)
    # another structure (dtype, size, grouping) builds a new plan
    ds_d, _ = one_slice([[c.double()[:99].float(), b]])
    assert launcher.get_plan(ds_d) is not plan
    ds_g, _ = one_slice([[a, b], []])
    plan_g = launcher.get_plan(ds_g)
    assert plan_g is not plan and plan_g.G == 2
    # other sizing settings: another plan (the chunk size is part of the key)
    monkeypatch.setattr(launcher, "CHUNK", 32)
    assert launcher.get_plan(ds) is not plan
    # bounded LRU
    monkeypatch.setattr(launcher, "PLAN_CACHE_SIZE", 2)
    for n in (10, 11, 12):
        launcher.get_plan(one_slice([[rand(gen, (n,), torch.float32)]])[0])
    assert len(launcher._CACHE) == 2


def test_slice_without_key_is_not_cached(backend):
    """DeviceSlice falls back to id(self) as key; ids are reused, so such plans aren't cached."""
    from gradstats.backends.base import DeviceSlice
    gen = torch.Generator().manual_seed(17)
    groups = [[rand(gen, (50,), torch.float32)], [rand(gen, (9, 4), torch.float16).t()]]
    ds = DeviceSlice(torch.device("cpu"), groups[0] + groups[1], [0, 1], 2, None)
    n = len(launcher._CACHE)
    check(backend.compute(ds, 2.0, per_tensor=True, full=True), groups, 2.0)
    assert len(launcher._CACHE) == n
    assert launcher.get_plan(ds) is not launcher.get_plan(ds)


def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("GRADSTATS_TRITON_CHUNK", "4096")
    monkeypatch.setenv("GRADSTATS_TRITON_BLOCK", "512")
    assert launcher.config()[:2] == (4096, 512)
    monkeypatch.setattr(launcher, "CHUNK", 128)  # the module attribute wins
    assert launcher.config()[0] == 128
    monkeypatch.setenv("GRADSTATS_TRITON_BLOCK", "300")
    with pytest.raises(ValueError, match="power of two"):
        launcher.config()
    monkeypatch.setenv("GRADSTATS_TRITON_BLOCK", "abc")
    with pytest.raises(ValueError, match="GRADSTATS_TRITON_BLOCK"):
        launcher.config()


def test_chunk_table_int64():
    """Tensors over 2**31 elements: offsets and slots in int64, chunk lengths fit int32."""
    big = 2 ** 31 + 5
    numel = np.array([big, 0, 3], dtype=np.int64)
    chunk = 65536
    tb, tid, off, length = launcher.chunk_table(numel, chunk)
    n0 = -(-big // chunk)
    assert tb.tolist() == [0, n0, n0, n0 + 1]
    assert length.sum() == big + 3 and length.max() == chunk and length.min() > 0
    assert length[n0 - 1] == big - (n0 - 1) * chunk == 5
    assert off.dtype == np.int64 and off[n0 - 1] == (n0 - 1) * chunk > 2 ** 31 - chunk
    assert off[n0] == 0 and tid[n0] == 2
    assert np.all(np.diff(off[:n0]) == chunk)


# ---------------------------------------------------------------------------------------
# availability
# ---------------------------------------------------------------------------------------

def test_unsupported_reasons(backend):
    assert backend.unavailable_reason() is None
    ds, _ = one_slice([[torch.randn(3)]])
    assert backend.unsupported_reasons(ds, 2.0) == []
    assert backend.unsupported_reasons(ds, 1) == []
    assert backend.unsupported_reasons(ds, INF) == []
    assert backend.unsupported_reasons(ds, 3.0) == [
        "norm_type=3.0: the triton kernel supports 1, 2 and inf"]
    ds64, _ = one_slice([[torch.randn(3), torch.randn(3, dtype=torch.float64)]])
    r = backend.unsupported_reasons(ds64, 2.0)
    assert len(r) == 1 and "float64" in r[0]
    dsm, _ = one_slice([[torch.empty(3, device="meta")]])
    r = backend.unsupported_reasons(dsm, 2.0)
    assert len(r) == 1 and "CPU tensors only" in r[0]
    with pytest.raises(ValueError, match="norm_type=3.0"):
        backend.compute(ds, 3.0, per_tensor=False, full=True)


def test_import_does_not_import_triton():
    code = ("import sys, gradstats.backends.triton as t; "
            "assert 'triton' not in sys.modules, 'triton imported'; "
            "assert t.TritonBackend.name == 'triton'")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code], cwd=root, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


_COMPILE_CHECK = r"""
import re, sys
import triton, triton.language as tl
try:
    from triton.compiler import ASTSource
    from triton.backends.compiler import GPUTarget
except ImportError as e:
    print("SKIP", e); sys.exit(0)
from gradstats.backends.triton import kernels as K
assert not K.INTERPRET
div = [["tt.divisibility", 16]]

def ptx(fn, sig, consts):
    nptr = sum(1 for v in sig.values() if v.startswith("*"))
    src = ASTSource(fn, sig, consts, {(i,): div for i in range(nptr)})
    try:
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
    except Exception as e:
        if "ptxas" in str(e).lower():
            print("SKIP", e); sys.exit(0)
        raise
    return k.asm["ptx"]

C = "constexpr"
stats = dict(ptrs_ptr="*i64", meta_ptr="*i64", acc_ptr="*fp64", max_ptr="*fp32",
             nan_ptr="*i32", inf_ptr="*i32", DTYPE=C, NORM=C, BLOCK=C, ALIGNED=C)
for dt, blk in ((tl.float32, 2048), (tl.bfloat16, 4096)):
    p = ptx(K.grad_stats_chunks_kernel, stats, dict(DTYPE=dt, NORM=2, BLOCK=blk, ALIGNED=True))
    assert "ld.global.v4" in p, ("stats loads not vectorised", dt)
scale = dict(ptrs_ptr="*i64", meta_ptr="*i64", coef_ptr="*fp32", DTYPE=C, BLOCK=C,
             ALIGNED=C, PER_GROUP=C)
p = ptx(K.grad_scale_chunks_kernel, scale, dict(DTYPE=tl.bfloat16, BLOCK=4096, ALIGNED=True,
                                                PER_GROUP=True))
assert "ld.global.v4" in p and "st.global.v4" in p, "scale not vectorised"
fin = dict(acc_ptr="*fp64", max_ptr="*fp32", nan_ptr="*i32", inf_ptr="*i32", gb_ptr="*i32",
           tb_ptr="*i32", outf_ptr="*fp32", outi_ptr="*i64", G="i32", T="i32",
           max_norm="fp32", NORM=C, HAS_CLIP=C, RBLOCK=C)
p = ptx(K.grad_stats_finalize_kernel, fin, dict(NORM=2, HAS_CLIP=True, RBLOCK=1024))
assert "div.rn.f32" in p and "sqrt.rn.f64" in p, "finalize must use IEEE div/sqrt"
step = dict(acc_ptr="*fp64", max_ptr="*fp32", nan_ptr="*i32", inf_ptr="*i32", gb_ptr="*i32",
            tb_ptr="*i32", outf_ptr="*fp32", outi_ptr="*i64", stf_ptr="*fp32", sti_ptr="*i64",
            fstate_ptr="*fp32", istate_ptr="*i64", table_ptr="*i32", params_ptr="*fp32",
            loss_ptr="*fp32", amp_scale_ptr="*fp32", amp_found_ptr="*fp32",
            has_grads_ptr="*i1", G="i32", T="i32", one_minus_alpha="fp32",
            **{n: "i32" for n in ("o_norm", "o_total", "o_max", "o_coef", "o_gs", "o_fi",
                                   "o_skip", "o_snf", "o_ssp", "o_nonf", "o_clip", "o_run")},
            NORM=C, RBLOCK=C, BLOCK_G=C, HAS_LOSS=C, HAS_AMP_SCALE=C, HAS_AMP_FOUND=C,
            HAS_MASK=C, EPILOGUE=C, OP0=C, OP1=C, OP2=C, OP3=C, OP4=C, OP5=C, QH=C, SW=C)
for ops, flags in (((1, 2, 0, 0, 0, 0), (0, 0, 0, 0, 1)),
                   ((1, 5, 3, 4, 2, 0), (1, 1, 1, 1, 1)),
                   ((1, 5, 0, 0, 0, 0), (1, 0, 0, 0, 0))):
    consts = dict(NORM=2, RBLOCK=1024, BLOCK_G=4, HAS_LOSS=flags[0], HAS_AMP_SCALE=flags[1],
                  HAS_AMP_FOUND=flags[2], HAS_MASK=flags[3], EPILOGUE=flags[4],
                  QH=1024, SW=128, **{f"OP{i}": o for i, o in enumerate(ops)})
    p = ptx(K.step_finalize_kernel, step, consts)
    assert "div.rn.f32" in p and "sqrt.rn.f64" in p, "step finalize must use IEEE div/sqrt"
print("OK")
"""


def test_kernels_compile_for_sm90():
    """The GPU path, checked on a CPU machine: compile to PTX for sm_90 (no GPU needed).

    Catches what the interpreter cannot: typing errors of the compiler, and whether the
    aligned-pointer hint still gives 16-byte vector loads.
    """
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", _COMPILE_CHECK], cwd=root, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    if r.stdout.startswith("SKIP"):
        pytest.skip(r.stdout.strip())
    assert r.stdout.strip().endswith("OK"), r.stdout + r.stderr
