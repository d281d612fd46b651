// Decode attention over a float32 KV cache in its [N, T, Dh] layout, each K and V row read once:
//   DenseProbabilities:  p[n, r] = softmax over the visible t of (capped) q[n, r] . k[n, t]
//   DenseWeightedValues: o[n, r] = sum_t p[n, r, t] v[n, t]
// A decode step reads the whole cache for a few query rows, so it is bound by memory bandwidth; XLA:CPU's
// library dots stream it at about half the rate a plain reduction reaches (kernels/attention/cpu.py has the
// numbers). Rows of the batch-head axis n are split over XLA's thread pool (parallel_for.h).

#include <algorithm>
#include <cstdint>

#include "dense_rows.h"
#include "parallel_for.h"
#include "row_blocks.h"
#include "softmax.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using Floats = ffi::Buffer<ffi::F32, 3>;

// One n per work item: below this many cache bytes per item, scheduling costs more than it saves.
constexpr int64_t kMinBytesPerItem = 64 << 10;

// p [N, R, T], values [N, T, Dh] -> out [N, R, Dh].
ffi::Error WeightedValues(ffi::ThreadPool pool, Floats p, Floats values, ffi::Result<Floats> out) {
  const int64_t n_size = p.dimensions()[0], rows = p.dimensions()[1];
  const int64_t tokens = values.dimensions()[1], dh = values.dimensions()[2];
  if (values.dimensions()[0] != n_size || p.dimensions()[2] != tokens) {
    return ffi::Error::InvalidArgument("decode_cpu: expected p [N, R, T] beside values [N, T, Dh]");
  }
  const int64_t threads = pangu_kernels::ThreadsWorth(pool, tokens * dh * 4, kMinBytesPerItem);
  pangu_kernels::ParallelFor(pool, n_size, threads, [&](int64_t n) {
    pangu_kernels::ForRowBlocks(rows, [&](int64_t r0, auto block) {
      constexpr int R = decltype(block)::value;
      float* on = out->typed_data() + (n * rows + r0) * dh;
      std::fill(on, on + R * dh, 0.f);
      pangu_kernels::DenseWeighRows<R>(p.typed_data() + (n * rows + r0) * tokens,
                                       values.typed_data() + n * tokens * dh, on, tokens, dh, tokens);
    });
  });
  return ffi::Error::Success();
}

using Mask = ffi::Buffer<ffi::PRED, 3>;

// q [N, R, Dh], keys [N, T, Dh], visible [B, R, T] (N = B K) -> the attention probabilities [N, R, T]: each n's
// scores, capped (softcap > 0: c tanh(s / c)), then the softmax over the slots its batch row sees, while the
// rows are in cache: it saves XLA's passes of the mask, maximum, exponential and sums.
ffi::Error Probabilities(ffi::ThreadPool pool, Floats q, Floats keys, Mask visible, ffi::Result<Floats> out,
                         float softcap) {
  const int64_t n_size = q.dimensions()[0], rows = q.dimensions()[1], batch = visible.dimensions()[0];
  const int64_t tokens = keys.dimensions()[1], dh = keys.dimensions()[2];
  if (keys.dimensions()[0] != n_size || q.dimensions()[2] != dh || batch < 1 || n_size % batch ||
      visible.dimensions()[1] != rows || visible.dimensions()[2] != tokens) {
    return ffi::Error::InvalidArgument(
        "decode_cpu: expected q [N, R, Dh], keys [N, T, Dh] and visible [B, R, T] with N a multiple of B");
  }
  const int64_t threads = pangu_kernels::ThreadsWorth(pool, tokens * dh * 4, kMinBytesPerItem);
  pangu_kernels::ParallelFor(pool, n_size, threads, [&](int64_t n) {
    float* on = out->typed_data() + n * rows * tokens;
    pangu_kernels::ForRowBlocks(rows, [&](int64_t r0, auto block) {
      constexpr int R = decltype(block)::value;
      pangu_kernels::DenseScoreRows<R>(q.typed_data() + (n * rows + r0) * dh, keys.typed_data() + n * tokens * dh,
                                       on + r0 * tokens, tokens, dh, tokens);
    });
    const bool* seen = visible.typed_data() + n / (n_size / batch) * rows * tokens;
    for (int64_t r = 0; r < rows; ++r)
      pangu_kernels::MaskedSoftmax(on + r * tokens, seen + r * tokens, tokens, softcap);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DenseProbabilities, Probabilities,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<Floats>().Arg<Floats>().Arg<Mask>()
                                  .Ret<Floats>().Attr<float>("softcap"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(DenseWeightedValues, WeightedValues,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<Floats>().Arg<Floats>().Ret<Floats>());
