// Gradients of a parameter list, read in C++ (~15 ns per parameter, against ~70 ns for
// Python's attribute access): the other per-tensor host cost of every clipping call.
//
// gradstats._C.grads_of(params) -> [p.grad for p in params if p.grad is not None] | None
// gradstats._C.params_and_grads(params) -> (params_with_grad, grads) | None
//
// Both return None (the caller's Python path) when an element is of any type other than
// exactly torch.Tensor or torch.nn.Parameter, e.g. a tensor subclass whose .grad may be
// overridden through __torch_function__. Moves no tensor data.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/python_variable.h>

#include "python_api.h"

namespace gradstats {
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
