// A decode step's softmax over one row of attention scores, in place, for the kernels that computed them
// (attention/decode_cpu.cc, specache/lowbit.cc): done while the row is in cache, it saves XLA's separate
// passes of the mask, maximum, exponential, sum and division over every row.

#ifndef PANGU_KERNELS_FFI_SOFTMAX_H_
#define PANGU_KERNELS_FFI_SOFTMAX_H_

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace pangu_kernels {

// e^x in eight lanes (Cephes' expf): 2^n e^r with n = round(x log2 e) and r = x - n ln 2 (ln 2 in two parts, so
// r is exact), e^r = 1 + r + r^2 P(r) on |r| <= ln 2 / 2. At most 1.24 ulp from a float64 exp (checked every
// 7e-4 over [-87, 88]); x is clamped there (below: ~1e-38, not 0).
inline __m256 Exp(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i exponent = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(exponent));
}

// c tanh(s / c) = c (1 - 2 / (e^(2 s / c) + 1)): the logit soft-cap.
inline __m256 SoftCap(__m256 s, float cap) {
  const __m256 e = Exp(_mm256_mul_ps(s, _mm256_set1_ps(2.0f / cap)));
  const __m256 tanh = _mm256_sub_ps(_mm256_set1_ps(1.0f),
                                    _mm256_div_ps(_mm256_set1_ps(2.0f), _mm256_add_ps(e, _mm256_set1_ps(1.0f))));
  return _mm256_mul_ps(_mm256_set1_ps(cap), tanh);
}

// Eight lanes of visible[i .. i + 7] (bools) as an all-ones / zero mask.
inline __m256 VisibleMask(const bool* visible) {
  const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(visible)));
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(bytes, _mm256_setzero_si256()));
}

// row[i] <- softmax over the visible i of the scores row [size], soft-capped first where cap > 0, 0 where not
// visible; with none visible, 1 / size each (what a softmax over a finite "masked" score gives).
inline void MaskedSoftmax(float* row, const bool* visible, int64_t size, float cap) {
  const int64_t vec = size - size % 8;
  const float minus_inf = -std::numeric_limits<float>::infinity();
  const auto cap_one = [cap](float s) { return cap > 0 ? cap * std::tanh(s / cap) : s; };
  __m256 top = _mm256_set1_ps(minus_inf);
  for (int64_t i = 0; i < vec; i += 8) {
    __m256 s = _mm256_loadu_ps(row + i);
    if (cap > 0) _mm256_storeu_ps(row + i, s = SoftCap(s, cap));
    top = _mm256_max_ps(top, _mm256_blendv_ps(_mm256_set1_ps(minus_inf), s, VisibleMask(visible + i)));
  }
  float most = minus_inf;
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, top);
  for (float lane : lanes) most = std::max(most, lane);
  for (int64_t i = vec; i < size; ++i) {
    row[i] = cap_one(row[i]);
    if (visible[i]) most = std::max(most, row[i]);
  }
  if (most == minus_inf) {
    for (int64_t i = 0; i < size; ++i) row[i] = 1.0f / size;
    return;
  }
  __m256 total = _mm256_setzero_ps();
  for (int64_t i = 0; i < vec; i += 8) {
    const __m256 e = _mm256_and_ps(Exp(_mm256_sub_ps(_mm256_loadu_ps(row + i), _mm256_set1_ps(most))),
                                   VisibleMask(visible + i));
    _mm256_storeu_ps(row + i, e);
    total = _mm256_add_ps(total, e);
  }
  _mm256_store_ps(lanes, total);
  float sum = 0.f;
  for (float lane : lanes) sum += lane;
  for (int64_t i = vec; i < size; ++i) sum += row[i] = visible[i] ? std::exp(row[i] - most) : 0.f;
  const __m256 inverse = _mm256_set1_ps(1.0f / sum);
  for (int64_t i = 0; i < vec; i += 8) _mm256_storeu_ps(row + i, _mm256_mul_ps(_mm256_loadu_ps(row + i), inverse));
  for (int64_t i = vec; i < size; ++i) row[i] *= 1.0f / sum;
}

}  // namespace pangu_kernels

#endif  // PANGU_KERNELS_FFI_SOFTMAX_H_
