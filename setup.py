"""Build script. Metadata lives in pyproject.toml; this file only adds the compiled
extension ``gradstats._C`` (``csrc/``): the CPU kernels always, the CUDA kernels when
torch has CUDA and nvcc is found.

Environment:
    GRADSTATS_NO_EXT=1        install pure Python (no compiled extension).
    GRADSTATS_BUILD_CUDA=0/1  force the CUDA part off/on (default: on when torch was built
                              with CUDA and nvcc is found).
    TORCH_CUDA_ARCH_LIST      if set, the CUDA targets torch's build helpers derive from it;
                              otherwise sm_90 code plus compute_75 PTX (JIT on other GPUs).

A failed extension build never fails the install: a warning is printed, the reason is
written to ``gradstats/_ext_status.txt``, and ``import gradstats`` reports the native
backend as unavailable with that reason.

    GRADSTATS_SANITIZE        e.g. ``address,undefined``: compile and link with
                              ``-fsanitize=...`` (``make asan``; build into a separate
                              directory with ``--build-lib``/``--build-temp``: a sanitized
                              build never touches the in-place library of the source tree).

CPU kernels: ``csrc/cpu/stats_kernel.h`` is compiled three times, with the baseline flags,
with AVX2/FMA/F16C and with AVX512 (x86-64 only), each into its own namespace and with
``-fno-weak``, so that no inline function compiled with one instruction set can be merged
with another object's copy (see ``csrc/cpu/stats_kernel.h``); after compiling, each kernel
object is checked to export nothing but its table getter. The extension picks the build at
run time (``csrc/capability.cpp``): the best *verified* one the CPU supports, capped by
torch's own ``ATEN_CPU_CAPABILITY`` choice; AVX512 only on request
(``GRADSTATS_CPU_CAPABILITY=avx512``) until it has been verified on an AVX512 machine.
"""
import copy
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import traceback

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
STATUS_FILE = "_ext_status.txt"
# The instruction-set builds of the CPU kernels: compiled with -fno-weak (every inline or
# template function they use gets internal linkage: a private copy, never merged with
# another object's copy compiled for another instruction set), hidden visibility, and their
# -m flags (only these files get them). The baseline build (kernel_default.cpp) needs none
# of this: its shared copies are baseline code like the host objects'. -w: under -fno-weak
# GCC warns ("sorry: semantics of inline variable ...") for every constexpr inline
# variable of the torch headers, hundreds of lines per file; the same source is compiled
# with the ordinary warnings in the baseline build.
KERNEL_FLAGS = ["-fno-weak", "-fvisibility=hidden", "-fvisibility-inlines-hidden", "-w"]
ISA_FLAGS = {
    "kernel_avx2.cpp": KERNEL_FLAGS + ["-mavx2", "-mfma", "-mf16c"],
    "kernel_avx512.cpp": KERNEL_FLAGS + ["-mavx512f", "-mavx512bw", "-mavx512vl",
                                         "-mavx512dq", "-mfma", "-mf16c"],
}
# Host sources, one job each (csrc/README.md).
HOST_SOURCES = ["csrc/registration.cpp", "csrc/cpu_ops.cpp", "csrc/capability.cpp",
                "csrc/module.cpp", "csrc/tensor_lists.cpp", "csrc/decide/decide_cpu.cpp"]


def _log(msg):
    print(f"gradstats setup: {msg}", file=sys.stderr)


def _want_cuda(torch, cpp_extension):
    env = os.environ.get("GRADSTATS_BUILD_CUDA", "").strip()
    if env == "0":
        return False
    have = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None \
        and shutil.which(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")) is not None
    if env == "1":
        if not have:
            _log("GRADSTATS_BUILD_CUDA=1 but torch has no CUDA or nvcc was not found; "
                 "the CUDA build will be attempted and is likely to fail")
        return True
    return have


def _compiler_accepts(flag):
    """Whether the C++ compiler setuptools will use accepts ``flag`` (compiles a stub)."""
    cxx = os.environ.get("CXX") or "c++"
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "probe.cpp")
        with open(src, "w") as f:
            f.write("inline int f() { return 1; }\nint g() { return f(); }\n")
        try:
            res = subprocess.run([cxx, flag, "-c", src, "-o", os.path.join(d, "probe.o")],
                                 capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.SubprocessError):
            return False
        return res.returncode == 0 and "unrecognized" not in res.stderr


