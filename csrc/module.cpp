// torchext._C: a Python module whose import loads this library, and with it the static op
// registrations, plus what torchext.info asks the library itself. No pybind and no Python API
// beyond the limited one, so one wheel serves every CPython >= 3.10.
#include <Python.h>

#include <exception>

#include "csrc/cpu/kernels.h"
#ifdef USE_CUDA
#include "kernels/qgemm.cuh"
#endif

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

#ifdef USE_CUDA
// _C.tiled_gemm_first_row(qtype, n, k, bf16, device): the first activation row that qmatmul sends to the tiled
// GEMM rather than the GEMVs for an n x k weight of format qtype (a catalog id) and fp16 or bf16 activations on
// the CUDA device, with both operands 16-byte aligned (0: the tiled GEMM does not run there). The batch policy's
// own answer (qgemm_first_row), so that torchext.ops.gemv_max_rows needs no copy of its rules.
PyObject* tiled_gemm_first_row(PyObject*, PyObject* args) {
  long long qtype = 0, n = 0, k = 0;
  int bf16 = 0, device = 0;
  if (!PyArg_ParseTuple(args, "LLLpi", &qtype, &n, &k, &bf16, &device)) return nullptr;
  alignas(16) static const uint8_t aligned[16] = {};  // stands for both operands: only their alignment is read
  const int64_t first = torchext::qgemm_first_row(torchext::QType(qtype),
                                                  bf16 ? torchext::FloatType::BF16 : torchext::FloatType::F16,
                                                  aligned, aligned, n, k, device);
  return PyLong_FromLongLong(first);
}
#endif

PyMethodDef methods[] = {
    {"cpu_kernels", cpu_kernels, METH_NOARGS, "The CPU kernels torchext's GEMVs run (TORCHEXT_CPU_KERNELS's names)."},
#ifdef USE_CUDA
    {"tiled_gemm_first_row", tiled_gemm_first_row, METH_VARARGS,
     "The first activation row qmatmul's tiled GEMM takes (qtype, n, k, bf16, device); 0: it does not run."},
#endif
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}
