// CPU kernels of the fused supervised contrastive loss (forward and backward).
//
// Both calls of the op run the same tile functions over tiles of anchors (rows) x contrasts
// (columns). Tile products use BLAS (at::mm_out / addmm_) on a per-thread O(tile^2)
// workspace; the exponentials and weighted sums are one vectorised loop over the tile.
//
// Single set (the rows are anchors and contrasts at once): rows are cut into blocks of
// kTileRows inside each segment and only tile pairs (I, J) with I <= J are run: s_ij = s_ji,
// so one tile product serves both blocks, which halves the arithmetic of a row-by-row pass.
// Tile pairs are run in rounds of a round-robin tournament: within a round no block occurs
// twice, so tiles of one round run in parallel and update the accumulators of both their
// blocks directly.
//
// Reference set (anchors against separate key rows): the schedule is rectangular, anchor blocks
// x the key blocks of the matching reference segment, and a tile updates one side only. The
// forward gives each anchor block (or a fixed chunk of its key blocks) to one thread, which
// sweeps the keys; with anchor_gradient it also accumulates the softmax-weighted key sums
// U_i = sum_j w_ij exp(s_ij - m_i) k_j (one more tile product per tile, rescaled when the
// running maximum m_i grows, as in flash attention), so the anchors' gradient needs no second
// pass. The backward gives each key block to one thread, which sweeps the anchors.
//
// In both, every accumulator is owned by one thread at a time and updated in a fixed order
// whatever the thread count, so results are bit-identical from call to call, without atomics.
//
// The forward also checks the values of its inputs (labels, feature values and norms, segment
// offsets, self indices, temperature) with TORCH_CHECK_VALUE, which Python sees as a
// ValueError: it reads them all anyway, and under torch.compile the Python checks of values
// cannot run.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "cpu_math.h"
#include "supcon_checks.h"

namespace mcsc {
namespace {

// Rows of a single-set tile (both sides).
constexpr int64_t kTileRows = 256;
// A reference-set tile: anchors x keys. 512 x 512 (1 MiB of float32 weights, with its anchor
// and key rows about a 2 MiB L2 cache) was the fastest of 128..512 x 256..1024 for 1024-4096
// anchors against 65536 keys (D = 128, 2 threads, CPU time).
constexpr int64_t kAnchorTileRows = 512;
constexpr int64_t kKeyTileRows = 512;
// A reference-set forward with fewer anchor blocks than this splits each block's keys into
// chunks (merged afterwards, in chunk order), so that small batches against a large memory
// still keep every thread busy. A constant, not the thread count: results do not depend on it.
constexpr int64_t kMinForwardTasks = 16;

struct Block {
  int64_t start;
  int64_t size;
};

// A tile: a block of rows (anchors) against a block of columns (contrasts).
struct TilePair {
  Block rows;
  Block cols;
};

using Schedule = std::vector<std::vector<TilePair>>;

// Cuts [begin, end) into blocks of at most `rows` rows.
std::vector<Block> blocks_of(int64_t begin, int64_t end, int64_t rows) {
  std::vector<Block> blocks;
  for (int64_t start = begin; start < end; start += rows) {
    blocks.push_back({start, std::min(rows, end - start)});
  }
  return blocks;
}

// Round 0 holds every diagonal tile; then, per segment, the circle method pairs its T blocks
// in T - 1 (T even) or T (T odd) rounds so that every block meets every other exactly once.
Schedule build_schedule(const std::vector<int64_t>& offsets) {
  Schedule rounds(1);
  for (size_t segment = 0; segment + 1 < offsets.size(); ++segment) {
    const std::vector<Block> blocks = blocks_of(offsets[segment], offsets[segment + 1], kTileRows);
    for (const Block& block : blocks) rounds[0].push_back({block, block});
    const int64_t count = static_cast<int64_t>(blocks.size());
    if (count < 2) continue;
    const int64_t players = count + (count % 2);  // an odd count gets a bye player
    const int64_t circle = players - 1;
    if (static_cast<int64_t>(rounds.size()) < players) rounds.resize(players);
    for (int64_t round = 0; round < circle; ++round) {
      auto add_pair = [&](int64_t a, int64_t b) {
        if (a >= count || b >= count) return;  // a pair with the bye
        rounds[round + 1].push_back({blocks[std::min(a, b)], blocks[std::max(a, b)]});
      };
      add_pair(circle, round);
      for (int64_t k = 1; k < players / 2; ++k) {
        add_pair((round + k) % circle, (round - k + circle) % circle);
      }
    }
  }
  return rounds;
}

// Runs process(task) for every task, each on one thread, with make_worker() giving a thread its
// task function (with its own workspace). Threads take tasks one at a time from a shared
// counter, so a thread slowed down by other work on the machine delays the rest by one task at
// most; which thread runs a task changes no result as long as tasks touch disjoint accumulators.
template <typename Task, typename MakeWorker>
void run_tasks(const std::vector<Task>& tasks, const MakeWorker& make_worker) {
  const int64_t count = static_cast<int64_t>(tasks.size());
  if (count == 0) return;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), count), 1,
                   [&](int64_t, int64_t) {
                     auto process = make_worker();
                     for (int64_t t = next++; t < count; t = next++) process(tasks[t]);
                   });
}

// The rounds one after the other; the tiles of a round touch disjoint accumulators.
template <typename MakeWorker>
void run_schedule(const Schedule& rounds, const MakeWorker& make_worker) {
  for (const auto& tiles : rounds) run_tasks(tiles, make_worker);
}

// The segment offsets, checked, since the kernels index rows by them.
std::vector<int64_t> segment_offsets(const at::Tensor& segments, int64_t rows,
                                     const char* name = "segments", const char* size = "N") {
  const at::Tensor offsets = segments.to(at::kCPU, at::kLong).contiguous();
  const int64_t* data = offsets.data_ptr<int64_t>();
  std::vector<int64_t> result(data, data + offsets.numel());
  TORCH_CHECK_VALUE(result.front() == 0 && result.back() == rows, "mcsc: ", name,
                    " must start at 0 and end at ", size, "=", rows, ", got ", result.front(),
                    " ... ", result.back());
  for (size_t k = 0; k + 1 < result.size(); ++k) {
    TORCH_CHECK_VALUE(result[k] <= result[k + 1], "mcsc: ", name,
                      " must be non-decreasing offsets");
  }
  return result;
}

// Class ids 0..C-1 (-1 for ignored rows) and the number C. Ids below N are used as they are;
// larger or negative ones are replaced by their rank among the ids present, so that the
// per-class state (C <= N classes x D) is never larger than the features, whatever the ids
// (e.g. 10**9, or {0, 60000} in two rows).
struct ClassIds {
  std::vector<int32_t> label;
  int32_t num_classes = 0;
};

template <typename IsIgnored>
ClassIds compact_class_ids(const int64_t* raw, int64_t n, const IsIgnored& is_ignored) {
  ClassIds ids{std::vector<int32_t>(n, -1), 0};
  int64_t low = std::numeric_limits<int64_t>::max(), high = std::numeric_limits<int64_t>::min();
  for (int64_t i = 0; i < n; ++i) {
    if (is_ignored(i)) continue;
    low = std::min(low, raw[i]);
    high = std::max(high, raw[i]);
  }
  if (low > high) return ids;  // no valid row
  if (low >= 0 && high < n) {
    for (int64_t i = 0; i < n; ++i) {
      if (!is_ignored(i)) ids.label[i] = static_cast<int32_t>(raw[i]);
    }
    ids.num_classes = static_cast<int32_t>(high + 1);
    return ids;
  }
  std::vector<int64_t> present;
  for (int64_t i = 0; i < n; ++i) {
    if (!is_ignored(i)) present.push_back(raw[i]);
  }
  std::sort(present.begin(), present.end());
  present.erase(std::unique(present.begin(), present.end()), present.end());
  for (int64_t i = 0; i < n; ++i) {
    if (is_ignored(i)) continue;
    ids.label[i] = static_cast<int32_t>(
        std::lower_bound(present.begin(), present.end(), raw[i]) - present.begin());
  }
  ids.num_classes = static_cast<int32_t>(present.size());
  return ids;
}

