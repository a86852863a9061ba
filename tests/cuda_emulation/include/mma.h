// CPU emulation of the part of CUDA's <mma.h> (nvcuda::wmma) that mcsc's kernels use; found
// before the toolkit's header on the emulation's include path.
//
// Every lane holds a whole fragment as a row-major matrix, so element-wise loops over
// fragment.x (the TF32 conversions) see all of it. Loads and stores check the alignment rules
// of the real API (a 256-bit aligned pointer, a leading dimension that is a multiple of 16
// bytes). A store writes only the calling lane's share of the matrix -- row-major chunks of 8
// elements, lane L the chunks L, L + 32, ... -- so a lane that reads the stored tile without a
// __syncwarp after the store sees other lanes' elements missing, as on hardware, where the
// fragment layout is unspecified.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <deque>
#include <iterator>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "cuda_emulator.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
namespace precision {
struct tf32 {};
}  // namespace precision
enum layout_t { mem_row_major, mem_col_major };

namespace detail {

template <typename T>
struct Storage {
  using type = T;
};
template <>
struct Storage<precision::tf32> {
  using type = float;
};

template <typename Use, int M, int N, int K>
struct Shape;
template <int M, int N, int K>
struct Shape<matrix_a, M, N, K> {
  static constexpr int rows = M;
  static constexpr int cols = K;
};
template <int M, int N, int K>
struct Shape<matrix_b, M, N, K> {
  static constexpr int rows = K;
  static constexpr int cols = N;
};
template <int M, int N, int K>
struct Shape<accumulator, M, N, K> {
  static constexpr int rows = M;
  static constexpr int cols = N;
};

inline float to_float(float value) { return value; }
inline float to_float(__half value) { return __half2float(value); }
inline float to_float(__nv_bfloat16 value) { return __bfloat162float(value); }

template <typename Element>
void check_pointer(const Element* pointer, unsigned ldm, const char* function) {
  if (reinterpret_cast<uintptr_t>(pointer) % 32 != 0) {
    cuda_emulator::Scheduler::instance().fail(std::string("wmma::") + function +
                                              ": the pointer is not 256-bit aligned");
  }
  if ((ldm * sizeof(Element)) % 16 != 0) {
    cuda_emulator::Scheduler::instance().fail(
        std::string("wmma::") + function + ": ldm = " + std::to_string(ldm) +
        " is not a multiple of 16 bytes");
  }
}

constexpr int kStoreChunk = 8;

}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  using shape = detail::Shape<Use, M, N, K>;
  using storage_element_type = typename detail::Storage<T>::type;
  static constexpr int rows = shape::rows;
  static constexpr int cols = shape::cols;
  static constexpr int num_elements = rows * cols;
  storage_element_type x[num_elements];
};

template <typename Use, int M, int N, int K, typename T, typename Layout, typename Value>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& frag, const Value& value) {
  for (auto& element : frag.x) element = static_cast<typename detail::Storage<T>::type>(value);
}

template <typename Use, int M, int N, int K, typename T, typename Layout>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& frag,
                      const typename detail::Storage<T>::type* pointer, unsigned ldm) {
  using Frag = fragment<Use, M, N, K, T, Layout>;
  detail::check_pointer(pointer, ldm, "load_matrix_sync");
  constexpr bool kRowMajor = std::is_same_v<Layout, row_major>;
  for (int r = 0; r < Frag::rows; ++r) {
    for (int c = 0; c < Frag::cols; ++c) {
      frag.x[r * Frag::cols + c] = kRowMajor ? pointer[r * ldm + c] : pointer[c * ldm + r];
    }
  }
}

template <int M, int N, int K>
void store_matrix_sync(float* pointer, const fragment<accumulator, M, N, K, float>& frag,
                       unsigned ldm, layout_t layout) {
  using Frag = fragment<accumulator, M, N, K, float>;
  detail::check_pointer(pointer, ldm, "store_matrix_sync");
  const int lane = static_cast<int>(threadIdx.x) % cuda_emulator::kWarpSize;
  for (int e = 0; e < Frag::num_elements; ++e) {
    if ((e / detail::kStoreChunk) % cuda_emulator::kWarpSize != lane) continue;
    const int r = e / Frag::cols;
    const int c = e % Frag::cols;
    pointer[layout == mem_row_major ? r * ldm + c : c * ldm + r] = frag.x[e];
  }
}

namespace detail {

// The products of one warp's mma_sync calls that not all 32 lanes have taken yet. Lanes of a
// converged warp make the same calls in the same order, so a lane's n-th call is the warp's
// n-th product: the first lane to reach it computes it, the other 31 copy it.
struct WarpProducts {
  uint64_t first_call = 0;
  std::deque<std::pair<std::vector<float>, int>> pending;  // (product, lanes that took it)
};

template <int M, int N, int K, typename T, typename LayoutA, typename LayoutB>
std::vector<float> product(const fragment<matrix_a, M, N, K, T, LayoutA>& a,
                           const fragment<matrix_b, M, N, K, T, LayoutB>& b,
                           const fragment<accumulator, M, N, K, float>& c) {
  constexpr bool kTf32 = std::is_same_v<T, precision::tf32>;
  std::vector<float> result(M * N);
  for (int i = 0; i < M; ++i) {
    for (int j = 0; j < N; ++j) {
      float sum = c.x[i * N + j];
      for (int k = 0; k < K; ++k) {
        float left = to_float(a.x[i * K + k]);
        float right = to_float(b.x[k * N + j]);
        if constexpr (kTf32) {
          left = cuda_emulator::tf32_operand(left);
          right = cuda_emulator::tf32_operand(right);
        }
        sum += left * right;
      }
      result[i * N + j] = sum;
    }
  }
  return result;
}

}  // namespace detail

// d = a b + c, products and sums in float; TF32 operands enter with their upper 19 bits.
template <int M, int N, int K, typename T, typename LayoutA, typename LayoutB>
void mma_sync(fragment<accumulator, M, N, K, float>& d,
              const fragment<matrix_a, M, N, K, T, LayoutA>& a,
              const fragment<matrix_b, M, N, K, T, LayoutB>& b,
              const fragment<accumulator, M, N, K, float>& c) {
  constexpr int kMaxThreads = 1024;
  static uint64_t block_serial = ~uint64_t{0};
  static uint64_t calls[kMaxThreads];
  static detail::WarpProducts warps[kMaxThreads / cuda_emulator::kWarpSize];
  auto& scheduler = cuda_emulator::Scheduler::instance();
  if (scheduler.block_serial() != block_serial) {  // a new block: forget the last one's calls
    block_serial = scheduler.block_serial();
    std::fill(std::begin(calls), std::end(calls), 0);
    std::fill(std::begin(warps), std::end(warps), detail::WarpProducts{});
  }
  const unsigned thread = threadIdx.x;
  detail::WarpProducts& warp = warps[thread / cuda_emulator::kWarpSize];
  const uint64_t index = calls[thread]++ - warp.first_call;
  if (index == warp.pending.size()) warp.pending.emplace_back(detail::product(a, b, c), 0);
  auto& [result, taken] = warp.pending[index];
  std::memcpy(d.x, result.data(), sizeof(d.x));
  ++taken;
  while (!warp.pending.empty() && warp.pending.front().second == cuda_emulator::kWarpSize) {
    warp.pending.pop_front();
    ++warp.first_call;
  }
}

// cvt.rna.tf32.f32.
inline float __float_to_tf32(float value) { return cuda_emulator::round_to_tf32(value); }

}  // namespace wmma
}  // namespace nvcuda
