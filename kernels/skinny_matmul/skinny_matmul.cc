// y[M, N] = x[M, K] . w[N, K]^T in float32 for few rows M: the matmuls of a decode step on CPU.
//
// Each weight row is read from memory once: a 4-row x 3-column block of dot products accumulates 8 lanes
// of K at a time in 12 AVX2 registers, and the same 3 weight rows (in L1) serve every 4-row block of x
// before the next 3 are read. XLA:CPU's library GEMMs pack the weight on every call instead, which costs
// more than the multiply-adds when M is 1..16 (kernels/skinny_matmul/api.py has the measurements).
// Columns are split over XLA's intra-op thread pool when it has more than one thread (parallel_for.h).

#include <immintrin.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "parallel_for.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using Matrix = ffi::Buffer<ffi::F32, 2>;

// Dot products of R rows of x with C rows of w (R * C <= 12 accumulators), K % 8 tail in scalar.
template <int R, int C>
inline void Block(const float* x, const float* w, float* y, int64_t k_size, int64_t n_size) {
  __m256 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  const int64_t k_vec = k_size - k_size % 8;
  for (int64_t k = 0; k < k_vec; k += 8) {
    __m256 wv[C];
    for (int c = 0; c < C; ++c) wv[c] = _mm256_loadu_ps(w + c * k_size + k);
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_loadu_ps(x + r * k_size + k);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm256_fmadd_ps(xv, wv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      float sum = pangu_kernels::HorizontalSum(acc[r][c]);
      for (int64_t k = k_vec; k < k_size; ++k) sum += x[r * k_size + k] * w[c * k_size + k];
      y[r * n_size + c] = sum;
    }
}

// Rows of x per pass over the weights: 8 rows of a few thousand floats stay in L1 while the weights stream by.
constexpr int64_t kRowPanel = 8;

// Columns [n_begin, n_end) of y, all M rows, one panel of rows at a time.
void Columns(const float* x, const float* w, float* y, int64_t m_size, int64_t n_size, int64_t k_size,
             int64_t n_begin, int64_t n_end) {
  for (int64_t panel = 0; panel < m_size; panel += kRowPanel) {
    const int64_t panel_end = std::min(m_size, panel + kRowPanel);
    int64_t n = n_begin;
    for (; n + 3 <= n_end; n += 3) {
      int64_t m = panel;
      for (; m + 4 <= panel_end; m += 4) {
        Block<4, 3>(x + m * k_size, w + n * k_size, y + m * n_size + n, k_size, n_size);
      }
      for (; m < panel_end; ++m) Block<1, 3>(x + m * k_size, w + n * k_size, y + m * n_size + n, k_size, n_size);
    }
    for (; n < n_end; ++n) {
      int64_t m = panel;
      for (; m + 4 <= panel_end; m += 4) {
        Block<4, 1>(x + m * k_size, w + n * k_size, y + m * n_size + n, k_size, n_size);
      }
      for (; m < panel_end; ++m) Block<1, 1>(x + m * k_size, w + n * k_size, y + m * n_size + n, k_size, n_size);
    }
  }
}

// Below this many weight bytes per chunk, scheduling costs more than it saves.
constexpr int64_t kMinBytesPerChunk = 256 << 10;

ffi::Error SkinnyMatmulImpl(ffi::ThreadPool pool, Matrix x, Matrix w, ffi::Result<Matrix> y) {
  const int64_t m_size = x.dimensions()[0], k_size = x.dimensions()[1], n_size = w.dimensions()[0];
  if (w.dimensions()[1] != k_size || y->dimensions()[0] != m_size || y->dimensions()[1] != n_size) {
    return ffi::Error::InvalidArgument("skinny_matmul: expected x [M, K], w [N, K], y [M, N]");
  }
  const int64_t bytes = n_size * k_size * static_cast<int64_t>(sizeof(float));
  const int64_t threads = std::min<int64_t>(pool.num_threads(), bytes / kMinBytesPerChunk);
  // Four chunks per thread, in multiples of the block width 3, even out threads slowed by other work.
  const int64_t width = std::max<int64_t>(3, (n_size / (4 * std::max<int64_t>(threads, 1)) + 2) / 3 * 3);
  const int64_t chunks = threads <= 1 ? 1 : (n_size + width - 1) / width;
  const float* x_data = x.typed_data();
  const float* w_data = w.typed_data();
  float* y_data = y->typed_data();
  pangu_kernels::ParallelFor(pool, chunks, threads, [&](int64_t chunk) {
    const int64_t begin = chunks == 1 ? 0 : chunk * width;
    const int64_t end = chunks == 1 ? n_size : std::min(n_size, (chunk + 1) * width);
    Columns(x_data, w_data, y_data, m_size, n_size, k_size, begin, end);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SkinnyMatmul, SkinnyMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Matrix>()
                                  .Arg<Matrix>()
                                  .Ret<Matrix>());
