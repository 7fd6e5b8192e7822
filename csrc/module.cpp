// The Python module object gradstats._C. Importing it loads this library, which registers
// torch.ops.gradstats.* (registration.cpp), and exposes:
//   cpu_capability(), cpu_capabilities(), cpu_variants(), cpu_capability_summary(),
//   set_cpu_capability(name)            CPU kernel builds (capability.cpp)
//   cuda_built(), cuda_plan_counters()  CUDA part (cuda/stats_cuda.cu)
//   chunk_elems()                       elements per CPU chunk
//   fingerprint(list), describe(list)   cache keys of tensor lists (tensor_lists.cpp)
//   grads_of(list), params_and_grads(list)  .grad of parameter lists (tensor_lists.cpp)
#include <Python.h>

#include <stdexcept>
#include <string>

#include "capability.h"
#include "gradstats_common.h"
#include "python_api.h"

#if defined(GRADSTATS_WITH_CUDA)
#include "cuda/plan_counters.h"
#endif

namespace {

using gradstats::capability::enabled;
using gradstats::capability::variants;

PyObject* py_cpu_capability(PyObject*, PyObject*) {
  return PyUnicode_FromString(gradstats::capability::current().name);
}

PyObject* py_cpu_capabilities(PyObject*, PyObject*) {
  PyObject* out = PyList_New(0);
  if (out == nullptr) return nullptr;
  for (const auto& v : variants()) {
    if (!v.cpu_has() || !enabled(v)) continue;
    PyObject* s = PyUnicode_FromString(v.name);
    if (s == nullptr || PyList_Append(out, s) != 0) {
      Py_XDECREF(s);
      Py_DECREF(out);
      return nullptr;
    }
    Py_DECREF(s);
  }
  return out;
}

PyObject* py_cpu_variants(PyObject*, PyObject*) {
  PyObject* out = PyList_New(0);
  if (out == nullptr) return nullptr;
  for (const auto& v : variants()) {
    PyObject* t = Py_BuildValue("(sOOO)", v.name, v.cpu_has() ? Py_True : Py_False,
                                v.verified ? Py_True : Py_False,
                                enabled(v) ? Py_True : Py_False);
    if (t == nullptr || PyList_Append(out, t) != 0) {
      Py_XDECREF(t);
      Py_DECREF(out);
      return nullptr;
    }
    Py_DECREF(t);
  }
  return out;
}

PyObject* py_cpu_capability_summary(PyObject*, PyObject*) {
  const std::string s = gradstats::capability::summary();
  return PyUnicode_FromStringAndSize(s.data(), static_cast<Py_ssize_t>(s.size()));
}

PyObject* py_set_cpu_capability(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
  try {
    const std::string prev = gradstats::capability::set_current(name);
    return PyUnicode_FromString(prev.c_str());
  } catch (const std::invalid_argument& e) {
    PyErr_Format(PyExc_ValueError, "gradstats._C.set_cpu_capability: %s", e.what());
    return nullptr;
  }
}

PyObject* py_cuda_built(PyObject*, PyObject*) {
#if defined(GRADSTATS_WITH_CUDA)
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyObject* py_cuda_plan_counters(PyObject*, PyObject*) {
#if defined(GRADSTATS_WITH_CUDA)
  const auto c = gradstats::cuda::plan_counters();
  return Py_BuildValue("{s:L,s:L,s:L,s:L,s:L,s:L}", "plans_built", c.plans_built,
                       "plans_cached", c.plans_cached, "uploads", c.uploads,
                       "uploads_skipped", c.uploads_skipped, "ring_waits", c.ring_waits,
                       "capture_uploads", c.capture_uploads);
#else
  Py_RETURN_NONE;
#endif
}

PyObject* py_chunk_elems(PyObject*, PyObject*) { return PyLong_FromLongLong(gradstats::kChunk); }

PyMethodDef kMethods[] = {
    {"cpu_capability", py_cpu_capability, METH_NOARGS,
     "Name of the CPU kernel build in use (AVX512, AVX2 or DEFAULT)."},
    {"cpu_capabilities", py_cpu_capabilities, METH_NOARGS,
     "CPU kernel builds that may be used here (compiled in, supported by this CPU, and "
     "verified or explicitly requested), best first."},
    {"cpu_variants", py_cpu_variants, METH_NOARGS,
     "Every CPU kernel build compiled in, best first, as (name, cpu_supports, verified, "
     "enabled); an unverified build is enabled only by GRADSTATS_CPU_CAPABILITY."},
    {"cpu_capability_summary", py_cpu_capability_summary, METH_NOARGS,
     "One line: the CPU kernel build in use, the builds this CPU runs, the opt-in ones."},
    {"set_cpu_capability", py_set_cpu_capability, METH_O,
     "Use another enabled CPU kernel build (for tests); returns the previous one's name."},
    {"cuda_built", py_cuda_built, METH_NOARGS, "True when the CUDA kernels were compiled in."},
    {"cuda_plan_counters", py_cuda_plan_counters, METH_NOARGS,
     "Counters of the CUDA plan cache (plans built, pointer uploads made and skipped, ...), "
     "or None without the CUDA kernels."},
    {"chunk_elems", py_chunk_elems, METH_NOARGS, "Elements per chunk of the CPU kernels."},
    {"fingerprint", gradstats::py_fingerprint, METH_O,
     "(key, same_device) describing a list of tensors, addresses included, or None."},
    {"describe", gradstats::py_describe, METH_O,
     "(key, ptrs, same_device): the structure of a list of tensors without their addresses "
     "(key), the int64 data pointers (ptrs), or None for anything but plain strided tensors."},
    {"grads_of", gradstats::py_grads_of, METH_O,
     "The non-None .grad of a list of plain tensors/Parameters, or None for other types."},
    {"params_and_grads", gradstats::py_params_and_grads, METH_O,
     "(params_with_grad, grads) of a list of plain tensors/Parameters, or None for other "
     "types."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C",
                       "gradstats native kernels (registers torch.ops.gradstats.*)", -1,
                       kMethods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kModule); }
