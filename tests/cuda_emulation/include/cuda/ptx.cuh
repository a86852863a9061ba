// CPU emulation of csrc/cuda/ptx.cuh: the same functions in namespace mcsc::cuda::ptx, found
// first on the emulation's include path, so the kernels that include "cuda/ptx.cuh" get these.
//
// mma and ldmatrix are warp-collective (cuda_emulator::Collective): all 32 lanes must reach the
// same one, or the emulator reports a divergent warp. mma assembles the whole A, B and C
// matrices from the 32 lanes' registers by the PTX ISA's fragment tables ("Matrix Fragments
// for mma.m16n8k16 / mma.m16n8k8"), multiplies in float (products, then sums in ascending k,
// starting from C) and hands each lane its D registers by the same tables. TF32 operands enter
// with their upper 19 bits, as the tensor cores read them. ldmatrix reads the rows the lanes
// point to when the whole warp has arrived and checks that those addresses are 16-byte
// aligned. cp.async reads its source when issued and writes its destination only when a
// cp_async_wait covering its group returns (cuda_emulator::AsyncCopies).
//
// Not modelled: that ldmatrix and cp.async destinations lie in shared memory and cp.async
// sources in global memory (any address works here), the hardware's accumulation order and
// rounding inside mma, and timing.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <string>

#include "cuda_emulator.h"

// The block's dynamic shared memory as `unsigned char* name` (extern __shared__ on a GPU).
#define MCSC_DYNAMIC_SHARED_MEMORY(name)     \
  unsigned char* const name =                \
      reinterpret_cast<unsigned char*>(::cuda_emulator::Scheduler::instance().dynamic_shared())

