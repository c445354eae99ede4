// torchext._C: an empty Python module whose import loads this library, and with it the
// static op registrations. No pybind and no Python API beyond the limited one, so one wheel
// serves every CPython >= 3.10.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
