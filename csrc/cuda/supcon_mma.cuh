// Kernels of mcsc::supcon_forward and mcsc::supcon_backward on mma.sync (sm_80 and newer), in
// FlashAttention-2's style: m16n8k16 for fp16/bf16 features, m16n8k8 on TF32 for float32 ones
// when float32 matmuls may use TF32. Selected with MCSC_CUDA_KERNELS=mma.
//
// Block: 8 warps, 128 rows of one segment; warp w owns rows 16 w .. 16 w + 15 and computes their
// scores against a 64-column tile as eight m16n8 accumulator fragments (32 floats per thread).
// Scores never leave the registers: the forward applies masks, pair weights, exp2 with the
// temperature and log2(e) folded into one scale and the online log-sum-exp to the fragments,
// reducing each row over the 4 lanes that share it with shuffles; the backward turns the
// fragments into the pair coefficients H_ij = G_ij + G_ji - [j in P(i)] (b_i + b_j), packs them
// into the A operand of the next mma and accumulates dz_I += H z_J, with z_J read by
// ldmatrix.trans (fp16/bf16; TF32 reads it with scalar shared loads).
//
// Up to 512 bytes of features per row (D <= 256 fp16/bf16, D <= 128 float32), the block's row
// tile is copied once with cp.async into dynamic shared memory and stays resident for the
// whole column loop, as in FlashAttention-2; each step brings a whole column tile into one of
// two stages while the other stage feeds ldmatrix and mma (ResidentStages). Deeper features
// take the chunked kernels: D is streamed in 64-byte chunks (32 fp16/bf16 or 16 float32
// columns), each (column tile, chunk) step bringing a chunk of the block's rows and of the
// tile's rows into one of two stages of static shared memory (ScoreStages), so any D runs
// (chunks past D are zero-filled). Every staged row is an odd number of 16-byte vectors (80
// bytes for the chunks), which puts the eight rows of every ldmatrix in distinct banks. ldmatrix serves
// TF32 too: a 16-byte row is 4 floats, and the b16 matrices' thread layout is then exactly the
// m16n8k8 A and B layout.
//
// Rows and columns come from two PairRows (supcon_tiles.cuh): the features twice in the
// single-set call; anchors and keys, in either role, with a reference set.
//
// Each output element is owned by one thread and summed in a fixed order: no atomics, bitwise
// deterministic. Class ids come from classify_rows, so label values never index memory.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "cuda/ptx.cuh"
#include "cuda/supcon_tiles.cuh"
#include "supcon_math.h"

