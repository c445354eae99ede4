// torchext._C: a Python module whose import loads this library, and with it the static op
// registrations, plus what torchext.info asks the library itself. No pybind and no Python API
// beyond the limited one, so one wheel serves every CPython >= 3.10.
#include <Python.h>

#include <exception>

#include "csrc/cpu/kernels.h"

namespace {

// _C.cpu_kernels(): the CPU kernels the GEMVs run ("avx512vnni", "avxvnni", "avx2" or "portable").
PyObject* cpu_kernels(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(torchext::cpu::gemv_kernels_name());
  } catch (const std::exception& e) {  // TORCHEXT_CPU_KERNELS naming no set, or one this CPU lacks
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

PyMethodDef methods[] = {
    {"cpu_kernels", cpu_kernels, METH_NOARGS, "The CPU kernels torchext's GEMVs run (TORCHEXT_CPU_KERNELS's names)."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}
