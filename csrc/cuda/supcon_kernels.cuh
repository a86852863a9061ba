// CUDA kernels of mcsc::supcon_forward and mcsc::supcon_backward, and the host code that sizes
// and launches them.
//
// Four kernels, each over (segment, row block) pairs with a grid sized without reading the
// segment offsets on the host (supcon_tiles.cuh, locate_row_block). They pair the rows of one
// set with the columns of another (PairRows): in the single-set call both are the features and
// the excluded pair is i == j; with a reference set the anchors' segment s pairs with the
// reference rows' ("keys'") segment s and the excluded pair is (i, ref_self_index[i]).
//   classify_rows     per row: |P(i)| (-1 for ignored rows) and a class id, the index of the
//                     first column of the segment with the same label, so that anchors and keys
//                     get comparable ids (anchors of a label no key has: kAbsentClass). Ids are
//                     int32 whatever the label type, so the pairwise kernels compare them
//                     exactly and cheaply. Run on the keys against themselves it gives the key
//                     table: their ids and n_{y_j} - 1, whence contrast_weight_j = 1 / n_{y_j}.
//   forward           per (row block, column split), over the split's column tiles of the
//                     block's columns: the score tile z_I . k_J (tensor cores for
//                     fp16/bf16/TF32), then per row an online log-sum-exp of w_i(y_j) exp(s_ij)
//                     and the sum of s_ip over positives, written as the split's partial result.
//   forward_combine   per row: the splits' partial results merged in split order, then lse
//                     and the loss. Splitting the columns gives a small batch enough blocks
//                     to fill the GPU (flash-decoding's split-KV).
//   backward          per (row block, Tiles::kOutCols feature columns): the same score tiles,
//                     turned into H_ij = G_ij + G_ji - [j in P(i)] (b_i + b_j) in shared memory,
//                     then out_I += H k_J (TF32 tensor cores whenever the scores use tensor
//                     cores); so out_i = (1/t) sum_j H_ij k_j covers the pairwise and the
//                     positive terms of the gradient without class sums. A set that is no
//                     anchor has a = b = 0, so the same kernel gives the keys' gradient (rows =
//                     keys, columns = anchors: G_ji - [i in P(j)] b_j) and, run by the forward,
//                     each anchor's own gradient d loss_i / d z_i (rows = anchors with a_i = 1,
//                     columns = keys: p_ij - [j in P(i)] / |P(i)|).
// With MCSC_CUDA_KERNELS=mma, the tensor-core paths (fp16/bf16, float32 with TF32) take the
// mma.sync forward and backward of supcon_mma.cuh instead, with the same classify_rows and
// forward_combine.
// Every row's result is reduced by a fixed set of threads in a fixed order: no atomics, so the
// outputs are bitwise reproducible. State kept between forward and backward is O(M): lse and
// positives (and the anchors' gradients, O(M D), with a reference set); the key table is
// O(K). Shared memory is O(tile^2) per block (O(tile x D) for the mma kernels' resident row
// tiles, at most 512 bytes a row); nothing is O(M K).
//
// The host functions at the end launch kernels through a `launch(kernel, grid_x, grid_y,
// args...)` callable rather than with <<<...>>>: supcon_cuda.cu passes one that launches on the
// current stream, and tests/cuda_emulation one that runs the same kernels on the CPU. Its
// with_dynamic_shared(bytes, kernel, grid_x, grid_y, args...) launches with `bytes` of dynamic
// shared memory per block, and holds_dynamic_shared(kernel, bytes) says whether the device
// gives the kernel that much.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/abs.h>
#include <ATen/ops/amax.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>

#include "cuda/supcon_mma.cuh"
#include "cuda/supcon_tiles.cuh"
#include "supcon_checks.h"
#include "supcon_math.h"