namespace mcsc {
namespace cuda {

// Tile shapes of the mma kernels per feature dtype: fp16 and bf16 take m16n8k16, float32 TF32
// m16n8k8, all with float accumulation. Every shared row is a whole number of 16-byte vectors.
template <typename scalar_t>
struct MmaTiles {
  static_assert(std::is_same_v<scalar_t, c10::Half> || std::is_same_v<scalar_t, c10::BFloat16> ||
                    std::is_same_v<scalar_t, float>,
                "the mma kernels take fp16, bf16 or float32 features");
  using Element = std::conditional_t<
      std::is_same_v<scalar_t, c10::Half>, __half,
      std::conditional_t<std::is_same_v<scalar_t, c10::BFloat16>, __nv_bfloat16, float>>;
  static constexpr bool kTf32 = std::is_same_v<Element, float>;
  // Elements per 16-byte vector (one cp.async, one ldmatrix row).
  static constexpr int kVector = 16 / sizeof(Element);
  static constexpr int kWarps = kThreads / 32;
  static constexpr int kRows = 16 * kWarps;
  static constexpr int kCols = 64;
  // Score fragments per warp: one m16n8 accumulator per 8 columns.
  static constexpr int kColFragments = kCols / 8;
  // The mma's k: 32 bytes of features.
  static constexpr int kStep = 2 * kVector;
  // Feature columns per pipeline step (64 bytes), and the row pitch of a staged chunk (one
  // vector of padding: 80-byte rows, so ldmatrix's eight row addresses fall in distinct bank
  // groups).
  static constexpr int kDepth = 4 * kVector;
  static constexpr int kPitch = kDepth + kVector;
  // Feature columns of dz per backward block (grid y), and the pitch of the staged z_J slice:
  // 144-byte rows for ldmatrix.trans (fp16/bf16); 36 words for TF32's scalar reads of rows
  // 2 t and 2 t + 1, whose 32 lanes then hit 32 banks. TF32 takes half the columns to stay
  // within 48 KiB of static shared memory.
  static constexpr int kOutCols = kTf32 ? 32 : 64;
  static constexpr int kOutPitch = kOutCols + kVector;
  static constexpr int kOutFragments = kOutCols / 8;
  static constexpr int kStages = 2;
  // The fast path for shallow features: up to 512 bytes of features per row (256 fp16/bf16
  // or 128 float32 columns), the block's row tile stays in shared memory for the whole column
  // loop and only the column tiles stream through the two stages, each step a whole tile.
  static constexpr int kResidentDepth = 32 * kVector;
  // Feature columns of the resident tiles for `dim` features: dim rounded up to the mma's k
  // (the rest zero-filled), and their pitch with one vector of padding, an odd number of
  // 16-byte vectors so that ldmatrix's eight row addresses fall in distinct bank groups.
  static __host__ __device__ int64_t resident_depth(int64_t dim) {
    return (dim + kStep - 1) / kStep * kStep;
  }
  static __host__ __device__ int64_t resident_pitch(int64_t dim) {
    return resident_depth(dim) + kVector;
  }
  // Dynamic shared memory of the resident tiles: the row tile and both column stages.
  static __host__ __device__ int64_t resident_bytes(int64_t dim) {
    return (kRows + kStages * kCols) * resident_pitch(dim) * static_cast<int64_t>(sizeof(Element));
  }
};

template <typename Element>
__device__ __forceinline__ uint32_t element_bits(float value) {
  Element element;
  if constexpr (std::is_same_v<Element, __half>) {
    element = __float2half_rn(value);
  } else {
    element = __float2bfloat16_rn(value);
  }
  uint16_t bits;
  std::memcpy(&bits, &element, sizeof(bits));
  return bits;
}

// A float32 register as the TF32 operand the tensor cores read (round to nearest, away).
__device__ __forceinline__ uint32_t tf32_operand(uint32_t float_bits) {
  float value;
  std::memcpy(&value, &float_bits, sizeof(value));
  return ptx::to_tf32(value);
}

// Two values as one 32-bit fragment register: the lower column in the low half, as the mma
// fragment layouts place them.
template <typename Element>
__device__ __forceinline__ uint32_t pack_pair(float low, float high) {
  return element_bits<Element>(low) | (element_bits<Element>(high) << 16);
}

// d += a b for one m16n8k16 fragment (m16n8k8 on TF32 operands for float).
template <typename Element>
__device__ __forceinline__ void mma_accumulate(float (&d)[4], const uint32_t (&a)[4],
                                               uint32_t b0, uint32_t b1) {
  const uint32_t b[2] = {b0, b1};
  const float c[4] = {d[0], d[1], d[2], d[3]};
  if constexpr (std::is_same_v<Element, __half>) {
    ptx::mma_m16n8k16_f16(d, a, b, c);
  } else if constexpr (std::is_same_v<Element, __nv_bfloat16>) {
    ptx::mma_m16n8k16_bf16(d, a, b, c);
  } else {
    ptx::mma_m16n8k8_tf32(d, a, b, c);
  }
}

// Copies rows [row0, row_end) x feature columns [col0, col0 + width) of z (row-major, `dim`
// columns; width <= kWidth, both whole 16-byte vectors) into a kTileRows x width shared tile
// of pitch `pitch` (a whole number of vectors), zero outside z. With
// `vectorized` (rows_are_vector_aligned) in 16-byte cp.async copies that land at the caller's
// cp_async_wait; otherwise with plain loads and stores, visible after the caller's barrier.
template <int kTileRows, int kWidth, typename Element, typename scalar_t>
__device__ __forceinline__ void load_tile(Element* __restrict__ tile, int pitch,
                                          const scalar_t* __restrict__ z, int64_t dim,
                                          int64_t row0, int64_t row_end, int64_t col0,
                                          int width, bool vectorized) {
  constexpr int kVector = 16 / sizeof(Element);
  static_assert(sizeof(Element) == sizeof(scalar_t), "staged in the features' own bits");
  static_assert(kWidth % kVector == 0, "tile rows are whole 16-byte vectors");
  if (vectorized) {
    constexpr int kVectorsPerRow = kWidth / kVector;
    for (int index = threadIdx.x; index < kTileRows * kVectorsPerRow; index += kThreads) {
      const int r = index / kVectorsPerRow;
      const int c = index % kVectorsPerRow * kVector;
      if (c >= width) continue;
      const int64_t row = row0 + r;
      const int64_t column = col0 + c;
      // dim is a multiple of the vector width: a vector is wholly inside or outside.
      const bool inside = row < row_end && column < dim;
      ptx::cp_async<16>(tile + r * pitch + c, inside ? z + row * dim + column : z, inside);
    }
    return;
  }
  for (int index = threadIdx.x; index < kTileRows * kWidth; index += kThreads) {
    const int r = index / kWidth;
    const int c = index % kWidth;
    if (c >= width) continue;
    const int64_t row = row0 + r;
    const int64_t column = col0 + c;
    tile[r * pitch + c] = (row < row_end && column < dim)
                                   ? to_stage<Element>(z[row * dim + column])
                                   : to_stage<Element>(0.0f);
  }
}

// Tile shapes of the register-blocked FMA forward (float32 without TF32): 128 x 128 score
// tiles, each of the 16 x 16 threads owning 8 x 8 of them, fed by 16-byte shared loads from
// the same 80-byte staged rows as the TF32 path.
struct FmaTiles {
  using Element = float;
  static constexpr int kVector = 4;
  static constexpr int kRows = 128;
  static constexpr int kCols = 128;
  static constexpr int kDepth = 16;
  static constexpr int kPitch = kDepth + kVector;
  static constexpr int kStages = 2;
};

// The two shared-memory stages of the score pipeline.
template <typename Tiles>
struct ScoreStages {
  using Element = typename Tiles::Element;
  alignas(16) Element rows[Tiles::kStages][Tiles::kRows * Tiles::kPitch];
  alignas(16) Element cols[Tiles::kStages][Tiles::kCols * Tiles::kPitch];
};

// The resident tiles of the fast path (Tiles::kResidentDepth), carved out of the block's
// dynamic shared memory (Tiles::resident_bytes(dim) of it): the row tile, then the two
// column stages, all rows resident_pitch(dim) elements apart.
template <typename Tiles>
struct ResidentStages {
  using Element = typename Tiles::Element;
  Element* rows;
  Element* cols;
  int depth;
  int pitch;

