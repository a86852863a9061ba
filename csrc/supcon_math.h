// Math of the supervised contrastive loss shared by the CPU and CUDA kernels. Everything here is
// a small inline function of scalars so that both backends run the same formulas and the CPU
// tests exercise what the GPU computes. The loss itself is documented on mcsc.ops.supcon_loss.
//
// Notation: rows carry `positives` p_i = |P(i)| (-1 for ignored rows), so a valid row's class
// size in its segment is n_{y_i} = p_i + 1. The weight anchor i gives to a contrast j is
//   w_i(y_j) = (y_j == y_i) ? same_class_weight_i : contrast_weight_j
// with, for "prevalence", same_class_weight_i = 1 / (n_{y_i} - 1) and contrast_weight_j =
// 1 / n_{y_j}; for "none" both are 1. Ignored rows get 0 for both, which removes them as
// contrasts; rows without a positive are removed as anchors by a zero anchor weight.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__)
#define MCSC_HD __host__ __device__ __forceinline__
#else
#define MCSC_HD inline
#endif

namespace mcsc {

template <typename T>
MCSC_HD T contrast_weight(int32_t positives, bool prevalence) {
  if (positives < 0) return T(0);
  return prevalence ? T(1) / T(positives + 1) : T(1);
}

template <typename T>
MCSC_HD T same_class_weight(int32_t positives, bool prevalence) {
  if (positives <= 0) return T(0);
  return prevalence ? T(1) / T(positives) : T(1);
}

// w_i(y_j): the weight anchor i gives to the exp-similarity of contrast j (j != i).
template <typename T>
MCSC_HD T pair_weight(int32_t label_anchor, int32_t label_contrast, T same_class_weight_anchor,
                      T contrast_weight_contrast) {
  return label_anchor == label_contrast ? same_class_weight_anchor : contrast_weight_contrast;
}

// exp of a pairwise term. On the GPU, float takes the hardware exp2
// (__expf: relative error about 2^-21 + |x| 2^-24, far inside float32's tolerance for the loss)
// rather than expf's longer range reduction; double, and the CPU, take std::exp.
template <typename T>
MCSC_HD T pair_exp(T x) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<T, float>) {
    return __expf(x);
  } else {
    return std::exp(x);
  }
#else
  return std::exp(x);
#endif
}

// Adds a partial sum of exp(x - part_max) to a running sum of exp(x - running_max), keeping
// the larger maximum (online log-sum-exp, as in flash attention). Start from (-inf, 0).
template <typename T>
MCSC_HD void merge_log_sum_exp(T& running_max, T& running_sum, T part_max, T part_sum) {
  if (part_sum == T(0)) return;  // nothing to add; part_max may be -inf
  if (part_max > running_max) {
    running_sum = running_sum * std::exp(running_max - part_max) + part_sum;
    running_max = part_max;
  } else {
    running_sum += part_sum * std::exp(part_max - running_max);
  }
}

// loss_i = lse_i - (1/|P(i)|) sum_{p in P(i)} s_ip for anchors with a positive, else 0.
template <typename T>
MCSC_HD T anchor_loss(T lse, T positive_similarity_sum, int32_t positives) {
  return positives > 0 ? lse - positive_similarity_sum / T(positives) : T(0);
}

// Upstream gradient a_i of an anchor; rows that are not anchors contribute nothing.
template <typename T>
MCSC_HD T anchor_grad_weight(T grad_loss, int32_t positives) {
  return positives > 0 ? grad_loss : T(0);
}

// Coefficient b_i = a_i / |P(i)| of the positive term's gradient.
template <typename T>
MCSC_HD T positive_grad_weight(T grad_loss, int32_t positives) {
  return positives > 0 ? grad_loss / T(positives) : T(0);
}

// G_ij + G_ji for a pair i != j, where G_ij = a_i w_i(y_j) exp(s_ij - lse_i). The gradient of
// the pairwise part is dz_i = (1/t) sum_j (G_ij + G_ji) z_j.
template <typename T>
MCSC_HD T symmetric_pair_gradient(T similarity, int32_t label_i, int32_t label_j, T anchor_i,
                                  T lse_i, T same_i, T contrast_i, T anchor_j, T lse_j,
                                  T same_j, T contrast_j) {
  const T g_ij = anchor_i == T(0) ? T(0)
                                  : anchor_i * pair_weight(label_i, label_j, same_i, contrast_j) *
                                        pair_exp(similarity - lse_i);
  const T g_ji = anchor_j == T(0) ? T(0)
                                  : anchor_j * pair_weight(label_j, label_i, same_j, contrast_i) *
                                        pair_exp(similarity - lse_j);
  return g_ij + g_ji;
}

}  // namespace mcsc