namespace mcsc::cuda::ptx {
namespace emulation {

// A fragment element's place in its matrix.
struct Coordinate {
  int row;
  int col;
};

// The PTX ISA's fragment tables; `group` is %laneid >> 2, `thread` is %laneid % 4, and
// `element` counts a lane's elements from its first register's low half.
// m16n8k16, A (16 x 16, f16/bf16): 8 elements in 4 registers.
inline Coordinate a_m16n8k16(int lane, int element) {
  const int group = lane >> 2;
  const int thread = lane % 4;
  return {group + ((element & 2) ? 8 : 0), thread * 2 + (element & 1) + ((element & 4) ? 8 : 0)};
}

// m16n8k16, B (16 x 8, f16/bf16): 4 elements in 2 registers.
inline Coordinate b_m16n8k16(int lane, int element) {
  const int group = lane >> 2;
  const int thread = lane % 4;
  return {thread * 2 + (element & 1) + ((element & 2) ? 8 : 0), group};
}

// m16n8k8, A (16 x 8, tf32): 4 elements, one per register.
inline Coordinate a_m16n8k8(int lane, int element) {
  const int group = lane >> 2;
  const int thread = lane % 4;
  return {group + ((element & 1) ? 8 : 0), thread + ((element & 2) ? 4 : 0)};
}

// m16n8k8, B (8 x 8, tf32): 2 elements, one per register.
inline Coordinate b_m16n8k8(int lane, int element) {
  const int group = lane >> 2;
  const int thread = lane % 4;
  return {thread + (element ? 4 : 0), group};
}

// The accumulators C and D of both shapes (16 x 8, f32): 4 elements, one per register.
inline Coordinate accumulator(int lane, int element) {
  const int group = lane >> 2;
  const int thread = lane % 4;
  return {group + ((element & 2) ? 8 : 0), thread * 2 + (element & 1)};
}

struct MmaOperands {
  uint32_t a[4];
  uint32_t b[2];
  float c[4];
};

enum class Precision { F16, BF16, TF32 };

// The value of element `element` of a fragment whose registers are `registers`: a half of an
// f16x2/bf16x2 register (low half first), or a whole tf32 register.
template <Precision kind>
float element_value(const uint32_t* registers, int element) {
  if constexpr (kind == Precision::TF32) {
    return cuda_emulator::tf32_operand(cuda_emulator::from_bits<float>(registers[element]));
  } else {
    const auto bits = static_cast<uint16_t>(registers[element / 2] >> (16 * (element % 2)));
    if constexpr (kind == Precision::F16) {
      __half_raw raw;
      raw.x = bits;
      return __half2float(__half(raw));
    } else {
      __nv_bfloat16_raw raw;
      raw.x = bits;
      return __bfloat162float(__nv_bfloat16(raw));
    }
  }
}

template <Precision kind>
void run_mma(const void* const (&operands)[32], void* const (&results)[32]) {
  constexpr bool kTf32 = kind == Precision::TF32;
  constexpr int K = kTf32 ? 8 : 16;
  constexpr int kElementsA = kTf32 ? 4 : 8;
  constexpr int kElementsB = kTf32 ? 2 : 4;
  float a[16][K];
  float b[K][8];
  float c[16][8];
  for (int lane = 0; lane < cuda_emulator::kWarpSize; ++lane) {
    const auto& lane_operands = *static_cast<const MmaOperands*>(operands[lane]);
    for (int e = 0; e < kElementsA; ++e) {
      const Coordinate at = kTf32 ? a_m16n8k8(lane, e) : a_m16n8k16(lane, e);
      a[at.row][at.col] = element_value<kind>(lane_operands.a, e);
    }
    for (int e = 0; e < kElementsB; ++e) {
      const Coordinate at = kTf32 ? b_m16n8k8(lane, e) : b_m16n8k16(lane, e);
      b[at.row][at.col] = element_value<kind>(lane_operands.b, e);
    }
    for (int e = 0; e < 4; ++e) {
      const Coordinate at = accumulator(lane, e);
      c[at.row][at.col] = lane_operands.c[e];
    }
  }
  for (int lane = 0; lane < cuda_emulator::kWarpSize; ++lane) {
    auto* d = static_cast<float*>(results[lane]);
    for (int e = 0; e < 4; ++e) {
      const Coordinate at = accumulator(lane, e);
      float sum = c[at.row][at.col];
      for (int k = 0; k < K; ++k) sum += a[at.row][k] * b[k][at.col];
      d[e] = sum;
    }
  }
}

template <Precision kind>
void mma(float (&d)[4], const uint32_t* a, const uint32_t* b, const float (&c)[4],
         const char* name) {
  static const cuda_emulator::Collective operation{name, &run_mma<kind>};
  MmaOperands operands{};
  std::memcpy(operands.a, a, sizeof(operands.a));
  std::memcpy(operands.b, b, sizeof(operands.b));
  std::memcpy(operands.c, c, sizeof(operands.c));
  float result[4];
  cuda_emulator::Scheduler::instance().collective(operation, &operands, result);
  std::memcpy(d, result, sizeof(result));
}

// ldmatrix: matrix m's row r comes from the address lane 8 m + r offers.
template <int kMatrices, bool kTranspose>
void run_ldmatrix(const void* const (&operands)[32], void* const (&results)[32]) {
  uint16_t rows[kMatrices][8][8];
  for (int m = 0; m < kMatrices; ++m) {
    for (int r = 0; r < 8; ++r) {
      std::memcpy(rows[m][r], *static_cast<const void* const*>(operands[8 * m + r]),
                  sizeof(rows[m][r]));
    }
  }
  for (int lane = 0; lane < cuda_emulator::kWarpSize; ++lane) {
    auto* registers = static_cast<uint32_t*>(results[lane]);
    const int row = lane / 4;
    const int col = 2 * (lane % 4);
    for (int m = 0; m < kMatrices; ++m) {
      const uint16_t low = kTranspose ? rows[m][col][row] : rows[m][row][col];
      const uint16_t high = kTranspose ? rows[m][col + 1][row] : rows[m][row][col + 1];
      registers[m] = static_cast<uint32_t>(low) | (static_cast<uint32_t>(high) << 16);
    }
  }
}

template <int kMatrices, bool kTranspose>
void ldmatrix(uint32_t* r, const void* row, const char* name) {
  static const cuda_emulator::Collective operation{name, &run_ldmatrix<kMatrices, kTranspose>};
  auto& scheduler = cuda_emulator::Scheduler::instance();
  const int lane = static_cast<int>(threadIdx.x) % cuda_emulator::kWarpSize;
  if (lane < 8 * kMatrices && reinterpret_cast<uintptr_t>(row) % 16 != 0) {
    scheduler.fail(std::string("cuda_emulator: ") + name + ": the row address of lane " +
                   std::to_string(lane) + " is not 16-byte aligned");
  }
  uint32_t result[kMatrices];
  scheduler.collective(operation, &row, result);
  std::memcpy(r, result, sizeof(result));
}

}  // namespace emulation

// mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32: D = A B + C.
inline void mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                             const float (&c)[4]) {
  emulation::mma<emulation::Precision::F16>(d, a, b, c, "mma_m16n8k16_f16");
}

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32: D = A B + C.
inline void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                              const float (&c)[4]) {
  emulation::mma<emulation::Precision::BF16>(d, a, b, c, "mma_m16n8k16_bf16");
}

// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32: D = A B + C.
inline void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                             const float (&c)[4]) {
  emulation::mma<emulation::Precision::TF32>(d, a, b, c, "mma_m16n8k8_tf32");
}

// cvt.rna.tf32.f32: the bit pattern of x rounded to TF32.
inline uint32_t to_tf32(float x) {
  return static_cast<uint32_t>(cuda_emulator::to_bits(cuda_emulator::round_to_tf32(x)));
}

inline void ldmatrix_x1(uint32_t (&r)[1], const void* row) {
  emulation::ldmatrix<1, false>(r, row, "ldmatrix_x1");
}
inline void ldmatrix_x1_trans(uint32_t (&r)[1], const void* row) {
  emulation::ldmatrix<1, true>(r, row, "ldmatrix_x1_trans");
}
inline void ldmatrix_x2(uint32_t (&r)[2], const void* row) {
  emulation::ldmatrix<2, false>(r, row, "ldmatrix_x2");
}
inline void ldmatrix_x2_trans(uint32_t (&r)[2], const void* row) {
  emulation::ldmatrix<2, true>(r, row, "ldmatrix_x2_trans");
}
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  emulation::ldmatrix<4, false>(r, row, "ldmatrix_x4");
}
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  emulation::ldmatrix<4, true>(r, row, "ldmatrix_x4_trans");
}

// cp.async of Bytes (4, 8 or 16) from gmem to smem, both aligned to Bytes; when !valid the
// destination is zero-filled and gmem is not read. The copy lands at the covering wait.
template <int Bytes>
void cp_async(void* smem, const void* gmem, bool valid) {
  static_assert(Bytes == 4 || Bytes == 8 || Bytes == 16, "cp.async copies 4, 8 or 16 bytes");
  auto& scheduler = cuda_emulator::Scheduler::instance();
  if (reinterpret_cast<uintptr_t>(smem) % Bytes != 0 ||
      (valid && reinterpret_cast<uintptr_t>(gmem) % Bytes != 0)) {
    scheduler.fail("cuda_emulator: cp_async<" + std::to_string(Bytes) + ">: an address of thread " +
                   std::to_string(threadIdx.x) + " is not " + std::to_string(Bytes) +
                   "-byte aligned");
  }
  cuda_emulator::AsyncCopy copy{smem, {}, Bytes};
  if (valid) std::memcpy(copy.bytes, gmem, Bytes);
  scheduler.current().copies.open.push_back(copy);
}

// cp.async.commit_group.
inline void cp_async_commit() { cuda_emulator::Scheduler::instance().current().copies.commit(); }

// cp.async.wait_group Pending: all but the newest Pending committed groups have landed.
template <int Pending>
void cp_async_wait() {
  static_assert(Pending >= 0, "cp.async.wait_group takes a count of groups left pending");
  cuda_emulator::Scheduler::instance().current().copies.wait(Pending);
}

}  // namespace mcsc::cuda::ptx