  __device__ __forceinline__ ResidentStages(unsigned char* shared, int64_t dim)
      : rows(reinterpret_cast<Element*>(shared)),
        cols(rows + Tiles::kRows * Tiles::resident_pitch(dim)),
        depth(static_cast<int>(Tiles::resident_depth(dim))),
        pitch(static_cast<int>(Tiles::resident_pitch(dim))) {}

  __device__ __forceinline__ Element* stage(int index) const {
    return cols + index * Tiles::kCols * pitch;
  }
};

// How the block multiplies a staged chunk into score registers, and which scores a thread
// holds: at(score, h, c) pairs the tile's row row(h) with its column col(c), for
// h < kRowsPerThread and c < kColsPerThread; the kRowLanes adjacent lanes that share a row
// reduce it with shuffles.
//
// mma.sync: the warp's 16 rows as m16n8 accumulator fragments, score[f][e] pairing row
// 16 w + lane / 4 + 8 (e / 2) with column 8 f + 2 (lane % 4) + e % 2.
template <typename scalar_t>
struct MmaMultiply {
  using Tiles = MmaTiles<scalar_t>;
  using Element = typename Tiles::Element;
  static constexpr int kRowsPerThread = 2;
  static constexpr int kColsPerThread = 2 * Tiles::kColFragments;
  static constexpr int kRowLanes = 4;
  // Two forward blocks per SM (128 registers per thread: the 32 score registers and the
  // epilogue's fit without spilling; 64 spilled).
  static constexpr int kForwardBlocksPerSM = 2;
  using Scores = float[Tiles::kColFragments][4];

  static __device__ __forceinline__ int row(int h) {
    return 16 * (threadIdx.x / 32) + threadIdx.x % 32 / 4 + 8 * h;
  }
  static __device__ __forceinline__ int col(int c) {
    return 8 * (c / 2) + 2 * (threadIdx.x % 4) + c % 2;
  }
  static __device__ __forceinline__ float& at(Scores& score, int h, int c) {
    return score[c / 2][2 * h + c % 2];
  }
  static __device__ __forceinline__ float at(const Scores& score, int h, int c) {
    return score[c / 2][2 * h + c % 2];
  }

  // score += rows . cols over one staged chunk of Tiles::kDepth columns.
  static __device__ __forceinline__ void accumulate(Scores& score,
                                                    const Element* __restrict__ rows,
                                                    const Element* __restrict__ cols) {
    accumulate_depth<Tiles::kDepth>(score, rows, cols, Tiles::kPitch, Tiles::kDepth);
  }

  // score += rows . cols over the first `depth` columns (a multiple of kStep, at most
  // kMaxDepth) of tiles whose rows are `pitch` elements apart, with ldmatrix.x4 operands:
  // lanes 8 m .. 8 m + 7 supply the row addresses of matrix m.
  template <int kMaxDepth>
  static __device__ __forceinline__ void accumulate_depth(Scores& score,
                                                          const Element* __restrict__ rows,
                                                          const Element* __restrict__ cols,
                                                          int pitch, int depth) {
    const int lane = threadIdx.x % 32;
    const int matrix = lane / 8;
    const int matrix_row = lane % 8;
    // A (rows, row-major): matrices (rows 0-7 | 8-15) x (first | second 16 bytes of k), in
    // a[0..3] order.
    const int a_row = 16 * (threadIdx.x / 32) + (matrix & 1) * 8 + matrix_row;
    const int a_col = (matrix >> 1) * Tiles::kVector;
    // B (columns, stored as rows of k): matrices (n 0-7, first 16 bytes of k), (n 0-7,
    // second), (n 8-15, first), (n 8-15, second): b[0..1] of fragments 2 p and 2 p + 1.
    const int b_row = (matrix >> 1) * 8 + matrix_row;
    const int b_col = (matrix & 1) * Tiles::kVector;
#pragma unroll
    for (int kk = 0; kk < kMaxDepth; kk += Tiles::kStep) {
      if (kk >= depth) break;
      uint32_t a[4];
      ptx::ldmatrix_x4(a, rows + a_row * pitch + kk + a_col);
      if constexpr (Tiles::kTf32) {
#pragma unroll
        for (int e = 0; e < 4; ++e) a[e] = tf32_operand(a[e]);
      }
#pragma unroll
      for (int pair = 0; pair < Tiles::kColFragments / 2; ++pair) {
        uint32_t b[4];
        ptx::ldmatrix_x4(b, cols + (16 * pair + b_row) * pitch + kk + b_col);
        if constexpr (Tiles::kTf32) {
#pragma unroll
          for (int e = 0; e < 4; ++e) b[e] = tf32_operand(b[e]);
        }
        mma_accumulate<Element>(score[2 * pair], a, b[0], b[1]);
        mma_accumulate<Element>(score[2 * pair + 1], a, b[2], b[3]);
      }
    }
  }
};

// Register-blocked FMA: thread (ty, tx) of a 16 x 16 grid owns rows ty + 16 h and columns
// tx + 16 c. A half-warp reads one broadcast row vector and 16 column vectors whose 80-byte
// rows put each quarter-warp's 16-byte loads in distinct banks.
struct FmaMultiply {
  using Tiles = FmaTiles;
  using Element = float;
  static constexpr int kRowsPerThread = 8;
  static constexpr int kColsPerThread = 8;
  static constexpr int kRowLanes = 16;
  // One block per SM (up to 255 registers): the 64 scores and 16 operand vectors spill at 128.
  static constexpr int kForwardBlocksPerSM = 1;
  using Scores = float[kRowsPerThread][kColsPerThread];

