// Decode attention's two products for a few query rows against float32 rows [T, Dh], each row read once for
// all query rows: the full cache's kernels (attention/decode_cpu.cc) and the full-precision rows of SpeCache's
// mixed cache (specache/lowbit.cc).

#ifndef PANGU_KERNELS_FFI_DENSE_ROWS_H_
#define PANGU_KERNELS_FFI_DENSE_ROWS_H_

#include <immintrin.h>

#include <cstdint>

#include "simd.h"

namespace pangu_kernels {

// out[r * out_stride + t] = q[r] . k[t] for R query rows q [R, Dh] (R <= 4: the accumulators stay in
// registers) and every row of k [T, Dh].
template <int R>
void DenseScoreRows(const float* q, const float* k, float* out, int64_t tokens, int64_t dh, int64_t out_stride) {
  const int64_t vec = dh - dh % 8;
  for (int64_t t = 0; t < tokens; ++t) {
    const float* row = k + t * dh;
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t d = 0; d < vec; d += 8) {
      const __m256 kv = _mm256_loadu_ps(row + d);
      for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(q + r * dh + d), kv, acc[r]);
    }
    for (int r = 0; r < R; ++r) {
      float sum = HorizontalSum(acc[r]);
      for (int64_t d = vec; d < dh; ++d) sum += q[r * dh + d] * row[d];
      out[r * out_stride + t] = sum;
    }
  }
}

// out[r] += sum_t p[r * p_stride + t] v[t] for R rows of weights and every row of v [T, Dh]: each value row
// is read once and serves the R rows, whose outputs [R, Dh] stay in L1.
template <int R>
void DenseWeighRows(const float* p, const float* v, float* out, int64_t tokens, int64_t dh, int64_t p_stride) {
  const int64_t vec = dh - dh % 8;
  for (int64_t t = 0; t < tokens; ++t) {
    const float* row = v + t * dh;
    __m256 weight[R];
    for (int r = 0; r < R; ++r) weight[r] = _mm256_set1_ps(p[r * p_stride + t]);
    for (int64_t d = 0; d < vec; d += 8) {
      const __m256 vv = _mm256_loadu_ps(row + d);
      for (int r = 0; r < R; ++r) {
        float* o = out + r * dh + d;
        _mm256_storeu_ps(o, _mm256_fmadd_ps(weight[r], vv, _mm256_loadu_ps(o)));
      }
    }
    for (int64_t d = vec; d < dh; ++d)
      for (int r = 0; r < R; ++r) out[r * dh + d] += p[r * p_stride + t] * row[d];
  }
}

}  // namespace pangu_kernels

#endif  // PANGU_KERNELS_FFI_DENSE_ROWS_H_