// Per-row facts the pairwise passes need: the compact label (-1 for ignored rows) and the
// weights of supcon_math.h. A reference set has one table for its anchors and one for its keys:
// an anchor's same_weight is 1 / |P(i)|, a key's contrast_weight 1 / n_{y_j} (its class's valid
// keys in its segment), which is what `positives` = |P(i)| and n_{y_j} - 1 give.
template <typename acc_t>
struct RowTable {
  std::vector<int32_t> label;
  std::vector<int32_t> positives;
  std::vector<acc_t> same_weight;
  std::vector<acc_t> contrast_weight;
  std::vector<acc_t> norm;  // |z_i|, for the similarity bound of a tile

  RowTable(std::vector<int32_t> labels, std::vector<int32_t> positive_counts, bool prevalence,
           const acc_t* z, int64_t dim)
      : label(std::move(labels)), positives(std::move(positive_counts)) {
    const size_t n = label.size();
    same_weight.resize(n);
    contrast_weight.resize(n);
    norm.resize(n);
    for (size_t i = 0; i < n; ++i) {
      same_weight[i] = same_class_weight<acc_t>(positives[i], prevalence);
      contrast_weight[i] = mcsc::contrast_weight<acc_t>(positives[i], prevalence);
      acc_t square = 0;
      for (int64_t d = 0; d < dim; ++d) square += z[i * dim + d] * z[i * dim + d];
      norm[i] = std::sqrt(square);
    }
  }

  acc_t block_max_norm(const Block& block) const {
    return *std::max_element(norm.begin() + block.start, norm.begin() + block.start + block.size);
  }
};

// Who pairs with whom in a tile: the rows' table (anchors), the columns' table (contrasts) and
// each row's own column, which takes no part. In the single-set call both tables are one, a
// row's own column is the row itself, and pairs are symmetric: a tile also updates the state of
// its columns (except a diagonal tile, whose columns are its rows). In a reference set a row's
// own column is its ref_self_index entry (or none), and only rows are updated.
template <typename scalar_t>
struct Pairing {
  const RowTable<scalar_t>& rows;
  const RowTable<scalar_t>& cols;
  bool symmetric;
  const int64_t* self = nullptr;  // reference set: each anchor's own key row or -1 (or none)

  // The tile column that is row i itself, or -1.
  int64_t own_column(const TilePair& tile, int64_t i) const {
    int64_t own = tile.rows.start + i;
    if (!symmetric) {
      if (self == nullptr) return -1;
      own = self[tile.rows.start + i];
      if (own < 0) return -1;
    }
    const int64_t column = own - tile.cols.start;
    return column >= 0 && column < tile.cols.size ? column : -1;
  }

  // A single-set tile of one block against itself.
  bool diagonal(const TilePair& tile) const {
    return symmetric && tile.rows.start == tile.cols.start;
  }

  // Rows that take part: every valid row of a single set (all are contrasts), only the anchors
  // (a positive) of a reference set.
  bool row_takes_part(int64_t row) const {
    return symmetric ? rows.label[row] >= 0 : rows.positives[row] > 0;
  }

  // Cauchy-Schwarz bound of every s_ij in the tile: max|z_i| max|k_j| / t.
  scalar_t similarity_bound(const TilePair& tile, scalar_t inv_t) const {
    return rows.block_max_norm(tile.rows) * cols.block_max_norm(tile.cols) * inv_t;
  }
};

// With shift = the tile's similarity bound, exp(s_ij - shift) <= 1 for every pair, and each
// row's largest term is >= exp(-2 * bound): within SharedShiftRange, one shift serves the tile.
template <typename scalar_t>
bool shared_shift_is_safe(scalar_t bound) {
  return 2 * bound <= SharedShiftRange<scalar_t>::value;
}

// Visits each segment's rows grouped by class: fn(segment, class_sum) where class_sum(c) points
// at sum_{valid j of class c in the segment} z_j (D values). Only the classes a segment uses
// are touched, so many small segments stay O(N D).
template <typename scalar_t, typename F>
void for_each_segment_class_sums(const scalar_t* z, int64_t dim, const int32_t* label,
                                 const std::vector<int64_t>& offsets, int32_t num_classes,
                                 const F& fn) {
  std::vector<scalar_t> sums(static_cast<size_t>(num_classes) * dim, scalar_t(0));
  for (size_t segment = 0; segment + 1 < offsets.size(); ++segment) {
    const int64_t begin = offsets[segment], end = offsets[segment + 1];
    for (int64_t i = begin; i < end; ++i) {
      if (label[i] < 0) continue;
      scalar_t* sum = sums.data() + static_cast<int64_t>(label[i]) * dim;
      const scalar_t* row = z + i * dim;
      for (int64_t d = 0; d < dim; ++d) sum[d] += row[d];
    }
    fn(segment, [&](int32_t c) { return sums.data() + static_cast<int64_t>(c) * dim; });
    for (int64_t i = begin; i < end; ++i) {
      if (label[i] >= 0) std::fill_n(sums.data() + static_cast<int64_t>(label[i]) * dim, dim, 0);
    }
  }
}

template <typename scalar_t>
scalar_t dot(const scalar_t* a, const scalar_t* b, int64_t dim) {
  scalar_t total = 0;
#pragma omp simd reduction(+ : total)
  for (int64_t d = 0; d < dim; ++d) total += a[d] * b[d];
  return total;
}

// Maxima of a tile of similarities per row and per column (-inf where nothing contributes).
template <typename scalar_t>
struct TileMaxima {
  std::vector<scalar_t> row, col;

  void compute(const scalar_t* s, int64_t rows, int64_t cols) {
    const scalar_t lowest = -std::numeric_limits<scalar_t>::infinity();
    row.assign(rows, lowest);
    col.assign(cols, lowest);
    for (int64_t i = 0; i < rows; ++i) {
      const scalar_t* s_row = s + i * cols;
      scalar_t* col_max = col.data();
      scalar_t row_max = lowest;
#pragma omp simd reduction(max : row_max)
      for (int64_t j = 0; j < cols; ++j) {
        row_max = row_max < s_row[j] ? s_row[j] : row_max;
        col_max[j] = col_max[j] < s_row[j] ? s_row[j] : col_max[j];
      }
      row[i] = row_max;
    }
  }
};

// The tile of similarities s_ij = z_i . k_j / t in the workspace (rows from z_rows, columns
// from z_cols; the same tensor in a single set).
template <typename scalar_t>
at::Tensor similarity_tile(const at::Tensor& z_rows, const at::Tensor& z_cols,
                           const TilePair& tile, scalar_t inv_t, at::Tensor& workspace) {
  const int64_t height = tile.rows.size, width = tile.cols.size;
  at::Tensor s = workspace.view({-1}).narrow(0, 0, height * width).view({height, width});
  // beta = 0: the workspace's previous contents are ignored.
  at::addmm_out(s, s, z_rows.narrow(0, tile.rows.start, height),
                z_cols.narrow(0, tile.cols.start, width).t(), 0, inv_t);
  return s;
}

// Sets s_ij = -inf where the pair takes no part (a row that takes no part, an ignored column,
// or a row's own column): then exp(-inf) = 0 removes it from every sum, maximum and gradient
// however large s_ij was.
template <typename scalar_t>
void exclude_non_contributing(scalar_t* s, const TilePair& tile,
                              const Pairing<scalar_t>& pairs) {
  const int64_t height = tile.rows.size, width = tile.cols.size;
  const scalar_t excluded = -std::numeric_limits<scalar_t>::infinity();
  const int32_t* label_c = pairs.cols.label.data() + tile.cols.start;
  for (int64_t i = 0; i < height; ++i) {
    scalar_t* s_row = s + i * width;
    if (!pairs.row_takes_part(tile.rows.start + i)) {
      std::fill_n(s_row, width, excluded);
      continue;
    }
    for (int64_t j = 0; j < width; ++j) {
      if (label_c[j] < 0) s_row[j] = excluded;
    }
    const int64_t own = pairs.own_column(tile, i);
    if (own >= 0) s_row[own] = excluded;
  }
}

// Running log-sum-exp per row (anchor), and with a reference set's anchor gradient the
// weighted key sums U (rows x D, relative to the same running maximum).
template <typename scalar_t>
struct ForwardState {
  std::vector<scalar_t> running_max, running_sum;
  scalar_t* key_sum = nullptr;  // U, or null when not kept
  int64_t dim = 0;
};

// Per-thread scratch of the forward's tiles.
template <typename scalar_t>
struct ForwardWorkspace {
  at::Tensor similarities;  // rows x columns of a tile; the weights p_ij when they are kept
  TileMaxima<scalar_t> maxima;  // per row and column, for tiles of a wide range
  std::vector<scalar_t> col_sum;  // the tile's partial sums of its columns
  std::vector<scalar_t> rescale;  // per row: exp(old - new running maximum), 1 when unchanged
};