def check_kernel_object(obj, source):
    """ODR guard: a CPU kernel object may export exactly one symbol, its table getter
    (``gradstats::cpu::table_<cap>()``). Anything else with external linkage (a weak inline
    function, a template instantiation) could be merged with the copy of another object
    compiled for another instruction set. Raises RuntimeError naming the symbols."""
    nm = shutil.which("nm")
    if nm is None:
        _log(f"nm not found: cannot check the exported symbols of {obj}")
        return
    out = subprocess.run([nm, "-g", "--defined-only", "-P", obj], capture_output=True,
                         text=True, check=True).stdout
    # (name, type) pairs. Common symbols ("C": zero-initialised data such as the empty
    # std::ranges function objects of C++20, emitted so under -fno-weak) hold no code and no
    # code pointers, so they cannot carry instructions of one build into another.
    syms = [line.split()[:2] for line in out.splitlines() if line.strip()]
    names = [n for n, t in syms if t != "C"]
    tables = [n for n in names if "table_" in n]
    # DW.ref.__gxx_personality_v0: the same pointer to libstdc++'s personality routine
    # in every object, no code
    bad = [n for n in names if "table_" not in n and n != "DW.ref.__gxx_personality_v0"]
    if bad or len(tables) != 1:
        raise RuntimeError(
            f"ODR guard: {os.path.basename(source)} must export only its kernel table getter, "
            f"but {obj} exports {bad[:10]} ({len(bad)} symbols). Inline functions of the "
            "instruction-set builds must stay private to their object (-fno-weak).")


def _compile_all(jobs, run):
    """Runs the compile jobs: C++ sources in parallel threads (MAX_JOBS or one per CPU),
    then CUDA sources one at a time. torch's per-source compile wrapper swaps the
    compiler executable for nvcc while it compiles a .cu file, so a .cu job never runs
    beside another job; for C++ jobs it only re-sets the same compiler, which is harmless
    in parallel once its optional ccache prefix is off (TORCH_NO_COMPILER_WRAPPER)."""
    from concurrent.futures import ThreadPoolExecutor

    cxx = [j for j in jobs if not j[1].endswith(".cu")]
    cuda = [j for j in jobs if j[1].endswith(".cu")]
    try:
        workers = int(os.environ.get("MAX_JOBS") or 0) or (os.cpu_count() or 1)
    except ValueError:
        workers = os.cpu_count() or 1
    workers = max(1, min(workers, len(cxx)))
    if workers > 1:
        saved = os.environ.get("TORCH_NO_COMPILER_WRAPPER")
        os.environ["TORCH_NO_COMPILER_WRAPPER"] = "1"
        try:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                for fut in [pool.submit(run, j) for j in cxx]:
                    fut.result()  # the first failure, in source order, is raised
        finally:
            if saved is None:
                os.environ.pop("TORCH_NO_COMPILER_WRAPPER", None)
            else:
                os.environ["TORCH_NO_COMPILER_WRAPPER"] = saved
    else:
        for j in cxx:
            run(j)
    for j in cuda:
        run(j)


