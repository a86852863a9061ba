// The one schema block of the mcsc operators, and the Python module that carries them.
// Backends register their kernels in csrc/cpu and csrc/cuda; autograd and fake kernels are
// registered from Python (mcsc/ops.py).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(mcsc, m) {
  // Per-anchor loss (N,) in the features dtype, log-denominator lse (N,) in the accumulation
  // dtype, and the number of positives (N,) int32 (-1 for rows labelled ignore_index).
  m.def(
      "supcon_forward(Tensor features, Tensor labels, Tensor segments, float temperature, "
      "bool prevalence, int ignore_index) -> (Tensor loss, Tensor lse, Tensor positives)");
  // Gradient of sum_i grad_loss[i] * loss[i] with respect to features.
  m.def(
      "supcon_backward(Tensor grad_loss, Tensor features, Tensor labels, Tensor segments, "
      "Tensor lse, Tensor positives, float temperature, bool prevalence) -> Tensor");
}

#define MCSC_STRINGIFY_(x) #x
#define MCSC_STRINGIFY(x) MCSC_STRINGIFY_(x)

static PyModuleDef module_definition = {PyModuleDef_HEAD_INIT, "_C",
                                        "Compiled mcsc operators (registered on import).", -1,
                                        nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&module_definition);
  if (module == nullptr) return nullptr;
  PyModule_AddStringConstant(module, "built_with_torch", MCSC_STRINGIFY(MCSC_TORCH_VERSION));
#ifdef MCSC_WITH_CUDA
  PyModule_AddIntConstant(module, "with_cuda", 1);
#else
  PyModule_AddIntConstant(module, "with_cuda", 0);
#endif
  return module;
}
