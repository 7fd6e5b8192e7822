// Python-level helpers of gradstats._C over lists of tensors and parameters (host only,
// move no tensor data):
//
// gradstats._C.fingerprint(tensors) -> (key: bytes, same_device: bool) | None
//     For every tensor its address, element count, dtype, device and contiguity (plus
//     sizes and strides when it is not contiguous). Equal bytes <=> a plan made for these
//     exact tensors is still valid.
// gradstats._C.describe(tensors) -> (key: bytes, ptrs: bytes, same_device: bool) | None
//     The same without the address: element count, dtype, device, contiguity (plus dim,
//     sizes, strides when not contiguous) and the address modulo 16 (alignment class),
//     i.e. everything a kernel plan depends on except where the data is. Equal keys <=> a
//     plan keyed by structure is still valid after the gradients moved (zero_grad
//     (set_to_none=True) + backward()). `ptrs` packs the int64 data pointers in order, for
//     numpy.frombuffer(ptrs, dtype=numpy.int64) without a copy.
//     Both return None when an element is not a plain strided tensor with storage (the
//     caller's Python path). The bytes are compared exactly: no hash collisions to fear. In
//     C++ this costs ~20 ns per tensor, against ~200 ns for the same fields read through
//     Python-level passes.
// gradstats._C.grads_of(params) -> [p.grad for p in params if p.grad is not None] | None
// gradstats._C.params_and_grads(params) -> (params_with_grad, grads) | None
//     The .grad of parameters read in C++ (~15 ns each, against ~70 ns for Python's
//     attribute access): the other per-tensor host cost of every clipping call. None (the
//     caller's Python path) when an element is of any type other than exactly torch.Tensor
//     or torch.nn.Parameter, e.g. a tensor subclass whose .grad may be overridden through
//     __torch_function__.
//
// One file on purpose: torch/csrc/autograd/python_variable.h is the heaviest header of the
// extension to compile.
#include <Python.h>

#include <cstdint>
#include <cstring>
#include <string>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/python_variable.h>

#include "python_api.h"

namespace gradstats {

namespace {

struct Record {
  int64_t ptr;
  int64_t numel;
  int8_t dtype;
  int8_t device_type;
  int16_t device_index;
  int8_t contiguous;
  int8_t pad[3];
};
static_assert(sizeof(Record) == 24, "Record must stay packed");

// describe(): one record per tensor, then dim, sizes, strides when not contiguous.
struct StructRecord {
  int64_t numel;
  int8_t dtype;
  int8_t device_type;
  int16_t device_index;
  int8_t contiguous;
  int8_t align16;  // data address modulo 16
  int8_t pad[2];
};
static_assert(sizeof(StructRecord) == 16, "StructRecord must stay packed");

void append(std::string& buf, const void* p, size_t n) {
  buf.append(static_cast<const char*>(p), n);
}

// A strided tensor with real storage whose data pointer the kernels may read, or nullptr.
const at::Tensor* plain_tensor(PyObject* o) {
  if (!THPVariable_Check(o)) return nullptr;
  const at::Tensor& t = THPVariable_Unpack(o);
  if (!t.defined() || t.layout() != at::kStrided || !t.has_storage() || t.is_meta() ||
      t.unsafeGetTensorImpl()->is_python_dispatch()) {
    return nullptr;
  }
  return &t;
}

void append_layout(std::string& buf, const at::Tensor& t) {
  const int64_t dim = t.dim();
  append(buf, &dim, sizeof(dim));
  append(buf, t.sizes().data(), sizeof(int64_t) * dim);
  append(buf, t.strides().data(), sizeof(int64_t) * dim);
}

}  // namespace

PyObject* py_fingerprint(PyObject* /*self*/, PyObject* arg) {
  if (!PyList_Check(arg)) {
    PyErr_SetString(PyExc_TypeError, "gradstats._C.fingerprint: expected a list of tensors");
    return nullptr;
  }
  const Py_ssize_t n = PyList_GET_SIZE(arg);
  std::string buf;
  buf.reserve(static_cast<size_t>(n) * sizeof(Record));
  bool same_device = true;
  int first_type = -1, first_index = -1;
  try {
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* o = PyList_GET_ITEM(arg, i);
      if (!THPVariable_Check(o)) Py_RETURN_NONE;
      const at::Tensor& t = THPVariable_Unpack(o);
      if (!t.defined() || t.layout() != at::kStrided || !t.has_storage()) Py_RETURN_NONE;
      Record r;
      std::memset(&r, 0, sizeof(r));
      r.ptr = reinterpret_cast<int64_t>(t.data_ptr());
      r.numel = t.numel();
      r.dtype = static_cast<int8_t>(t.scalar_type());
      r.device_type = static_cast<int8_t>(t.device().type());
      r.device_index = static_cast<int16_t>(t.device().index());
      r.contiguous = t.is_contiguous() ? 1 : 0;
      append(buf, &r, sizeof(r));
      if (!r.contiguous) append_layout(buf, t);
      if (i == 0) {
        first_type = r.device_type;
        first_index = r.device_index;
      } else if (r.device_type != first_type || r.device_index != first_index) {
        same_device = false;
      }
    }
  } catch (const c10::Error&) {
    Py_RETURN_NONE;  // e.g. a tensor subclass without storage: the caller's slow path
  }
  PyObject* bytes = PyBytes_FromStringAndSize(buf.data(), static_cast<Py_ssize_t>(buf.size()));
  if (bytes == nullptr) return nullptr;
  PyObject* out = PyTuple_Pack(2, bytes, same_device ? Py_True : Py_False);
  Py_DECREF(bytes);
  return out;
}