// Merges a row's tile sum (relative to shift) into its state; with kKeepWeights records by how
// much the row's earlier key sum must shrink to stay relative to the running maximum.
template <bool kKeepWeights, typename scalar_t>
void merge_row(ForwardState<scalar_t>& state, ForwardWorkspace<scalar_t>& work, int64_t row,
               int64_t i, scalar_t shift, scalar_t row_sum) {
  const scalar_t before = state.running_max[row];
  merge_log_sum_exp(state.running_max[row], state.running_sum[row], shift, row_sum);
  if constexpr (kKeepWeights) {
    const scalar_t after = state.running_max[row];
    work.rescale[i] = after == before ? scalar_t(1) : std::exp(before - after);
  }
}

// Adds the tile's partial sums of each column (shifted by shift(j)) to the column rows' states
// (single set only; a diagonal tile's columns are its rows, already merged).
template <typename scalar_t, typename Shift>
void merge_columns(const TilePair& tile, const Pairing<scalar_t>& pairs,
                   const std::vector<scalar_t>& col_sum, const Shift& shift,
                   ForwardState<scalar_t>& state) {
  if (!pairs.symmetric || pairs.diagonal(tile)) return;
  const int64_t c0 = tile.cols.start;
  for (int64_t j = 0; j < tile.cols.size; ++j) {
    merge_log_sum_exp(state.running_max[c0 + j], state.running_sum[c0 + j], shift(j), col_sum[j]);
  }
}

// A tile whose bound is within SharedShiftRange (shared_shift_is_safe): one exponential
// exp(s_ij - bound) <= 1 per pair serves both its row and (single set) its column, with no pass
// over the tile to find maxima and no masking (every weight of an ignored row or column is
// already 0). A reference set's row shifts by max(bound, its running maximum) instead, which
// keeps its kept weights p_ij relative to the running maximum (no rescale of the tile needed).
// With kKeepWeights the tile's similarities are overwritten by the weights
// p_ij = w_ij exp(s_ij - shift_i) (0 for pairs that take no part).
template <bool kKeepWeights, typename scalar_t>
void forward_tile_shared_shift(const TilePair& tile, scalar_t* s, scalar_t bound,
                               const Pairing<scalar_t>& pairs, ForwardWorkspace<scalar_t>& work,
                               ForwardState<scalar_t>& state) {
  const int64_t r0 = tile.rows.start, c0 = tile.cols.start;
  const int64_t height = tile.rows.size, width = tile.cols.size;
  const RowTable<scalar_t>& rows = pairs.rows;
  const int32_t* label_c = pairs.cols.label.data() + c0;
  const scalar_t* same_c = pairs.cols.same_weight.data() + c0;
  const scalar_t* contrast_c = pairs.cols.contrast_weight.data() + c0;
  scalar_t* col = work.col_sum.data();
  for (int64_t i = 0; i < height; ++i) {
    scalar_t* s_row = s + i * width;
    if (!pairs.symmetric && rows.positives[r0 + i] <= 0) {
      // not an anchor: no weight, no state (a single set's such rows are still contrasts)
      if constexpr (kKeepWeights) std::fill_n(s_row, width, scalar_t(0));
      if constexpr (kKeepWeights) work.rescale[i] = 1;
      continue;
    }
    const int32_t label_i = rows.label[r0 + i];
    const scalar_t same_i = rows.same_weight[r0 + i];
    const scalar_t contrast_i = rows.contrast_weight[r0 + i];
    const int64_t own = pairs.own_column(tile, i);
    const scalar_t shift =
        pairs.symmetric ? bound : std::max(bound, state.running_max[r0 + i]);
    scalar_t row_sum = 0;
    if (own >= 0) {
#pragma omp simd reduction(+ : row_sum)
      for (int64_t j = 0; j < width; ++j) {
        const scalar_t w = j == own ? scalar_t(0)
                                    : pair_weight(label_i, label_c[j], same_i, contrast_c[j]);
        if constexpr (kKeepWeights) {
          s_row[j] = w * exp_vectorizable(s_row[j] - shift);
          row_sum += s_row[j];
        } else {
          row_sum += w * exp_vectorizable(s_row[j] - shift);
        }
      }
    } else if (pairs.symmetric) {
#pragma omp simd reduction(+ : row_sum)
      for (int64_t j = 0; j < width; ++j) {
        const scalar_t e = exp_vectorizable(s_row[j] - bound);
        row_sum += e * pair_weight(label_i, label_c[j], same_i, contrast_c[j]);
        col[j] += e * pair_weight(label_c[j], label_i, same_c[j], contrast_i);
      }
    } else {
#pragma omp simd reduction(+ : row_sum)
      for (int64_t j = 0; j < width; ++j) {
        const scalar_t p = pair_weight(label_i, label_c[j], same_i, contrast_c[j]) *
                           exp_vectorizable(s_row[j] - shift);
        if constexpr (kKeepWeights) s_row[j] = p;
        row_sum += p;
      }
    }
    merge_row<kKeepWeights>(state, work, r0 + i, i, shift, row_sum);
  }
  merge_columns(tile, pairs, work.col_sum, [bound](int64_t) { return bound; }, state);
}

// A tile of a wide similarity range: rows (and, single set off the diagonal, columns) are each
// shifted by their own maximum over the pairs that take part (a reference set's rows by at
// least their running maximum, as above). Overwrites the tile's similarities (with the weights
// p_ij under kKeepWeights).
template <bool kKeepWeights, typename scalar_t>
void forward_tile_own_shifts(const TilePair& tile, scalar_t* s, const Pairing<scalar_t>& pairs,
                             ForwardWorkspace<scalar_t>& work, ForwardState<scalar_t>& state) {
  const int64_t r0 = tile.rows.start, c0 = tile.cols.start;
  const int64_t height = tile.rows.size, width = tile.cols.size;
  const RowTable<scalar_t>& rows = pairs.rows;
  const int32_t* label_c = pairs.cols.label.data() + c0;
  const scalar_t* same_c = pairs.cols.same_weight.data() + c0;
  const scalar_t* contrast_c = pairs.cols.contrast_weight.data() + c0;
  const scalar_t none = -std::numeric_limits<scalar_t>::infinity();
  exclude_non_contributing(s, tile, pairs);
  TileMaxima<scalar_t>& maxima = work.maxima;
  maxima.compute(s, height, width);
  for (int64_t i = 0; i < height; ++i) {
    scalar_t* s_row = s + i * width;
    const int32_t label_i = rows.label[r0 + i];
    const scalar_t same_i = rows.same_weight[r0 + i];
    if (maxima.row[i] == none) {
      if constexpr (kKeepWeights) std::fill_n(s_row, width, scalar_t(0));
      if constexpr (kKeepWeights) work.rescale[i] = 1;
      continue;
    }
    const scalar_t shift =
        pairs.symmetric ? maxima.row[i] : std::max(maxima.row[i], state.running_max[r0 + i]);
    scalar_t row_sum = 0;
#pragma omp simd reduction(+ : row_sum)
    for (int64_t j = 0; j < width; ++j) {
      const scalar_t p = pair_weight(label_i, label_c[j], same_i, contrast_c[j]) *
                         exp_vectorizable(s_row[j] - shift);
      if constexpr (kKeepWeights) s_row[j] = p;
      row_sum += p;
    }
    merge_row<kKeepWeights>(state, work, r0 + i, i, shift, row_sum);
  }
  if (!pairs.symmetric || pairs.diagonal(tile)) return;
  scalar_t* col = work.col_sum.data();
  for (int64_t i = 0; i < height; ++i) {
    const scalar_t* s_row = s + i * width;
    const int32_t label_i = rows.label[r0 + i];
    const scalar_t contrast_i = rows.contrast_weight[r0 + i];
    for (int64_t j = 0; j < width; ++j) {
      if (maxima.col[j] == none) continue;
      col[j] += pair_weight(label_c[j], label_i, same_c[j], contrast_i) *
                exp_vectorizable(s_row[j] - maxima.col[j]);
    }
  }
  merge_columns(tile, pairs, work.col_sum, [&maxima](int64_t j) { return maxima.col[j]; },
                state);
}

