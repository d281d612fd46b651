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

}  // namespace pangu_kernels

#endif  // PANGU_KERNELS_FFI_SIMD_H_