namespace mcsc {
namespace cuda {

// Labels of a column tile staged by classify_rows; 8 KiB for int64 labels.
constexpr int kClassifyCols = 1024;

// Class id of valid anchors whose label no reference row of their segment has: an id that no
// row index (a class id of the reference rows) reaches.
constexpr int32_t kAbsentClass = std::numeric_limits<int32_t>::max();

// How classify_rows finds a row's own pair among the columns, which it does not count as a
// positive: the row itself (rows and columns are one set), self_index[row] (rows are anchors,
// columns a reference set), or none.
enum class OwnPair { Row, SelfIndex };

// One row per thread, against the column labels of its segment (the rows' own segment in the
// single-set call; the reference segment for anchors against a reference set): the class id is
// the index of the first column with the row's label (kAbsentClass for a valid row that no
// column matches), so rows of either set get comparable ids. With `known_positives`
// (backward: the forward's output) validity comes from it and only class ids are needed, so a
// block stops scanning once each of its rows has met the first column of its class; otherwise
// rows equal to ignore_index are ignored and the whole segment is scanned to count positives:
// the matching columns less the row's own pair (own_pair; an own pair outside the segment or
// of another label is no match and is not subtracted).
template <typename label_t>
__global__ void __launch_bounds__(kThreads)
    classify_rows_kernel(const label_t* __restrict__ labels,
                         const label_t* __restrict__ column_labels, int64_t ignore_index,
                         const int32_t* __restrict__ known_positives, OwnPair own_pair,
                         const int64_t* __restrict__ self_index,
                         const int64_t* __restrict__ offsets,
                         const int64_t* __restrict__ column_offsets,
                         const int64_t* __restrict__ block_offsets, int64_t num_segments,
                         int32_t* __restrict__ positives, int32_t* __restrict__ classes) {
  __shared__ label_t tile[kClassifyCols];
  RowBlock block;
  if (!locate_row_block(offsets, column_offsets, block_offsets, num_segments, blockIdx.x,
                        kThreads, block)) {
    return;
  }
  const int64_t row = block.row_begin + threadIdx.x;
  const bool has_row = row < block.row_end;
  const label_t label = has_row ? labels[row] : label_t(0);
  bool valid = false;
  if (has_row) {
    valid = known_positives != nullptr ? known_positives[row] >= 0
                                       : static_cast<int64_t>(label) != ignore_index;
  }
  const bool count = positives != nullptr;

  int64_t matches = 0;
  int64_t first = -1;
  for (int64_t col0 = block.column_begin; col0 < block.column_end; col0 += kClassifyCols) {
    __syncthreads();
    const int64_t width = min(static_cast<int64_t>(kClassifyCols), block.column_end - col0);
    for (int j = threadIdx.x; j < width; j += kThreads) tile[j] = column_labels[col0 + j];
    __syncthreads();
    if (valid) {
      // An ignored row never carries a valid row's label, so equal labels mean a valid match.
      for (int j = 0; j < width; ++j) {
        if (tile[j] == label) {
          ++matches;
          if (first < 0) first = col0 + j;
        }
      }
    }
    if (!count && __syncthreads_and(!valid || first >= 0)) break;
  }
  if (!has_row) return;
  classes[row] = valid ? (first >= 0 ? static_cast<int32_t>(first) : kAbsentClass) : -1;
  if (!count) return;
  int64_t own = 1;  // OwnPair::Row: the row is one of its own matches
  if (own_pair == OwnPair::SelfIndex) {
    const int64_t partner = self_index != nullptr ? self_index[row] : -1;
    own = partner >= block.column_begin && partner < block.column_end &&
          column_labels[partner] == label;
  }
  positives[row] = valid ? static_cast<int32_t>(matches - own) : -1;
}

// The row of a score tile that a thread of the pairwise kernels works on: tile row `tile_row`
// is shared by kRowThreads adjacent threads, the thread `part` taking the tile's columns part,
// part + kRowThreads, ... Rows past the block's end get class kNoClass and positives -1. `tag`
// is the column excluded from the row's contrasts (its pair tag, see PairRows).
struct AnchorRow {
  int tile_row;
  int part;
  int64_t row;
  bool exists;
  int32_t class_id;
  int32_t positives;
  int32_t tag;
};

template <int kRowThreads, typename scalar_t>
__device__ __forceinline__ AnchorRow anchor_row(const RowBlock& block,
                                                const PairRows<scalar_t>& rows) {
  AnchorRow anchor;
  anchor.tile_row = threadIdx.x / kRowThreads;
  anchor.part = threadIdx.x % kRowThreads;
  anchor.row = block.row_begin + anchor.tile_row;
  anchor.exists = anchor.row < block.row_end;
  anchor.class_id = anchor.exists ? rows.classes[anchor.row] : kNoClass;
  anchor.positives = anchor.exists ? rows.positives[anchor.row] : -1;
  anchor.tag = anchor.exists ? pair_tag(rows, anchor.row) : -1;
  return anchor;
}

// Per (row block, column split), over the split's column tiles of the block's column range:
// `rows` are the anchors, `cols` the contrasts (the same set in the single-set call; cols'
// pair tags are their indices: cols.self_index is not read).
template <typename scalar_t, Mma kind>
__global__ void __launch_bounds__(kThreads, kForwardBlocksPerSM)
    supcon_forward_kernel(PairRows<scalar_t> rows, PairRows<scalar_t> cols, int64_t dim,
                          const int64_t* __restrict__ block_offsets, int64_t num_segments,
                          acc_type<scalar_t> inv_temperature, bool prevalence,
                          int64_t num_rows, int64_t num_splits,
                          ForwardPartials<acc_type<scalar_t>> partials) {
  using acc_t = acc_type<scalar_t>;
  using T = Tiles<acc_t>;
  // Each row of the score tile is reduced by kRowThreads adjacent lanes of one warp.
  constexpr int kRowThreads = kThreads / T::kRows;
  constexpr acc_t kMinusInf = -std::numeric_limits<acc_t>::infinity();

  __shared__ ScoreStaging<scalar_t, kind> staging;
  __shared__ __align__(32) acc_t scores[T::kRows * T::kScoreLd];
  __shared__ int32_t col_class[T::kCols];
  __shared__ acc_t col_contrast_weight[T::kCols];

  RowBlock block;
  if (!locate_row_block(rows.offsets, cols.offsets, block_offsets, num_segments, blockIdx.x,
                        T::kRows, block)) {
    return;
  }
  const bool vectorized =
      rows_are_vector_aligned(rows.features, dim) && rows_are_vector_aligned(cols.features, dim);
  const AnchorRow anchor = anchor_row<kRowThreads>(block, rows);
  const acc_t* const score_row = scores + anchor.tile_row * T::kScoreLd;
  const acc_t same_weight = same_class_weight<acc_t>(anchor.positives, prevalence);

  // This thread's share of the row: sum of w exp(s) relative to running_max, and of s_ip.
  acc_t running_max = kMinusInf;
  acc_t running_sum = 0;
  acc_t positive_sum = 0;
  // The column tiles of this split: a contiguous share of the block's column tiles (maybe
  // none).
  const int64_t column_tiles = (block.column_end - block.column_begin + T::kCols - 1) / T::kCols;
  const int64_t tiles_per_split = (column_tiles + num_splits - 1) / num_splits;
  const int64_t split_begin = block.column_begin + blockIdx.y * tiles_per_split * T::kCols;
  const int64_t split_end = min(block.column_end, split_begin + tiles_per_split * T::kCols);
  for (int64_t col0 = split_begin; col0 < split_end; col0 += T::kCols) {
    __syncthreads();
    for (int j = threadIdx.x; j < T::kCols; j += kThreads) {
      const int64_t col = col0 + j;
      const bool inside = col < block.column_end;
      col_class[j] = inside ? cols.classes[col] : kNoClass;
      col_contrast_weight[j] =
          inside ? contrast_weight<acc_t>(cols.positives[col], prevalence) : 0;
    }
    ScoreTile<scalar_t, kind>::compute(scores, staging, rows.features, cols.features, dim,
                                       block.row_begin, block.row_end, col0, block.column_end,
                                       vectorized);
    __syncthreads();
    // Ignored rows and rows past the block's end (class < 0) have no contrasts; a valid row
    // gives every valid column but its own pair a positive weight.
    if (anchor.class_id < 0) continue;

    // Two passes over this thread's columns: the maximum first, so that no exponential of the
    // second can overflow (flash attention's online softmax, per thread).
    acc_t tile_max = kMinusInf;
    for (int j = anchor.part; j < T::kCols; j += kRowThreads) {
      if (col_class[j] < 0 || col0 + j == anchor.tag) continue;
      const acc_t similarity = score_row[j] * inv_temperature;
      if (col_class[j] == anchor.class_id) positive_sum += similarity;
      tile_max = max(tile_max, similarity);
    }
    if (tile_max == kMinusInf) continue;
    acc_t tile_sum = 0;
    for (int j = anchor.part; j < T::kCols; j += kRowThreads) {
      if (col_class[j] < 0 || col0 + j == anchor.tag) continue;
      const acc_t weight =
          pair_weight(anchor.class_id, col_class[j], same_weight, col_contrast_weight[j]);
      tile_sum += weight * pair_exp(score_row[j] * inv_temperature - tile_max);
    }
    merge_log_sum_exp(running_max, running_sum, tile_max, tile_sum);
  }

  // Combine the kRowThreads shares of each row (a fixed butterfly: deterministic).
#pragma unroll
  for (int offset = kRowThreads / 2; offset > 0; offset /= 2) {
    const acc_t other_max = __shfl_xor_sync(0xffffffffu, running_max, offset);
    const acc_t other_sum = __shfl_xor_sync(0xffffffffu, running_sum, offset);
    positive_sum += __shfl_xor_sync(0xffffffffu, positive_sum, offset);
    if (other_max != kMinusInf) merge_log_sum_exp(running_max, running_sum, other_max, other_sum);
  }
  if (!anchor.exists || anchor.part != 0) return;
  const int64_t index = blockIdx.y * num_rows + anchor.row;
  partials.running_max[index] = running_max;
  partials.running_sum[index] = running_sum;
  partials.positive_sum[index] = positive_sum;
}

// One thread per row: the splits merged in split order (deterministic), then lse and loss.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    supcon_forward_combine_kernel(ForwardPartials<acc_type<scalar_t>> partials,
                                  const int32_t* __restrict__ positives, int64_t rows,
                                  int64_t num_splits, scalar_t* __restrict__ loss,
                                  acc_type<scalar_t>* __restrict__ lse) {
  using acc_t = acc_type<scalar_t>;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (row >= rows) return;
  acc_t running_max = -std::numeric_limits<acc_t>::infinity();
  acc_t running_sum = 0;
  acc_t positive_sum = 0;
  for (int64_t split = 0; split < num_splits; ++split) {
    const int64_t index = split * rows + row;
    merge_log_sum_exp(running_max, running_sum, partials.running_max[index],
                      partials.running_sum[index]);
    positive_sum += partials.positive_sum[index];
  }
  // -inf (log 0) for ignored rows and rows without any contrast; neither is an anchor.
  const acc_t row_lse = running_max + std::log(running_sum);
  lse[row] = row_lse;
  loss[row] = static_cast<scalar_t>(anchor_loss(row_lse, positive_sum, positives[row]));
}

// Per (row block, Tiles::kOutCols feature columns of the output): out_i = (1/t) sum_j H_ij
// col_j over the block's column range, H the pair coefficient of rows i and columns j
// (pair_coefficient): the features' gradient in the single-set call (rows = cols = the
// features), the reference rows' gradient (rows = keys, cols = anchors) and the anchors' own
// gradients d loss_i / d z_i (rows = anchors with a_i = 1, cols = keys; out_t is then the
// accumulation type). Two resident blocks per SM at least (128 registers per thread): without
// the bound the TF32 instantiation takes about 200 registers and runs one block of 8 warps per
// SM.
template <typename scalar_t, Mma kind, typename out_t>
__global__ void __launch_bounds__(kThreads, 2)
    supcon_backward_kernel(PairRows<scalar_t> rows, PairRows<scalar_t> cols, int64_t dim,
                           const int64_t* __restrict__ block_offsets, int64_t num_segments,
                           acc_type<scalar_t> inv_temperature, bool prevalence,
                           out_t* __restrict__ grad) {
  using acc_t = acc_type<scalar_t>;
  using T = Tiles<acc_t>;
  constexpr int kRowThreads = kThreads / T::kRows;
  // Tensor cores for P z_J whenever the scores use them: TF32 is exact for fp16/bf16 features
  // and allowed by the user for float32 ones.
  constexpr bool kTensorCoreGradient = kind != Mma::Fma && kHasTf32TensorCores;
  using Gradient = GradientTile<acc_t, kTensorCoreGradient>;
  // Rows of z_J staged at a time for the product P z_J.
  constexpr int kValueRows = 16;
  // The write-out scratch of the tensor-core GradientTile (256 floats per warp) is `values`.
  static_assert(!kTensorCoreGradient || kValueRows * T::kOutLd >= kThreads / 32 * 256,
                "values is too small to serve as write-out scratch");

  __shared__ ScoreStaging<scalar_t, kind> staging;
  __shared__ __align__(32) acc_t scores[T::kRows * T::kScoreLd];
  __shared__ __align__(32) acc_t values[kValueRows * T::kOutLd];
  __shared__ BackwardRow<acc_t> columns[T::kCols];

  RowBlock block;
  if (!locate_row_block(rows.offsets, cols.offsets, block_offsets, num_segments, blockIdx.x,
                        T::kRows, block)) {
    return;
  }
  const int64_t out_col0 = static_cast<int64_t>(blockIdx.y) * T::kOutCols;

  const bool vectorized =
      rows_are_vector_aligned(rows.features, dim) && rows_are_vector_aligned(cols.features, dim);
  const bool values_vectorized = rows_are_vector_aligned(cols.features, dim);
  const int tile_row = threadIdx.x / kRowThreads;
  const int part = threadIdx.x % kRowThreads;
  const int64_t own_row = block.row_begin + tile_row;
  acc_t* const p_row = scores + tile_row * T::kScoreLd;
  const BackwardRow<acc_t> row = backward_row(rows, own_row, own_row < block.row_end, prevalence);

  Gradient gradient;

  for (int64_t col0 = block.column_begin; col0 < block.column_end; col0 += T::kCols) {
    __syncthreads();
    for (int j = threadIdx.x; j < T::kCols; j += kThreads) {
      columns[j] = backward_row(cols, col0 + j, col0 + j < block.column_end, prevalence);
    }
    ScoreTile<scalar_t, kind>::compute(scores, staging, rows.features, cols.features, dim,
                                       block.row_begin, block.row_end, col0, block.column_end,
                                       vectorized);
    __syncthreads();

    // Scores become P_ij in place; each element is read and written by the same thread.
    for (int j = part; j < T::kCols; j += kRowThreads) {
      p_row[j] = pair_coefficient(p_row[j] * inv_temperature, row, columns[j]);
    }

    // out += P[:, k0:k0+16] z_J[k0:k0+16, out_col0:out_col0+kOutCols], z_J in slices of rows.
    for (int k0 = 0; k0 < T::kCols && col0 + k0 < block.column_end; k0 += kValueRows) {
      __syncthreads();
      stage_window<kValueRows, T::kOutCols, T::kOutLd>(values, cols.features, dim, col0 + k0,
                                                       block.column_end, out_col0,
                                                       values_vectorized);
      __syncthreads();
      gradient.accumulate(scores, values, k0);
    }
  }
  // Every warp is done with `values` before it becomes the write-out scratch.
  __syncthreads();
  gradient.write(grad, dim, block.row_begin, block.row_end, out_col0, inv_temperature, values);
}

// ---- Host side: grid sizes and launches -------------------------------------------------------

// block_offsets[s] = sum_{s' < s} ceil(len_{s'} / rows_per_block), computed on the device.
inline at::Tensor row_block_offsets(const at::Tensor& segments, int64_t rows_per_block) {
  const at::Tensor lengths = segments.slice(0, 1).sub(segments.slice(0, 0, -1));
  const at::Tensor blocks = lengths.add(rows_per_block - 1).div(rows_per_block, "floor");
  return at::cat({at::zeros({1}, segments.options()), at::cumsum(blocks, 0)});
}

// Enough blocks for any offsets: each segment adds at most one partial block.
inline int64_t row_block_bound(int64_t rows, int64_t num_segments, int64_t rows_per_block) {
  return (rows + rows_per_block - 1) / rows_per_block + num_segments;
}

// Class ids (and, without known_positives, positives) of the rows labelled `labels` (offsets
// `segments`) against the columns labelled `column_labels` (offsets `column_segments`, the
// same dtype); see classify_rows_kernel.
template <typename Launch>
void classify_rows(const Launch& launch, const at::Tensor& labels,
                   const at::Tensor& column_labels, int64_t ignore_index,
                   const int32_t* known_positives, OwnPair own_pair, const int64_t* self_index,
                   const at::Tensor& segments, const at::Tensor& column_segments,
                   int32_t* positives, at::Tensor& classes) {
  const int64_t num_segments = segments.numel() - 1;
  const at::Tensor block_offsets = row_block_offsets(segments, kThreads);
  const int64_t grid = row_block_bound(labels.size(0), num_segments, kThreads);
  AT_DISPATCH_INDEX_TYPES(labels.scalar_type(), "mcsc_classify_rows", [&] {
    launch(&classify_rows_kernel<index_t>, grid, 1, labels.const_data_ptr<index_t>(),
           column_labels.const_data_ptr<index_t>(), ignore_index, known_positives, own_pair,
           self_index, segments.const_data_ptr<int64_t>(),
           column_segments.const_data_ptr<int64_t>(), block_offsets.const_data_ptr<int64_t>(),
           num_segments, positives, classes.mutable_data_ptr<int32_t>());
  });
}

// A reference set ("keys") for the anchors, contiguous and checked (supcon_checks.h):
// features (K, D) of the anchors' dtype, labels (K,), segments (S + 1,) int64 and self_index,
// (M,) int64 or undefined (no anchor has an own pair among the keys).
struct ReferenceRows {
  at::Tensor features;
  at::Tensor labels;
  at::Tensor segments;
  at::Tensor self_index;
};

// The reference set of an op call, contiguous, with self_index as int64; nullopt without
// ref_features. The caller has checked shapes, dtypes and devices.
inline std::optional<ReferenceRows> reference_rows(const std::optional<at::Tensor>& features,
                                                   const std::optional<at::Tensor>& labels,
                                                   const std::optional<at::Tensor>& segments,
                                                   const std::optional<at::Tensor>& self_index) {
  if (!features.has_value()) return std::nullopt;
  ReferenceRows keys{features->contiguous(), labels->contiguous(), segments->contiguous(),
                     at::Tensor()};
  if (self_index.has_value()) keys.self_index = self_index->to(at::kLong).contiguous();
  return keys;
}

// Labels of both sets in one dtype, so that classify_rows compares them directly: as they
// are when their dtypes agree, else both as int64.
inline std::tuple<at::Tensor, at::Tensor> common_labels(const at::Tensor& labels,
                                                        const at::Tensor& key_labels) {
  if (labels.scalar_type() == key_labels.scalar_type()) return {labels, key_labels};
  return {labels.to(at::kLong), key_labels.to(at::kLong)};
}

// Class ids and contrast counts of the keys: each key's id is the first key of its segment
// with its label, and its positives n_{y_j} - 1 (the keys of its class in its segment, less
// itself), -1 for ignored keys.
struct KeyTable {
  at::Tensor classes;
  at::Tensor positives;
};

template <typename Launch>
KeyTable classify_keys(const Launch& launch, const at::Tensor& key_labels,
                       const at::Tensor& key_segments, int64_t ignore_index) {
  KeyTable table{at::empty({key_labels.size(0)}, key_labels.options().dtype(at::kInt)),
                 at::empty({key_labels.size(0)}, key_labels.options().dtype(at::kInt))};
  if (key_labels.size(0) > 0) {
    classify_rows(launch, key_labels, key_labels, ignore_index, nullptr, OwnPair::Row, nullptr,
                  key_segments, key_segments, table.positives.mutable_data_ptr<int32_t>(),
                  table.classes);
  }
  return table;
}

template <Mma kind>
using MmaTag = std::integral_constant<Mma, kind>;

// Which kernels run for fp16/bf16 and float32: the WMMA and FMA kernels above, validated on an
// H200, or the mma.sync kernels of supcon_mma.cuh (float32 without TF32: its register-blocked
// FMA forward, and the FMA backward above). float64 takes the FMA kernels either way.
enum class KernelFamily { Wmma, Mma };

// The family named by MCSC_CUDA_KERNELS's value: "wmma" (also when unset or empty) or "mma".
inline KernelFamily kernel_family(const char* name) {
  const std::string value = name == nullptr ? "" : name;
  if (value.empty() || value == "wmma") return KernelFamily::Wmma;
  if (value == "mma") return KernelFamily::Mma;
  TORCH_CHECK_VALUE(false, "mcsc: MCSC_CUDA_KERNELS must be 'wmma' or 'mma', got '", value,
                    "'");
}

// Calls body(MmaTag<kind>{}) with the multiply kind for scalar_t: tensor cores for fp16/bf16,
// TF32 tensor cores for float32 when float32 matmuls may use it (mma.sync in the Mma family,
// else WMMA), FMA otherwise.
template <typename scalar_t, typename Body>
void with_mma_kind(bool allow_tf32, KernelFamily family, const Body& body) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    body(MmaTag<Mma::Fma>{});
  } else if constexpr (std::is_same_v<scalar_t, float>) {
    if (family == KernelFamily::Mma) {
      if (allow_tf32) {
        body(MmaTag<Mma::Sync>{});
      } else {
        body(MmaTag<Mma::BlockedFma>{});
      }
    } else if (allow_tf32) {
      body(MmaTag<Mma::Tf32>{});
    } else {
      body(MmaTag<Mma::Fma>{});
    }
  } else if (family == KernelFamily::Mma) {
    body(MmaTag<Mma::Sync>{});
  } else {
    body(MmaTag<Mma::Wmma>{});
  }
}

