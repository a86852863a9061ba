// mcsc's CUDA kernels and their host-side launch code (csrc/cuda/supcon_kernels.cuh), compiled
// for the CPU against the emulator in include/, as a Python module for the tests
// (tests/test_cuda_emulated.py builds it with torch.utils.cpp_extension.load).
//
// forward/backward take CPU tensors, choose the multiply path as the CUDA op would (fp16/bf16:
// tensor cores; float32: TF32 tensor cores with allow_tf32, else FMA; float64: FMA) and run the
// threads of each phase in ascending or descending order. misuse(name, ...) runs small kernels
// with deliberate barrier and alignment mistakes, to show that the emulator catches them.
#include <torch/extension.h>

#include "cuda_emulator.h"
#include "cuda/supcon_kernels.cuh"
#include "mma.h"

#include <map>
#include <optional>
#include <string>
#include <tuple>
#include <utility>

namespace {

struct EmulatedLaunch {
  bool descending;

  template <typename... Params, typename... Args>
  void operator()(void (*kernel)(Params...), int64_t grid_x, int64_t grid_y,
                  Args&&... args) const {
    cuda_emulator::launch(kernel, grid_x, grid_y, mcsc::cuda::kThreads, descending,
                          std::forward<Args>(args)...);
  }

  template <typename... Params, typename... Args>
  void with_dynamic_shared(int64_t bytes, void (*kernel)(Params...), int64_t grid_x,
                           int64_t grid_y, Args&&... args) const {
    cuda_emulator::launch_with_dynamic_shared(kernel, grid_x, grid_y, mcsc::cuda::kThreads,
                                              static_cast<size_t>(bytes), descending,
                                              std::forward<Args>(args)...);
  }