PyObject* py_describe(PyObject* /*self*/, PyObject* arg) {
  if (!PyList_Check(arg)) {
    PyErr_SetString(PyExc_TypeError, "gradstats._C.describe: expected a list of tensors");
    return nullptr;
  }
  const Py_ssize_t n = PyList_GET_SIZE(arg);
  std::string key;
  std::string ptrs;
  key.reserve(static_cast<size_t>(n) * sizeof(StructRecord));
  ptrs.reserve(static_cast<size_t>(n) * sizeof(int64_t));
  bool same_device = true;
  int first_type = -1, first_index = -1;
  try {
    for (Py_ssize_t i = 0; i < n; ++i) {
      const at::Tensor* tp = plain_tensor(PyList_GET_ITEM(arg, i));
      if (tp == nullptr) Py_RETURN_NONE;
      const at::Tensor& t = *tp;
      const int64_t ptr = reinterpret_cast<int64_t>(t.data_ptr());
      StructRecord r;
      std::memset(&r, 0, sizeof(r));
      r.numel = t.numel();
      r.dtype = static_cast<int8_t>(t.scalar_type());
      r.device_type = static_cast<int8_t>(t.device().type());
      r.device_index = static_cast<int16_t>(t.device().index());
      r.contiguous = t.is_contiguous() ? 1 : 0;
      r.align16 = static_cast<int8_t>(static_cast<uint64_t>(ptr) & 15u);
      append(key, &r, sizeof(r));
      if (!r.contiguous) append_layout(key, t);
      append(ptrs, &ptr, sizeof(ptr));
      if (i == 0) {
        first_type = r.device_type;
        first_index = r.device_index;
      } else if (r.device_type != first_type || r.device_index != first_index) {
        same_device = false;
      }
    }
  } catch (const c10::Error&) {
    Py_RETURN_NONE;  // e.g. a tensor whose data pointer cannot be read: the Python path
  }
  PyObject* kb = PyBytes_FromStringAndSize(key.data(), static_cast<Py_ssize_t>(key.size()));
  PyObject* pb = PyBytes_FromStringAndSize(ptrs.data(), static_cast<Py_ssize_t>(ptrs.size()));
  PyObject* out = nullptr;
  if (kb != nullptr && pb != nullptr) {
    out = PyTuple_Pack(3, kb, pb, same_device ? Py_True : Py_False);
  }
  Py_XDECREF(kb);
  Py_XDECREF(pb);
  return out;
}