// Rows and columns of the score tiles of the kernels of one multiply kind, and how many of the
// forward's blocks an SM holds.
template <typename scalar_t, Mma kind>
struct ScoreTileShape {
  static constexpr int kRows = Tiles<acc_type<scalar_t>>::kRows;
  static constexpr int kCols = Tiles<acc_type<scalar_t>>::kCols;
  static constexpr int kForwardBlocksPerSM = ::mcsc::cuda::kForwardBlocksPerSM;
};
template <typename scalar_t>
struct ScoreTileShape<scalar_t, Mma::Sync> {
  static constexpr int kRows = MmaTiles<scalar_t>::kRows;
  static constexpr int kCols = MmaTiles<scalar_t>::kCols;
  static constexpr int kForwardBlocksPerSM = MmaMultiply<scalar_t>::kForwardBlocksPerSM;
};
template <typename scalar_t>
struct ScoreTileShape<scalar_t, Mma::BlockedFma> {
  static constexpr int kRows = FmaTiles::kRows;
  static constexpr int kCols = FmaTiles::kCols;
  static constexpr int kForwardBlocksPerSM = FmaMultiply::kForwardBlocksPerSM;
};

// Most column splits of the forward: their partial results take 3 * splits floats per row.
constexpr int64_t kMaxColumnSplits = 16;

