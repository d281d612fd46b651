// Small AVX2 helpers shared by the CPU FFI kernels.

#ifndef PANGU_KERNELS_FFI_SIMD_H_
#define PANGU_KERNELS_FFI_SIMD_H_

#include <immintrin.h>

namespace pangu_kernels {

// The sum of the eight lanes.
inline float HorizontalSum(__m256 v) {
  __m128 sum = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  sum = _mm_hadd_ps(sum, sum);
  return _mm_cvtss_f32(_mm_hadd_ps(sum, sum));
}

// sums[i] = the sum of acc[i]'s lanes for eight vectors, through one tree of horizontal adds: ~9 shuffles and
// adds for the eight, against ~5 for each alone.
inline void HorizontalSums8(const __m256* acc, float* sums) {
  const __m256 h01 = _mm256_hadd_ps(acc[0], acc[1]), h23 = _mm256_hadd_ps(acc[2], acc[3]);
  const __m256 h45 = _mm256_hadd_ps(acc[4], acc[5]), h67 = _mm256_hadd_ps(acc[6], acc[7]);
  const __m256 x = _mm256_hadd_ps(h01, h23), y = _mm256_hadd_ps(h45, h67);  // [0-3 low, 0-3 high], [4-7 ..]
  const __m256 low = _mm256_permute2f128_ps(x, y, 0x20), high = _mm256_permute2f128_ps(x, y, 0x31);
  _mm256_storeu_ps(sums, _mm256_add_ps(low, high));
}

}  // namespace pangu_kernels

#endif  // PANGU_KERNELS_FFI_SIMD_H_