  static __device__ __forceinline__ int row(int h) { return threadIdx.x / 16 + 16 * h; }
  static __device__ __forceinline__ int col(int c) { return threadIdx.x % 16 + 16 * c; }
  static __device__ __forceinline__ float& at(Scores& score, int h, int c) {
    return score[h][c];
  }
  static __device__ __forceinline__ float at(const Scores& score, int h, int c) {
    return score[h][c];
  }

  static __device__ __forceinline__ void accumulate(Scores& score,
                                                    const float* __restrict__ rows,
                                                    const float* __restrict__ cols) {
#pragma unroll
    for (int k = 0; k < Tiles::kDepth; k += 4) {
      float4 a[kRowsPerThread];
      float4 b[kColsPerThread];
#pragma unroll
      for (int h = 0; h < kRowsPerThread; ++h) {
        a[h] = *reinterpret_cast<const float4*>(rows + row(h) * Tiles::kPitch + k);
      }
#pragma unroll
      for (int c = 0; c < kColsPerThread; ++c) {
        b[c] = *reinterpret_cast<const float4*>(cols + col(c) * Tiles::kPitch + k);
      }
#pragma unroll
      for (int h = 0; h < kRowsPerThread; ++h) {
#pragma unroll
        for (int c = 0; c < kColsPerThread; ++c) {
          score[h][c] += a[h].x * b[c].x + a[h].y * b[c].y + a[h].z * b[c].z + a[h].w * b[c].w;
        }
      }
    }
  }
};

template <typename Multiply>
__device__ __forceinline__ void clear_scores(typename Multiply::Scores& score) {
#pragma unroll
  for (int h = 0; h < Multiply::kRowsPerThread; ++h) {
#pragma unroll
    for (int c = 0; c < Multiply::kColsPerThread; ++c) Multiply::at(score, h, c) = 0.0f;
  }
}

// The pipeline's step `step` of `steps`: issues the next step's copies, so that they overlap
// this step's multiplies, and returns once this step's copies (all groups but the newest) have
// landed and every thread of the block is past that wait.
template <typename Issue>
__device__ __forceinline__ void issue_next_and_wait(int64_t step, int64_t steps,
                                                    const Issue& issue) {
  if (step + 1 < steps) {
    issue(step + 1);
    ptx::cp_async_wait<1>();
  } else {
    ptx::cp_async_wait<0>();
  }
  __syncthreads();
}

// Streams the score tiles z_I k_J^T of a block (z = row_z, the block's rows; k = col_z, its
// columns; the same features in the single-set call): step s is column tile s / chunks and
// depth chunk s % chunks. Called by all threads of the block with the same arguments, for the
// column tiles [col_begin, col_begin + tiles * kCols) (clipped to col_end):
//   begin(tile)            before the tile's first step, after every thread is done with the
//                          previous tile; may stage per-column data and commit cp.async groups
//                          (they are waited for before end(tile));
//   end(tile, col0, score) the finished fragments of the tile starting at column col0.
template <typename Multiply, typename scalar_t, typename Begin, typename End>
__device__ __forceinline__ void for_each_score_tile(ScoreStages<typename Multiply::Tiles>& stages,
                                                    const scalar_t* __restrict__ row_z,
                                                    const scalar_t* __restrict__ col_z, int64_t dim,
                                                    const RowBlock& block, int64_t col_begin,
                                                    int64_t col_end, int64_t tiles,
                                                    bool vectorized, const Begin& begin,
                                                    const End& end) {
  using Tiles = typename Multiply::Tiles;
  const int64_t chunks = (dim + Tiles::kDepth - 1) / Tiles::kDepth;
  const int64_t steps = tiles * chunks;
  if (steps == 0) return;

  const auto issue = [&](int64_t step) {
    const int stage = static_cast<int>(step % Tiles::kStages);
    const int64_t col0 = col_begin + step / chunks * Tiles::kCols;
    const int64_t k0 = step % chunks * Tiles::kDepth;
    load_tile<Tiles::kRows, Tiles::kDepth>(stages.rows[stage], Tiles::kPitch, row_z, dim,
                                           block.row_begin, block.row_end, k0, Tiles::kDepth,
                                           vectorized);
    load_tile<Tiles::kCols, Tiles::kDepth>(stages.cols[stage], Tiles::kPitch, col_z, dim, col0,
                                           col_end, k0, Tiles::kDepth, vectorized);
    ptx::cp_async_commit();
  };

  typename Multiply::Scores score;
  begin(int64_t{0});
  issue(0);
  for (int64_t step = 0; step < steps; ++step) {
    const int64_t chunk = step % chunks;
    const int64_t tile = step / chunks;
    if (chunk == 0) clear_scores<Multiply>(score);
    issue_next_and_wait(step, steps, issue);
    const int stage = static_cast<int>(step % Tiles::kStages);
    Multiply::accumulate(score, stages.rows[stage], stages.cols[stage]);
    if (chunk == chunks - 1) end(tile, col_begin + tile * Tiles::kCols, score);
    // Every warp is done with this stage (and the tile's staged data) before it is refilled.
    __syncthreads();
    if (chunk == chunks - 1 && tile + 1 < tiles) begin(tile + 1);
  }
}

// The same contract on the resident tiles of the fast path: the block's rows are copied once,
// in the first cp.async group, and step s is the whole of column tile s, brought into stage
// s % 2 while the other stage feeds the multiplies.
template <typename Multiply, typename scalar_t, typename Begin, typename End>
__device__ __forceinline__ void for_each_score_tile(
    const ResidentStages<typename Multiply::Tiles>& stages, const scalar_t* __restrict__ row_z,
    const scalar_t* __restrict__ col_z, int64_t dim, const RowBlock& block, int64_t col_begin, int64_t col_end, int64_t tiles,
    bool vectorized, const Begin& begin, const End& end) {
  using Tiles = typename Multiply::Tiles;
  if (tiles == 0) return;

  const auto issue = [&](int64_t tile) {
    load_tile<Tiles::kCols, Tiles::kResidentDepth>(
        stages.stage(static_cast<int>(tile % Tiles::kStages)), stages.pitch, col_z, dim,
        col_begin + tile * Tiles::kCols, col_end, 0, stages.depth, vectorized);
    ptx::cp_async_commit();
  };

  typename Multiply::Scores score;
  begin(int64_t{0});
  load_tile<Tiles::kRows, Tiles::kResidentDepth>(stages.rows, stages.pitch, row_z, dim,
                                                 block.row_begin, block.row_end, 0,
                                                 stages.depth, vectorized);
  issue(0);
  for (int64_t tile = 0; tile < tiles; ++tile) {
    clear_scores<Multiply>(score);
    issue_next_and_wait(tile, tiles, issue);
    Multiply::template accumulate_depth<Tiles::kResidentDepth>(
        score, stages.rows, stages.stage(static_cast<int>(tile % Tiles::kStages)),
        stages.pitch, stages.depth);
    end(tile, col_begin + tile * Tiles::kCols, score);
    // Every warp is done with this stage (and the tile's staged data) before it is refilled.
    __syncthreads();
    if (tile + 1 < tiles) begin(tile + 1);
  }
}

// The rows of the block a thread's scores cover (Multiply::row), as rows of z.
template <typename Multiply>
struct ThreadRows {
  int64_t row[Multiply::kRowsPerThread];
  bool exists[Multiply::kRowsPerThread];

