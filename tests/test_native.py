"""Native backend (csrc/ ops, CPU kernels) against the reference spec.

Every case runs once per CPU kernel build compiled in (AVX512, AVX2, DEFAULT), selected
through ``gradstats._C.set_cpu_capability``; a build is skipped, with the reason, when this
CPU does not run it or when it is opt-in (AVX512 until verified: run
``GRADSTATS_CPU_CAPABILITY=avx512 pytest tests/test_native.py`` on an AVX512 machine).
"""
import math
import os

import pytest
import torch

from gradstats import clip_grad_norm_, grad_stats
from gradstats.backends import registry as _dispatch
from gradstats.backends import native
from gradstats.core.reference import ref_grad_stats, rel_err
from gradstats.core.stats import compute_groups

_WHY = native.NativeBackend().unavailable_reason()
if _WHY is not None:
    pytest.skip(f"native backend unavailable: {_WHY}", allow_module_level=True)

_C = native.extension()
OPS = torch.ops.gradstats
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NORMS = [2.0, 1.0, math.inf, 3.0, 0.5]
TOL = 1e-5
INF, NAN = math.inf, math.nan


_VARIANTS = {name: (cpu, enabled) for name, cpu, _verified, enabled in _C.cpu_variants()}


@pytest.fixture(params=list(_VARIANTS))
def cap(request):
    cpu, enabled = _VARIANTS[request.param]
    if not cpu:
        pytest.skip(f"this CPU does not run the {request.param} kernels")
    if not enabled:
        pytest.skip(f"{request.param} kernels are opt-in until verified: set "
                    f"GRADSTATS_CPU_CAPABILITY={request.param.lower()} to run them")
    prev = _C.set_cpu_capability(request.param)
    yield request.param
    _C.set_cpu_capability(prev)


def _rand(shape, dtype, gen, scale=1.0):
    return (torch.randn(shape, generator=gen) * scale).to(dtype)


def _mixed_tensors(dtype, seed=0):
    """Irregular shapes: zero-size, 0-dim, chunk-boundary sizes, transposed, strided."""
    g = torch.Generator().manual_seed(seed)
    ts = [
        _rand((37, 11), dtype, g),
        _rand((0,), dtype, g),
        _rand((), dtype, g),
        _rand((65536,), dtype, g, 1e-3),  # exactly one chunk
        _rand((65537,), dtype, g, 10.0),  # one chunk + 1
        _rand((300, 700), dtype, g).t(),  # transposed: dense, read in place
        _rand((3, 40000), dtype, g)[:, ::3],  # strided: copied first
        _rand((5, 1), dtype, g).expand(5, 9),  # stride 0
        _rand((2, 0, 3), dtype, g),
        _rand((129,), dtype, g, 1e2),
    ]
    return ts


def _check(groups, p, per_tensor=True):
    st, _, _ = compute_groups(groups, p, per_tensor=per_tensor, backend="native", full=True)
    ref = ref_grad_stats(groups, p)
    assert rel_err(st.norm, ref.norm) <= TOL, (st.norm, ref.norm)
    assert rel_err(st.total_norm, ref.total_norm) <= TOL, (st.total_norm, ref.total_norm)
    assert torch.equal(st.max_abs.double(), ref.max_abs), (st.max_abs, ref.max_abs)
    assert torch.equal(st.nonfinite, ref.nonfinite)
    assert torch.equal(st.numel, ref.numel)
    assert st.norm.dtype == torch.float32 and st.total_norm.dim() == 0
    if per_tensor:
        assert rel_err(st.per_tensor_norm, ref.per_tensor_norm) <= TOL
    return st


