// Building blocks of the CUDA kernels (supcon_kernels.cuh, supcon_mma.cuh): which rows of the
// varlen batch a thread block owns, and, for the WMMA kernels, the (rows x columns) tile of raw
// dot products z_i . z_j, staged through shared memory and multiplied on tensor cores (WMMA) or
// with plain FMA.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <limits>
#include <type_traits>

#include "supcon_math.h"

// The bf16 and tf32 WMMA shapes exist from sm_80 on; older targets fall back to FMA so that a
// TORCH_CUDA_ARCH_LIST with them still compiles (they are not in the default list).
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define MCSC_AMPERE_TENSOR_CORES 1
#endif

namespace mcsc {
namespace cuda {

constexpr int kThreads = 256;

// How a tile of dot products is multiplied: FMA on CUDA cores (float32 without TF32, float64),
// WMMA 16x16x16 on fp16/bf16 with float accumulation, WMMA 16x16x8 on TF32 (float32 inputs
// when torch.backends.cuda.matmul.allow_tf32 is on), mma.sync (m16n8k16 on fp16/bf16, m16n8k8
// on TF32) with the scores kept in registers, or, for float32 without TF32, the same pipeline
// with 8 x 8 register-blocked FMA in the forward (the last two: supcon_mma.cuh).
enum class Mma { Fma, Wmma, Tf32, Sync, BlockedFma };

// Float accumulation for float32/float16/bfloat16 inputs, double for double.
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Tile sizes per accumulation type. float: 64 x 64 score tiles (16 WMMA fragments, two per
// warp), D staged 32 columns at a time (64 for fp16/bf16, see Staging), backward output 128
// feature columns per block (D = 128,
// the usual projection size, then needs one pass). double: 32 x 32 tiles so that every kernel
// stays within the 48 KiB of static shared memory.
template <typename acc_t>
struct Tiles;
template <>
struct Tiles<float> {
  static constexpr int kRows = 64;
  static constexpr int kCols = 64;
  static constexpr int kDepth = 32;
  static constexpr int kOutCols = 128;
  // Row pitch of the float score tile: a multiple of 4 as WMMA stores require, and 4 banks
  // apart per row so the epilogue's (row, column) pattern hits 32 distinct banks.
  static constexpr int kScoreLd = kCols + 4;
  static constexpr int kOutLd = kOutCols + 4;
};
template <>
struct Tiles<double> {
  static constexpr int kRows = 32;
  static constexpr int kCols = 32;
  static constexpr int kDepth = 16;
  static constexpr int kOutCols = 64;
  static constexpr int kScoreLd = kCols + 1;
  static constexpr int kOutLd = kOutCols + 1;
};

// The element type features are staged in, the row pitch of a staged slice and its depth (the
// feature columns staged at a time). FMA stages in the accumulation type with one column of
// padding (conflict-free column reads); WMMA stages in the input type (or float for TF32) with
// the padding its loads allow (pitch a multiple of 8 halves / 4 floats, so every fragment
// starts 32-byte aligned). Half-precision slices are 64 deep: half the barriers per score tile
// of D = 128, within the 48 KiB of static shared memory.
template <typename scalar_t, Mma kind>
struct Staging {
  using type = acc_type<scalar_t>;
  static constexpr int kPad = 1;
  static constexpr int kDepth = Tiles<acc_type<scalar_t>>::kDepth;
};
template <>
struct Staging<c10::Half, Mma::Wmma> {
  using type = __half;
  static constexpr int kPad = 8;
  static constexpr int kDepth = 64;
};
template <>
struct Staging<c10::BFloat16, Mma::Wmma> {
  using type = __nv_bfloat16;
  static constexpr int kPad = 8;
  static constexpr int kDepth = 64;
};
template <>
struct Staging<float, Mma::Tf32> {
  using type = float;
  static constexpr int kPad = 4;
  static constexpr int kDepth = Tiles<float>::kDepth;
};

template <typename Stage, typename T>
__device__ __forceinline__ Stage to_stage(T value) {
  if constexpr (std::is_same_v<Stage, __half>) {
    return __float2half(static_cast<float>(value));
  } else if constexpr (std::is_same_v<Stage, __nv_bfloat16>) {
    return __float2bfloat16(static_cast<float>(value));
  } else {
    return static_cast<Stage>(value);
  }
}

template <typename acc_t, typename Stage>
__device__ __forceinline__ acc_t to_acc(Stage value) {
  if constexpr (std::is_same_v<Stage, __half>) {
    return __half2float(value);
  } else if constexpr (std::is_same_v<Stage, __nv_bfloat16>) {
    return __bfloat162float(value);
  } else {
    return static_cast<acc_t>(value);
  }
}

// Class id of rows past the end of a block and columns past the end of a segment: like the
// ignored rows' -1, negative, and equal to no row's id.
constexpr int32_t kNoClass = std::numeric_limits<int32_t>::min();

// Partial results of the forward per column split: for split s and row i, element s * rows + i
// of each array.
template <typename acc_t>
struct ForwardPartials {
  acc_t* running_max;   // max_j s_ij over the split's contrasts (-inf if none)
  acc_t* running_sum;   // sum_j w_i(y_j) exp(s_ij - running_max)
  acc_t* positive_sum;  // sum of s_ip over the split's positives
};

// Resident forward blocks per SM that the launch bounds ask for (64 registers per thread): the
// float32 FMA instantiation would otherwise take 80 and fit three. The host sizes the column
// splits by it.
constexpr int kForwardBlocksPerSM = 4;

// One of the two sets of rows the pairwise kernels pair up: the rows of the score tiles (the
// anchors in the forward) or their columns (the contrasts). The single-set call passes the
// features as both; with a reference set the anchors are one and the reference rows ("keys")
// the other, in either role (the backward of the keys takes them as rows).
//   classes     ids shared by both sets (classify_rows): equal ids, equal labels; < 0 for rows
//               that take no part.
//   positives   as anchors |P(i)|, as contrasts n_{y_j} - 1 (the row's class size in its
//               segment, less one), -1 for ignored rows. In the single-set call both are the
//               same number; contrast_weight and same_class_weight read them.
//   self_index, index_tags
//               the rows' pair tags: self_index[i] when self_index is given (the index in the
//               other set of row i's own pair, -1 for none); else i with index_tags, -1
//               without. A pair whose row and column have equal tags is excluded: the single
//               set (index tags on both sides) excludes i == j, a reference set the pairs
//               (i, self_index[i]) (index tags on the keys), and anchors without
//               ref_self_index (no index tags) nothing.
//   lse, grad_loss
//               backward only: the rows' lse and upstream gradient a_i when they act as
//               anchors; lse == nullptr when they do not (keys); grad_loss == nullptr gives
//               a_i = 1 (the forward's gradient of each anchor's own loss).
template <typename scalar_t>
struct PairRows {
  const scalar_t* features;  // (rows, dim), row-major
  const int64_t* offsets;    // (S + 1,) segment offsets into these rows
  const int32_t* classes;
  const int32_t* positives;
  const int64_t* self_index;
  bool index_tags;
  const acc_type<scalar_t>* lse;
  const acc_type<scalar_t>* grad_loss;
};

// The pair tag of `row` of `set` (see PairRows): -1 when the row has no own pair, and for
// self indices outside int32 (which no row index reaches), so that it matches no index.
template <typename scalar_t>
__device__ __forceinline__ int32_t pair_tag(const PairRows<scalar_t>& set, int64_t row) {
  if (set.self_index == nullptr) return set.index_tags ? static_cast<int32_t>(row) : -1;
  const int64_t partner = set.self_index[row];
  return partner >= 0 && partner <= std::numeric_limits<int32_t>::max()
             ? static_cast<int32_t>(partner)
             : -1;
}

// What the backward's pair coefficient needs of one row, as anchor and as contrast: the class
// id (kNoClass past a block's or segment's end), the two weights, a_i, b_i and lse_i (0 where
// the row is no anchor, so that lse is never read for it), and the pair tag.
template <typename acc_t>
struct BackwardRow {
  int32_t class_id;
  int32_t tag;
  acc_t same_weight;
  acc_t contrast_weight;
  acc_t anchor;
  acc_t positive_grad;
  acc_t lse;
};

template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
__device__ __forceinline__ BackwardRow<acc_t> backward_row(const PairRows<scalar_t>& set,
                                                           int64_t row, bool exists,
                                                           bool prevalence) {
  const int32_t row_positives = exists ? set.positives[row] : -1;
  // Rows that are no anchors (keys) get a_i = b_i = 0: their own terms vanish.
  const bool anchors = set.lse != nullptr;
  const acc_t row_grad =
      exists && anchors ? (set.grad_loss != nullptr ? set.grad_loss[row] : acc_t(1)) : acc_t(0);
  BackwardRow<acc_t> data;
  data.class_id = exists ? set.classes[row] : kNoClass;
  data.tag = exists ? pair_tag(set, row) : -1;
  data.same_weight = same_class_weight<acc_t>(row_positives, prevalence);
  data.contrast_weight = contrast_weight<acc_t>(row_positives, prevalence);
  data.anchor = anchors ? anchor_grad_weight(row_grad, row_positives) : acc_t(0);
  data.positive_grad = anchors ? positive_grad_weight(row_grad, row_positives) : acc_t(0);
  data.lse = data.anchor != 0 ? set.lse[row] : acc_t(0);
  return data;
}

// The backward's coefficient of z_j in dz_i (before the 1/t): G_ij + G_ji, minus b_i + b_j
// for a positive pair (the positive term -(1/t) sum_{p in P(i)} (b_i + b_p) z_p); a side that
// is no anchor has a = b = 0, which leaves G_ji - [i in P(j)] b_j for a key row i and an anchor
// column j, and G_ij - [j in P(i)] b_i for an anchor row and a key column. Pairs with an
// ignored row or a row past the end (class < 0) and excluded pairs (equal tags) give 0;
// skipping them also avoids exp overflow times a zero weight.
template <typename acc_t>
__device__ __forceinline__ acc_t pair_coefficient(acc_t similarity, const BackwardRow<acc_t>& i,
                                                  const BackwardRow<acc_t>& j) {
  if (i.class_id < 0 || j.class_id < 0 || i.tag == j.tag) return acc_t(0);
  acc_t coefficient = symmetric_pair_gradient(similarity, i.class_id, j.class_id, i.anchor,
                                              i.lse, i.same_weight, i.contrast_weight, j.anchor,
                                              j.lse, j.same_weight, j.contrast_weight);
  if (i.class_id == j.class_id) coefficient -= i.positive_grad + j.positive_grad;
  return coefficient;
}

// Rows of one segment handled by one thread block, and the columns they pair with: the same
// segment of the same rows in the single-set call, the segment's reference rows with a
// reference set.
struct RowBlock {
  int64_t segment_begin;
  int64_t segment_end;
  int64_t row_begin;
  int64_t row_end;
  int64_t column_begin;
  int64_t column_end;
};

// Segment s owns the thread blocks [block_offsets[s], block_offsets[s + 1]), each of
// `rows_per_block` rows (flash attention's cu_seqlens scheme); its columns are
// [column_offsets[s], column_offsets[s + 1]). The grid is sized by an upper bound so the host
// never reads the offsets; surplus blocks get false and must exit.
__device__ __forceinline__ bool locate_row_block(const int64_t* __restrict__ offsets,
                                                 const int64_t* __restrict__ column_offsets,
                                                 const int64_t* __restrict__ block_offsets,
                                                 int64_t num_segments, int64_t block,
                                                 int rows_per_block, RowBlock& out) {
  if (block >= block_offsets[num_segments]) return false;
  // Largest s with block_offsets[s] <= block; empty segments repeat an offset and lose to the
  // non-empty segment after them.
  int64_t low = 0;
  int64_t high = num_segments - 1;
  while (low < high) {
    const int64_t middle = (low + high + 1) / 2;
    if (block_offsets[middle] <= block) {
      low = middle;
    } else {
      high = middle - 1;
    }
  }
  out.segment_begin = offsets[low];
  out.segment_end = offsets[low + 1];
  out.row_begin = out.segment_begin + (block - block_offsets[low]) * rows_per_block;
  out.row_end = min(out.row_begin + rows_per_block, out.segment_end);
  out.column_begin = column_offsets[low];
  out.column_end = column_offsets[low + 1];
  return true;
}

// Sixteen bytes of consecutive features, loaded with one vector instruction.
template <typename scalar_t>
struct alignas(16) Vector16 {
  static constexpr int kWidth = 16 / sizeof(scalar_t);
  scalar_t values[kWidth];
};

// Whether every row of z (row-major, `dim` columns) starts on a 16-byte boundary, so windows
// whose first column is a multiple of Vector16's width can be read in vectors. Features are
// contiguous, but a view that starts mid-row (z[1:] of a wider tensor, say) need not be aligned.
template <typename scalar_t>
__device__ __forceinline__ bool rows_are_vector_aligned(const scalar_t* z, int64_t dim) {
  return reinterpret_cast<uintptr_t>(z) % 16 == 0 && dim % Vector16<scalar_t>::kWidth == 0;
}

// Copies the window rows [row0, row_end) x columns [col0, col0 + COLS) of z (row-major, `dim`
// columns) into a ROWS x COLS shared tile of pitch LD, converted to Stage. Outside the rows or
// columns it writes zeros, so partial tiles add nothing to the products they feed. With
// `vectorized` (rows_are_vector_aligned, and col0 a multiple of the vector width) each thread
// reads 16 bytes at a time: a vector then lies wholly inside or wholly outside the columns.
template <int ROWS, int COLS, int LD, typename Stage, typename scalar_t>
__device__ __forceinline__ void stage_window(Stage* __restrict__ tile,
                                             const scalar_t* __restrict__ z, int64_t dim,
                                             int64_t row0, int64_t row_end, int64_t col0,
                                             bool vectorized) {
  using Vector = Vector16<scalar_t>;
  constexpr int kWidth = Vector::kWidth;
  if constexpr (COLS % kWidth == 0) {
    if (vectorized) {
      constexpr int kVectorsPerRow = COLS / kWidth;
      for (int index = threadIdx.x; index < ROWS * kVectorsPerRow; index += kThreads) {
        const int r = index / kVectorsPerRow;
        const int c = index % kVectorsPerRow * kWidth;
        const int64_t row = row0 + r;
        const int64_t column = col0 + c;
        Stage* const out = tile + r * LD + c;
        if (row < row_end && column < dim) {
          const Vector vector = *reinterpret_cast<const Vector*>(z + row * dim + column);
#pragma unroll
          for (int e = 0; e < kWidth; ++e) out[e] = to_stage<Stage>(vector.values[e]);
        } else {
#pragma unroll
          for (int e = 0; e < kWidth; ++e) out[e] = to_stage<Stage>(0.0f);
        }
      }
      return;
    }
  }
  for (int index = threadIdx.x; index < ROWS * COLS; index += kThreads) {
    const int r = index / COLS;
    const int c = index % COLS;
    const int64_t row = row0 + r;
    const int64_t column = col0 + c;
    tile[r * LD + c] = (row < row_end && column < dim) ? to_stage<Stage>(z[row * dim + column])
                                                       : to_stage<Stage>(0.0f);
  }
}

// Shared memory of one score-tile computation: a DEPTH-wide slice of the block's rows and of
// the column tile's rows.
template <typename scalar_t, Mma kind>
struct ScoreStaging {
  using acc_t = acc_type<scalar_t>;
  using T = Tiles<acc_t>;
  using Stage = typename Staging<scalar_t, kind>::type;
  static constexpr int kDepth = Staging<scalar_t, kind>::kDepth;
  static constexpr int kLd = kDepth + Staging<scalar_t, kind>::kPad;
  alignas(32) Stage rows[T::kRows * kLd];
  alignas(32) Stage cols[T::kCols * kLd];
};

// scores[r * kScoreLd + c] = row_z_{row0 + r} . col_z_{col0 + c} (not yet divided by the
// temperature; zero for rows or columns outside the ranges) for a kRows x kCols tile, D
// streamed through `staging`. compute() is called by all threads of the block; it starts with a barrier, so the
// caller may reuse `scores` and `staging` right up to the call, and must barrier before reading
// scores. FMA version: thread (ty, tx) of a 16 x 16 grid owns rows ty + 16 r and columns
// tx + 16 c; the strided ownership makes a half-warp read one broadcast row value and 16
// distinct banks.
template <typename scalar_t, Mma kind,
          bool kTensorCores = (kind == Mma::Wmma || kind == Mma::Tf32)>
struct ScoreTile {
  using acc_t = acc_type<scalar_t>;
  using T = Tiles<acc_t>;
  using Buffers = ScoreStaging<scalar_t, kind>;

  static __device__ void compute(acc_t* __restrict__ scores, Buffers& staging,
                                 const scalar_t* __restrict__ row_z,
                                 const scalar_t* __restrict__ col_z, int64_t dim, int64_t row0,
                                 int64_t row_end, int64_t col0, int64_t col_end,
                                 bool vectorized) {
    constexpr int kLd = Buffers::kLd;
    constexpr int kDepth = Buffers::kDepth;
    constexpr int kRowsPerThread = T::kRows / 16;
    constexpr int kColsPerThread = T::kCols / 16;
    const int ty = threadIdx.x / 16;
    const int tx = threadIdx.x % 16;
    acc_t sums[kRowsPerThread][kColsPerThread] = {};
    for (int64_t k0 = 0; k0 < dim; k0 += kDepth) {
      __syncthreads();
      stage_window<T::kRows, kDepth, kLd>(staging.rows, row_z, dim, row0, row_end, k0, vectorized);
      stage_window<T::kCols, kDepth, kLd>(staging.cols, col_z, dim, col0, col_end, k0, vectorized);
      __syncthreads();
#pragma unroll 4
      for (int k = 0; k < kDepth; ++k) {
        acc_t a[kRowsPerThread];
        acc_t b[kColsPerThread];
#pragma unroll
        for (int r = 0; r < kRowsPerThread; ++r) {
          a[r] = to_acc<acc_t>(staging.rows[(ty + 16 * r) * kLd + k]);
        }
#pragma unroll
        for (int c = 0; c < kColsPerThread; ++c) {
          b[c] = to_acc<acc_t>(staging.cols[(tx + 16 * c) * kLd + k]);
        }
#pragma unroll
        for (int r = 0; r < kRowsPerThread; ++r) {
#pragma unroll
          for (int c = 0; c < kColsPerThread; ++c) sums[r][c] += a[r] * b[c];
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kRowsPerThread; ++r) {
#pragma unroll
      for (int c = 0; c < kColsPerThread; ++c) {
        scores[(ty + 16 * r) * T::kScoreLd + tx + 16 * c] = sums[r][c];
      }
    }
  }
};

#if defined(MCSC_AMPERE_TENSOR_CORES)
// Tensor-core version: WMMA 16x16x16 on fp16/bf16 or 16x16x8 on TF32, float accumulation,
// stored to `scores` once the depth is done.
template <typename scalar_t, Mma kind>
struct ScoreTile<scalar_t, kind, true> {
  using acc_t = acc_type<scalar_t>;
  using T = Tiles<acc_t>;
  using Buffers = ScoreStaging<scalar_t, kind>;
  static_assert(T::kRows == 64 && T::kCols == 64 && kThreads == 256,
                "the warp layout below covers a 64 x 64 tile with 8 warps");

  static __device__ void compute(acc_t* __restrict__ scores, Buffers& staging,
                                 const scalar_t* __restrict__ row_z,
                                 const scalar_t* __restrict__ col_z, int64_t dim, int64_t row0,
                                 int64_t row_end, int64_t col0, int64_t col_end,
                                 bool vectorized) {
    constexpr int kLd = Buffers::kLd;
    constexpr int kDepth = Buffers::kDepth;
    namespace wmma = nvcuda::wmma;
    using Stage = typename Buffers::Stage;
    constexpr int kFragK = kind == Mma::Tf32 ? 8 : 16;
    using FragInput = std::conditional_t<kind == Mma::Tf32, wmma::precision::tf32, Stage>;
    using FragA = wmma::fragment<wmma::matrix_a, 16, 16, kFragK, FragInput, wmma::row_major>;
    // Column tile rows stored row-major are the transposed operand: B in column-major order.
    using FragB = wmma::fragment<wmma::matrix_b, 16, 16, kFragK, FragInput, wmma::col_major>;
    using FragC = wmma::fragment<wmma::accumulator, 16, 16, kFragK, float>;

    // Warp w computes the 16-row strip w / 2 and the two 16-column blocks 2 (w % 2) + {0, 1}.
    const int warp = threadIdx.x / 32;
    const int strip = warp / 2;
    const int block0 = 2 * (warp % 2);
    FragC accumulators[2];
    wmma::fill_fragment(accumulators[0], 0.0f);
    wmma::fill_fragment(accumulators[1], 0.0f);
    for (int64_t k0 = 0; k0 < dim; k0 += kDepth) {
      __syncthreads();
      stage_window<T::kRows, kDepth, kLd>(staging.rows, row_z, dim, row0, row_end, k0,
                                             vectorized);
      stage_window<T::kCols, kDepth, kLd>(staging.cols, col_z, dim, col0, col_end, k0,
                                             vectorized);
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kDepth; kk += kFragK) {
        FragA a;
        wmma::load_matrix_sync(a, staging.rows + strip * 16 * kLd + kk, kLd);
        if constexpr (kind == Mma::Tf32) {
#pragma unroll
          for (int e = 0; e < a.num_elements; ++e) a.x[e] = wmma::__float_to_tf32(a.x[e]);
        }
#pragma unroll
        for (int f = 0; f < 2; ++f) {
          FragB b;
          wmma::load_matrix_sync(b, staging.cols + (block0 + f) * 16 * kLd + kk, kLd);
          if constexpr (kind == Mma::Tf32) {
#pragma unroll
            for (int e = 0; e < b.num_elements; ++e) b.x[e] = wmma::__float_to_tf32(b.x[e]);
          }
          wmma::mma_sync(accumulators[f], a, b, accumulators[f]);
        }
      }
    }
#pragma unroll
    for (int f = 0; f < 2; ++f) {
      wmma::store_matrix_sync(scores + strip * 16 * T::kScoreLd + (block0 + f) * 16,
                              accumulators[f], T::kScoreLd, wmma::mem_row_major);
    }
  }
};
#endif

// The block's kRows x kOutCols tile of the feature gradient, accumulated one 16-row slice of
// z_J at a time: out += P[:, k0:k0+16] values, with P the kRows x kCols pair coefficients
// (pitch kScoreLd) and values = z_J[k0:k0+16, out columns] (pitch kOutLd), both in shared
// memory. FMA version: thread (ty, tx) owns rows ty + 16 i and columns tx + 16 c.
template <typename acc_t, bool kTensorCores>
struct GradientTile {
  using T = Tiles<acc_t>;
  static constexpr int kRowsPerThread = T::kRows / 16;
  static constexpr int kColsPerThread = T::kOutCols / 16;
  acc_t out[kRowsPerThread][kColsPerThread] = {};

  __device__ __forceinline__ void accumulate(const acc_t* __restrict__ p,
                                             const acc_t* __restrict__ values, int k0) {
    const int ty = threadIdx.x / 16;
    const int tx = threadIdx.x % 16;
#pragma unroll 4
    for (int k = 0; k < 16; ++k) {
      acc_t coefficient[kRowsPerThread];
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) {
        coefficient[i] = p[(ty + 16 * i) * T::kScoreLd + k0 + k];
      }
#pragma unroll
      for (int c = 0; c < kColsPerThread; ++c) {
        const acc_t value = values[k * T::kOutLd + tx + 16 * c];
#pragma unroll
        for (int i = 0; i < kRowsPerThread; ++i) out[i][c] += coefficient[i] * value;
      }
    }
  }

  // grad[rows, cols] = scale * out within [row_begin, row_end) x [col_begin, dim).
  template <typename scalar_t>
  __device__ __forceinline__ void write(scalar_t* __restrict__ grad, int64_t dim,
                                       int64_t row_begin, int64_t row_end, int64_t col_begin,
                                       acc_t scale, acc_t* /*scratch: unused*/) const {
    const int ty = threadIdx.x / 16;
    const int tx = threadIdx.x % 16;
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      const int64_t row = row_begin + ty + 16 * i;
      if (row >= row_end) continue;
#pragma unroll
      for (int c = 0; c < kColsPerThread; ++c) {
        const int64_t col = col_begin + tx + 16 * c;
        if (col < dim) grad[row * dim + col] = static_cast<scalar_t>(out[i][c] * scale);
      }
    }
  }
};

#if defined(MCSC_AMPERE_TENSOR_CORES)
constexpr bool kHasTf32TensorCores = true;

// Tensor-core version: TF32 WMMA 16x16x8 with float accumulation. fp16 and bf16 features are
// exact in TF32 and P is rounded to TF32's 11-bit significand; unlike P in fp16, tiny pair
// coefficients (about a_i / N) cannot underflow. Warp w owns the 16-row strip w / 2 and the
// 16-column blocks 4 (w % 2) + {0, 1, 2, 3} of the 64 x 128 tile.
template <>
struct GradientTile<float, true> {
  using T = Tiles<float>;
  static_assert(T::kRows == 64 && T::kOutCols == 128 && kThreads == 256,
                "the warp layout covers a 64 x 128 tile with 8 warps");
  using FragA = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 8,
                                       nvcuda::wmma::precision::tf32, nvcuda::wmma::row_major>;
  using FragB = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 8,
                                       nvcuda::wmma::precision::tf32, nvcuda::wmma::row_major>;
  using FragC = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 8, float>;
  static constexpr int kBlocksPerWarp = 4;
  FragC out[kBlocksPerWarp];