  // As on an H100 or H200, whose 227 KiB per block hold the resident tiles (at most 132 KiB)
  // beside any kernel's static shared memory.
  template <typename Kernel>
  bool holds_dynamic_shared(Kernel, int64_t bytes) const {
    return bytes <= 227 * 1024;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& features, const at::Tensor& labels, const at::Tensor& segments,
    double temperature, bool prevalence, int64_t ignore_index, bool allow_tf32, bool descending,
    int64_t multiprocessors, const std::string& kernels,
    const std::optional<at::Tensor>& ref_features, const std::optional<at::Tensor>& ref_labels,
    const std::optional<at::Tensor>& ref_segments,
    const std::optional<at::Tensor>& ref_self_index, bool anchor_gradient) {
  const auto keys =
      mcsc::cuda::reference_rows(ref_features, ref_labels, ref_segments, ref_self_index);
  return mcsc::cuda::launch_supcon_forward(
      EmulatedLaunch{descending}, features.contiguous(), labels.contiguous(),
      segments.contiguous(), temperature, prevalence, ignore_index,
      keys.has_value() ? &*keys : nullptr, anchor_gradient, allow_tf32, multiprocessors,
      mcsc::cuda::kernel_family(kernels.c_str()));
}

at::Tensor backward(const at::Tensor& grad_loss, const at::Tensor& features,
                    const at::Tensor& labels, const at::Tensor& segments, const at::Tensor& lse,
                    const at::Tensor& positives, double temperature, bool prevalence,
                    int64_t ignore_index, bool allow_tf32, bool descending,
                    const std::string& kernels, const std::optional<at::Tensor>& ref_features,
                    const std::optional<at::Tensor>& ref_labels,
                    const std::optional<at::Tensor>& ref_segments,
                    const std::optional<at::Tensor>& ref_self_index) {
  const auto keys =
      mcsc::cuda::reference_rows(ref_features, ref_labels, ref_segments, ref_self_index);
  return mcsc::cuda::launch_supcon_backward(
      EmulatedLaunch{descending},
      grad_loss.to(mcsc::accumulation_dtype(features)).contiguous(),
      features.contiguous(), labels.contiguous(), segments.contiguous(), lse.contiguous(),
      positives.contiguous(), temperature, prevalence, ignore_index,
      keys.has_value() ? &*keys : nullptr, allow_tf32,
      mcsc::cuda::kernel_family(kernels.c_str()));
}

// ---- Kernels with deliberate mistakes -----------------------------------------------------

// Odd threads leave before a __syncthreads the even ones wait at.
__global__ void divergent_barrier_kernel(float* out, float base) {
  if (threadIdx.x % 2 == 1) return;
  __syncthreads();
  out[threadIdx.x] = base;
}

// Half of each warp shuffles, the other half does not.
__global__ void divergent_shuffle_kernel(float* out, float base) {
  float value = base + threadIdx.x;
  if (threadIdx.x % 32 < 16) value = __shfl_xor_sync(0xffffffffu, value, 1);
  out[threadIdx.x] = value;
}

// Each thread reads its neighbour's shared value, with or without the barrier between the
// write and the read that makes this correct.
template <bool kBarrier>
__global__ void neighbour_kernel(float* out, float base) {
  __shared__ float values[mcsc::cuda::kThreads];
  values[threadIdx.x] = base + threadIdx.x;
  if (kBarrier) __syncthreads();
  out[threadIdx.x] = values[(threadIdx.x + 1) % mcsc::cuda::kThreads];
}

// A WMMA load 16 bytes past a 32-byte boundary.
__global__ void misaligned_wmma_kernel(float* out, float base) {
  __shared__ __align__(32) __half tile[16 * 24];
  for (int i = threadIdx.x; i < 16 * 24; i += mcsc::cuda::kThreads) tile[i] = __float2half(base);
  __syncthreads();
  nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __half, nvcuda::wmma::row_major> a;
  nvcuda::wmma::load_matrix_sync(a, tile + 8, 24);
  out[threadIdx.x] = __half2float(a.x[0]);
}

// A tile stored by the warp's lanes is read back by each lane, with or without the
// __syncwarp after the store.
template <bool kSyncWarp>
__global__ void wmma_store_kernel(float* out, float base) {
  __shared__ __align__(32) float tile[8 * 256];
  float* own = tile + threadIdx.x / 32 * 256;
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> c;
  nvcuda::wmma::fill_fragment(c, base);
  nvcuda::wmma::store_matrix_sync(own, c, 16, nvcuda::wmma::mem_row_major);
  if (kSyncWarp) __syncwarp();
  float sum = 0;
  for (int e = threadIdx.x % 32; e < 256; e += 32) sum += own[e];
  out[threadIdx.x] = sum;
}

at::Tensor misuse(const std::string& name, double base, bool descending) {
  using Kernel = void (*)(float*, float);
  static const std::map<std::string, Kernel> kKernels = {
      {"divergent_barrier", &divergent_barrier_kernel},
      {"divergent_shuffle", &divergent_shuffle_kernel},
      {"neighbour_synchronised", &neighbour_kernel<true>},
      {"neighbour_racy", &neighbour_kernel<false>},
      {"misaligned_wmma", &misaligned_wmma_kernel},
      {"wmma_store_synchronised", &wmma_store_kernel<true>},
      {"wmma_store_racy", &wmma_store_kernel<false>},
  };
  const auto found = kKernels.find(name);
  TORCH_CHECK(found != kKernels.end(), "unknown misuse kernel ", name);
  at::Tensor out = at::zeros({mcsc::cuda::kThreads}, at::kFloat);
  cuda_emulator::launch(found->second, 1, 1, mcsc::cuda::kThreads, descending,
                        out.mutable_data_ptr<float>(), static_cast<float>(base));
  return out;
}

}  // namespace

// Poisons the __shared__ variables of every mcsc::cuda kernel before each block; returns how
// many bytes that covers (0 would mean the symbol table was stripped and nothing is poisoned).
int64_t poison_shared_memory() {
  return cuda_emulator::poison_kernel_shared_memory(reinterpret_cast<const void*>(&forward),
                                                    "_ZZN4mcsc4cuda");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // multiprocessors: 132 SMs, as on an H100 or H200.
  m.def("forward", &forward, "mcsc::supcon_forward's CUDA kernels, emulated on the CPU",
        pybind11::arg("features"), pybind11::arg("labels"), pybind11::arg("segments"),
        pybind11::arg("temperature"), pybind11::arg("prevalence"),
        pybind11::arg("ignore_index"), pybind11::arg("allow_tf32"),
        pybind11::arg("descending"),
        pybind11::arg("multiprocessors") = 132,
        pybind11::arg("kernels") = "wmma", pybind11::arg("ref_features") = pybind11::none(),
        pybind11::arg("ref_labels") = pybind11::none(),
        pybind11::arg("ref_segments") = pybind11::none(),
        pybind11::arg("ref_self_index") = pybind11::none(),
        pybind11::arg("anchor_gradient") = false);
  m.def("backward", &backward, "mcsc::supcon_backward's CUDA kernels, emulated on the CPU",
        pybind11::arg("grad_loss"), pybind11::arg("features"), pybind11::arg("labels"),
        pybind11::arg("segments"), pybind11::arg("lse"), pybind11::arg("positives"),
        pybind11::arg("temperature"), pybind11::arg("prevalence"),
        pybind11::arg("ignore_index"), pybind11::arg("allow_tf32"),
        pybind11::arg("descending"), pybind11::arg("kernels") = "wmma",
        pybind11::arg("ref_features") = pybind11::none(),
        pybind11::arg("ref_labels") = pybind11::none(),
        pybind11::arg("ref_segments") = pybind11::none(),
        pybind11::arg("ref_self_index") = pybind11::none());
  m.def("misuse", &misuse, "a kernel with a deliberate barrier or alignment mistake");
  m.def("poison_shared_memory", &poison_shared_memory,
        "fill the kernels' shared memory with a pattern before each block; returns its bytes");
}