// Column splits of the forward when the device holds `resident_blocks` blocks at once: the
// number that minimises the run time, taken as proportional to waves / splits (each split
// does 1/splits of a row block's work; the last wave costs as much as a full one). Ties go to
// fewer splits; never more splits than a segment can have column tiles.
inline int64_t forward_column_splits(int64_t row_blocks, int64_t rows, int64_t tile_columns,
                                     int64_t resident_blocks) {
  const int64_t most = std::min(kMaxColumnSplits, (rows + tile_columns - 1) / tile_columns);
  const auto waves = [&](int64_t splits) {
    return (row_blocks * splits + resident_blocks - 1) / resident_blocks;
  };
  int64_t best = 1;
  for (int64_t splits = 2; splits <= most; ++splits) {
    if (waves(splits) * best < waves(best) * splits) best = splits;
  }
  return best;
}

// The forward kernel of one multiply kind (its partial results are the same for every kind);
// kResident picks the mma kernel's fast path (see resident_shared_bytes).
template <typename scalar_t, Mma kind, bool kResident = false>
constexpr auto forward_kernel() {
  if constexpr (kind == Mma::Sync) {
    return &supcon_forward_tiled_kernel<MmaMultiply<scalar_t>, scalar_t, kResident>;
  } else if constexpr (kind == Mma::BlockedFma) {
    return &supcon_forward_tiled_kernel<FmaMultiply, scalar_t, false>;
  } else {
    return &supcon_forward_kernel<scalar_t, kind>;
  }
}