def _extensions():
    """(ext_modules, cmdclass) for setup(); empty when the extension is not wanted."""
    if os.environ.get("GRADSTATS_NO_EXT", "").strip() == "1":
        _log("GRADSTATS_NO_EXT=1: installing pure Python (no gradstats._C)")
        return [], {}
    if not os.path.isdir("csrc"):
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as e:  # no torch at build time: pure Python
        _log(f"torch is not importable ({e}); installing without gradstats._C")
        return [], {}

    x86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")
    unix = os.name == "posix"
    sources = HOST_SOURCES + ["csrc/cpu/kernel_default.cpp"]
    macros = []
    if x86 and unix:
        if _compiler_accepts("-fno-weak"):
            sources += ["csrc/cpu/kernel_avx2.cpp", "csrc/cpu/kernel_avx512.cpp"]
            macros += [("GRADSTATS_HAVE_AVX2", "1"), ("GRADSTATS_HAVE_AVX512", "1")]
        else:  # without it the ISA builds could leak AVX code into shared inline functions
            _log("WARNING: the C++ compiler does not accept -fno-weak; building the "
                 "baseline CPU kernels only (no AVX2/AVX512 builds)")
    cxx = ["-O3"] if unix else ["/O2"]
    link = []
    sanitize = os.environ.get("GRADSTATS_SANITIZE", "").strip()
    if sanitize:
        if not unix:
            raise RuntimeError("GRADSTATS_SANITIZE needs gcc or clang")
        # -g1: line tables are all the sanitizer reports need, and compile ~2.5x faster
        # than full debug info (python's own CFLAGS bring -g)
        cxx += ["-O1", "-g1", f"-fsanitize={sanitize}", "-fno-omit-frame-pointer"]
        link += [f"-fsanitize={sanitize}"]
    # at::parallel_for is inline: with torch's OpenMP backend the extension must be
    # compiled with OpenMP, or it runs single-threaded. At run time the libgomp torch
    # already loaded (same soname) serves it.
    if unix and "parallel backend: OpenMP" in torch.__config__.parallel_info():
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    ext = None
    if _want_cuda(torch, cpp_extension):
        nvcc = ["-O3"]
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            nvcc += ["-gencode=arch=compute_90,code=sm_90",
                     "-gencode=arch=compute_75,code=compute_75"]
        try:
            ext = cpp_extension.CUDAExtension(
                "gradstats._C", sources + ["csrc/cuda/stats_cuda.cu", "csrc/cuda/decide_cuda.cu"],
                define_macros=macros + [("GRADSTATS_WITH_CUDA", "1")],
                extra_compile_args={"cxx": list(cxx), "nvcc": nvcc}, extra_link_args=link)
        except Exception as e:  # e.g. CUDA_HOME unknown: build the CPU part only
            _log(f"WARNING: cannot set up the CUDA build ({e}); building the CPU kernels only")
    if ext is None:
        ext = cpp_extension.CppExtension(
            "gradstats._C", sources, define_macros=macros, extra_compile_args={"cxx": cxx},
            extra_link_args=link)

    class BuildExt(cpp_extension.BuildExtension):
        """torch's BuildExtension, with per-file ISA flags and a build that may fail."""

        def __init__(self, *args, **kwargs):
            # Per-source flags need the one-file-at-a-time compile path (not ninja).
            kwargs["use_ninja"] = False
            super().__init__(*args, **kwargs)

        def _places(self, ext):
            """(library path, status file path) in the build dir and in the source tree
            (editable installs load the latter; setuptools may have reset ``inplace``
            when a build step raised)."""
            built = self.get_ext_fullpath(ext.name)
            src_pkg = os.path.join(HERE, *ext.name.split(".")[:-1])
            out = [(built, os.path.join(os.path.dirname(built), STATUS_FILE))]
            sanitized = bool(os.environ.get("GRADSTATS_SANITIZE", "").strip())
            if os.path.isdir(src_pkg) and not sanitized:
                out.append((os.path.join(src_pkg, os.path.basename(built)),
                            os.path.join(src_pkg, STATUS_FILE)))
            return out

        def _record_failure(self, ext, err):
            msg = f"{type(err).__name__}: {err}"
            _log("WARNING: building the native extension gradstats._C failed; gradstats "
                 "will run without the native backend. Reason: " + msg)
            for lib, status in self._places(ext):
                try:
                    if os.path.exists(lib):  # do not leave a stale library behind
                        os.remove(lib)
                    os.makedirs(os.path.dirname(status), exist_ok=True)
                    with open(status, "w") as f:
                        f.write("build failed: " + msg + "\n\n" + traceback.format_exc())
                except OSError:
                    pass

        def run(self):
            try:
                super().run()
            except Exception as e:  # e.g. no C++ compiler: never fail the install
                for ext_ in self.extensions:
                    self._record_failure(ext_, e)

        def build_extension(self, ext):
            """Compiles the sources in parallel (per-source flags rule out ninja), then
            links: distutils calls _compile once per source, which only queues the job;
            the queue runs just before the link."""
            inner = self.compiler._compile
            inner_link = self.compiler.link_shared_object
            jobs = []

            def _compile(obj, src, ext_, cc_args, extra_postargs, pp_opts):
                extra = ISA_FLAGS.get(os.path.basename(src))
                if extra:
                    extra_postargs = copy.deepcopy(extra_postargs)
                    if isinstance(extra_postargs, dict):
                        extra_postargs["cxx"] = list(extra_postargs["cxx"]) + extra
                    else:
                        extra_postargs = list(extra_postargs) + extra
                jobs.append((obj, src, ext_, cc_args, extra_postargs, pp_opts))

            def _run(job):
                inner(*job)
                if os.path.basename(job[1]) in ISA_FLAGS:
                    check_kernel_object(job[0], job[1])

            def _link(*args, **kwargs):
                pending = list(jobs)
                jobs.clear()
                _compile_all(pending, _run)
                return inner_link(*args, **kwargs)

            self.compiler._compile = _compile
            self.compiler.link_shared_object = _link
            try:
                try:
                    super().build_extension(ext)
                except Exception as e:
                    cu = [s for s in ext.sources if s.endswith(".cu")]
                    if not cu:
                        raise
                    # Keep the CPU kernels when only the CUDA part fails to build.
                    _log(f"WARNING: the CUDA kernels failed to build ({e}); "
                         "retrying without them")
                    ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
                    ext.define_macros = [m for m in ext.define_macros
                                         if m[0] != "GRADSTATS_WITH_CUDA"]
                    ext.libraries = [lib for lib in ext.libraries
                                     if lib not in ("cudart", "c10_cuda", "torch_cuda")]
                    super().build_extension(ext)
            except Exception as e:
                self._record_failure(ext, e)
                return
            finally:
                self.compiler._compile = inner
                self.compiler.link_shared_object = inner_link
            for _, status in self._places(ext):
                try:
                    os.remove(status)
                except OSError:
                    pass

    return [ext], {"build_ext": BuildExt}


if __name__ == "__main__":  # `python setup.py ...` and pip's build backend both run it so;
    # importing this file (tests/test_native_build.py) only defines the helpers above
    try:
        ext_modules, cmdclass = _extensions()
    except Exception as e:  # never fail the install because of the extension
        _log(f"WARNING: skipping the native extension ({type(e).__name__}: {e})")
        ext_modules, cmdclass = [], {}
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
