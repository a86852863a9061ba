// The warp-level PTX instructions the tensor-core kernels are built from, as inline-PTX
// wrappers (sm_80 and newer): mma.sync, ldmatrix, cvt to TF32 and cp.async with its groups;
// and MCSC_DYNAMIC_SHARED_MEMORY, the declaration of dynamic shared memory.
//
// Register contents follow the PTX ISA's fragment tables ("Matrix Fragments for mma.m16n8k16"
// and "... for mma.m16n8k8"): with group = lane / 4 and thread = lane % 4, f16/bf16 registers
// hold two elements, the lower-indexed one in the low 16 bits. The CPU emulator ships a header
// of the same name (tests/cuda_emulation/include/cuda/ptx.cuh) that shadows this one on its
// include path and computes from the same tables, so include this as "cuda/ptx.cuh".
#pragma once

#include <cstdint>

// Declares the block's dynamic shared memory (the bytes of kernel<<<grid, block, bytes>>>) as
// an array `name` of unsigned char, 16-byte aligned; a statement inside a kernel. A macro, so
// that the emulator can give the same statement its own meaning.
#define MCSC_DYNAMIC_SHARED_MEMORY(name) extern __shared__ __align__(16) unsigned char name[]

namespace mcsc::cuda::ptx {

// asm volatile on mma: a warp-synchronous instruction must not be moved into or out of the
// branches it was written in.
// D = A B + C; A 16x16 row-major, B 16x8 column-major, float accumulators.
__device__ __forceinline__ void mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4],
                                                 const uint32_t (&b)[2], const float (&c)[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]),
        "f"(c[1]), "f"(c[2]), "f"(c[3]));
}

// The same with bfloat16 operands.
__device__ __forceinline__ void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4],
                                                  const uint32_t (&b)[2], const float (&c)[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]),
        "f"(c[1]), "f"(c[2]), "f"(c[3]));
}

// D = A B + C with A 16x8 and B 8x8 in TF32: each register holds one tf32 bit pattern (see
// to_tf32; the tensor cores read the upper 19 bits of a plain float32).
__device__ __forceinline__ void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4],
                                                 const uint32_t (&b)[2], const float (&c)[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]),
        "f"(c[1]), "f"(c[2]), "f"(c[3]));
}

// x rounded to TF32 (to nearest, ties away from zero), as a 32-bit pattern.
__device__ __forceinline__ uint32_t to_tf32(float x) {
  uint32_t bits;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(bits) : "f"(x));
  return bits;
}

namespace detail {
__device__ __forceinline__ uint32_t shared_address(const void* pointer) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}
}  // namespace detail

// ldmatrix.sync.aligned.m8n8.{x1,x2,x4}[.trans].shared.b16: one, two or four 8x8 matrices of
// 16-bit elements. Lanes 8k .. 8k+7 pass the 16-byte aligned shared-memory addresses of the
// rows of matrix k; register k of lane L then holds row L / 4, columns 2 (L % 4) and
// 2 (L % 4) + 1 of matrix k (of its transpose with .trans). volatile: the instruction reads
// memory, so it must stay between the barriers it was written between.
__device__ __forceinline__ void ldmatrix_x1(uint32_t (&r)[1], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n"
               : "=r"(r[0])
               : "r"(detail::shared_address(row)));
}

__device__ __forceinline__ void ldmatrix_x1_trans(uint32_t (&r)[1], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n"
               : "=r"(r[0])
               : "r"(detail::shared_address(row)));
}

__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(detail::shared_address(row)));
}

__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(detail::shared_address(row)));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(detail::shared_address(row)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(detail::shared_address(row)));
}

// cp.async of Bytes (4, 8 or 16; 16 bypasses L1 with .cg) from global to shared memory, both
// addresses aligned to Bytes. When !valid nothing is read and the destination is zero-filled
// (a source size of 0). The copy is only known to have landed after a cp_async_wait that
// covers the group cp_async_commit put it in. The "memory" clobbers keep the compiler from
// moving shared-memory accesses across the copy, the commit or the wait.
template <int Bytes>
__device__ __forceinline__ void cp_async(void* smem, const void* gmem, bool valid) {
  static_assert(Bytes == 4 || Bytes == 8 || Bytes == 16, "cp.async copies 4, 8 or 16 bytes");
  const int source_bytes = valid ? Bytes : 0;
  if constexpr (Bytes == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 :
                 : "r"(detail::shared_address(smem)), "l"(gmem), "r"(source_bytes)
                 : "memory");
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n"
                 :
                 : "r"(detail::shared_address(smem)), "l"(gmem), "n"(Bytes), "r"(source_bytes)
                 : "memory");
  }
}

// cp.async.commit_group: the copies issued since the last commit form a new group.
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// cp.async.wait_group Pending: waits until at most the newest Pending groups are in flight.
template <int Pending>
__device__ __forceinline__ void cp_async_wait() {
  static_assert(Pending >= 0, "cp.async.wait_group takes a count of groups left pending");
  asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending) : "memory");
}

}  // namespace mcsc::cuda::ptx
