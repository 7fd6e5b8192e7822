"""The build-time guard against mixing instruction sets through shared inline functions.

The CPU kernels are compiled once per instruction set (csrc/cpu/kernel_*.cpp). If an ISA
object exported a weak inline function (a c10 conversion, a template instantiation), the
linker would keep one copy for the whole library, possibly the AVX2/AVX512 one, and the
baseline code would run it. setup.py compiles those objects with -fno-weak and refuses an
object that exports anything but its table getter (``check_kernel_object``).
"""
import importlib.util
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup_module():
    spec = importlib.util.spec_from_file_location("gradstats_setup", os.path.join(ROOT, "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # defines helpers only (setup() runs under __main__)
    return mod


_CXX = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
needs_toolchain = pytest.mark.skipif(_CXX is None or shutil.which("nm") is None,
                                     reason="needs a C++ compiler and nm")

_SRC = """
inline __attribute__((noinline)) float widen(unsigned short h) {
  unsigned int w = static_cast<unsigned int>(h) << 16; float f;
  __builtin_memcpy(&f, &w, 4); return f;
}
namespace gradstats { namespace cpu { namespace cap_x { namespace {
float sum(const unsigned short* x, int n) {
  float s = 0;
  for (int i = 0; i < n; ++i) s += widen(x[i]);
  return s;
}
} }  // namespace cap_x::(anonymous)
const void* table_x() { return reinterpret_cast<const void*>(&cap_x::sum); } } }
"""


def _compile(tmp_path, flags):
    src = tmp_path / "kernel_x.cpp"
    src.write_text(_SRC)
    obj = tmp_path / ("kernel_x%d.o" % len(flags))
    subprocess.run([_CXX, "-O2", "-c", str(src), "-o", str(obj)] + flags, check=True,
                   capture_output=True, timeout=120)
    return str(obj), str(src)


@needs_toolchain
def test_guard_rejects_an_exported_inline_function(tmp_path):
    setup = _setup_module()
    obj, src = _compile(tmp_path, [])
    with pytest.raises(RuntimeError, match="ODR guard.*widen"):
        setup.check_kernel_object(obj, src)


@needs_toolchain
def test_guard_accepts_the_kernel_flags(tmp_path):
    setup = _setup_module()
    obj, src = _compile(tmp_path, list(setup.KERNEL_FLAGS))
    setup.check_kernel_object(obj, src)  # no raise: widen() is private to the object
    for name in ("kernel_avx2.cpp", "kernel_avx512.cpp"):
        assert "-fno-weak" in setup.ISA_FLAGS[name]


@pytest.mark.skipif(shutil.which("nm") is None, reason="needs nm")
def test_built_library_exports_no_kernel_code():
    from gradstats.backends import native
    if native.NativeBackend().unavailable_reason() is not None:
        pytest.skip("native backend unavailable")
    lib = native.extension().__file__
    out = subprocess.run(["nm", "-D", "--defined-only", lib], capture_output=True, text=True,
                         check=True).stdout
    # per-ISA namespaces of ours and of at::vec (mangled): nothing of them is exported
    for marker in ("cap_avx2", "cap_avx512", "3vec4AVX2", "3vec6AVX512"):
        assert marker not in out, marker
