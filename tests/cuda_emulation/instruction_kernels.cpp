// Small kernels that exercise each emulated PTX instruction of include/cuda/ptx.cuh on its own
// (and dynamic shared memory),
// as a Python module for tests/test_cuda_emulator_instructions.py (built by
// emulation.load_instructions). The tests put known matrices into registers by the PTX ISA's
// fragment tables, written out again in Python, and compare what comes back with torch.
#include <torch/extension.h>

#include "cuda_emulator.h"
#include "cuda/ptx.cuh"

#include <cstdint>
#include <map>
#include <string>
#include <utility>

namespace instruction_tests {

namespace ptx = mcsc::cuda::ptx;
using Mma = void (*)(float (&)[4], const uint32_t (&)[4], const uint32_t (&)[2],
                     const float (&)[4]);

// Each warp w multiplies its own matrices: lane L of warp w reads its registers from row
// 32 w + L of a (4 registers), b (2) and c (4) and writes d. Only the first `lanes` lanes of
// each warp take part (32 unless a test wants a divergent warp).
template <Mma kMma>
__global__ void mma_kernel(const int32_t* a, const int32_t* b, const float* c, float* d,
                           int lanes) {
  const int thread = static_cast<int>(threadIdx.x);
  if (thread % cuda_emulator::kWarpSize >= lanes) return;
  uint32_t a_registers[4];
  uint32_t b_registers[2];
  float c_registers[4];
  float d_registers[4];
  for (int r = 0; r < 4; ++r) a_registers[r] = static_cast<uint32_t>(a[4 * thread + r]);
  for (int r = 0; r < 2; ++r) b_registers[r] = static_cast<uint32_t>(b[2 * thread + r]);
  for (int r = 0; r < 4; ++r) c_registers[r] = c[4 * thread + r];
  kMma(d_registers, a_registers, b_registers, c_registers);
  for (int r = 0; r < 4; ++r) d[4 * thread + r] = d_registers[r];
}

at::Tensor mma(const std::string& kind, const at::Tensor& a, const at::Tensor& b,
               const at::Tensor& c, int64_t lanes, bool descending) {
  static const std::map<std::string, void (*)(const int32_t*, const int32_t*, const float*,
                                              float*, int)>
      kKernels = {{"f16", &mma_kernel<ptx::mma_m16n8k16_f16>},
                  {"bf16", &mma_kernel<ptx::mma_m16n8k16_bf16>},
                  {"tf32", &mma_kernel<ptx::mma_m16n8k8_tf32>}};
  const auto found = kKernels.find(kind);
  TORCH_CHECK(found != kKernels.end(), "unknown mma kind ", kind);
  TORCH_CHECK(a.dim() == 2 && a.size(1) == 4 && a.size(0) % 32 == 0 && a.scalar_type() == at::kInt,
              "a: int32 registers of shape (32 * warps, 4)");
  const int64_t threads = a.size(0);
  TORCH_CHECK(b.sizes() == at::IntArrayRef({threads, 2}) && b.scalar_type() == at::kInt,
              "b: int32 registers of shape (32 * warps, 2)");
  TORCH_CHECK(c.sizes() == at::IntArrayRef({threads, 4}) && c.scalar_type() == at::kFloat,
              "c: float32 registers of shape (32 * warps, 4)");
  at::Tensor d = at::zeros({threads, 4}, at::kFloat);
  const at::Tensor a_contiguous = a.contiguous();
  const at::Tensor b_contiguous = b.contiguous();
  const at::Tensor c_contiguous = c.contiguous();
  cuda_emulator::launch(found->second, 1, 1, static_cast<int>(threads), descending,
                        a_contiguous.const_data_ptr<int32_t>(),
                        b_contiguous.const_data_ptr<int32_t>(),
                        c_contiguous.const_data_ptr<float>(), d.mutable_data_ptr<float>(),
                        static_cast<int>(lanes));
  return d;
}

constexpr int kTileElements = 64 * 16;  // 64 rows of 16 b16 elements (32 bytes)

// The block copies `source` (kTileElements 16-bit values) into shared memory; lane L of each
// warp then passes the address of element offsets[L] of it to ldmatrix.
template <int kMatrices, bool kTranspose>
__global__ void ldmatrix_kernel(const int16_t* source, const int64_t* offsets, int32_t* out) {
  __shared__ __align__(16) int16_t tile[kTileElements];
  const int thread = static_cast<int>(threadIdx.x);
  const int lane = thread % cuda_emulator::kWarpSize;
  for (int i = thread; i < kTileElements; i += cuda_emulator::kWarpSize) tile[i] = source[i];
  __syncwarp();
  uint32_t registers[kMatrices];
  const void* row = tile + offsets[lane];
  if constexpr (kMatrices == 1) {
    kTranspose ? ptx::ldmatrix_x1_trans(registers, row) : ptx::ldmatrix_x1(registers, row);
  } else if constexpr (kMatrices == 2) {
    kTranspose ? ptx::ldmatrix_x2_trans(registers, row) : ptx::ldmatrix_x2(registers, row);
  } else {
    kTranspose ? ptx::ldmatrix_x4_trans(registers, row) : ptx::ldmatrix_x4(registers, row);
  }
  for (int m = 0; m < kMatrices; ++m) {
    out[kMatrices * thread + m] = static_cast<int32_t>(registers[m]);
  }
}

at::Tensor ldmatrix(int64_t matrices, bool transpose, const at::Tensor& source,
                    const at::Tensor& offsets, bool descending) {
  using Kernel = void (*)(const int16_t*, const int64_t*, int32_t*);
  static const std::map<std::pair<int64_t, bool>, Kernel> kKernels = {
      {{1, false}, &ldmatrix_kernel<1, false>}, {{1, true}, &ldmatrix_kernel<1, true>},
      {{2, false}, &ldmatrix_kernel<2, false>}, {{2, true}, &ldmatrix_kernel<2, true>},
      {{4, false}, &ldmatrix_kernel<4, false>}, {{4, true}, &ldmatrix_kernel<4, true>}};
  const auto found = kKernels.find({matrices, transpose});
  TORCH_CHECK(found != kKernels.end(), "matrices must be 1, 2 or 4");
  TORCH_CHECK(source.numel() == kTileElements && source.scalar_type() == at::kShort,
              "source: ", kTileElements, " int16 values");
  TORCH_CHECK(offsets.sizes() == at::IntArrayRef({32}) && offsets.scalar_type() == at::kLong,
              "offsets: 32 int64 element offsets, one per lane");
  TORCH_CHECK(offsets.min().item<int64_t>() >= 0 &&
                  offsets.max().item<int64_t>() + 8 <= kTileElements,
              "offsets: each row of 8 elements must lie inside the tile");
  at::Tensor out = at::zeros({32, matrices}, at::kInt);
  const at::Tensor source_contiguous = source.contiguous();
  const at::Tensor offsets_contiguous = offsets.contiguous();
  cuda_emulator::launch(found->second, 1, 1, 32, descending,
                        source_contiguous.const_data_ptr<int16_t>(),
                        offsets_contiguous.const_data_ptr<int64_t>(),
                        out.mutable_data_ptr<int32_t>());
  return out;
}

// ---- cp.async ------------------------------------------------------------------------------

constexpr int kThreads = 64;
constexpr int kFloatsPerThread = 8;  // two groups of up to 4 floats (16 bytes) each

// Thread t copies floats [8 t, 8 t + 4) in one group and [8 t + 4, 8 t + 8) in a second, with
// cp.async of Bytes; `valid` false zero-fills the second group without reading it. out gets
// 3 * 8 floats per thread: what the thread reads of its destination after the commits (before
// any wait), after cp_async_wait<1> and after cp_async_wait<0>.
template <int Bytes, bool kValid>
__global__ void cp_async_kernel(const float* source, float* out) {
  __shared__ __align__(16) float staged[kThreads * kFloatsPerThread];
  const int thread = static_cast<int>(threadIdx.x);
  float* own = staged + kFloatsPerThread * thread;
  const float* from = source + kFloatsPerThread * thread;
  constexpr int kFloatsPerCopy = Bytes / 4;
  for (int group = 0; group < 2; ++group) {
    for (int f = 0; f < 4; f += kFloatsPerCopy) {
      const bool valid = group == 0 || kValid;
      ptx::cp_async<Bytes>(own + 4 * group + f, valid ? from + 4 * group + f : nullptr, valid);
    }
    ptx::cp_async_commit();
  }
  float* mine = out + 3 * kFloatsPerThread * thread;
  for (int f = 0; f < kFloatsPerThread; ++f) mine[f] = own[f];
  ptx::cp_async_wait<1>();
  for (int f = 0; f < kFloatsPerThread; ++f) mine[kFloatsPerThread + f] = own[f];
  ptx::cp_async_wait<0>();
  for (int f = 0; f < kFloatsPerThread; ++f) mine[2 * kFloatsPerThread + f] = own[f];
}

at::Tensor cp_async(int64_t bytes, bool valid, const at::Tensor& source, bool descending) {
  using Kernel = void (*)(const float*, float*);
  static const std::map<std::pair<int64_t, bool>, Kernel> kKernels = {
      {{4, true}, &cp_async_kernel<4, true>},   {{8, true}, &cp_async_kernel<8, true>},
      {{16, true}, &cp_async_kernel<16, true>}, {{16, false}, &cp_async_kernel<16, false>}};
  const auto found = kKernels.find({bytes, valid});
  TORCH_CHECK(found != kKernels.end(), "bytes must be 4, 8 or 16 (valid=false: 16)");
  TORCH_CHECK(source.numel() == kThreads * kFloatsPerThread && source.scalar_type() == at::kFloat,
              "source: ", kThreads * kFloatsPerThread, " float32 values");
  at::Tensor out = at::zeros({kThreads, 3, kFloatsPerThread}, at::kFloat);
  const at::Tensor source_contiguous = source.contiguous();
  cuda_emulator::launch(found->second, 1, 1, kThreads, descending,
                        source_contiguous.const_data_ptr<float>(), out.mutable_data_ptr<float>());
  return out;
}

// ---- Dynamic shared memory ---------------------------------------------------------------

// Each thread writes into the first half of the block's dynamic shared memory; after the
// barrier it reads its neighbour's value and a float of the second half, which no thread
// writes. out gets (neighbour, unwritten) per thread.
__global__ void dynamic_shared_kernel(float* out) {
  MCSC_DYNAMIC_SHARED_MEMORY(bytes);
  float* values = reinterpret_cast<float*>(bytes);
  const int thread = static_cast<int>(threadIdx.x);
  values[thread] = static_cast<float>(thread) + 0.5f;
  __syncthreads();
  out[2 * thread] = values[(thread + 1) % kThreads];
  out[2 * thread + 1] = values[kThreads + thread];
}

// Runs dynamic_shared_kernel over `blocks` blocks with 2 kThreads floats of dynamic shared
// memory (every block writes the same out).
at::Tensor dynamic_shared(int64_t blocks, bool descending) {
  at::Tensor out = at::zeros({kThreads, 2}, at::kFloat);
  cuda_emulator::launch_with_dynamic_shared(&dynamic_shared_kernel, blocks, 1, kThreads,
                                            2 * kThreads * sizeof(float), descending,
                                            out.mutable_data_ptr<float>());
  return out;
}

// ---- Deliberate mistakes: each must be reported -----------------------------------------

// Lanes 0-15 of each warp multiply, the others do not.
__global__ void divergent_mma_kernel(const float* source, float* out) {
  if (threadIdx.x % 32 >= 16) return;
  const uint32_t a[4] = {0, 0, 0, 0};
  const uint32_t b[2] = {0, 0};
  const float c[4] = {source[0], 0, 0, 0};
  float d[4];
  ptx::mma_m16n8k16_bf16(d, a, b, c);
  out[threadIdx.x] = d[0];
}

// Half of each warp multiplies while the other half loads a matrix.
__global__ void mismatched_warp_kernel(const float* source, float* out) {
  __shared__ __align__(16) int16_t tile[32 * 8];
  for (int i = threadIdx.x; i < 32 * 8; i += kThreads) tile[i] = 0;
  __syncthreads();
  float d[4] = {source[0], 0, 0, 0};
  if (threadIdx.x % 32 < 16) {
    const uint32_t a[4] = {0, 0, 0, 0};
    const uint32_t b[2] = {0, 0};
    const float c[4] = {0, 0, 0, 0};
    ptx::mma_m16n8k16_f16(d, a, b, c);
  } else {
    uint32_t r[1];
    ptx::ldmatrix_x1(r, tile + 8 * (threadIdx.x % 8));
    d[0] = static_cast<float>(r[0]);
  }
  out[threadIdx.x] = d[0];
}

// Lane 3 passes a row address 8 bytes past a 16-byte boundary.
__global__ void misaligned_ldmatrix_kernel(const float* source, float* out) {
  __shared__ __align__(16) int16_t tile[32 * 8];
  for (int i = threadIdx.x; i < 32 * 8; i += kThreads) tile[i] = 0;
  __syncthreads();
  const int lane = threadIdx.x % 32;
  uint32_t r[4];
  ptx::ldmatrix_x4(r, tile + 8 * lane + (lane == 3 ? 4 : 0));
  out[threadIdx.x] = source[0] + static_cast<float>(r[0]);
}

// A 16-byte copy to an address 4 bytes past a 16-byte boundary.
__global__ void misaligned_cp_async_kernel(const float* source, float* out) {
  __shared__ __align__(16) float staged[kThreads * 8];
  ptx::cp_async<16>(staged + 8 * threadIdx.x + 1, source, true);
  ptx::cp_async_commit();
  ptx::cp_async_wait<0>();
  out[threadIdx.x] = staged[8 * threadIdx.x + 1];
}

// Copies committed but never waited for.
__global__ void missing_wait_kernel(const float* source, float* out) {
  __shared__ __align__(16) float staged[kThreads * 4];
  ptx::cp_async<16>(staged + 4 * threadIdx.x, source, true);
  ptx::cp_async_commit();
  out[threadIdx.x] = staged[4 * threadIdx.x];
}

// Copies waited for but never committed: the wait does not cover them.
__global__ void missing_commit_kernel(const float* source, float* out) {
  __shared__ __align__(16) float staged[kThreads * 4];
  ptx::cp_async<16>(staged + 4 * threadIdx.x, source, true);
  ptx::cp_async_wait<0>();
  out[threadIdx.x] = staged[4 * threadIdx.x];
}

at::Tensor misuse(const std::string& name, bool descending) {
  using Kernel = void (*)(const float*, float*);
  static const std::map<std::string, Kernel> kKernels = {
      {"divergent_mma", &divergent_mma_kernel},
      {"mismatched_warp", &mismatched_warp_kernel},
      {"misaligned_ldmatrix", &misaligned_ldmatrix_kernel},
      {"misaligned_cp_async", &misaligned_cp_async_kernel},
      {"missing_wait", &missing_wait_kernel},
      {"missing_commit", &missing_commit_kernel},
  };
  const auto found = kKernels.find(name);
  TORCH_CHECK(found != kKernels.end(), "unknown misuse kernel ", name);
  const at::Tensor source = at::ones({16}, at::kFloat);
  at::Tensor out = at::zeros({kThreads}, at::kFloat);
  cuda_emulator::launch(found->second, 1, 1, kThreads, descending, source.const_data_ptr<float>(),
                        out.mutable_data_ptr<float>());
  return out;
}

// cvt.rna.tf32.f32 of each value, as the bit patterns (int32) the instruction returns.
at::Tensor to_tf32(const at::Tensor& values) {
  TORCH_CHECK(values.scalar_type() == at::kFloat, "values: float32");
  const at::Tensor contiguous = values.contiguous();
  at::Tensor out = at::empty(values.sizes(), at::kInt);
  const float* in = contiguous.const_data_ptr<float>();
  int32_t* bits = out.mutable_data_ptr<int32_t>();
  for (int64_t i = 0; i < values.numel(); ++i) {
    bits[i] = static_cast<int32_t>(ptx::to_tf32(in[i]));
  }
  return out;
}

// Poisons the test kernels' __shared__ variables before each block; returns the bytes that
// covers. (The namespace's name must not contain "_kernel", or every static in it would
// count as a kernel's shared memory.)
int64_t poison_shared_memory() {
  return cuda_emulator::poison_kernel_shared_memory(reinterpret_cast<const void*>(&misuse),
                                                    "_ZZN17instruction_tests");
}

}  // namespace instruction_tests

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("mma", &instruction_tests::mma,
        "one emulated mma per warp from given registers; returns each lane's D registers");
  m.def("ldmatrix", &instruction_tests::ldmatrix,
        "one emulated ldmatrix from a shared tile; returns each lane's registers");
  m.def("cp_async", &instruction_tests::cp_async,
        "two cp.async groups per thread; what each thread reads before and after the waits");
  m.def("dynamic_shared", &instruction_tests::dynamic_shared,
        "a kernel on dynamic shared memory; each thread's (neighbour's value, unwritten value)");
  m.def("misuse", &instruction_tests::misuse, "a kernel with a deliberate PTX misuse");
  m.def("to_tf32", &instruction_tests::to_tf32, "the emulated cvt.rna.tf32.f32");
  m.def("poison_shared_memory", &instruction_tests::poison_shared_memory,
        "fill the test kernels' shared memory with a pattern before each block");
}
