// Decode attention's two products over a float32 KV cache in its [N, T, Dh] layout, each K and V row read once:
//   DenseScores:         s[n, r, t] = q[n, r] . k[n, t]
//   DenseWeightedValues: o[n, r]    = sum_t p[n, r, t] v[n, t]
// A decode step reads the whole cache for a few query rows, so it is bound by memory bandwidth; XLA:CPU's
// library dots stream it at about half the rate a plain reduction reaches (kernels/attention/cpu.py has the
// numbers). Rows of the batch-head axis n are split over XLA's thread pool (parallel_for.h).

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "parallel_for.h"
#include "row_blocks.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using Floats = ffi::Buffer<ffi::F32, 3>;

// Scores of R query rows (R <= 4: the accumulators stay in registers) against every key row of one n.
template <int R>
void ScoreRows(const float* q, const float* k, float* out, int64_t tokens, int64_t dh) {
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
      float sum = pangu_kernels::HorizontalSum(acc[r]);
      for (int64_t d = vec; d < dh; ++d) sum += q[r * dh + d] * row[d];
      out[r * tokens + t] = sum;
    }
  }
}

// o[r] += p[r, t] v[t] for every token of one n: each value row is read once and serves the R rows, whose
// outputs stay in L1.
template <int R>
void WeighRows(const float* p, const float* v, float* out, int64_t tokens, int64_t dh) {
  const int64_t vec = dh - dh % 8;
  std::fill(out, out + R * dh, 0.f);
  for (int64_t t = 0; t < tokens; ++t) {
    const float* row = v + t * dh;
    __m256 weight[R];
    for (int r = 0; r < R; ++r) weight[r] = _mm256_set1_ps(p[r * tokens + t]);
    for (int64_t d = 0; d < vec; d += 8) {
      const __m256 vv = _mm256_loadu_ps(row + d);
      for (int r = 0; r < R; ++r) {
        float* o = out + r * dh + d;
        _mm256_storeu_ps(o, _mm256_fmadd_ps(weight[r], vv, _mm256_loadu_ps(o)));
      }
    }
    for (int64_t d = vec; d < dh; ++d)
      for (int r = 0; r < R; ++r) out[r * dh + d] += p[r * tokens + t] * row[d];
  }
}

// One n per work item: below this many cache bytes per item, scheduling costs more than it saves.
constexpr int64_t kMinBytesPerItem = 64 << 10;

int64_t Threads(ffi::ThreadPool& pool, int64_t items, int64_t bytes_per_item) {
  return bytes_per_item < kMinBytesPerItem ? 1 : std::min<int64_t>(pool.num_threads(), items);
}

// a [N, R, X], cache [N, T, Dh] -> out [N, R, Y]: scores (X = Dh, Y = T) or weighted values (X = T, Y = Dh).
template <bool kScores>
ffi::Error Products(ffi::ThreadPool pool, Floats a, Floats cache, ffi::Result<Floats> out) {
  const int64_t n_size = a.dimensions()[0], rows = a.dimensions()[1];
  const int64_t tokens = cache.dimensions()[1], dh = cache.dimensions()[2];
  if (cache.dimensions()[0] != n_size || a.dimensions()[2] != (kScores ? dh : tokens)) {
    return ffi::Error::InvalidArgument("decode_cpu: expected q [N, R, Dh] or p [N, R, T] beside a cache [N, T, Dh]");
  }
  const float* ad = a.typed_data();
  const float* cd = cache.typed_data();
  float* od = out->typed_data();
  const int64_t width = a.dimensions()[2], out_width = kScores ? tokens : dh;
  pangu_kernels::ParallelFor(pool, n_size, Threads(pool, n_size, tokens * dh * 4), [&](int64_t n) {
    pangu_kernels::ForRowBlocks(rows, [&](int64_t r0, auto block) {
      constexpr int R = decltype(block)::value;
      const float* an = ad + (n * rows + r0) * width;
      float* on = od + (n * rows + r0) * out_width;
      if constexpr (kScores) {
        ScoreRows<R>(an, cd + n * tokens * dh, on, tokens, dh);
      } else {
        WeighRows<R>(an, cd + n * tokens * dh, on, tokens, dh);
      }
    });
  });
  return ffi::Error::Success();
}

auto Binding() {
  return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<Floats>().Arg<Floats>().Ret<Floats>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DenseScores, Products<true>, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(DenseWeightedValues, Products<false>, Binding());
