// Decode attention's two products over a float32 KV cache in its [N, T, Dh] layout, each K and V row read once:
//   DenseScores:         s[n, r, t] = q[n, r] . k[n, t]
//   DenseWeightedValues: o[n, r]    = sum_t p[n, r, t] v[n, t]
// A decode step reads the whole cache for a few query rows, so it is bound by memory bandwidth; XLA:CPU's
// library dots stream it at about half the rate a plain reduction reaches (kernels/attention/cpu.py has the
// numbers). Rows of the batch-head axis n are split over XLA's thread pool (parallel_for.h).

#include <algorithm>
#include <cstdint>

#include "dense_rows.h"
#include "parallel_for.h"
#include "row_blocks.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using Floats = ffi::Buffer<ffi::F32, 3>;

// One n per work item: below this many cache bytes per item, scheduling costs more than it saves.
constexpr int64_t kMinBytesPerItem = 64 << 10;

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
  const int64_t threads = pangu_kernels::ThreadsWorth(pool, tokens * dh * 4, kMinBytesPerItem);
  pangu_kernels::ParallelFor(pool, n_size, threads, [&](int64_t n) {
    pangu_kernels::ForRowBlocks(rows, [&](int64_t r0, auto block) {
      constexpr int R = decltype(block)::value;
      const float* an = ad + (n * rows + r0) * width;
      float* on = od + (n * rows + r0) * out_width;
      if constexpr (kScores) {
        pangu_kernels::DenseScoreRows<R>(an, cd + n * tokens * dh, on, tokens, dh, tokens);
      } else {
        std::fill(on, on + R * dh, 0.f);
        pangu_kernels::DenseWeighRows<R>(an, cd + n * tokens * dh, on, tokens, dh, tokens);
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