// Adds one tile's terms to the log-sum-exp states of its rows (and, single set, its columns).
// With kKeepWeights (a reference set's anchor gradient) it also adds the tile's weighted keys
// to the rows' key sums: U_I = rescale * U_I + P_IJ k_J, one more tile product.
template <bool kKeepWeights, typename scalar_t>
void forward_tile(const TilePair& tile, scalar_t inv_t, const at::Tensor& z_rows,
                  const at::Tensor& z_cols, const Pairing<scalar_t>& pairs,
                  ForwardWorkspace<scalar_t>& work, ForwardState<scalar_t>& state) {
  const at::Tensor s = similarity_tile(z_rows, z_cols, tile, inv_t, work.similarities);
  if (pairs.symmetric) work.col_sum.assign(tile.cols.size, scalar_t(0));
  if constexpr (kKeepWeights) work.rescale.resize(tile.rows.size);
  const scalar_t bound = pairs.similarity_bound(tile, inv_t);
  if (shared_shift_is_safe(bound)) {
    forward_tile_shared_shift<kKeepWeights>(tile, s.data_ptr<scalar_t>(), bound, pairs, work,
                                            state);
  } else {
    forward_tile_own_shifts<kKeepWeights>(tile, s.data_ptr<scalar_t>(), pairs, work, state);
  }
  if constexpr (kKeepWeights) {
    const int64_t dim = state.dim;
    for (int64_t i = 0; i < tile.rows.size; ++i) {
      if (work.rescale[i] == scalar_t(1)) continue;
      scalar_t* u = state.key_sum + (tile.rows.start + i) * dim;
      for (int64_t d = 0; d < dim; ++d) u[d] *= work.rescale[i];
    }
    at::Tensor u = at::from_blob(state.key_sum + tile.rows.start * dim, {tile.rows.size, dim},
                                 z_rows.options());
    u.addmm_(s, z_cols.narrow(0, tile.cols.start, tile.cols.size));
  }
}

// Labels as int64 on the CPU, checked to be >= 0 or ignore_index.
std::vector<int64_t> checked_labels(const at::Tensor& labels, int64_t ignore_index,
                                    const char* name) {
  const at::Tensor labels64 = labels.to(at::kCPU, at::kLong).contiguous();
  const int64_t* raw = labels64.data_ptr<int64_t>();
  const int64_t n = labels64.numel();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(raw[i] >= 0 || raw[i] == ignore_index, "mcsc: ", name,
                      " must be in [0, C) or equal ignore_index=", ignore_index, "; found ",
                      raw[i]);
  }
  return std::vector<int64_t>(raw, raw + n);
}

// n_{y_j} - 1 per valid row j (the number of other valid rows of its class in its segment), -1
// for ignored rows: a single set's |P(j)|, a reference set's key "positives" whose
// contrast_weight is 1 / n_{y_j}.
std::vector<int32_t> count_same_class(const std::vector<int32_t>& label, int32_t num_classes,
                                      const std::vector<int64_t>& offsets) {
  std::vector<int32_t> positives(label.size(), -1);
  std::vector<int32_t> class_size(num_classes, 0);
  for (size_t segment = 0; segment + 1 < offsets.size(); ++segment) {
    const int64_t begin = offsets[segment], end = offsets[segment + 1];
    for (int64_t i = begin; i < end; ++i) {
      if (label[i] >= 0) ++class_size[label[i]];
    }
    for (int64_t i = begin; i < end; ++i) {
      if (label[i] >= 0) positives[i] = class_size[label[i]] - 1;
    }
    for (int64_t i = begin; i < end; ++i) {
      if (label[i] >= 0) class_size[label[i]] = 0;
    }
  }
  return positives;
}

// Compact class ids (-1 for ignored rows), checked to be >= 0 or ignore_index, and |P(i)| per
// row (-1 for ignored rows).
std::pair<ClassIds, std::vector<int32_t>> count_positives(const at::Tensor& labels,
                                                          int64_t ignore_index,
                                                          const std::vector<int64_t>& offsets) {
  const std::vector<int64_t> raw = checked_labels(labels, ignore_index, "labels");
  const int64_t n = static_cast<int64_t>(raw.size());
  ClassIds ids =
      compact_class_ids(raw.data(), n, [&](int64_t i) { return raw[i] == ignore_index; });
  std::vector<int32_t> positives = count_same_class(ids.label, ids.num_classes, offsets);
  return {std::move(ids), std::move(positives)};
}

// Every feature finite and the similarity bound max_i |z_i| max_j |k_j| / temperature within
// similarity_limit, from the norms RowTable computed (a NaN or infinite value, or a squared norm
// past the dtype's range, makes a norm non-finite). `keys` is null in a single set.
template <typename scalar_t>
void check_feature_values(const RowTable<scalar_t>& rows, const scalar_t* z, int64_t dim,
                          double temperature, const RowTable<scalar_t>* keys = nullptr,
                          const scalar_t* k = nullptr) {
  const auto largest_norm = [dim](const RowTable<scalar_t>& table, const scalar_t* data,
                                  const char* name) {
    double largest = 0;
    for (size_t i = 0; i < table.norm.size(); ++i) {
      if (!std::isfinite(table.norm[i])) {
        const scalar_t* row = data + static_cast<int64_t>(i) * dim;
        TORCH_CHECK_VALUE(
            std::all_of(row, row + dim, [](scalar_t x) { return std::isfinite(x); }), "mcsc: ",
            name, " contain NaN or infinite values (row ", i, ")");
      }
      largest = std::max(largest, static_cast<double>(table.norm[i]));
    }
    return largest;
  };
  const double largest = largest_norm(rows, z, "features");
  const double bound =
      largest * (keys == nullptr ? largest : largest_norm(*keys, k, "ref_features")) /
      temperature;
  TORCH_CHECK_VALUE(bound <= static_cast<double>(similarity_limit<scalar_t>()),
                    "mcsc: features are too large: ",
                    keys == nullptr ? "max_i |z_i|^2 / temperature"
                                    : "max_i |features_i| max_j |ref_features_j| / temperature",
                    " = ", bound, " exceeds ", similarity_limit<scalar_t>(), " for ",
                    c10::CppTypeToScalarType<scalar_t>::value,
                    " sums, past which the gradient's rounding error exceeds 1e-3; normalise the "
                    "features or raise the temperature");
}

// 1 / temperature, checked to be a finite number > 0 in scalar_t.
template <typename scalar_t>
scalar_t inverse_temperature(double temperature) {
  const scalar_t inverse = scalar_t(1) / static_cast<scalar_t>(temperature);
  TORCH_CHECK_VALUE(temperature > 0 && std::isfinite(inverse),
                    "mcsc: temperature must be > 0 with 1 / temperature finite in ",
                    c10::CppTypeToScalarType<scalar_t>::value, ", got ", temperature);
  return inverse;
}

constexpr std::initializer_list<at::ScalarType> kFeatureDtypes = {at::kFloat, at::kDouble};

// ---- The reference set ---------------------------------------------------------------------

// What both passes of a reference-set call know of its rows: class ids compact over anchors and
// keys together, |P(i)| per anchor, n_{y_j} - 1 per key, both sets' segment offsets and each
// anchor's own key row (checked: -1, or a key of the anchor's reference segment with the
// anchor's label).
struct ReferenceRows {
  std::vector<int64_t> anchor_offsets, key_offsets;
  std::vector<int32_t> anchor_label, key_label;
  std::vector<int32_t> anchor_positives, key_positives;
  std::vector<int64_t> self;  // empty without ref_self_index
  int32_t num_classes = 0;
};

