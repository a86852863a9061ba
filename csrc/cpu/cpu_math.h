// Math that only the CPU kernels use: the range in which a tile of pairs may share one
// exponential, the pair gradient written with that shared exponential, and an exp that the
// compiler can vectorise. The formulas both backends run are in supcon_math.h.
#pragma once

#include <cmath>
#include <cstdint>

#include "supcon_math.h"

namespace mcsc {

// A tile of pairs may share one exponential per pair, exp(s_ij - b) with b >= every s_ij of
// the tile (e.g. max|z_i| max|z_j| / t), when 2 b stays within this range: every row's largest
// term is then >= exp(-2 b), far from underflow, and the backward's per-row rescale factors
// exp(b - lse_i) <= exp(2 b + log N) stay far from overflow.
template <typename T>
struct SharedShiftRange;
template <>
struct SharedShiftRange<float> {
  static constexpr float value = 40.0f;
};
template <>
struct SharedShiftRange<double> {
  static constexpr double value = 600.0;
};

// symmetric_pair_gradient with one shared exponential: shifted_exp = exp(s_ij - shift) and
// per-row scales scale_i = a_i exp(shift - lse_i). Valid while the shift keeps the scales
// finite (SharedShiftRange).
template <typename T>
inline T symmetric_pair_gradient_shared(T shifted_exp, int32_t label_i, int32_t label_j,
                                        T scale_i, T same_i, T contrast_i, T scale_j, T same_j,
                                        T contrast_j) {
  return shifted_exp * (scale_i * pair_weight(label_i, label_j, same_i, contrast_j) +
                        scale_j * pair_weight(label_j, label_i, same_j, contrast_i));
}

// exp for float without calls or data-dependent branches, so loops over it vectorise. Cody-Waite
// reduction x = k ln2 + r, |r| <= ln2/2, then a degree-6 polynomial for e^r (relative error
// about 2 ulp); results below about 2^-125 flush to 0.
inline float exp_vectorizable(float x) {
  const float clamped = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  // Round to nearest with the 1.5 * 2^23 trick: std::floor would not vectorise unless
  // -fno-trapping-math.
  const float k = (clamped * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (clamped - k * 0.693359375f) + k * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e_r = p * r * r + r + 1.0f;
  const float two_to_k = __builtin_bit_cast(float, (static_cast<int32_t>(k) + 127) << 23);
  return x < -87.0f ? 0.0f : e_r * two_to_k;
}

inline double exp_vectorizable(double x) { return std::exp(x); }

}  // namespace mcsc