// The dynamic shared memory of the mma kernels' fast path, whose block keeps its row tile
// resident, for features of `dim` columns: MmaTiles::resident_bytes(dim) when dim is at most
// kResidentDepth and the launch's device gives `resident_kernel` that much on top of its
// static shared memory (launch.holds_dynamic_shared), else 0 (the chunked kernel runs).
template <typename scalar_t, typename Launch, typename Kernel>
int64_t resident_shared_bytes(const Launch& launch, Kernel resident_kernel, int64_t dim) {
  using M = MmaTiles<scalar_t>;
  if (dim > M::kResidentDepth) return 0;
  const int64_t bytes = M::resident_bytes(dim);
  return launch.holds_dynamic_shared(resident_kernel, bytes) ? bytes : 0;
}

// How a set's pair tags are made (see PairRows): the rows' own indices (the single set, and
// the keys), or the anchors' self indices, -1 where ref_self_index is not given.
enum class Tags { Index, SelfIndex };

// One set of the pair kernels (PairRows) from tensors on the kernels' device; self_index is
// read with Tags::SelfIndex (undefined: no own pairs).
template <typename scalar_t>
PairRows<scalar_t> pair_rows(const at::Tensor& features, const at::Tensor& segments,
                             const at::Tensor& classes, const at::Tensor& positives,
                             Tags tags = Tags::Index, const at::Tensor& self_index = at::Tensor(),
                             const at::Tensor& lse = at::Tensor(),
                             const at::Tensor& grad_loss = at::Tensor()) {
  using acc_t = acc_type<scalar_t>;
  const bool self = tags == Tags::SelfIndex && self_index.defined();
  return PairRows<scalar_t>{
      features.const_data_ptr<scalar_t>(),
      segments.const_data_ptr<int64_t>(),
      classes.const_data_ptr<int32_t>(),
      positives.const_data_ptr<int32_t>(),
      self ? self_index.const_data_ptr<int64_t>() : nullptr,
      tags == Tags::Index,
      lse.defined() ? lse.const_data_ptr<acc_t>() : nullptr,
      grad_loss.defined() ? grad_loss.const_data_ptr<acc_t>() : nullptr};
}