ReferenceRows reference_rows(const at::Tensor& labels, const at::Tensor& segments,
                             const at::Tensor& ref_labels, const at::Tensor& ref_segments,
                             const std::optional<at::Tensor>& ref_self_index,
                             int64_t ignore_index) {
  ReferenceRows rows;
  const int64_t m = labels.size(0), k = ref_labels.size(0);
  rows.anchor_offsets = segment_offsets(segments, m);
  rows.key_offsets = segment_offsets(ref_segments, k, "ref_segments", "K");
  std::vector<int64_t> raw = checked_labels(labels, ignore_index, "labels");
  const std::vector<int64_t> raw_keys = checked_labels(ref_labels, ignore_index, "ref_labels");
  raw.insert(raw.end(), raw_keys.begin(), raw_keys.end());
  ClassIds ids = compact_class_ids(raw.data(), m + k,
                                   [&](int64_t i) { return raw[i] == ignore_index; });
  rows.num_classes = ids.num_classes;
  rows.anchor_label.assign(ids.label.begin(), ids.label.begin() + m);
  rows.key_label.assign(ids.label.begin() + m, ids.label.end());
  rows.key_positives = count_same_class(rows.key_label, rows.num_classes, rows.key_offsets);

  if (ref_self_index.has_value()) {
    const at::Tensor index = ref_self_index->to(at::kCPU, at::kLong).contiguous();
    rows.self.assign(index.data_ptr<int64_t>(), index.data_ptr<int64_t>() + m);
    for (size_t segment = 0; segment + 1 < rows.anchor_offsets.size(); ++segment) {
      const int64_t low = rows.key_offsets[segment], high = rows.key_offsets[segment + 1];
      for (int64_t i = rows.anchor_offsets[segment]; i < rows.anchor_offsets[segment + 1]; ++i) {
        const int64_t own = rows.self[i];
        if (own == -1) continue;
        TORCH_CHECK_VALUE(own >= 0 && own < k,
                          "mcsc: ref_self_index must be -1 or a row of ref_features in [0, ", k,
                          "); anchor ", i, " names ", own);
        TORCH_CHECK_VALUE(own >= low && own < high,
                          "mcsc: ref_self_index must name a reference row of the anchor's own "
                          "segment; anchor ",
                          i, " names row ", own, " outside [", low, ", ", high, ")");
        TORCH_CHECK_VALUE(raw[m + own] == raw[i],
                          "mcsc: ref_self_index must name reference rows with the anchor's own "
                          "label (the anchor's copy in the reference set); anchor ",
                          i, " names row ", own);
      }
    }
  }

  // |P(i)| = n_{y_i} - [self_i >= 0], n counted over the valid keys of the reference segment.
  rows.anchor_positives.assign(m, -1);
  std::vector<int32_t> class_size(rows.num_classes, 0);
  for (size_t segment = 0; segment + 1 < rows.anchor_offsets.size(); ++segment) {
    const int64_t key_begin = rows.key_offsets[segment], key_end = rows.key_offsets[segment + 1];
    for (int64_t j = key_begin; j < key_end; ++j) {
      if (rows.key_label[j] >= 0) ++class_size[rows.key_label[j]];
    }
    for (int64_t i = rows.anchor_offsets[segment]; i < rows.anchor_offsets[segment + 1]; ++i) {
      if (rows.anchor_label[i] < 0) continue;
      const bool has_self = !rows.self.empty() && rows.self[i] >= 0;
      rows.anchor_positives[i] = class_size[rows.anchor_label[i]] - (has_self ? 1 : 0);
    }
    for (int64_t j = key_begin; j < key_end; ++j) {
      if (rows.key_label[j] >= 0) class_size[rows.key_label[j]] = 0;
    }
  }
  return rows;
}

// A reference-set task: one block of rows owned by one thread, against the blocks of the other
// set in [others.start, others.start + others.size), in order. `part` numbers the key chunk
// of a split forward sweep (0 otherwise).
struct Sweep {
  Block owned;
  Block others;
  int64_t part = 0;
};