  __device__ GradientTile() {
#pragma unroll
    for (int f = 0; f < kBlocksPerWarp; ++f) nvcuda::wmma::fill_fragment(out[f], 0.0f);
  }

  __device__ __forceinline__ void accumulate(const float* __restrict__ p,
                                             const float* __restrict__ values, int k0) {
    namespace wmma = nvcuda::wmma;
    const int warp = threadIdx.x / 32;
    const int strip = warp / 2;
    const int block0 = kBlocksPerWarp * (warp % 2);
#pragma unroll
    for (int kk = 0; kk < 16; kk += 8) {
      FragA a;
      wmma::load_matrix_sync(a, p + strip * 16 * T::kScoreLd + k0 + kk, T::kScoreLd);
#pragma unroll
      for (int e = 0; e < a.num_elements; ++e) a.x[e] = wmma::__float_to_tf32(a.x[e]);
#pragma unroll
      for (int f = 0; f < kBlocksPerWarp; ++f) {
        FragB b;
        wmma::load_matrix_sync(b, values + kk * T::kOutLd + (block0 + f) * 16, T::kOutLd);
#pragma unroll
        for (int e = 0; e < b.num_elements; ++e) b.x[e] = wmma::__float_to_tf32(b.x[e]);
        wmma::mma_sync(out[f], a, b, out[f]);
      }
    }
  }

  // Fragments go through `scratch` (256 floats per warp, 32-byte aligned), since their
  // register layout is unspecified, and from there to global memory with bounds checks.
  template <typename scalar_t>
  __device__ __forceinline__ void write(scalar_t* __restrict__ grad, int64_t dim,
                                       int64_t row_begin, int64_t row_end, int64_t col_begin,
                                       float scale, float* scratch) const {
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int strip = warp / 2;
    const int block0 = kBlocksPerWarp * (warp % 2);
    float* own = scratch + warp * 256;
#pragma unroll
    for (int f = 0; f < kBlocksPerWarp; ++f) {
      nvcuda::wmma::store_matrix_sync(own, out[f], 16, nvcuda::wmma::mem_row_major);
      __syncwarp();
      for (int e = lane; e < 256; e += 32) {
        const int64_t row = row_begin + strip * 16 + e / 16;
        const int64_t col = col_begin + (block0 + f) * 16 + e % 16;
        if (row < row_end && col < dim) {
          grad[row * dim + col] = static_cast<scalar_t>(own[e] * scale);
        }
      }
      __syncwarp();
    }
  }
};
#else
constexpr bool kHasTf32TensorCores = false;
#endif

}  // namespace cuda
}  // namespace mcsc