// The backward kernel of one multiply kind over `rows` (num_rows of them, offsets
// row_segments) against `cols`, writing out_i = (1/t) sum_j H_ij col_j into `grad`
// (num_rows x dim). largest_grad: max_i |a_i| on the device, the scale of the fp16/bf16
// mma kernels' pair coefficients (nullptr: a_i = 1).
template <typename scalar_t, Mma kind, typename out_t, typename Launch>
void backward_of_kind(const Launch& launch, const PairRows<scalar_t>& rows,
                      const PairRows<scalar_t>& cols, int64_t num_rows, int64_t dim,
                      const at::Tensor& row_segments, const float* largest_grad,
                      double temperature, bool prevalence, out_t* grad) {
  using acc_t = acc_type<scalar_t>;
  const int64_t num_segments = row_segments.numel() - 1;
  if constexpr (kind == Mma::Sync) {
    using M = MmaTiles<scalar_t>;
    const at::Tensor block_offsets = row_block_offsets(row_segments, M::kRows);
    const auto resident = &supcon_backward_mma_kernel<scalar_t, out_t, true>;
    const int64_t shared_bytes = resident_shared_bytes<scalar_t>(launch, resident, dim);
    launch.with_dynamic_shared(
        shared_bytes,
        shared_bytes > 0 ? resident : &supcon_backward_mma_kernel<scalar_t, out_t, false>,
        row_block_bound(num_rows, num_segments, M::kRows), (dim + M::kOutCols - 1) / M::kOutCols,
        rows, cols, dim, largest_grad, block_offsets.const_data_ptr<int64_t>(), num_segments,
        static_cast<float>(1.0 / temperature), prevalence, grad);
  } else {
    // The register-blocked FMA forward pairs with the FMA backward.
    constexpr Mma backward_kind = kind == Mma::BlockedFma ? Mma::Fma : kind;
    using T = Tiles<acc_t>;
    const at::Tensor block_offsets = row_block_offsets(row_segments, T::kRows);
    launch(&supcon_backward_kernel<scalar_t, backward_kind, out_t>,
           row_block_bound(num_rows, num_segments, T::kRows),
           (dim + T::kOutCols - 1) / T::kOutCols, rows, cols, dim,
           block_offsets.const_data_ptr<int64_t>(), num_segments,
           static_cast<acc_t>(1.0 / temperature), prevalence, grad);
  }
}

