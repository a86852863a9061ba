// The one schema block of the mcsc operators, and the Python module that carries them.
// Backends register their kernels in csrc/cpu and csrc/cuda; autograd and fake kernels are
// registered from Python (mcsc/ops.py).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(mcsc, m) {
  // One op for both calls: without ref_features the rows of `features` are anchors and
  // contrasts at once (each row's own pair excluded); with them, anchor i of segment k
  // contrasts against the reference rows of reference segment k, minus the row
  // ref_self_index[i] when that is >= 0 (the anchor's own copy, e.g. in a cross-batch memory).
  //
  // Outputs: the per-anchor loss (M,) in the features dtype, the log-denominator lse (M,) in the
  // accumulation dtype, the number of positives (M,) int32 (-1 for rows labelled ignore_index),
  // and, only with ref_features and anchor_gradient, d loss_i / d features_i (M, D) in the
  // accumulation dtype ((0, D) otherwise): with a reference set each loss depends on its own
  // anchor row alone, so the anchors' gradient is that row scaled by grad_loss[i], computed in
  // the forward's pass over the pairs instead of a second pass in the backward.
  m.def(
      "supcon_forward(Tensor features, Tensor labels, Tensor segments, float temperature, "
      "bool prevalence, int ignore_index, Tensor? ref_features=None, Tensor? ref_labels=None, "
      "Tensor? ref_segments=None, Tensor? ref_self_index=None, bool anchor_gradient=False) -> "
      "(Tensor loss, Tensor lse, Tensor positives, Tensor anchor_grad)");
  // Gradient of sum_i grad_loss[i] * loss[i] with respect to the contrast rows: `features`
  // (N, D) without ref_features (both of its roles), `ref_features` (K, D) with them.
  m.def(
      "supcon_backward(Tensor grad_loss, Tensor features, Tensor labels, Tensor segments, "
      "Tensor lse, Tensor positives, float temperature, bool prevalence, int ignore_index=-1, "
      "Tensor? ref_features=None, Tensor? ref_labels=None, Tensor? ref_segments=None, "
      "Tensor? ref_self_index=None) -> Tensor");
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