  __device__ __forceinline__ explicit ThreadRows(const RowBlock& block) {
#pragma unroll
    for (int h = 0; h < Multiply::kRowsPerThread; ++h) {
      row[h] = block.row_begin + Multiply::row(h);
      exists[h] = row[h] < block.row_end;
    }
  }
};

// Sum and maximum over the kLanes adjacent lanes that share a row (a fixed butterfly:
// deterministic; every lane gets the result).
template <int kLanes>
__device__ __forceinline__ float row_sum(float value) {
#pragma unroll
  for (int offset = kLanes / 2; offset > 0; offset /= 2) {
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  }
  return value;
}

template <int kLanes>
__device__ __forceinline__ float row_max(float value) {
#pragma unroll
  for (int offset = kLanes / 2; offset > 0; offset /= 2) {
    value = fmaxf(value, __shfl_xor_sync(0xffffffffu, value, offset));
  }
  return value;
}

// The forward of one block over the column tiles of its split: masks, pair weights, exp2 and
// the online log-sum-exp applied to the score registers; the partial results are those of
// supcon_forward_kernel, merged by supcon_forward_combine_kernel.
template <typename Multiply, typename Stages, typename scalar_t>
__device__ __forceinline__ void forward_block(
    Stages& stages, const PairRows<scalar_t>& rows, const PairRows<scalar_t>& cols, int64_t dim,
    const int64_t* __restrict__ block_offsets, int64_t num_segments, float inv_temperature,
    bool prevalence, int64_t num_rows, int64_t num_splits, ForwardPartials<float> partials) {
  using Tiles = typename Multiply::Tiles;
  constexpr int kRowsPerThread = Multiply::kRowsPerThread;
  constexpr int kColsPerThread = Multiply::kColsPerThread;
  constexpr float kMinusInf = -std::numeric_limits<float>::infinity();
  constexpr float kLog2e = 1.4426950408889634f;
  constexpr float kLn2 = 0.6931471805599453f;

  __shared__ int32_t col_class[Tiles::kCols];
  __shared__ float col_contrast_weight[Tiles::kCols];

  RowBlock block;
  if (!locate_row_block(rows.offsets, cols.offsets, block_offsets, num_segments, blockIdx.x,
                        Tiles::kRows, block)) {
    return;
  }
  const ThreadRows<Multiply> own(block);
  int32_t row_class[kRowsPerThread];
  // The column excluded from each row's contrasts (its pair tag, see PairRows).
  int32_t row_tag[kRowsPerThread];
  float row_same_weight[kRowsPerThread];
  // Per row, in log2 units: the running maximum (shared by the row's lanes) and this lane's
  // share of sum_j w exp2(x_j - max); the lane's share of the positives' similarities.
  float running_max[kRowsPerThread];
  float running_sum[kRowsPerThread];
  float positive_sum[kRowsPerThread];
#pragma unroll
  for (int h = 0; h < kRowsPerThread; ++h) {
    row_class[h] = own.exists[h] ? rows.classes[own.row[h]] : kNoClass;
    row_tag[h] = own.exists[h] ? pair_tag(rows, own.row[h]) : -1;
    row_same_weight[h] =
        same_class_weight<float>(own.exists[h] ? rows.positives[own.row[h]] : -1, prevalence);
    running_max[h] = kMinusInf;
    running_sum[h] = 0.0f;
    positive_sum[h] = 0.0f;
  }
  // exp(s / t - m) = exp2(s * log2(e) / t - m log2(e)): one multiply-add per pair.
  const float scale_log2 = inv_temperature * kLog2e;

  const int64_t column_tiles =
      (block.column_end - block.column_begin + Tiles::kCols - 1) / Tiles::kCols;
  const int64_t tiles_per_split = (column_tiles + num_splits - 1) / num_splits;
  const int64_t split_tile = min(static_cast<int64_t>(blockIdx.y) * tiles_per_split,
                                 column_tiles);
  const int64_t tiles = min(tiles_per_split, column_tiles - split_tile);
  const int64_t col_begin = block.column_begin + split_tile * Tiles::kCols;

  const auto begin = [&](int64_t tile) {
    for (int j = threadIdx.x; j < Tiles::kCols; j += kThreads) {
      const int64_t col = col_begin + tile * Tiles::kCols + j;
      const bool inside = col < block.column_end;
      col_class[j] = inside ? cols.classes[col] : kNoClass;
      col_contrast_weight[j] =
          inside ? contrast_weight<float>(cols.positives[col], prevalence) : 0;
    }
  };
  const auto end = [&](int64_t, int64_t col0, const typename Multiply::Scores& score) {
#pragma unroll
    for (int h = 0; h < kRowsPerThread; ++h) {
      // Masked pairs (ignored rows or columns, own pairs, columns past the segment) are
      // -inf: they add nothing, and a row of them leaves the running values as they were.
      float x[kColsPerThread];
      float tile_max = kMinusInf;
#pragma unroll
      for (int c = 0; c < kColsPerThread; ++c) {
        const int j = Multiply::col(c);
        const bool valid = row_class[h] >= 0 && col_class[j] >= 0 && col0 + j != row_tag[h];
        const float s = Multiply::at(score, h, c);
        if (valid && col_class[j] == row_class[h]) positive_sum[h] += s * inv_temperature;
        x[c] = valid ? s * scale_log2 : kMinusInf;
        tile_max = fmaxf(tile_max, x[c]);
      }
      const float new_max = fmaxf(running_max[h], row_max<Multiply::kRowLanes>(tile_max));
      if (new_max == kMinusInf) continue;  // the same for all lanes of the row
      float sum = running_max[h] == kMinusInf ? 0.0f
                                               : running_sum[h] * exp2f(running_max[h] - new_max);
#pragma unroll
      for (int c = 0; c < kColsPerThread; ++c) {
        const int j = Multiply::col(c);
        if (x[c] == kMinusInf) continue;
        const float weight = pair_weight(row_class[h], col_class[j], row_same_weight[h],
                                         col_contrast_weight[j]);
        sum += weight * exp2f(x[c] - new_max);
      }
      running_max[h] = new_max;
      running_sum[h] = sum;
    }
  };
  for_each_score_tile<Multiply>(
      stages, rows.features, cols.features, dim, block, col_begin, block.column_end, tiles,
      rows_are_vector_aligned(rows.features, dim) && rows_are_vector_aligned(cols.features, dim),
      begin, end);

#pragma unroll
  for (int h = 0; h < kRowsPerThread; ++h) {
    const float sum = row_sum<Multiply::kRowLanes>(running_sum[h]);
    const float positive = row_sum<Multiply::kRowLanes>(positive_sum[h]);
    if (!own.exists[h] || threadIdx.x % Multiply::kRowLanes != 0) continue;
    const int64_t index = blockIdx.y * num_rows + own.row[h];
    partials.running_max[index] = running_max[h] * kLn2;
    partials.running_sum[index] = sum;
    partials.positive_sum[index] = positive;
  }
}

// Forward per (row block, column split): Multiply is MmaMultiply<scalar_t> (fp16/bf16, TF32) or
// FmaMultiply (float32 without TF32; cp.async needs sm_80 too). With kResident (MmaMultiply
// and dim <= kResidentDepth only) on the resident tiles in MmaTiles::resident_bytes(dim) of
// dynamic shared memory, else on the chunked stages.
template <typename Multiply, typename scalar_t, bool kResident>
__global__ void __launch_bounds__(kThreads, Multiply::kForwardBlocksPerSM)
    supcon_forward_tiled_kernel(PairRows<scalar_t> rows, PairRows<scalar_t> cols, int64_t dim,
                                const int64_t* __restrict__ block_offsets,
                                int64_t num_segments, float inv_temperature, bool prevalence,
                                int64_t num_rows, int64_t num_splits,
                                ForwardPartials<float> partials) {
#if defined(MCSC_AMPERE_TENSOR_CORES)
  if constexpr (kResident) {
    MCSC_DYNAMIC_SHARED_MEMORY(shared);
    const ResidentStages<typename Multiply::Tiles> stages(shared, dim);
    forward_block<Multiply>(stages, rows, cols, dim, block_offsets, num_segments,
                            inv_temperature, prevalence, num_rows, num_splits, partials);
  } else {
    __shared__ ScoreStages<typename Multiply::Tiles> stages;
    forward_block<Multiply>(stages, rows, cols, dim, block_offsets, num_segments,
                            inv_temperature, prevalence, num_rows, num_splits, partials);
  }
#else
  __trap();  // the host refuses MCSC_CUDA_KERNELS=mma below sm_80
#endif
}

// Power-of-two scale that brings the largest pair coefficient, at most 4 max|a| (G_ij <= a_i,
// b_i <= a_i), to about 2^12: well inside fp16's range, and far from its subnormals for
// coefficients many orders of magnitude smaller. Exact to undo.
__device__ __forceinline__ int coefficient_exponent(float largest_grad) {
  if (!(largest_grad > 0.0f) || !std::isfinite(largest_grad)) return 0;
  return max(-126, min(126, 10 - ilogbf(largest_grad)));
}

// The backward of one (row block, kOutCols feature columns of the output) on the given score
// stages: for every column tile J of the block's column range, the score fragments again, H_IJ
// in registers, then out_I += H_IJ k_J[:, columns] (rows and columns as for
// supcon_backward_kernel). largest_grad: max |a_i| on the device, or nullptr for a_i = 1.
template <typename Stages, typename scalar_t, typename out_t>
__device__ __forceinline__ void backward_block(
    Stages& stages, const PairRows<scalar_t>& rows, const PairRows<scalar_t>& cols, int64_t dim,
    const float* __restrict__ largest_grad, const int64_t* __restrict__ block_offsets,
    int64_t num_segments, float inv_temperature, bool prevalence, out_t* __restrict__ grad) {
  using Tiles = MmaTiles<scalar_t>;
  using Element = typename Tiles::Element;
  using Multiply = MmaMultiply<scalar_t>;

  __shared__ __align__(16) Element values[Tiles::kCols * Tiles::kOutPitch];
  __shared__ BackwardRow<float> columns[Tiles::kCols];

  RowBlock block;
  if (!locate_row_block(rows.offsets, cols.offsets, block_offsets, num_segments, blockIdx.x,
                        Tiles::kRows, block)) {
    return;
  }
  const int64_t out_col0 = static_cast<int64_t>(blockIdx.y) * Tiles::kOutCols;
  const bool values_vectorized = rows_are_vector_aligned(cols.features, dim);
  const bool vectorized = rows_are_vector_aligned(rows.features, dim) && values_vectorized;
  const int exponent = coefficient_exponent(largest_grad != nullptr ? *largest_grad : 1.0f);
  const float coefficient_scale = ldexpf(1.0f, exponent);

  const ThreadRows<Multiply> own(block);
  BackwardRow<float> row_data[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    row_data[h] = backward_row(rows, own.row[h], own.exists[h], prevalence);
  }

  const int lane = threadIdx.x % 32;
  const int lane_col = 2 * (lane % 4);
  float out[Tiles::kOutFragments][4] = {};

  const auto begin = [&](int64_t tile) {
    const int64_t col0 = block.column_begin + tile * Tiles::kCols;
    for (int j = threadIdx.x; j < Tiles::kCols; j += kThreads) {
      columns[j] = backward_row(cols, col0 + j, col0 + j < block.column_end, prevalence);
    }
    load_tile<Tiles::kCols, Tiles::kOutCols>(values, Tiles::kOutPitch, cols.features, dim, col0,
                                             block.column_end, out_col0, Tiles::kOutCols,
                                             values_vectorized);
    ptx::cp_async_commit();
  };
  const auto end = [&](int64_t, int64_t, const typename Multiply::Scores& score) {
    // H_ij (scaled) in the score fragments' layout: coefficient[f][e] pairs the fragment row
    // lane / 4 + 8 (e / 2) with the tile's column 8 f + 2 (lane % 4) + e % 2.
    float coefficient[Tiles::kColFragments][4];
#pragma unroll
    for (int f = 0; f < Tiles::kColFragments; ++f) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int h = e / 2;
        const int j = 8 * f + lane_col + e % 2;
        coefficient[f][e] =
            pair_coefficient(score[f][e] * inv_temperature, row_data[h], columns[j]) *
            coefficient_scale;
      }
    }
    if constexpr (Tiles::kTf32) {
      // m16n8k8's A holds columns t and t + 4 where the accumulators hold 2 t and 2 t + 1: k
      // runs over the tile's columns in the order 0, 2, 4, 6, 1, 3, 5, 7, and B's rows follow
      // (read from shared memory directly: ldmatrix.trans has no 32-bit form).
#pragma unroll
      for (int f = 0; f < Tiles::kColFragments; ++f) {
        const uint32_t a[4] = {ptx::to_tf32(coefficient[f][0]), ptx::to_tf32(coefficient[f][2]),
                               ptx::to_tf32(coefficient[f][1]), ptx::to_tf32(coefficient[f][3])};
        const Element* const even = values + (8 * f + lane_col) * Tiles::kOutPitch + lane / 4;
#pragma unroll
        for (int n = 0; n < Tiles::kOutFragments; ++n) {
          mma_accumulate<Element>(out[n], a, ptx::to_tf32(even[8 * n]),
                                  ptx::to_tf32(even[Tiles::kOutPitch + 8 * n]));
        }
      }
    } else {
      // The accumulator pair (f, h) is A's (row h, k pair) of k step f / 2, register
      // h + 2 (f % 2): FlashAttention-2's reuse of P as an operand without shared memory.
      // ldmatrix.x4.trans of z_J (k = column j, n = feature d): matrices (j 0-7 | 8-15) x
      // (d 0-7 | 8-15), giving b[0..1] of output fragment 2 p and of 2 p + 1.
      const int v_row = (lane / 8 & 1) * 8 + lane % 8;
      const int v_col = (lane / 8 >> 1) * 8;
#pragma unroll
      for (int k = 0; k < Tiles::kColFragments / 2; ++k) {
        uint32_t a[4];
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const float* const pair = coefficient[2 * k + r / 2] + 2 * (r % 2);
          a[r] = pack_pair<Element>(pair[0], pair[1]);
        }
#pragma unroll
        for (int pair = 0; pair < Tiles::kOutFragments / 2; ++pair) {
          uint32_t b[4];
          ptx::ldmatrix_x4_trans(
              b, values + (16 * k + v_row) * Tiles::kOutPitch + 16 * pair + v_col);
          mma_accumulate<Element>(out[2 * pair], a, b[0], b[1]);
          mma_accumulate<Element>(out[2 * pair + 1], a, b[2], b[3]);
        }
      }
    }
  };
  const int64_t tiles =
      (block.column_end - block.column_begin + Tiles::kCols - 1) / Tiles::kCols;
  for_each_score_tile<Multiply>(stages, rows.features, cols.features, dim, block,
                                block.column_begin, block.column_end, tiles, vectorized, begin,
                                end);

  // dz = (1/t) sum_j H_ij z_j, with the coefficient scale undone (a power of two: exact).
  const float scale = ldexpf(inv_temperature, -exponent);