// The forward of contiguous, checked inputs on the kernels' device: (loss, lse, positives,
// anchor_grad). With `keys` the anchors contrast against the reference rows, and with
// anchor_gradient anchor_grad (M, D) in the accumulation dtype holds d loss_i / d z_i (the
// backward kernel's pass with rows = anchors, a_i = 1, columns = keys); otherwise it is empty
// (0, D). multiprocessors: the device's SM count, which with the kernel's blocks per SM gives
// how many forward blocks run at once (forward_column_splits).
template <typename Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> launch_supcon_forward(
    const Launch& launch, const at::Tensor& features, const at::Tensor& labels,
    const at::Tensor& segments, double temperature, bool prevalence, int64_t ignore_index,
    const ReferenceRows* keys, bool anchor_gradient, bool allow_tf32, int64_t multiprocessors,
    KernelFamily family) {
  const int64_t rows = features.size(0);
  const int64_t dim = features.size(1);
  const int64_t num_segments = segments.numel() - 1;
  const auto accumulation = features.options().dtype(accumulation_dtype(features));

  at::Tensor loss = at::empty({rows}, features.options());
  at::Tensor lse = at::empty({rows}, accumulation);
  at::Tensor positives = at::empty({rows}, features.options().dtype(at::kInt));
  const bool with_anchor_grad = keys != nullptr && anchor_gradient;
  at::Tensor anchor_grad = at::empty({with_anchor_grad ? rows : 0, dim}, accumulation);
  if (rows == 0) return {loss, lse, positives, anchor_grad};

  at::Tensor classes = at::empty({rows}, features.options().dtype(at::kInt));
  // The contrasts: the rows themselves, or the keys with their own class ids and counts.
  at::Tensor contrast_features = features;
  at::Tensor contrast_segments = segments;
  at::Tensor contrast_classes = classes;
  at::Tensor contrast_positives = positives;
  at::Tensor self_index;
  if (keys == nullptr) {
    classify_rows(launch, labels, labels, ignore_index, nullptr, OwnPair::Row, nullptr, segments,
                  segments, positives.mutable_data_ptr<int32_t>(), classes);
  } else {
    const auto [anchor_labels, key_labels] = common_labels(labels, keys->labels);
    const KeyTable table = classify_keys(launch, key_labels, keys->segments, ignore_index);
    self_index = keys->self_index;
    classify_rows(launch, anchor_labels, key_labels, ignore_index, nullptr, OwnPair::SelfIndex,
                  self_index.defined() ? self_index.const_data_ptr<int64_t>() : nullptr,
                  segments, keys->segments, positives.mutable_data_ptr<int32_t>(), classes);
    contrast_features = keys->features;
    contrast_segments = keys->segments;
    contrast_classes = table.classes;
    contrast_positives = table.positives;
  }
  const int64_t contrasts = contrast_features.size(0);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(),
                                  "mcsc_supcon_forward_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    // The anchors' own pairs: themselves in the single set, else their self indices.
    const Tags anchor_tags = keys == nullptr ? Tags::Index : Tags::SelfIndex;
    const PairRows<scalar_t> anchors =
        pair_rows<scalar_t>(features, segments, classes, positives, anchor_tags, self_index);
    const PairRows<scalar_t> contrast_rows = pair_rows<scalar_t>(
        contrast_features, contrast_segments, contrast_classes, contrast_positives);
    with_mma_kind<scalar_t>(allow_tf32, family, [&](auto tag) {
      constexpr Mma kind = decltype(tag)::value;
      using Shape = ScoreTileShape<scalar_t, kind>;
      const at::Tensor block_offsets = row_block_offsets(segments, Shape::kRows);
      const int64_t grid = row_block_bound(rows, num_segments, Shape::kRows);
      const int64_t splits = forward_column_splits(grid, contrasts, Shape::kCols,
                                                   Shape::kForwardBlocksPerSM * multiprocessors);
      at::Tensor partial = at::empty({3, splits, rows}, lse.options());
      const ForwardPartials<acc_t> partials{partial[0].mutable_data_ptr<acc_t>(),
                                            partial[1].mutable_data_ptr<acc_t>(),
                                            partial[2].mutable_data_ptr<acc_t>()};
      auto kernel = forward_kernel<scalar_t, kind>();
      int64_t shared_bytes = 0;
      if constexpr (kind == Mma::Sync) {
        const auto resident = forward_kernel<scalar_t, kind, true>();
        shared_bytes = resident_shared_bytes<scalar_t>(launch, resident, dim);
        if (shared_bytes > 0) kernel = resident;
      }
      launch.with_dynamic_shared(shared_bytes, kernel, grid, splits, anchors, contrast_rows, dim,
                                 block_offsets.const_data_ptr<int64_t>(), num_segments,
                                 static_cast<acc_t>(1.0 / temperature), prevalence, rows,
                                 splits, partials);
      launch(&supcon_forward_combine_kernel<scalar_t>, (rows + kThreads - 1) / kThreads, 1,
             partials, positives.const_data_ptr<int32_t>(), rows, splits,
             loss.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<acc_t>());
      if (with_anchor_grad) {
        const PairRows<scalar_t> anchors_with_lse = pair_rows<scalar_t>(
            features, segments, classes, positives, anchor_tags, self_index, lse);
        backward_of_kind<scalar_t, kind, acc_t>(
            launch, anchors_with_lse, contrast_rows, rows, dim, segments,
            /*largest_grad=*/nullptr, temperature, prevalence,
            anchor_grad.mutable_data_ptr<acc_t>());
      }
    });
  });
  return {loss, lse, positives, anchor_grad};
}