// The forward's sweeps: every anchor block against the keys of its reference segment, each
// key range cut into `parts` chunks of whole key blocks when there are few anchor blocks.
std::vector<Sweep> forward_sweeps(const ReferenceRows& rows, int64_t& parts) {
  std::vector<Sweep> sweeps;
  int64_t anchor_blocks = 0;
  for (size_t segment = 0; segment + 1 < rows.anchor_offsets.size(); ++segment) {
    anchor_blocks += static_cast<int64_t>(
        blocks_of(rows.anchor_offsets[segment], rows.anchor_offsets[segment + 1],
                  kAnchorTileRows)
            .size());
  }
  parts = anchor_blocks == 0 ? 1
                             : std::max<int64_t>(1, (kMinForwardTasks + anchor_blocks - 1) /
                                                        anchor_blocks);
  for (size_t segment = 0; segment + 1 < rows.anchor_offsets.size(); ++segment) {
    const int64_t key_begin = rows.key_offsets[segment], key_end = rows.key_offsets[segment + 1];
    const int64_t key_blocks = (key_end - key_begin + kKeyTileRows - 1) / kKeyTileRows;
    for (const Block& block : blocks_of(rows.anchor_offsets[segment],
                                        rows.anchor_offsets[segment + 1], kAnchorTileRows)) {
      for (int64_t part = 0; part < parts; ++part) {
        // chunk `part` of the key blocks, as even as whole blocks allow (empty ones skipped)
        const int64_t first = key_blocks * part / parts, last = key_blocks * (part + 1) / parts;
        if (first == last) continue;
        const int64_t start = key_begin + first * kKeyTileRows;
        const int64_t stop = std::min(key_end, key_begin + last * kKeyTileRows);
        sweeps.push_back({block, {start, stop - start}, part});
      }
    }
  }
  return sweeps;
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> reference_forward(
    const at::Tensor& features, const at::Tensor& labels, const at::Tensor& segments,
    double temperature, bool prevalence, int64_t ignore_index, const at::Tensor& ref_features,
    const at::Tensor& ref_labels, const at::Tensor& ref_segments,
    const std::optional<at::Tensor>& ref_self_index, bool anchor_gradient) {
  const at::Tensor a = features.detach().contiguous();
  const at::Tensor k = ref_features.detach().contiguous();
  const int64_t m = a.size(0), dim = a.size(1);
  const scalar_t inv_t = inverse_temperature<scalar_t>(temperature);
  ReferenceRows facts =
      reference_rows(labels, segments, ref_labels, ref_segments, ref_self_index, ignore_index);
  const scalar_t* a_data = a.data_ptr<scalar_t>();
  const scalar_t* k_data = k.data_ptr<scalar_t>();
  const RowTable<scalar_t> anchors(facts.anchor_label, facts.anchor_positives, prevalence, a_data,
                                   dim);
  const RowTable<scalar_t> keys(facts.key_label, facts.key_positives, prevalence, k_data, dim);
  check_feature_values(anchors, a_data, dim, temperature, &keys, k_data);
  const Pairing<scalar_t> pairs{anchors, keys, false,
                                facts.self.empty() ? nullptr : facts.self.data()};

  at::Tensor loss = at::zeros({m}, a.options());
  at::Tensor lse = at::zeros({m}, a.options());
  at::Tensor positives_out = at::empty({m}, a.options().dtype(at::kInt));
  std::copy(anchors.positives.begin(), anchors.positives.end(),
            positives_out.data_ptr<int32_t>());
  at::Tensor anchor_grad = at::zeros({anchor_gradient ? m : 0, dim}, a.options());

  // One state per key chunk: chunk 0's key sums are the output itself, later chunks' are
  // merged into it in chunk order.
  int64_t parts = 1;
  const std::vector<Sweep> sweeps = forward_sweeps(facts, parts);
  std::vector<ForwardState<scalar_t>> states(parts);
  std::vector<at::Tensor> chunk_key_sums(parts);
  for (int64_t part = 0; part < parts; ++part) {
    ForwardState<scalar_t>& state = states[part];
    state.running_max.assign(m, -std::numeric_limits<scalar_t>::infinity());
    state.running_sum.assign(m, scalar_t(0));
    state.dim = dim;
    if (anchor_gradient) {
      chunk_key_sums[part] = part == 0 ? anchor_grad : at::zeros({m, dim}, a.options());
      state.key_sum = chunk_key_sums[part].data_ptr<scalar_t>();
    }
  }

  const auto sweep_keys = [&](auto keep_weights) {
    constexpr bool kKeep = decltype(keep_weights)::value;
    run_tasks(sweeps, [&] {
      return [&, work = ForwardWorkspace<scalar_t>{at::empty({kAnchorTileRows * kKeyTileRows},
                                                             a.options())}](
                 const Sweep& sweep) mutable {
        for (const Block& key_block :
             blocks_of(sweep.others.start, sweep.others.start + sweep.others.size,
                       kKeyTileRows)) {
          forward_tile<kKeep>({sweep.owned, key_block}, inv_t, a, k, pairs, work,
                              states[sweep.part]);
        }
      };
    });
  };
  if (anchor_gradient) {
    sweep_keys(std::true_type{});
  } else {
    sweep_keys(std::false_type{});
  }

  // The chunks' states merged into chunk 0's, in chunk order.
  ForwardState<scalar_t>& state = states[0];
  for (int64_t part = 1; part < parts; ++part) {
    const ForwardState<scalar_t>& other = states[part];
    for (int64_t i = 0; i < m; ++i) {
      const scalar_t before = state.running_max[i];
      merge_log_sum_exp(state.running_max[i], state.running_sum[i], other.running_max[i],
                        other.running_sum[i]);
      if (!anchor_gradient || other.running_sum[i] == scalar_t(0)) continue;
      const scalar_t after = state.running_max[i];
      const scalar_t keep = after == before ? scalar_t(1) : std::exp(before - after);
      const scalar_t add = std::exp(other.running_max[i] - after);
      scalar_t* u = state.key_sum + i * dim;
      const scalar_t* v = other.key_sum + i * dim;
      for (int64_t d = 0; d < dim; ++d) u[d] = u[d] * keep + v[d] * add;
    }
  }

  // loss_i = lse_i - a_i . (S'_{y_i} - [self] k_self) / (t |P(i)|), and with anchor_gradient
  // d loss_i / d a_i = (U_i / sum_i - (S'_{y_i} - [self] k_self) / |P(i)|) / t.
  scalar_t* loss_data = loss.data_ptr<scalar_t>();
  scalar_t* lse_data = lse.data_ptr<scalar_t>();
  scalar_t* grad_data = anchor_gradient ? anchor_grad.data_ptr<scalar_t>() : nullptr;
  std::vector<scalar_t> positive_keys(dim);
  for_each_segment_class_sums(
      k_data, dim, keys.label.data(), facts.key_offsets, facts.num_classes,
      [&](size_t segment, const auto& class_sum) {
        for (int64_t i = facts.anchor_offsets[segment]; i < facts.anchor_offsets[segment + 1];
             ++i) {
          const int32_t count = anchors.positives[i];
          if (count <= 0) continue;
          const scalar_t* row = a_data + i * dim;
          const scalar_t* sum = class_sum(anchors.label[i]);
          const int64_t own = facts.self.empty() ? -1 : facts.self[i];
          for (int64_t d = 0; d < dim; ++d) positive_keys[d] = sum[d];
          if (own >= 0) {
            for (int64_t d = 0; d < dim; ++d) positive_keys[d] -= k_data[own * dim + d];
          }
          const scalar_t positive_sum = dot(row, positive_keys.data(), dim) * inv_t;
          lse_data[i] = state.running_max[i] + std::log(state.running_sum[i]);
          loss_data[i] = anchor_loss(lse_data[i], positive_sum, count);
          if (grad_data == nullptr) continue;
          scalar_t* g = grad_data + i * dim;
          const scalar_t inv_sum = scalar_t(1) / state.running_sum[i];
          const scalar_t inv_count = scalar_t(1) / static_cast<scalar_t>(count);
          for (int64_t d = 0; d < dim; ++d) {
            g[d] = (g[d] * inv_sum - positive_keys[d] * inv_count) * inv_t;
          }
        }
      });
  if (anchor_gradient) {
    // Rows that are not anchors (ignored, or without a positive) have no gradient.
    for (int64_t i = 0; i < m; ++i) {
      if (anchors.positives[i] <= 0) std::fill_n(grad_data + i * dim, dim, scalar_t(0));
    }
  }
  return {loss, lse, positives_out, anchor_grad};
}

// ---- The single set ------------------------------------------------------------------------

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> single_set_forward(
    const at::Tensor& features, const at::Tensor& labels, const at::Tensor& segments,
    double temperature, bool prevalence, int64_t ignore_index) {
  // Detached: the kernels call ATen ops, which must not record autograd history.
  const at::Tensor z = features.detach().contiguous();
  const int64_t n = z.size(0), dim = z.size(1);
  const std::vector<int64_t> offsets = segment_offsets(segments, n);
  auto [ids, positives] = count_positives(labels, ignore_index, offsets);
  const int32_t num_classes = ids.num_classes;

  at::Tensor loss = at::zeros({n}, z.options());
  at::Tensor lse = at::zeros({n}, z.options());
  at::Tensor positives_out = at::empty({n}, z.options().dtype(at::kInt));
  std::copy(positives.begin(), positives.end(), positives_out.data_ptr<int32_t>());

  const scalar_t inv_t = inverse_temperature<scalar_t>(temperature);
  const scalar_t* z_data = z.data_ptr<scalar_t>();
  const RowTable<scalar_t> rows(std::move(ids.label), std::move(positives), prevalence, z_data,
                                dim);
  check_feature_values(rows, z_data, dim, temperature);
  const Pairing<scalar_t> pairs{rows, rows, true};

  ForwardState<scalar_t> state;
  state.running_max.assign(n, -std::numeric_limits<scalar_t>::infinity());
  state.running_sum.assign(n, scalar_t(0));
  run_schedule(build_schedule(offsets), [&] {
    return [&, work = ForwardWorkspace<scalar_t>{at::empty({kTileRows * kTileRows},
                                                           z.options())}](
               const TilePair& tile) mutable {
      forward_tile<false>(tile, inv_t, z, z, pairs, work, state);
    };
  });

  scalar_t* loss_data = loss.data_ptr<scalar_t>();
  scalar_t* lse_data = lse.data_ptr<scalar_t>();
  for_each_segment_class_sums(
      z_data, dim, rows.label.data(), offsets, num_classes,
      [&](size_t segment, const auto& class_sum) {
        for (int64_t i = offsets[segment]; i < offsets[segment + 1]; ++i) {
          if (rows.positives[i] <= 0) continue;
          const scalar_t* row = z_data + i * dim;
          const scalar_t positive_sum =
              (dot(row, class_sum(rows.label[i]), dim) - dot(row, row, dim)) * inv_t;
          lse_data[i] = state.running_max[i] + std::log(state.running_sum[i]);
          loss_data[i] = anchor_loss(lse_data[i], positive_sum, rows.positives[i]);
        }
      });
  return {loss, lse, positives_out, at::empty({0, dim}, z.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> supcon_forward_cpu(
    const at::Tensor& features, const at::Tensor& labels, const at::Tensor& segments,
    double temperature, bool prevalence, int64_t ignore_index,
    const std::optional<at::Tensor>& ref_features, const std::optional<at::Tensor>& ref_labels,
    const std::optional<at::Tensor>& ref_segments,
    const std::optional<at::Tensor>& ref_self_index, bool anchor_gradient) {
  check_op_inputs(features, labels, segments, c10::DeviceType::CPU, kFeatureDtypes);
  check_forward_reference_inputs(features, segments, ref_features, ref_labels, ref_segments,
                                 ref_self_index, anchor_gradient);
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "supcon_forward_cpu", [&] {
    if (ref_features.has_value()) {
      result = reference_forward<scalar_t>(features, labels, segments, temperature, prevalence,
                                           ignore_index, *ref_features, *ref_labels,
                                           *ref_segments, ref_self_index, anchor_gradient);
    } else {
      result = single_set_forward<scalar_t>(features, labels, segments, temperature, prevalence,
                                            ignore_index);
    }
  });
  return result;
}

// ---- Backward ------------------------------------------------------------------------------

template <typename scalar_t>
struct BackwardRows {
  std::vector<scalar_t> anchor;  // a_i
  std::vector<scalar_t> lse;
};

// H_ij = G_ij + G_ji for a single-set tile whose bound is within SharedShiftRange, from one
// shared exponential per pair, written over the similarities in place.
template <typename scalar_t>
void pair_gradient_tile_shared_shift(const TilePair& tile, scalar_t* s, scalar_t bound,
                                     const Pairing<scalar_t>& pairs,
                                     const BackwardRows<scalar_t>& grad,
                                     std::vector<scalar_t>& col_scale) {
  const RowTable<scalar_t>& rows = pairs.rows;
  const int64_t r0 = tile.rows.start, c0 = tile.cols.start;
  const int64_t height = tile.rows.size, width = tile.cols.size;
  const int32_t* label_c = rows.label.data() + c0;
  const scalar_t* same_c = rows.same_weight.data() + c0;
  const scalar_t* contrast_c = rows.contrast_weight.data() + c0;
  // scale_i = a_i exp(bound - lse_i) <= a_i exp(2 bound + log N): finite in this range.
  const auto scale = [&](int64_t row) {
    return grad.anchor[row] == scalar_t(0) ? scalar_t(0)
                                           : grad.anchor[row] * std::exp(bound - grad.lse[row]);
  };
  col_scale.resize(width);
  for (int64_t j = 0; j < width; ++j) col_scale[j] = scale(c0 + j);
  const scalar_t* scale_c = col_scale.data();
  for (int64_t i = 0; i < height; ++i) {
    scalar_t* s_row = s + i * width;
    const int32_t label_i = rows.label[r0 + i];
    const scalar_t scale_i = scale(r0 + i);
    const scalar_t same_i = rows.same_weight[r0 + i];
    const scalar_t contrast_i = rows.contrast_weight[r0 + i];
#pragma omp simd
    for (int64_t j = 0; j < width; ++j) {
      s_row[j] = symmetric_pair_gradient_shared(exp_vectorizable(s_row[j] - bound), label_i,
                                                label_c[j], scale_i, same_i, contrast_i,
                                                scale_c[j], same_c[j], contrast_c[j]);
    }
    const int64_t own = pairs.own_column(tile, i);
    if (own >= 0) s_row[own] = 0;
  }
}

// H_ij = G_ij + G_ji for a single-set tile of a wide similarity range, each term shifted by its
// own row's lse, written over the similarities in place.
template <typename scalar_t>
void pair_gradient_tile_own_shifts(const TilePair& tile, scalar_t* s,
                                   const Pairing<scalar_t>& pairs,
                                   const BackwardRows<scalar_t>& grad) {
  const RowTable<scalar_t>& rows = pairs.rows;
  exclude_non_contributing(s, tile, pairs);
  for (int64_t i = 0; i < tile.rows.size; ++i) {
    scalar_t* s_row = s + i * tile.cols.size;
    const int64_t row = tile.rows.start + i;
    for (int64_t j = 0; j < tile.cols.size; ++j) {
      const int64_t col = tile.cols.start + j;
      s_row[j] = symmetric_pair_gradient(s_row[j], rows.label[row], rows.label[col],
                                         grad.anchor[row], grad.lse[row], rows.same_weight[row],
                                         rows.contrast_weight[row], grad.anchor[col],
                                         grad.lse[col], rows.same_weight[col],
                                         rows.contrast_weight[col]);
    }
  }
}

// G_ij = a_i w_i(y_j) exp(s_ij - lse_i) for a reference-set tile (anchors x keys), written over
// the similarities in place. Each term shifts by its own row's lse, which bounds it
// (exp(s_ij - lse_i) <= 1 / w_i(y_j) <= K), so no range condition applies.
template <typename scalar_t>
void pair_gradient_tile_one_sided(const TilePair& tile, scalar_t* s,
                                  const Pairing<scalar_t>& pairs,
                                  const BackwardRows<scalar_t>& grad) {
  const int64_t r0 = tile.rows.start, c0 = tile.cols.start, width = tile.cols.size;
  const int32_t* label_c = pairs.cols.label.data() + c0;
  const scalar_t* contrast_c = pairs.cols.contrast_weight.data() + c0;
  for (int64_t i = 0; i < tile.rows.size; ++i) {
    scalar_t* s_row = s + i * width;
    const scalar_t anchor = grad.anchor[r0 + i];
    if (anchor == scalar_t(0)) {
      std::fill_n(s_row, width, scalar_t(0));
      continue;
    }
    const int32_t label_i = pairs.rows.label[r0 + i];
    const scalar_t same_i = pairs.rows.same_weight[r0 + i];
    const scalar_t lse_i = grad.lse[r0 + i];
#pragma omp simd
    for (int64_t j = 0; j < width; ++j) {
      s_row[j] = anchor * pair_weight(label_i, label_c[j], same_i, contrast_c[j]) *
                 exp_vectorizable(s_row[j] - lse_i);
    }
    const int64_t own = pairs.own_column(tile, i);
    if (own >= 0) s_row[own] = 0;
  }
}

// The tile's pair gradients written over its similarities in place: H = G + G^T (single set)
// or G (reference set).
template <typename scalar_t>
void pair_gradient_tile(const TilePair& tile, scalar_t* s, scalar_t inv_t,
                        const Pairing<scalar_t>& pairs, const BackwardRows<scalar_t>& grad,
                        std::vector<scalar_t>& col_scale) {
  if (!pairs.symmetric) {
    pair_gradient_tile_one_sided(tile, s, pairs, grad);
    return;
  }
  const scalar_t bound = pairs.similarity_bound(tile, inv_t);
  if (shared_shift_is_safe(bound)) {
    pair_gradient_tile_shared_shift(tile, s, bound, pairs, grad, col_scale);
  } else {
    pair_gradient_tile_own_shifts(tile, s, pairs, grad);
  }
}

// Adds one tile's pairwise gradient terms (1/t applied later): single set, dz_I += H z_J and,
// off the diagonal, dz_J += H^T z_I; reference set, dk_J += G^T a_I.
template <typename scalar_t>
void backward_tile(const TilePair& tile, scalar_t inv_t, const at::Tensor& z_rows,
                   const at::Tensor& z_cols, const Pairing<scalar_t>& pairs,
                   const BackwardRows<scalar_t>& grad, at::Tensor& workspace,
                   std::vector<scalar_t>& col_scale, at::Tensor& grad_rows,
                   at::Tensor& grad_cols) {
  // The tile's similarities are overwritten by its pair gradients.
  const at::Tensor h = similarity_tile(z_rows, z_cols, tile, inv_t, workspace);
  pair_gradient_tile(tile, h.data_ptr<scalar_t>(), inv_t, pairs, grad, col_scale);
  const at::Tensor rows_z = z_rows.narrow(0, tile.rows.start, tile.rows.size);
  const at::Tensor cols_z = z_cols.narrow(0, tile.cols.start, tile.cols.size);
  if (pairs.symmetric) {
    grad_rows.narrow(0, tile.rows.start, tile.rows.size).addmm_(h, cols_z);
  }
  if (!pairs.diagonal(tile)) {
    grad_cols.narrow(0, tile.cols.start, tile.cols.size).addmm_(h.t(), rows_z);
  }
}

template <typename scalar_t>
at::Tensor single_set_backward(const at::Tensor& grad_loss, const at::Tensor& features,
                               const at::Tensor& labels, const at::Tensor& segments,
                               const at::Tensor& lse, const at::Tensor& positives,
                               double temperature, bool prevalence) {
  // Detached: the kernels call ATen ops, which must not record autograd history.
  const at::Tensor z = features.detach().contiguous();
  const int64_t n = z.size(0), dim = z.size(1);
  const std::vector<int64_t> offsets = segment_offsets(segments, n);

  const at::Tensor positives32 = positives.to(at::kInt).contiguous();
  const int32_t* positive_data = positives32.data_ptr<int32_t>();
  std::vector<int32_t> positive_counts(positive_data, positive_data + n);
  // The forward marked ignored rows with positives = -1, so ignore_index is not needed here.
  const at::Tensor labels64 = labels.to(at::kLong).contiguous();
  ClassIds ids = compact_class_ids(labels64.data_ptr<int64_t>(), n,
                                   [&](int64_t i) { return positive_counts[i] < 0; });
  const int32_t num_classes = ids.num_classes;

  at::Tensor grad_z = at::zeros_like(z);
  const scalar_t inv_t = inverse_temperature<scalar_t>(temperature);
  const RowTable<scalar_t> rows(std::move(ids.label), std::move(positive_counts), prevalence,
                                z.data_ptr<scalar_t>(), dim);
  const Pairing<scalar_t> pairs{rows, rows, true};
  const at::Tensor grad_cast = grad_loss.to(z.scalar_type()).contiguous();
  const at::Tensor lse_cast = lse.to(z.scalar_type()).contiguous();
  BackwardRows<scalar_t> grad;
  grad.anchor.resize(n);
  grad.lse.assign(lse_cast.data_ptr<scalar_t>(), lse_cast.data_ptr<scalar_t>() + n);
  for (int64_t i = 0; i < n; ++i) {
    grad.anchor[i] = anchor_grad_weight(grad_cast.data_ptr<scalar_t>()[i], rows.positives[i]);
  }

  run_schedule(build_schedule(offsets), [&] {
    return [&, workspace = at::empty({kTileRows * kTileRows}, z.options()),
            col_scale = std::vector<scalar_t>()](const TilePair& tile) mutable {
      backward_tile(tile, inv_t, z, z, pairs, grad, workspace, col_scale, grad_z, grad_z);
    };
  });

  // Positive term: dz_k -= b_k S_{y_k} + R_{y_k} - 2 b_k z_k, R_c = sum_{y_i = c} b_i z_i.
  const scalar_t* z_data = z.data_ptr<scalar_t>();
  scalar_t* grad_data = grad_z.data_ptr<scalar_t>();
  std::vector<scalar_t> weight(n);
  for (int64_t i = 0; i < n; ++i) {
    weight[i] = positive_grad_weight(grad_cast.data_ptr<scalar_t>()[i], rows.positives[i]);
  }
  const at::Tensor weighted = z * at::from_blob(weight.data(), {n, 1}, z.options());
  const scalar_t* weighted_data = weighted.data_ptr<scalar_t>();
  for_each_segment_class_sums(
      weighted_data, dim, rows.label.data(), offsets, num_classes,
      [&](size_t segment, const auto& weighted_sum) {
        for (int64_t i = offsets[segment]; i < offsets[segment + 1]; ++i) {
          if (rows.label[i] < 0) continue;
          const scalar_t* r = weighted_sum(rows.label[i]);
          scalar_t* g = grad_data + i * dim;
          const scalar_t* w = weighted_data + i * dim;
          for (int64_t d = 0; d < dim; ++d) g[d] -= r[d] - 2 * w[d];
        }
      });
  for_each_segment_class_sums(
      z_data, dim, rows.label.data(), offsets, num_classes,
      [&](size_t segment, const auto& class_sum) {
        for (int64_t i = offsets[segment]; i < offsets[segment + 1]; ++i) {
          if (rows.label[i] < 0 || weight[i] == scalar_t(0)) continue;
          const scalar_t* s = class_sum(rows.label[i]);
          scalar_t* g = grad_data + i * dim;
          for (int64_t d = 0; d < dim; ++d) g[d] -= weight[i] * s[d];
        }
      });
  grad_z.mul_(inv_t);
  return grad_z;
}

// dL/dk_j = (1/t) sum_i [a_i p_ij - [j in P(i)] a_i / |P(i)|] a_i-row, over the anchors of j's
// segment: each key block is owned by one thread, which sweeps the segment's anchor blocks.
template <typename scalar_t>
at::Tensor reference_backward(const at::Tensor& grad_loss, const at::Tensor& features,
                              const at::Tensor& labels, const at::Tensor& segments,
                              const at::Tensor& lse, const at::Tensor& positives,
                              double temperature, bool prevalence, int64_t ignore_index,
                              const at::Tensor& ref_features, const at::Tensor& ref_labels,
                              const at::Tensor& ref_segments,
                              const std::optional<at::Tensor>& ref_self_index) {
  const at::Tensor a = features.detach().contiguous();
  const at::Tensor k = ref_features.detach().contiguous();
  const int64_t m = a.size(0), dim = a.size(1);
  const scalar_t inv_t = inverse_temperature<scalar_t>(temperature);
  ReferenceRows facts =
      reference_rows(labels, segments, ref_labels, ref_segments, ref_self_index, ignore_index);
  // The anchors' |P(i)| as the forward returned them (they decide who is an anchor).
  const at::Tensor positives32 = positives.to(at::kInt).contiguous();
  std::vector<int32_t> anchor_positives(positives32.data_ptr<int32_t>(),
                                        positives32.data_ptr<int32_t>() + m);
  const RowTable<scalar_t> anchors(facts.anchor_label, std::move(anchor_positives), prevalence,
                                   a.data_ptr<scalar_t>(), dim);
  const RowTable<scalar_t> keys(facts.key_label, facts.key_positives, prevalence,
                                k.data_ptr<scalar_t>(), dim);
  const Pairing<scalar_t> pairs{anchors, keys, false,
                                facts.self.empty() ? nullptr : facts.self.data()};

  const at::Tensor grad_cast = grad_loss.to(a.scalar_type()).contiguous();
  const at::Tensor lse_cast = lse.to(a.scalar_type()).contiguous();
  const scalar_t* grad_loss_data = grad_cast.data_ptr<scalar_t>();
  BackwardRows<scalar_t> grad;
  grad.anchor.resize(m);
  grad.lse.assign(lse_cast.data_ptr<scalar_t>(), lse_cast.data_ptr<scalar_t>() + m);
  for (int64_t i = 0; i < m; ++i) {
    grad.anchor[i] = anchor_grad_weight(grad_loss_data[i], anchors.positives[i]);
  }

  at::Tensor grad_k = at::zeros_like(k);
  std::vector<Sweep> sweeps;
  for (size_t segment = 0; segment + 1 < facts.key_offsets.size(); ++segment) {
    const int64_t anchor_begin = facts.anchor_offsets[segment];
    const int64_t anchor_end = facts.anchor_offsets[segment + 1];
    if (anchor_end == anchor_begin) continue;
    for (const Block& block : blocks_of(facts.key_offsets[segment],
                                        facts.key_offsets[segment + 1], kKeyTileRows)) {
      sweeps.push_back({block, {anchor_begin, anchor_end - anchor_begin}});
    }
  }
  run_tasks(sweeps, [&] {
    return [&, workspace = at::empty({kAnchorTileRows * kKeyTileRows}, a.options()),
            col_scale = std::vector<scalar_t>()](const Sweep& sweep) mutable {
      for (const Block& anchor_block :
           blocks_of(sweep.others.start, sweep.others.start + sweep.others.size,
                     kAnchorTileRows)) {
        backward_tile({anchor_block, sweep.owned}, inv_t, a, k, pairs, grad, workspace,
                      col_scale, grad_k, grad_k);
      }
    };
  });

  // Positive term: dk_j -= R_{y_j} - sum_{i : self_i = j} b_i a_i, R_c = sum_{y_i = c} b_i a_i
  // over the anchors of j's segment, b_i = a_i / |P(i)|.
  std::vector<scalar_t> weight(m);
  for (int64_t i = 0; i < m; ++i) {
    weight[i] = positive_grad_weight(grad_loss_data[i], anchors.positives[i]);
  }
  const at::Tensor weighted = a * at::from_blob(weight.data(), {m, 1}, a.options());
  const scalar_t* weighted_data = weighted.data_ptr<scalar_t>();
  scalar_t* grad_data = grad_k.data_ptr<scalar_t>();
  for_each_segment_class_sums(
      weighted_data, dim, anchors.label.data(), facts.anchor_offsets, facts.num_classes,
      [&](size_t segment, const auto& weighted_sum) {
        for (int64_t j = facts.key_offsets[segment]; j < facts.key_offsets[segment + 1]; ++j) {
          if (keys.label[j] < 0) continue;
          const scalar_t* r = weighted_sum(keys.label[j]);
          scalar_t* g = grad_data + j * dim;
          for (int64_t d = 0; d < dim; ++d) g[d] -= r[d];
        }
      });
  for (int64_t i = 0; i < static_cast<int64_t>(facts.self.size()); ++i) {
    const int64_t own = facts.self[i];
    if (own < 0 || weight[i] == scalar_t(0)) continue;
    for (int64_t d = 0; d < dim; ++d) grad_data[own * dim + d] += weighted_data[i * dim + d];
  }
  grad_k.mul_(inv_t);
  return grad_k;
}

at::Tensor supcon_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& features,
                               const at::Tensor& labels, const at::Tensor& segments,
                               const at::Tensor& lse, const at::Tensor& positives,
                               double temperature, bool prevalence, int64_t ignore_index,
                               const std::optional<at::Tensor>& ref_features,
                               const std::optional<at::Tensor>& ref_labels,
                               const std::optional<at::Tensor>& ref_segments,
                               const std::optional<at::Tensor>& ref_self_index) {
  check_backward_inputs(grad_loss, features, labels, segments, lse, positives,
                        c10::DeviceType::CPU, kFeatureDtypes);
  check_reference_inputs(features, segments, ref_features, ref_labels, ref_segments,
                         ref_self_index);
  at::Tensor result;
  AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "supcon_backward_cpu", [&] {
    if (ref_features.has_value()) {
      result = reference_backward<scalar_t>(grad_loss, features, labels, segments, lse,
                                            positives, temperature, prevalence, ignore_index,
                                            *ref_features, *ref_labels, *ref_segments,
                                            ref_self_index);
    } else {
      result = single_set_backward<scalar_t>(grad_loss, features, labels, segments, lse,
                                             positives, temperature, prevalence);
    }
  });
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(mcsc, CPU, m) {
  m.impl("supcon_forward", &supcon_forward_cpu);
  m.impl("supcon_backward", &supcon_backward_cpu);
}

}  // namespace mcsc