#pragma unroll
  for (int f = 0; f < Tiles::kOutFragments; ++f) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if (!own.exists[h]) continue;
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int64_t col = out_col0 + 8 * f + lane_col + e;
        if (col < dim) {
          grad[own.row[h] * dim + col] = static_cast<out_t>(out[f][2 * h + e] * scale);
        }
      }
    }
  }
}

// Backward per (row block, kOutCols feature columns of the output); kResident as for the
// forward. One block per SM (up to 255 registers per thread): the score, coefficient and dz
// fragments (96 floats) do not fit 128 without spilling, as in FlashAttention-2's backward.
template <typename scalar_t, typename out_t, bool kResident>
__global__ void __launch_bounds__(kThreads, 1)
    supcon_backward_mma_kernel(PairRows<scalar_t> rows, PairRows<scalar_t> cols, int64_t dim,
                               const float* __restrict__ largest_grad,
                               const int64_t* __restrict__ block_offsets, int64_t num_segments,
                               float inv_temperature, bool prevalence,
                               out_t* __restrict__ grad) {
#if defined(MCSC_AMPERE_TENSOR_CORES)
  if constexpr (kResident) {
    MCSC_DYNAMIC_SHARED_MEMORY(shared);
    const ResidentStages<MmaTiles<scalar_t>> stages(shared, dim);
    backward_block(stages, rows, cols, dim, largest_grad, block_offsets, num_segments,
                   inv_temperature, prevalence, grad);
  } else {
    __shared__ ScoreStages<MmaTiles<scalar_t>> stages;
    backward_block(stages, rows, cols, dim, largest_grad, block_offsets, num_segments,
                   inv_temperature, prevalence, grad);
  }
#else
  __trap();  // the host refuses MCSC_CUDA_KERNELS=mma below sm_80
#endif
}

}  // namespace cuda
}  // namespace mcsc