// The backward of contiguous, checked inputs (grad_loss in the accumulation dtype). Without
// `keys`: the gradient with respect to features (N, D), contiguous. With them: the gradient with
// respect to the keys (K, D), the backward kernel's pass with rows = keys and columns =
// anchors.
template <typename Launch>
at::Tensor launch_supcon_backward(const Launch& launch, const at::Tensor& grad_loss,
                                  const at::Tensor& features, const at::Tensor& labels,
                                  const at::Tensor& segments, const at::Tensor& lse,
                                  const at::Tensor& positives, double temperature,
                                  bool prevalence, int64_t ignore_index, const ReferenceRows* keys,
                                  bool allow_tf32, KernelFamily family) {
  const int64_t rows = features.size(0);
  const int64_t dim = features.size(1);
  at::Tensor grad = at::empty_like(keys == nullptr ? features : keys->features);
  if (grad.size(0) == 0) return grad;
  // No anchors: nothing depends on the keys.
  if (rows == 0) return grad.zero_();

  at::Tensor classes = at::empty({rows}, features.options().dtype(at::kInt));
  KeyTable table;
  if (keys == nullptr) {
    classify_rows(launch, labels, labels, ignore_index, positives.const_data_ptr<int32_t>(),
                  OwnPair::Row, nullptr, segments, segments, /*positives=*/nullptr, classes);
  } else {
    const auto [anchor_labels, key_labels] = common_labels(labels, keys->labels);
    table = classify_keys(launch, key_labels, keys->segments, ignore_index);
    classify_rows(launch, anchor_labels, key_labels, ignore_index,
                  positives.const_data_ptr<int32_t>(), OwnPair::SelfIndex, nullptr, segments,
                  keys->segments, /*positives=*/nullptr, classes);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(),
                                  "mcsc_supcon_backward_cuda", [&] {
    with_mma_kind<scalar_t>(allow_tf32, family, [&](auto tag) {
      constexpr Mma kind = decltype(tag)::value;
      // The largest |a_i| sets the power-of-two scale of the mma kernels' pair coefficients.
      at::Tensor largest_grad;
      if constexpr (kind == Mma::Sync) largest_grad = grad_loss.abs().amax();
      const float* largest =
          largest_grad.defined() ? largest_grad.const_data_ptr<float>() : nullptr;
      if (keys == nullptr) {
        const PairRows<scalar_t> both = pair_rows<scalar_t>(
            features, segments, classes, positives, Tags::Index, at::Tensor(), lse, grad_loss);
        backward_of_kind<scalar_t, kind, scalar_t>(
            launch, both, both, rows, dim, segments, largest, temperature, prevalence,
            grad.mutable_data_ptr<scalar_t>());
      } else {
        const PairRows<scalar_t> key_rows = pair_rows<scalar_t>(
            keys->features, keys->segments, table.classes, table.positives);
        const PairRows<scalar_t> anchors =
            pair_rows<scalar_t>(features, segments, classes, positives, Tags::SelfIndex,
                                keys->self_index, lse, grad_loss);
        backward_of_kind<scalar_t, kind, scalar_t>(
            launch, key_rows, anchors, keys->features.size(0), dim, keys->segments, largest,
            temperature, prevalence, grad.mutable_data_ptr<scalar_t>());
      }
    });
  });
  return grad;
}

}  // namespace cuda
}  // namespace mcsc
