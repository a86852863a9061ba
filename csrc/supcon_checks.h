// Shape, dtype and device checks of the mcsc ops, shared by the CPU and CUDA kernels, and the
// dtype rules both follow.
//
// In eager mode mcsc.ops.validate_inputs checks every argument (values included) with Python
// errors that name it before the op runs. These checks catch direct calls of torch.ops.mcsc
// with wrong shapes, dtypes or devices before a kernel could read out of bounds; the CPU kernels
// also check values (supcon_cpu.cpp), which keeps calls under torch.compile, where the Python
// value checks cannot run, as safe as eager ones.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <optional>

namespace mcsc {

// The dtype of lse and of every sum: float64 for float64 features, float32 for the others.
inline at::ScalarType accumulation_dtype(const at::Tensor& features) {
  return features.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The largest max_i |z_i|^2 / temperature the kernels accept, for sums in acc_t: 2^-10 / eps
// (8192 for float32, 4.4e12 for float64). lse_i is stored rounded to acc_t, an absolute error of
// up to eps |lse_i| / 2 that every exp(s_ij - lse_i) of the backward inherits, so the gradient's
// relative error grows as about 0.4 eps max_i |z_i|^2 / t; within this limit it stays below 1e-3
// (and every result stays finite: they overflow only about 10^5 times further out).
template <typename acc_t>
constexpr acc_t similarity_limit() {
  return acc_t(1.0 / 1024) / std::numeric_limits<acc_t>::epsilon();
}

inline void check_op_inputs(const at::Tensor& features, const at::Tensor& labels,
                            const at::Tensor& segments, c10::DeviceType device_type,
                            std::initializer_list<at::ScalarType> feature_dtypes) {
  TORCH_CHECK(features.device().type() == device_type, "mcsc: features must be a ",
              c10::DeviceTypeName(device_type), " tensor for this kernel");
  TORCH_CHECK(features.dim() == 2, "mcsc: features must have shape (N, D), got ",
              features.sizes());
  TORCH_CHECK(features.size(1) >= 1, "mcsc: features need D >= 1 columns");
  TORCH_CHECK(std::find(feature_dtypes.begin(), feature_dtypes.end(),
                        features.scalar_type()) != feature_dtypes.end(),
              "mcsc: unsupported features dtype ", features.scalar_type());
  TORCH_CHECK(features.size(0) <= std::numeric_limits<int32_t>::max(),
              "mcsc: at most 2^31 - 1 rows are supported");
  TORCH_CHECK(labels.device() == features.device(), "mcsc: labels must be on ",
              features.device());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == features.size(0),
              "mcsc: labels must have shape (N,) = (", features.size(0), ",)");
  TORCH_CHECK(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt,
              "mcsc: labels must be int64 or int32");
  TORCH_CHECK(segments.device() == features.device(), "mcsc: segments must be on ",
              features.device());
  TORCH_CHECK(segments.dim() == 1 && segments.numel() >= 2 &&
                  segments.scalar_type() == at::kLong,
              "mcsc: segments must be int64 offsets of shape (S + 1,) with S >= 1");
}

inline void check_row_tensor(const at::Tensor& tensor, const at::Tensor& features,
                             const char* name) {
  TORCH_CHECK(tensor.device() == features.device(), "mcsc: ", name, " must be on ",
              features.device());
  TORCH_CHECK(tensor.dim() == 1 && tensor.size(0) == features.size(0), "mcsc: ", name,
              " must have shape (N,) = (", features.size(0), ",)");
}

// The backward's extra inputs: one value per row each; lse in the accumulation dtype and
// positives as int32, as the forward returns them.
inline void check_backward_inputs(const at::Tensor& grad_loss, const at::Tensor& features,
                                  const at::Tensor& labels, const at::Tensor& segments,
                                  const at::Tensor& lse, const at::Tensor& positives,
                                  c10::DeviceType device_type,
                                  std::initializer_list<at::ScalarType> feature_dtypes) {
  check_op_inputs(features, labels, segments, device_type, feature_dtypes);
  check_row_tensor(grad_loss, features, "grad_loss");
  check_row_tensor(lse, features, "lse");
  check_row_tensor(positives, features, "positives");
  TORCH_CHECK(lse.scalar_type() == accumulation_dtype(features), "mcsc: lse must be ",
              accumulation_dtype(features));
  TORCH_CHECK(positives.scalar_type() == at::kInt, "mcsc: positives must be int32");
}

// The reference set of a two-set call (shapes, dtypes, devices; the kernels check values):
// ref_features (K, D) like features; ref_labels (K,) int64/int32; ref_segments int64 offsets
// with as many entries as segments; ref_self_index None or (M,) int64. Without ref_features
// none of the others may be given. Errors are ValueError/TypeError naming the argument.
inline void check_reference_inputs(const at::Tensor& features, const at::Tensor& segments,
                                   const std::optional<at::Tensor>& ref_features,
                                   const std::optional<at::Tensor>& ref_labels,
                                   const std::optional<at::Tensor>& ref_segments,
                                   const std::optional<at::Tensor>& ref_self_index) {
  if (!ref_features.has_value()) {
    TORCH_CHECK_VALUE(!ref_labels.has_value(), "mcsc: ref_labels was given without ref_features");
    TORCH_CHECK_VALUE(!ref_segments.has_value(),
                      "mcsc: ref_segments was given without ref_features");
    TORCH_CHECK_VALUE(!ref_self_index.has_value(),
                      "mcsc: ref_self_index was given without ref_features");
    return;
  }
  const at::Tensor& keys = *ref_features;
  TORCH_CHECK_VALUE(keys.device() == features.device(), "mcsc: ref_features must be on ",
                    features.device(), " like features, got ", keys.device());
  TORCH_CHECK_VALUE(keys.dim() == 2 && keys.size(1) == features.size(1),
                    "mcsc: ref_features must have shape (K, D) with D = ", features.size(1),
                    " like features, got ", keys.sizes());
  TORCH_CHECK_TYPE(keys.scalar_type() == features.scalar_type(),
                   "mcsc: ref_features must have the features' dtype ", features.scalar_type(),
                   ", got ", keys.scalar_type());
  TORCH_CHECK_VALUE(keys.size(0) <= std::numeric_limits<int32_t>::max(),
                    "mcsc: ref_features may have at most 2^31 - 1 rows");
  TORCH_CHECK_VALUE(ref_labels.has_value(), "mcsc: ref_labels must be given with ref_features");
  const at::Tensor& key_labels = *ref_labels;
  TORCH_CHECK_VALUE(key_labels.device() == features.device(), "mcsc: ref_labels must be on ",
                    features.device());
  TORCH_CHECK_VALUE(key_labels.dim() == 1 && key_labels.size(0) == keys.size(0),
                    "mcsc: ref_labels must have shape (K,) = (", keys.size(0), ",), got ",
                    key_labels.sizes());
  TORCH_CHECK_TYPE(key_labels.scalar_type() == at::kLong || key_labels.scalar_type() == at::kInt,
                   "mcsc: ref_labels must be int64 or int32, got ", key_labels.scalar_type());
  TORCH_CHECK_VALUE(ref_segments.has_value(),
                    "mcsc: ref_segments must be given with ref_features ([0, K] for one set)");
  const at::Tensor& key_segments = *ref_segments;
  TORCH_CHECK_VALUE(key_segments.device() == features.device(), "mcsc: ref_segments must be on ",
                    features.device());
  TORCH_CHECK_TYPE(key_segments.scalar_type() == at::kLong,
                   "mcsc: ref_segments must be int64 offsets, got ", key_segments.scalar_type());
  TORCH_CHECK_VALUE(key_segments.dim() == 1 && key_segments.numel() == segments.numel(),
                    "mcsc: ref_segments must have shape (S + 1,) = (", segments.numel(),
                    ",) like segments, got ", key_segments.sizes());
  if (ref_self_index.has_value()) {
    const at::Tensor& self_index = *ref_self_index;
    TORCH_CHECK_VALUE(self_index.device() == features.device(),
                      "mcsc: ref_self_index must be on ", features.device());
    TORCH_CHECK_TYPE(self_index.scalar_type() == at::kLong,
                     "mcsc: ref_self_index must be int64, got ", self_index.scalar_type());
    TORCH_CHECK_VALUE(self_index.dim() == 1 && self_index.size(0) == features.size(0),
                      "mcsc: ref_self_index must have shape (M,) = (", features.size(0),
                      ",), got ", self_index.sizes());
  }
}

// The forward's reference-set checks: those above, and anchor_gradient, which only a two-set
// call honours (a single-set call's gradient comes from supcon_backward).
inline void check_forward_reference_inputs(const at::Tensor& features, const at::Tensor& segments,
                                           const std::optional<at::Tensor>& ref_features,
                                           const std::optional<at::Tensor>& ref_labels,
                                           const std::optional<at::Tensor>& ref_segments,
                                           const std::optional<at::Tensor>& ref_self_index,
                                           bool anchor_gradient) {
  check_reference_inputs(features, segments, ref_features, ref_labels, ref_segments,
                         ref_self_index);
  TORCH_CHECK_VALUE(!anchor_gradient || ref_features.has_value(),
                    "mcsc: anchor_gradient=True needs ref_features (a single-set call's "
                    "gradient comes from supcon_backward)");
}

}  // namespace mcsc
