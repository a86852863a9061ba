// CPU kernels of the fused supervised contrastive loss (forward and backward).
//
// Rows are cut into blocks of kTileRows inside each segment. The pairwise work is done per
// tile pair (row block I, column block J) with I <= J: s_ij = s_ji, so one tile product
// serves both blocks, which halves the arithmetic of a row-by-row pass. Tile products use
// BLAS (at::mm_out / addmm_) on a per-thread O(tile^2) workspace; the exponentials and
// weighted sums are one vectorised loop over the tile.
//
// Tile pairs are run in rounds of a round-robin tournament: within a round no block occurs
// twice, so tiles of one round run in parallel and update the accumulators of both their
// blocks directly. Every accumulator is updated in round order whatever the thread count,
// so results are bit-identical from call to call, without atomics or per-thread copies.
//
// The forward also checks the values of its inputs (labels, feature values and norms, segment
// offsets, temperature) with TORCH_CHECK_VALUE, which Python sees as a ValueError: it reads
// them all anyway, and under torch.compile the Python checks of values cannot run.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu_math.h"
#include "supcon_checks.h"

namespace mcsc {
namespace {

constexpr int64_t kTileRows = 256;

struct Block {
  int64_t start;
  int64_t size;
};

struct TilePair {
  Block rows;
  Block cols;
  bool diagonal() const { return rows.start == cols.start; }
};

using Schedule = std::vector<std::vector<TilePair>>;

// Round 0 holds every diagonal tile; then, per segment, the circle method pairs its T blocks
// in T - 1 (T even) or T (T odd) rounds so that every block meets every other exactly once.
Schedule build_schedule(const std::vector<int64_t>& offsets) {
  Schedule rounds(1);
  for (size_t segment = 0; segment + 1 < offsets.size(); ++segment) {
    std::vector<Block> blocks;
    for (int64_t start = offsets[segment]; start < offsets[segment + 1]; start += kTileRows) {
      blocks.push_back({start, std::min(kTileRows, offsets[segment + 1] - start)});
    }
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

// make_worker() gives a thread its tile function (with its own workspace). Threads take the
// tiles of a round one at a time from a shared counter, so a thread slowed down by other work
// on the machine delays its round by one tile at most; which thread runs a tile changes no
// result, since the tiles of a round touch disjoint accumulators.
template <typename MakeWorker>
void run_schedule(const Schedule& rounds, const MakeWorker& make_worker) {
  for (const auto& tiles : rounds) {
    const int64_t count = static_cast<int64_t>(tiles.size());
    std::atomic<int64_t> next{0};
    at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), count), 1,
                     [&](int64_t, int64_t) {
                       auto process = make_worker();
                       for (int64_t t = next++; t < count; t = next++) process(tiles[t]);
                     });
  }
}

// The segment offsets, checked, since the kernels index rows by them.
std::vector<int64_t> segment_offsets(const at::Tensor& segments, int64_t rows) {
  const at::Tensor offsets = segments.to(at::kCPU, at::kLong).contiguous();
  const int64_t* data = offsets.data_ptr<int64_t>();
  std::vector<int64_t> result(data, data + offsets.numel());
  TORCH_CHECK_VALUE(result.front() == 0 && result.back() == rows,
                    "mcsc: segments must start at 0 and end at N=", rows, ", got ",
                    result.front(), " ... ", result.back());
  for (size_t k = 0; k + 1 < result.size(); ++k) {
    TORCH_CHECK_VALUE(result[k] <= result[k + 1], "mcsc: segments must be non-decreasing offsets");
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
// weights of supcon_math.h.
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

  // Cauchy-Schwarz bound of every s_ij in the tile: max|z_i| max|z_j| / t.
  acc_t similarity_bound(const TilePair& tile, acc_t inv_t) const {
    const auto block_max = [&](const Block& block) {
      return *std::max_element(norm.begin() + block.start,
                               norm.begin() + block.start + block.size);
    };
    return block_max(tile.rows) * block_max(tile.cols) * inv_t;
  }
};

// With shift = the tile's similarity bound, exp(s_ij - shift) <= 1 for every pair, and each
// row's largest term is >= exp(-2 * bound): within SharedShiftRange, one shift serves the tile.
template <typename scalar_t>
bool shared_shift_is_safe(scalar_t bound) {
  return 2 * bound <= SharedShiftRange<scalar_t>::value;
}

// Visits each segment's rows grouped by class: fn(segment_start, segment_end, class_sum)
// where class_sum(c) points at sum_{valid j of class c in the segment} z_j (D values).
// Only the classes a segment uses are touched, so many small segments stay O(N D).
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
    fn(begin, end, [&](int32_t c) { return sums.data() + static_cast<int64_t>(c) * dim; });
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

// The tile of similarities s_ij = z_i . z_j / t in the workspace.
template <typename scalar_t>
at::Tensor similarity_tile(const at::Tensor& z, const TilePair& tile, scalar_t inv_t,
                           at::Tensor& workspace) {
  const int64_t height = tile.rows.size, width = tile.cols.size;
  at::Tensor s = workspace.view({-1}).narrow(0, 0, height * width).view({height, width});
  // beta = 0: the workspace's previous contents are ignored.
  at::addmm_out(s, s, z.narrow(0, tile.rows.start, height),
                z.narrow(0, tile.cols.start, width).t(), 0, inv_t);
  return s;
}

// Sets s_ij = -inf where the pair takes no part (an ignored row or column, or i == j): then
// exp(-inf) = 0 removes it from every sum, maximum and gradient however large s_ij was.
template <typename scalar_t>
void exclude_non_contributing(scalar_t* s, const TilePair& tile, const int32_t* label) {
  const int64_t height = tile.rows.size, width = tile.cols.size;
  const scalar_t excluded = -std::numeric_limits<scalar_t>::infinity();
  const int32_t* label_c = label + tile.cols.start;
  for (int64_t i = 0; i < height; ++i) {
    scalar_t* s_row = s + i * width;
    if (label[tile.rows.start + i] < 0) {
      std::fill_n(s_row, width, excluded);
      continue;
    }
    for (int64_t j = 0; j < width; ++j) {
      if (label_c[j] < 0) s_row[j] = excluded;
    }
    if (tile.diagonal()) s_row[i] = excluded;
  }
}

template <typename scalar_t>
struct ForwardState {
  std::vector<scalar_t> running_max, running_sum;
};

// Per-thread scratch of the forward's tiles.
template <typename scalar_t>
struct ForwardWorkspace {
  at::Tensor similarities;  // kTileRows x kTileRows
  TileMaxima<scalar_t> maxima;  // per row and column, for tiles of a wide range
  std::vector<scalar_t> col_sum;  // the tile's partial sums of its columns
};

// Adds the tile's partial sums of each column (shifted by shift(j)) to the column rows' states;
// a diagonal tile's columns are its rows, already merged.
template <typename scalar_t, typename Shift>
void merge_columns(const TilePair& tile, const std::vector<scalar_t>& col_sum, const Shift& shift,
                   ForwardState<scalar_t>& state) {
  if (tile.diagonal()) return;
  const int64_t c0 = tile.cols.start;
  for (int64_t j = 0; j < tile.cols.size; ++j) {
    merge_log_sum_exp(state.running_max[c0 + j], state.running_sum[c0 + j], shift(j), col_sum[j]);
  }
}

// A tile whose bound is within SharedShiftRange (shared_shift_is_safe): one exponential
// exp(s_ij - bound) <= 1 per pair serves both its row and its column, with no pass over the tile
// to find maxima and no masking (every weight of an ignored row or column is already 0).
template <typename scalar_t>
void forward_tile_shared_shift(const TilePair& tile, const scalar_t* s, scalar_t bound,
                               const RowTable<scalar_t>& rows, std::vector<scalar_t>& col_sum,
                               ForwardState<scalar_t>& state) {
  const int64_t r0 = tile.rows.start, c0 = tile.cols.start;
  const int64_t height = tile.rows.size, width = tile.cols.size;
  const int32_t* label_c = rows.label.data() + c0;
  const scalar_t* same_c = rows.same_weight.data() + c0;
  const scalar_t* contrast_c = rows.contrast_weight.data() + c0;
  scalar_t* col = col_sum.data();
  for (int64_t i = 0; i < height; ++i) {
    const scalar_t* s_row = s + i * width;
    const int32_t label_i = rows.label[r0 + i];
    const scalar_t same_i = rows.same_weight[r0 + i];
    const scalar_t contrast_i = rows.contrast_weight[r0 + i];
    scalar_t row_sum = 0;
    if (tile.diagonal()) {
#pragma omp simd reduction(+ : row_sum)
      for (int64_t j = 0; j < width; ++j) {
        const scalar_t w = j == i ? scalar_t(0)
                                  : pair_weight(label_i, label_c[j], same_i, contrast_c[j]);
        row_sum += w * exp_vectorizable(s_row[j] - bound);
      }
    } else {
#pragma omp simd reduction(+ : row_sum)
      for (int64_t j = 0; j < width; ++j) {
        const scalar_t e = exp_vectorizable(s_row[j] - bound);
        row_sum += e * pair_weight(label_i, label_c[j], same_i, contrast_c[j]);
        col[j] += e * pair_weight(label_c[j], label_i, same_c[j], contrast_i);
      }
    }
    merge_log_sum_exp(state.running_max[r0 + i], state.running_sum[r0 + i], bound, row_sum);
  }
  merge_columns(tile, col_sum, [bound](int64_t) { return bound; }, state);
}

// A tile of a wide similarity range: rows (and, off the diagonal, columns) are each shifted by
// their own maximum over the pairs that take part. Overwrites the tile's similarities.
template <typename scalar_t>
void forward_tile_own_shifts(const TilePair& tile, scalar_t* s, const RowTable<scalar_t>& rows,
                             ForwardWorkspace<scalar_t>& work, ForwardState<scalar_t>& state) {
  const int64_t r0 = tile.rows.start, c0 = tile.cols.start;
  const int64_t height = tile.rows.size, width = tile.cols.size;
  const int32_t* label_c = rows.label.data() + c0;
  const scalar_t* same_c = rows.same_weight.data() + c0;
  const scalar_t* contrast_c = rows.contrast_weight.data() + c0;
  const scalar_t none = -std::numeric_limits<scalar_t>::infinity();
  exclude_non_contributing(s, tile, rows.label.data());
  TileMaxima<scalar_t>& maxima = work.maxima;
  maxima.compute(s, height, width);
  for (int64_t i = 0; i < height; ++i) {
    const scalar_t* s_row = s + i * width;
    const int32_t label_i = rows.label[r0 + i];
    const scalar_t same_i = rows.same_weight[r0 + i];
    const scalar_t shift = maxima.row[i];
    if (shift == none) continue;
    scalar_t row_sum = 0;
#pragma omp simd reduction(+ : row_sum)
    for (int64_t j = 0; j < width; ++j) {
      row_sum += pair_weight(label_i, label_c[j], same_i, contrast_c[j]) *
                 exp_vectorizable(s_row[j] - shift);
    }
    merge_log_sum_exp(state.running_max[r0 + i], state.running_sum[r0 + i], shift, row_sum);
  }
  if (tile.diagonal()) return;
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
  merge_columns(tile, work.col_sum, [&maxima](int64_t j) { return maxima.col[j]; }, state);
}

// Adds one tile pair's terms to the log-sum-exp states of its rows and columns.
template <typename scalar_t>
void forward_tile(const TilePair& tile, scalar_t inv_t, const at::Tensor& z,
                  const RowTable<scalar_t>& rows, ForwardWorkspace<scalar_t>& work,
                  ForwardState<scalar_t>& state) {
  const at::Tensor s = similarity_tile(z, tile, inv_t, work.similarities);
  work.col_sum.assign(tile.cols.size, scalar_t(0));
  const scalar_t bound = rows.similarity_bound(tile, inv_t);
  if (shared_shift_is_safe(bound)) {
    forward_tile_shared_shift(tile, s.data_ptr<scalar_t>(), bound, rows, work.col_sum, state);
  } else {
    forward_tile_own_shifts(tile, s.data_ptr<scalar_t>(), rows, work, state);
  }
}

// Compact class ids (-1 for ignored rows), checked to be >= 0 or ignore_index, and |P(i)| per
// row (-1 for ignored rows).
std::pair<ClassIds, std::vector<int32_t>> count_positives(const at::Tensor& labels,
                                                          int64_t ignore_index,
                                                          const std::vector<int64_t>& offsets) {
  const at::Tensor labels64 = labels.to(at::kLong).contiguous();
  const int64_t* raw = labels64.data_ptr<int64_t>();
  const int64_t n = labels64.numel();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(raw[i] >= 0 || raw[i] == ignore_index,
                      "mcsc: labels must be in [0, C) or equal ignore_index=", ignore_index,
                      "; found ", raw[i]);
  }
  ClassIds ids = compact_class_ids(raw, n, [&](int64_t i) { return raw[i] == ignore_index; });
  const std::vector<int32_t>& label = ids.label;
  std::vector<int32_t> positives(n, -1);
  std::vector<int32_t> class_size(ids.num_classes, 0);
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
  return {std::move(ids), std::move(positives)};
}

// Every feature finite and max_i |z_i|^2 / temperature within similarity_limit, from the norms
// RowTable computed (a NaN or infinite value, or a squared norm past the dtype's range, makes a
// norm non-finite).
template <typename scalar_t>
void check_feature_values(const RowTable<scalar_t>& rows, const scalar_t* z, int64_t dim,
                          double temperature) {
  double largest = 0;
  for (size_t i = 0; i < rows.norm.size(); ++i) {
    if (!std::isfinite(rows.norm[i])) {
      const scalar_t* row = z + static_cast<int64_t>(i) * dim;
      TORCH_CHECK_VALUE(std::all_of(row, row + dim, [](scalar_t x) { return std::isfinite(x); }),
                        "mcsc: features contain NaN or infinite values (row ", i, ")");
    }
    largest = std::max(largest, static_cast<double>(rows.norm[i]));
  }
  const double bound = largest * largest / temperature;
  TORCH_CHECK_VALUE(bound <= static_cast<double>(similarity_limit<scalar_t>()),
                    "mcsc: features are too large: max_i |z_i|^2 / temperature = ", bound,
                    " exceeds ", similarity_limit<scalar_t>(), " for ",
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> supcon_forward_cpu(
    const at::Tensor& features, const at::Tensor& labels, const at::Tensor& segments,
    double temperature, bool prevalence, int64_t ignore_index) {
  check_op_inputs(features, labels, segments, c10::DeviceType::CPU, kFeatureDtypes);
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

  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "supcon_forward_cpu", [&] {
    const scalar_t inv_t = inverse_temperature<scalar_t>(temperature);
    const scalar_t* z_data = z.data_ptr<scalar_t>();
    const RowTable<scalar_t> rows(std::move(ids.label), std::move(positives), prevalence, z_data,
                                  dim);
    check_feature_values(rows, z_data, dim, temperature);

    ForwardState<scalar_t> state;
    state.running_max.assign(n, -std::numeric_limits<scalar_t>::infinity());
    state.running_sum.assign(n, scalar_t(0));
    run_schedule(build_schedule(offsets), [&] {
      return [&, work = ForwardWorkspace<scalar_t>{at::empty({kTileRows * kTileRows},
                                                             z.options())}](
                 const TilePair& tile) mutable { forward_tile(tile, inv_t, z, rows, work, state); };
    });

    scalar_t* loss_data = loss.data_ptr<scalar_t>();
    scalar_t* lse_data = lse.data_ptr<scalar_t>();
    for_each_segment_class_sums(
        z_data, dim, rows.label.data(), offsets, num_classes,
        [&](int64_t begin, int64_t end, const auto& class_sum) {
          for (int64_t i = begin; i < end; ++i) {
            if (rows.positives[i] <= 0) continue;
            const scalar_t* row = z_data + i * dim;
            const scalar_t positive_sum =
                (dot(row, class_sum(rows.label[i]), dim) - dot(row, row, dim)) * inv_t;
            lse_data[i] = state.running_max[i] + std::log(state.running_sum[i]);
            loss_data[i] = anchor_loss(lse_data[i], positive_sum, rows.positives[i]);
          }
        });
  });
  return {loss, lse, positives_out};
}

template <typename scalar_t>
struct BackwardRows {
  std::vector<scalar_t> anchor;  // a_i
  std::vector<scalar_t> lse;
};

// H_ij = G_ij + G_ji for a tile whose bound is within SharedShiftRange, from one shared
// exponential per pair, written over the similarities in place.
template <typename scalar_t>
void pair_gradient_tile_shared_shift(const TilePair& tile, scalar_t* s, scalar_t bound,
                                     const RowTable<scalar_t>& rows,
                                     const BackwardRows<scalar_t>& grad,
                                     std::vector<scalar_t>& col_scale) {
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
    if (tile.diagonal()) s_row[i] = 0;
  }
}

// H_ij = G_ij + G_ji for a tile of a wide similarity range, each term shifted by its own row's
// lse, written over the similarities in place.
template <typename scalar_t>
void pair_gradient_tile_own_shifts(const TilePair& tile, scalar_t* s,
                                   const RowTable<scalar_t>& rows,
                                   const BackwardRows<scalar_t>& grad) {
  exclude_non_contributing(s, tile, rows.label.data());
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

// H_ij = G_ij + G_ji for the tile, written over the similarities in place.
template <typename scalar_t>
void pair_gradient_tile(const TilePair& tile, scalar_t* s, scalar_t inv_t,
                        const RowTable<scalar_t>& rows, const BackwardRows<scalar_t>& grad,
                        std::vector<scalar_t>& col_scale) {
  const scalar_t bound = rows.similarity_bound(tile, inv_t);
  if (shared_shift_is_safe(bound)) {
    pair_gradient_tile_shared_shift(tile, s, bound, rows, grad, col_scale);
  } else {
    pair_gradient_tile_own_shifts(tile, s, rows, grad);
  }
}

at::Tensor supcon_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& features,
                               const at::Tensor& labels, const at::Tensor& segments,
                               const at::Tensor& lse, const at::Tensor& positives,
                               double temperature, bool prevalence) {
  check_backward_inputs(grad_loss, features, labels, segments, lse, positives,
                        c10::DeviceType::CPU, kFeatureDtypes);
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
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "supcon_backward_cpu", [&] {
    const scalar_t inv_t = inverse_temperature<scalar_t>(temperature);
    const RowTable<scalar_t> rows(std::move(ids.label), std::move(positive_counts), prevalence,
                                  z.data_ptr<scalar_t>(), dim);
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
        // The tile's similarities are overwritten by its pair gradients H_ij = G_ij + G_ji.
        const at::Tensor h = similarity_tile(z, tile, inv_t, workspace);
        pair_gradient_tile(tile, h.data_ptr<scalar_t>(), inv_t, rows, grad, col_scale);
        const at::Tensor z_rows = z.narrow(0, tile.rows.start, tile.rows.size);
        const at::Tensor z_cols = z.narrow(0, tile.cols.start, tile.cols.size);
        grad_z.narrow(0, tile.rows.start, tile.rows.size).addmm_(h, z_cols);
        if (!tile.diagonal()) {
          grad_z.narrow(0, tile.cols.start, tile.cols.size).addmm_(h.t(), z_rows);
        }
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
        [&](int64_t begin, int64_t end, const auto& weighted_sum) {
          for (int64_t i = begin; i < end; ++i) {
            if (rows.label[i] < 0) continue;
            const scalar_t* r = weighted_sum(rows.label[i]);
            scalar_t* g = grad_data + i * dim;
            const scalar_t* w = weighted_data + i * dim;
            for (int64_t d = 0; d < dim; ++d) g[d] -= r[d] - 2 * w[d];
          }
        });
    for_each_segment_class_sums(
        z_data, dim, rows.label.data(), offsets, num_classes,
        [&](int64_t begin, int64_t end, const auto& class_sum) {
          for (int64_t i = begin; i < end; ++i) {
            if (rows.label[i] < 0 || weight[i] == scalar_t(0)) continue;
            const scalar_t* s = class_sum(rows.label[i]);
            scalar_t* g = grad_data + i * dim;
            for (int64_t d = 0; d < dim; ++d) g[d] -= weight[i] * s[d];
          }
        });
    grad_z.mul_(inv_t);
  });
  return grad_z.to(features.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(mcsc, CPU, m) {
  m.impl("supcon_forward", &supcon_forward_cpu);
  m.impl("supcon_backward", &supcon_backward_cpu);
}

}  // namespace mcsc
