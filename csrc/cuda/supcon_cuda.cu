// Registration of the CUDA kernels (supcon_kernels.cuh) for mcsc::supcon_forward and
// mcsc::supcon_backward: input checks shared with the CPU kernels, device guard, current
// stream, TF32 policy and the output layout.
#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <optional>
#include <tuple>
#include <utility>

#include "cuda/supcon_kernels.cuh"
#include "supcon_checks.h"

namespace mcsc {
namespace cuda {
namespace {

constexpr std::initializer_list<at::ScalarType> kFeatureDtypes = {at::kFloat, at::kHalf,
                                                                   at::kBFloat16, at::kDouble};

// Launches kernels of kThreads threads on one stream, checking each launch.
struct StreamLaunch {
  cudaStream_t stream;

  template <typename... Params, typename... Args>
  void operator()(void (*kernel)(Params...), int64_t grid_x, int64_t grid_y,
                  Args&&... args) const {
    with_dynamic_shared(0, kernel, grid_x, grid_y, std::forward<Args>(args)...);
  }

  // With `bytes` of dynamic shared memory per block; beyond 48 KiB a kernel must opt in.
  template <typename... Params, typename... Args>
  void with_dynamic_shared(int64_t bytes, void (*kernel)(Params...), int64_t grid_x,
                           int64_t grid_y, Args&&... args) const {
    if (bytes > 0) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(bytes)));
    }
    const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y));
    kernel<<<grid, kThreads, static_cast<size_t>(bytes), stream>>>(std::forward<Args>(args)...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // Whether the current device gives `kernel` `bytes` of dynamic shared memory on top of its
  // static shared memory (the opt-in limit per block: 227 KiB on sm_90, 163 KiB on sm_80, 99
  // KiB on sm_86 and sm_89).
  template <typename Kernel>
  bool holds_dynamic_shared(Kernel kernel, int64_t bytes) const {
    cudaFuncAttributes attributes;
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
    const auto limit =
        static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin);
    return static_cast<int64_t>(attributes.sharedSizeBytes) + bytes <= limit;
  }
};

// Whether float32 matmuls may use TF32: torch.backends.cuda.matmul.allow_tf32 = True,
// torch.set_float32_matmul_precision("high") and torch.backends.cuda.matmul.fp32_precision =
// "tf32" all set this. (Context::allowTF32CuBLAS reads the same value but throws when the
// legacy and the new API were mixed, e.g. after only the last of the three.)
bool float32_matmul_allows_tf32() {
  return at::globalContext().float32Precision(at::Float32Backend::CUDA,
                                              at::Float32Op::MATMUL) ==
         at::Float32Precision::TF32;
}

// The tensor-core kernels MCSC_CUDA_KERNELS names, read on every call so that a process can
// switch between them (the tests run both). mma.sync, ldmatrix and cp.async need sm_80.
KernelFamily selected_kernels() {
  const KernelFamily family = kernel_family(std::getenv("MCSC_CUDA_KERNELS"));
  TORCH_CHECK_VALUE(family != KernelFamily::Mma ||
                        at::cuda::getCurrentDeviceProperties()->major >= 8,
                    "mcsc: MCSC_CUDA_KERNELS=mma needs a GPU of compute capability 8.0 or "
                    "newer; unset it to use the WMMA kernels");
  return family;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> supcon_forward_cuda(
    const at::Tensor& features, const at::Tensor& labels, const at::Tensor& segments,
    double temperature, bool prevalence, int64_t ignore_index,
    const std::optional<at::Tensor>& ref_features, const std::optional<at::Tensor>& ref_labels,
    const std::optional<at::Tensor>& ref_segments,
    const std::optional<at::Tensor>& ref_self_index, bool anchor_gradient) {
  check_op_inputs(features, labels, segments, c10::DeviceType::CUDA, kFeatureDtypes);
  check_forward_reference_inputs(features, segments, ref_features, ref_labels, ref_segments,
                                 ref_self_index, anchor_gradient);
  const c10::cuda::CUDAGuard guard(features.device());
  const int64_t multiprocessors =
      at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const auto keys = reference_rows(ref_features, ref_labels, ref_segments, ref_self_index);
  return launch_supcon_forward(StreamLaunch{at::cuda::getCurrentCUDAStream()},
                               features.contiguous(), labels.contiguous(),
                               segments.contiguous(), temperature, prevalence, ignore_index,
                               keys.has_value() ? &*keys : nullptr, anchor_gradient,
                               float32_matmul_allows_tf32(), multiprocessors, selected_kernels());
}

// The gradient with respect to the contrast rows: features (N, D) without ref_features,
// ref_features (K, D) with them; laid out like empty_like of that tensor, as the fake kernel
// promises.
at::Tensor supcon_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& features,
                                const at::Tensor& labels, const at::Tensor& segments,
                                const at::Tensor& lse, const at::Tensor& positives,
                                double temperature, bool prevalence, int64_t ignore_index,
                                const std::optional<at::Tensor>& ref_features,
                                const std::optional<at::Tensor>& ref_labels,
                                const std::optional<at::Tensor>& ref_segments,
                                const std::optional<at::Tensor>& ref_self_index) {
  check_backward_inputs(grad_loss, features, labels, segments, lse, positives,
                        c10::DeviceType::CUDA, kFeatureDtypes);
  check_reference_inputs(features, segments, ref_features, ref_labels, ref_segments,
                         ref_self_index);
  const c10::cuda::CUDAGuard guard(features.device());
  const auto keys = reference_rows(ref_features, ref_labels, ref_segments, ref_self_index);
  const at::Tensor grad = launch_supcon_backward(
      StreamLaunch{at::cuda::getCurrentCUDAStream()},
      grad_loss.to(accumulation_dtype(features)).contiguous(), features.contiguous(),
      labels.contiguous(), segments.contiguous(), lse.contiguous(), positives.contiguous(),
      temperature, prevalence, ignore_index, keys.has_value() ? &*keys : nullptr,
      float32_matmul_allows_tf32(), selected_kernels());
  const at::Tensor& rows = ref_features.has_value() ? *ref_features : features;
  if (rows.is_contiguous()) return grad;
  at::Tensor grad_in_layout = at::empty_like(rows);
  grad_in_layout.copy_(grad);
  return grad_in_layout;
}

}  // namespace
}  // namespace cuda
}  // namespace mcsc

TORCH_LIBRARY_IMPL(mcsc, CUDA, m) {
  m.impl("supcon_forward", &mcsc::cuda::supcon_forward_cuda);
  m.impl("supcon_backward", &mcsc::cuda::supcon_backward_cuda);
}
