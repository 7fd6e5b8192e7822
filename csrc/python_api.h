// The Python-level functions of gradstats._C other than the capability queries, as
// METH_O/METH_NOARGS C functions; the module object that exposes them is module.cpp.
#pragma once

#include <Python.h>

namespace gradstats {

PyObject* py_fingerprint(PyObject* self, PyObject* arg);       // tensor_lists.cpp
PyObject* py_describe(PyObject* self, PyObject* arg);          // tensor_lists.cpp
PyObject* py_grads_of(PyObject* self, PyObject* arg);          // tensor_lists.cpp
PyObject* py_params_and_grads(PyObject* self, PyObject* arg);  // tensor_lists.cpp

}  // namespace gradstats