def _same(a, b):
    """Bit-identical, NaN positions included."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        iv = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.view(iv), b.view(iv))
    return torch.equal(a, b)


# ----------------------------------------------------------------------- statistics


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", NORMS)
def test_matches_reference(cap, dtype, p):
    ts = _mixed_tensors(dtype)
    _check([ts[:4], [], ts[4:]], p)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [2.0, 1.0, math.inf, 3.0])
def test_nan_inf(cap, dtype, p):
    g = torch.Generator().manual_seed(1)
    a = _rand((70000,), dtype, g)
    a[5] = NAN
    a[69999] = INF
    b = _rand((1000,), dtype, g)
    b[7] = -INF
    c = _rand((300,), dtype, g)
    c[0] = NAN
    d = torch.full((10,), NAN, dtype=dtype)  # nothing finite: max_abs 0
    e = _rand((50,), dtype, g)
    st = _check([[a], [b], [c, d], [e]], p)
    assert math.isnan(st.norm[0]) and st.norm[1] == INF and math.isnan(st.norm[2])
    assert math.isfinite(st.norm[3]) and math.isnan(st.total_norm)
    assert st.nonfinite.tolist() == [2, 1, 11, 0]
    st2 = _check([[b], [e]], p)
    assert st2.total_norm == INF


@pytest.mark.parametrize("dtype", DTYPES)
def test_overflowing_squares_fall_back_exactly(cap, dtype):
    # sum of squares beyond float32 range with finite elements: the exact path (double)
    big = 3e4 if dtype == torch.float16 else 1e20
    ts = [torch.full((1000,), big, dtype=dtype), torch.ones(10, dtype=dtype)]
    _check([ts], 2.0)


def test_many_tensors_and_groups(cap):
    g = torch.Generator().manual_seed(2)
    shapes = [((i * 7919) % 300,) for i in range(3000)]
    ts = [_rand(s, torch.float32, g) for s in shapes]
    groups = [[], ts[:1000], [], ts[1000:1001], ts[1001:2500], ts[2500:], []]
    for p in (2.0, math.inf):
        _check(groups, p)


def test_mixed_dtypes_one_call(cap):
    g = torch.Generator().manual_seed(3)
    ts = [_rand((1000,), dt, g) for dt in DTYPES * 3]
    _check([ts[:4], ts[4:]], 2.0)


def test_only_empty_tensors(cap):
    out = OPS.stats([torch.zeros(0), torch.zeros(0, 4)], [0, 1, 2], 2.0, 1.0)
    assert out[7].tolist() == [0.0, 0.0] and float(out[8]) == 0.0
    assert float(out[11]) == 1.0  # 1 / (0 + 1e-6) clamped


@pytest.mark.parametrize("p", [2.0, 1.0, math.inf, 3.0])
def test_bit_identical_across_thread_counts(cap, p):
    g = torch.Generator().manual_seed(4)
    ts = [_rand((n,), dt, g) for n, dt in [(1_000_003, torch.float32),
                                          (400_000, torch.bfloat16),
                                          (333_333, torch.float16),
                                          (5, torch.float32),
                                          (700_000, torch.float32)]]
    ts[2][12345] = NAN
    bounds = [0, 2, 5]
    prev = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3, prev):
            torch.set_num_threads(n)
            outs.append(OPS.stats(ts, bounds, p, 1.0))
            outs.append(OPS.stats(ts, bounds, p, 1.0))  # and from call to call
    finally:
        torch.set_num_threads(prev)
    for o in outs[1:]:
        assert all(_same(x, y) for x, y in zip(outs[0], o))


def test_outputs_are_fresh_tensors(cap):
    ts = [torch.randn(100)]
    a = OPS.stats(ts, [0, 1], 2.0, None)
    b = OPS.stats(ts, [0, 1], 2.0, None)
    ptrs = {t.data_ptr() for t in a} | {t.data_ptr() for t in b}
    assert len(ptrs) == 24


def test_partials_match_finals(cap):
    g = torch.Generator().manual_seed(5)
    ts = [_rand((1000,), torch.float32, g) for _ in range(4)]
    (acc, mx, n_nan, n_inf, t_acc, t_nan, t_inf, norm, total, nonfinite, ptn,
     coef) = OPS.stats(ts, [0, 1, 4], 2.0, 0.5)
    assert torch.allclose(acc.sqrt(), norm, rtol=1e-6)
    assert torch.allclose(t_acc.sqrt(), ptn, rtol=1e-6)
    assert torch.allclose(acc.sum().sqrt(), total, rtol=1e-6)
    assert torch.equal(nonfinite, n_nan + n_inf)
    assert n_nan.dtype == t_nan.dtype == torch.int64


def test_clip_coef_is_torchs(cap):
    g = torch.Generator().manual_seed(6)
    for scale in (1e-7, 1e-3, 1.0, 1e3):
        ts = [_rand((3000,), torch.float32, g, scale)]
        for max_norm in (0.0, 1e-3, 1.0, 7.5):
            out = OPS.stats(ts, [0, 1], 2.0, max_norm)
            ref = torch.clamp(max_norm / (out[8] + 1e-6), max=1.0)
            assert _same(out[11], ref)
    out = OPS.stats([torch.tensor([NAN])], [0, 1], 2.0, 1.0)
    assert math.isnan(out[11])


@pytest.mark.slow
def test_tensor_over_2_31_elements():
    n = 2**31 + 4097
    need = n * 2 + (2 << 30)
    try:
        with open("/proc/meminfo") as f:
            avail = {l.split(":")[0]: int(l.split()[1]) * 1024 for l in f}["MemAvailable"]
    except (OSError, KeyError, ValueError):
        avail = need
    if avail < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free RAM, {avail / 2**30:.1f} available")
    x = torch.full((n,), 0.5, dtype=torch.float16)
    x[2**31 + 5] = 3.0
    x[n - 1] = -INF
    x[2**31 - 1] = NAN
    small = torch.ones(3, dtype=torch.float16)
    out = OPS.stats([small, x], [0, 1, 2], 2.0, None)
    assert out[2].tolist() == [0, 1] and out[3].tolist() == [0, 1]
    assert out[1].tolist() == [1.0, 3.0]
    finite_sq = (n - 3) * 0.25 + 9.0
    assert abs(float(out[4][1]) - finite_sq) / finite_sq < 1e-6  # t_acc: finite elements
    out1 = OPS.stats([x[: 2**31 - 1]], [0, 1], 1.0, None)
    # exact in double (chunks of 0.5s), then rounded once to float32
    assert float(out1[7][0]) == float(torch.tensor((2**31 - 1) * 0.5, dtype=torch.float32))
    y = x[2**31:]  # offset view beyond 2^31 elements
    OPS.scale_([x], [0, 1], torch.tensor(0.5))
    assert float(y[5]) == 1.5 and float(x[n - 2]) == 0.25 and float(x[0]) == 0.25
    del x, y


# ----------------------------------------------------------------------- scale


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", [0.3, 0.123456789, 0.99999994, 1e-40, 0.0, NAN])
def test_scale_matches_foreach_mul(cap, dtype, c):
    ts = _mixed_tensors(dtype, seed=7)
    ts[0][0, 0] = NAN
    ts[3][9] = INF
    ts = [t for t in ts if t.stride() == () or min(t.stride(), default=1) > 0]  # no stride-0
    mine = [t.clone() for t in ts]  # transposed stays transposed (dense), read in place
    theirs = [t.clone() for t in mine]
    coef = torch.tensor(c, dtype=torch.float32)
    torch._foreach_mul_(theirs, coef)
    OPS.scale_(mine, [0, len(mine)], coef)
    for a, b in zip(mine, theirs):
        na, nb = torch.isnan(a), torch.isnan(b)
        assert torch.equal(na, nb)
        # bit-identical values; NaN payloads of bf16/fp16 may differ (still NaN)
        assert _same(torch.where(na, torch.zeros_like(a), a),
                     torch.where(nb, torch.zeros_like(b), b))


def test_scale_strided_views(cap):
    base = torch.randn(4, 1000)
    view = base[:, ::3]  # not dense: handled through torch's mul_
    ref = base.clone()
    ref[:, ::3] *= torch.tensor(0.25)
    OPS.scale_([view], [0, 1], torch.tensor(0.25))
    assert torch.equal(base, ref)


def test_scale_per_group_and_untouched(cap):
    g = torch.Generator().manual_seed(8)
    ts = [_rand((5000,), torch.bfloat16, g) for _ in range(5)]
    ts[0][3] = NAN
    before = [t.clone() for t in ts]
    coef = torch.tensor([1.0, 0.5, 2.0, INF])  # groups: [0,1], [2], [3], [4]
    OPS.scale_(ts, [0, 2, 3, 4, 5], coef)
    for i in (0, 1, 3, 4):  # coefficient >= 1: not written at all (NaN bits kept)
        assert _same(ts[i], before[i])
    assert _same(ts[2], (before[2].float() * 0.5).bfloat16())
    with pytest.raises(RuntimeError, match="one value per group"):
        OPS.scale_(ts, [0, 2, 5], torch.ones(3))


def test_scale_through_backend(cap):
    g = torch.Generator().manual_seed(9)
    ps = [torch.nn.Parameter(torch.empty(s)) for s in [(300, 20), (20,), (7, 7, 7)]]
    for p in ps:
        p.grad = _rand(p.shape, torch.float32, g)
    ref_ps = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    for p, r in zip(ps, ref_ps):
        r.grad = p.grad.clone()
    orig = [p.grad.clone() for p in ps]
    total = clip_grad_norm_(ps, 1.0)
    ref_total = torch.nn.utils.clip_grad_norm_(ref_ps, 1.0, foreach=True)
    assert rel_err(total, ref_total) <= TOL
    coef = torch.clamp(1.0 / (total + 1e-6), max=1.0)
    torch._foreach_mul_(orig, coef)  # torch's multiply with our coefficient: same bits
    assert all(_same(p.grad, o) for p, o in zip(ps, orig))
    assert all(torch.allclose(p.grad, r.grad, rtol=1e-6) for p, r in zip(ps, ref_ps))
    # no clipping: gradients unchanged, bit for bit
    before = [p.grad.clone() for p in ps]
    clip_grad_norm_(ps, 1e9)
    assert all(torch.equal(p.grad, b) for p, b in zip(ps, before))


# ----------------------------------------------------------------------- ops, dispatch


def test_opcheck():
    g = torch.Generator().manual_seed(10)
    ts = [_rand((100, 3), torch.float32, g), _rand((70,), torch.bfloat16, g),
          torch.zeros(0, dtype=torch.float16), _rand((9,), torch.float16, g).t()]
    for p, mx in [(2.0, 1.0), (1.0, None), (math.inf, 0.5), (3.0, None)]:
        torch.library.opcheck(OPS.stats.default, (ts, [0, 2, 2, 4], p, mx))
    torch.library.opcheck(OPS.scale_.default, ([t.clone() for t in ts], [0, 4],
                                               torch.tensor(0.5)))
    torch.library.opcheck(OPS.scale_.default, ([t.clone() for t in ts], [0, 1, 4],
                                               torch.tensor([0.5, 3.0])))


def test_torch_compile_fullgraph():
    ts = [torch.randn(100, 3), torch.randn(70).bfloat16()]

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(ts):
        out = OPS.stats(ts, [0, 1, 2], 2.0, 1.0)
        OPS.scale_(ts, [0, 1, 2], out[11])
        return out[8]

    a = [t.clone() for t in ts]
    b = [t.clone() for t in ts]
    total = step(a)
    out = OPS.stats(b, [0, 1, 2], 2.0, 1.0)
    OPS.scale_(b, [0, 1, 2], out[11])
    assert _same(total, out[8]) and all(_same(x, y) for x, y in zip(a, b))


def test_errors():
    with pytest.raises(RuntimeError, match="dtype"):
        OPS.stats([torch.zeros(3, dtype=torch.float64)], [0, 1], 2.0, None)
    with pytest.raises(RuntimeError, match="group_bounds"):
        OPS.stats([torch.zeros(3)], [0, 2], 2.0, None)
    with pytest.raises(RuntimeError, match="norm_type"):
        OPS.stats([torch.zeros(3)], [0, 1], 0.0, None)


def test_dispatch_prefers_native_on_cpu():
    ps = [torch.nn.Parameter(torch.zeros(3))]
    ps[0].grad = torch.ones(3)
    groups = [[ps[0].grad]]
    from gradstats.core import grouping as _grouping
    s = _grouping.slices(groups)[0][0]
    assert _dispatch.select(s, 2.0, None).name == "native"
    s64 = _grouping.slices([[torch.ones(3, dtype=torch.float64)]])[0][0]
    why = native.NativeBackend().unsupported_reasons(s64, 2.0)
    assert any("float64" in w for w in why)
    assert _dispatch.select(s64, 2.0, None).name == "torch"
    st = grad_stats(ps, backend="native")
    assert float(st.norm[0]) == pytest.approx(math.sqrt(3))


def test_describe_and_module():
    line = native.describe()
    assert _C.cpu_capability() in line
    assert _C.chunk_elems() == 65536
    assert _C.cpu_capabilities()[-1] == "DEFAULT"
    assert [v[0] for v in _C.cpu_variants()][-1] == "DEFAULT"
    with pytest.raises(ValueError):
        _C.set_cpu_capability("NOPE")
    if "AVX512" in _VARIANTS and not _VARIANTS["AVX512"][1]:
        assert "AVX512 built, opt-in until verified" in line
        with pytest.raises(ValueError, match="opt-in|not supported by this CPU"):
            _C.set_cpu_capability("AVX512")


def _child(code, **env):
    """Run ``code`` in a fresh interpreter (the CPU build is chosen once per process)."""
    import subprocess
    import sys
    full = dict(os.environ)
    full.pop("GRADSTATS_CPU_CAPABILITY", None)
    full.update(env)
    return subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], env=full,
                          capture_output=True, text=True, timeout=300)


_WHICH = ("import torch, gradstats.backends.native as n; c = n.extension(); "
          "print(c.cpu_capability()); print(c.cpu_capabilities()); "
          "print(c.cpu_capability_summary())")


def test_env_caps_capability():
    out = _child(_WHICH, GRADSTATS_CPU_CAPABILITY="default")
    assert out.stdout.splitlines()[0] == "DEFAULT", out.stderr


def test_avx512_is_opt_in():
    """A kernel build that no machine of ours has run is not dispatched by default."""
    out = _child(_WHICH)
    assert out.returncode == 0, out.stderr
    chosen, usable, summary = out.stdout.splitlines()
    assert chosen != "AVX512" and "AVX512" not in usable
    if "AVX512" in _VARIANTS:
        assert "AVX512 built, opt-in until verified (GRADSTATS_CPU_CAPABILITY=avx512" in summary
    opted = _child(_WHICH, GRADSTATS_CPU_CAPABILITY="avx512")
    assert opted.returncode == 0, opted.stderr
    chosen, usable, summary = opted.stdout.splitlines()
    if _VARIANTS.get("AVX512", (False,))[0]:  # this CPU runs AVX512: used on request
        assert chosen == "AVX512" and "opt-in, not yet verified" in summary
    else:
        assert chosen != "AVX512"


def test_op_errors_raise_cleanly_in_every_build():
    """Argument errors of the ops (C++ exceptions through the dispatcher) become
    RuntimeError in every enabled CPU build, checked in a child process so that a crash
    is reported here with its output instead of killing the test run (the first AVX512
    host died with SIGSEGV at such a call, tests/test_native.py::
    test_scale_per_group_and_untouched)."""
    code = """