// ----------------------------------------------------------------- .grad of parameter lists

namespace {

// torch.Tensor and torch.nn.Parameter, looked up once. The references are kept for the
// life of the process on purpose (never released, so nothing runs at interpreter exit).
bool plain_types(PyTypeObject** tensor_type, PyTypeObject** param_type) {
  static PyTypeObject* tt = nullptr;
  static PyTypeObject* pt = nullptr;
  if (tt == nullptr) {
    PyObject* torch = PyImport_ImportModule("torch");
    if (torch == nullptr) return false;
    PyObject* t = PyObject_GetAttrString(torch, "Tensor");
    PyObject* nn = PyObject_GetAttrString(torch, "nn");
    PyObject* prm = nn ? PyObject_GetAttrString(nn, "Parameter") : nullptr;
    Py_XDECREF(nn);
    Py_DECREF(torch);
    if (t == nullptr || prm == nullptr) {
      Py_XDECREF(t);
      Py_XDECREF(prm);
      return false;
    }
    tt = reinterpret_cast<PyTypeObject*>(t);
    pt = reinterpret_cast<PyTypeObject*>(prm);
  }
  *tensor_type = tt;
  *param_type = pt;
  return true;
}

// 1: every element is exactly a Tensor or Parameter; 0: some is not; -1: error set.
int all_plain(PyObject* list, const char* fn) {
  if (!PyList_Check(list)) {
    PyErr_Format(PyExc_TypeError, "gradstats._C.%s: expected a list", fn);
    return -1;
  }
  PyTypeObject *tt, *pt;
  if (!plain_types(&tt, &pt)) return -1;
  const Py_ssize_t n = PyList_GET_SIZE(list);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyTypeObject* tp = Py_TYPE(PyList_GET_ITEM(list, i));
    if (tp != tt && tp != pt) return 0;
  }
  return 1;
}

// Appends the defined .grad of every element (and, if params_out, the element itself).
// Returns false with a Python error set, or throws c10::Error.
bool collect(PyObject* list, PyObject* grads_out, PyObject* params_out) {
  const Py_ssize_t n = PyList_GET_SIZE(list);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* po = PyList_GET_ITEM(list, i);
    const at::Tensor& g = THPVariable_Unpack(po).grad();
    if (!g.defined()) continue;
    PyObject* w = THPVariable_Wrap(g);
    if (w == nullptr) return false;
    const int rc = PyList_Append(grads_out, w);
    Py_DECREF(w);
    if (rc != 0) return false;
    if (params_out != nullptr && PyList_Append(params_out, po) != 0) return false;
  }
  return true;
}

}  // namespace

PyObject* py_grads_of(PyObject* /*self*/, PyObject* arg) {
  const int ok = all_plain(arg, "grads_of");
  if (ok < 0) return nullptr;
  if (ok == 0) Py_RETURN_NONE;
  PyObject* grads = PyList_New(0);
  if (grads == nullptr) return nullptr;
  try {
    if (!collect(arg, grads, nullptr)) {
      Py_DECREF(grads);
      return nullptr;
    }
  } catch (const c10::Error&) {
    Py_DECREF(grads);
    Py_RETURN_NONE;
  }
  return grads;
}

PyObject* py_params_and_grads(PyObject* /*self*/, PyObject* arg) {
  const int ok = all_plain(arg, "params_and_grads");
  if (ok < 0) return nullptr;
  if (ok == 0) Py_RETURN_NONE;
  PyObject* grads = PyList_New(0);
  PyObject* params = PyList_New(0);
  if (grads == nullptr || params == nullptr) {
    Py_XDECREF(grads);
    Py_XDECREF(params);
    return nullptr;
  }
  bool done = false;
  try {
    done = collect(arg, grads, params);
  } catch (const c10::Error&) {
    Py_DECREF(grads);
    Py_DECREF(params);
    Py_RETURN_NONE;
  }
  PyObject* out = done ? PyTuple_Pack(2, params, grads) : nullptr;
  Py_DECREF(grads);
  Py_DECREF(params);
  return out;
}

}  // namespace gradstats