import torch, gradstats.backends.native as n
C = n.extension(); O = torch.ops.gradstats
for cap in C.cpu_capabilities():
    C.set_cpu_capability(cap)
    ts = [torch.randn(5000).bfloat16() for _ in range(5)]
    O.scale_(ts, [0, 2, 3, 4, 5], torch.tensor([1.0, 0.5, 2.0, float("inf")]))
    calls = [lambda: O.scale_(ts, [0, 2, 5], torch.ones(3)),
             lambda: O.stats([torch.zeros(3, dtype=torch.float64)], [0, 1], 2.0, None),
             lambda: O.stats([torch.zeros(3)], [0, 2], 2.0, None),
             lambda: O.stats([torch.zeros(3)], [0, 1], 0.0, None)]
    for f in calls:
        try:
            f()
        except RuntimeError:
            pass
        else:
            raise SystemExit("no error raised")
    print(cap, "ok")
"""
    out = _child(code, **({"GRADSTATS_CPU_CAPABILITY": os.environ["GRADSTATS_CPU_CAPABILITY"]}
                          if os.environ.get("GRADSTATS_CPU_CAPABILITY") else {}))
    assert out.returncode == 0, (out.returncode, out.stdout, out.stderr[-3000:])
    assert out.stdout.split().count("ok") == len(_C.cpu_capabilities())


# ----------------------------------------------------------------------- CUDA source


@pytest.mark.slow
def test_cuda_source_compiles_to_sm90_ptx(tmp_path):
    """No GPU in CI: at least compile csrc/cuda/stats_cuda.cu to sm_90 PTX with torch's
    nvcc macros and check the 16-byte vector loads/stores are there."""
    import shutil
    import subprocess
    import sysconfig

    from torch.utils import cpp_extension

    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if not os.path.exists(nvcc):
        pytest.skip("nvcc not found")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = os.path.join(root, "csrc", "cuda", "stats_cuda.cu")
    out = tmp_path / "stats.ptx"
    cmd = [nvcc, "-std=c++20", "-O3", "-arch=compute_90", "-ptx", src, "-o", str(out),
           "--expt-relaxed-constexpr", "-D_GLIBCXX_USE_CXX11_ABI=1",
           # torch's COMMON_NVCC_FLAGS, and: a CPU-only torch ships no cuda_cmake_macros.h
           "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
           "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
           "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", "-I" + sysconfig.get_paths()["include"]]
    cmd += ["-I" + p for p in cpp_extension.include_paths()]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    ptx = out.read_text()
    stats = ptx[ptx.index("stats_kernel"):ptx.index("finalize_kernel")]
    assert "ld.global.cs.v4.u32" in stats  # 16-byte streaming loads
    assert "f64" in stats  # the exact (double) path of the range guard
    scale = ptx[ptx.rindex(".entry", 0, ptx.index("scale_kernelEPK")):]
    assert "ld.v4" in scale and "st.v4" in scale  # 16-byte loads and stores
    # and the host code (plans, pointer ring, capture handling) compiles too
    obj = tmp_path / "stats_cuda.o"
    host = [c for c in cmd if c not in ("-ptx",)]
    host[host.index("-o") + 1] = str(obj)
    host[host.index("-arch=compute_90")] = "-gencode=arch=compute_90,code=compute_90"
    host += ["-c", "-Xcompiler", "-fPIC", "-DGRADSTATS_WITH_CUDA=1",
             "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C"]
    res = subprocess.run(host, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    syms = subprocess.run(["nm", "-C", str(obj)], capture_output=True, text=True).stdout
    assert "gradstats::cuda::stats(" in syms and "gradstats::cuda::scale_(" in syms


@pytest.mark.slow
def test_cuda_decide_source_compiles(tmp_path):
    """The CUDA decide op (csrc/cuda/decide_cuda.cu, with the program of
    csrc/decide/program.h compiled for the device) builds to an sm_90 object."""
    import shutil
    import subprocess
    import sysconfig

    from torch.utils import cpp_extension

    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if not os.path.exists(nvcc):
        pytest.skip("nvcc not found")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = os.path.join(root, "csrc", "cuda", "decide_cuda.cu")
    obj = tmp_path / "decide_cuda.o"
    cmd = [nvcc, "-std=c++20", "-O3", "-gencode=arch=compute_90,code=compute_90", "-c", src,
           "-o", str(obj), "--expt-relaxed-constexpr", "-D_GLIBCXX_USE_CXX11_ABI=1",
           "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
           "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
           "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", "-I" + sysconfig.get_paths()["include"],
           "-Xcompiler", "-fPIC", "-DGRADSTATS_WITH_CUDA=1", "-DTORCH_API_INCLUDE_EXTENSION_H",
           "-DTORCH_EXTENSION_NAME=_C"]
    cmd += ["-I" + p for p in cpp_extension.include_paths()]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    syms = subprocess.run(["nm", "-C", str(obj)], capture_output=True, text=True).stdout
    assert "gradstats::decide::decide_cuda(" in syms
