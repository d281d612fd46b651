// Attention's two products over bit-packed KIVI codes, read in place (never dequantised into a float cache):
//   LowbitScores:         s[n, r, t] = q[n, r] . k_hat[n, t]          keys per channel over groups of g tokens
//   LowbitWeightedValues: o[n, r]    = sum_t p[n, r, t] v_hat[n, t]   values per token over groups of channels
// On CPU a decode step is bound by the bytes it reads: the float32 cache is 32 / b times the codes, and XLA
// materialises a dequantised copy before its matmuls, so a low-bit cache read that way costs more than the
// full one. Here each token's codes are unpacked in registers.
//
// Bit layout (reference.py): a row of Dh b-bit codes packs into P = Dh b / 8 bytes, and slot j of byte p holds
// channel j P + p. Eight consecutive bytes widened to eight int32 lanes therefore give, per slot, the eight
// consecutive channels j P + p0 .. j P + p0 + 7: one shift, mask and convert per slot, no shuffles. A row's
// last P % 8 bytes go four at a time (SSE), then one by one; values take the 8- or 4-byte path when P and the
// channel groups are multiples of it, else the scalar one. The batch-head axis n is split over XLA's thread
// pool (parallel_for.h).

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel_for.h"
#include "row_blocks.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using Codes = ffi::Buffer<ffi::U8, 3>;
using Floats = ffi::Buffer<ffi::F32, 3>;

// One block of bytes widened to int32 lanes: eight with AVX (Wide) or four with SSE (Narrow, for rows of
// P % 8 == 4 bytes, e.g. 1-bit codes of Dh = 32). Both share the loops below.
struct Wide {
  static constexpr int kBytes = 8;
  using Float = __m256;
  using Int = __m256i;
  static Int Widen(const uint8_t* bytes) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes)));
  }
  static Float Codes(Int bytes, int shift, int bits) {
    const Int field = _mm256_srl_epi32(bytes, _mm_cvtsi32_si128(shift));
    return _mm256_cvtepi32_ps(_mm256_and_si256(field, _mm256_set1_epi32((1 << bits) - 1)));
  }
  static Float Zero() { return _mm256_setzero_ps(); }
  static Float Load(const float* p) { return _mm256_loadu_ps(p); }
  static void Store(float* p, Float v) { _mm256_storeu_ps(p, v); }
  static Float Broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  static Float Fma(Float a, Float b, Float c) { return _mm256_fmadd_ps(a, b, c); }
  static Float Add(Float a, Float b) { return _mm256_add_ps(a, b); }
  static float Sum(Float v) { return pangu_kernels::HorizontalSum(v); }
};

struct Narrow {
  static constexpr int kBytes = 4;
  using Float = __m128;
  using Int = __m128i;
  static Int Widen(const uint8_t* bytes) {
    int32_t word;
    std::memcpy(&word, bytes, sizeof(word));
    return _mm_cvtepu8_epi32(_mm_cvtsi32_si128(word));
  }
  static Float Codes(Int bytes, int shift, int bits) {
    const Int field = _mm_srl_epi32(bytes, _mm_cvtsi32_si128(shift));
    return _mm_cvtepi32_ps(_mm_and_si128(field, _mm_set1_epi32((1 << bits) - 1)));
  }
  static Float Zero() { return _mm_setzero_ps(); }
  static Float Load(const float* p) { return _mm_loadu_ps(p); }
  static void Store(float* p, Float v) { _mm_storeu_ps(p, v); }
  static Float Broadcast(const float* p) { return _mm_broadcast_ss(p); }
  static Float Fma(Float a, Float b, Float c) { return _mm_fmadd_ps(a, b, c); }
  static Float Add(Float a, Float b) { return _mm_add_ps(a, b); }
  static float Sum(Float v) {
    v = _mm_hadd_ps(v, v);
    return _mm_cvtss_f32(_mm_hadd_ps(v, v));
  }
};

struct Shape {
  int64_t rows, tokens, dh, packed, groups;  // R, T, Dh, P, and T / g (keys) or Dh / g_v (values)
  int bits;
  int64_t per() const { return 8 / bits; }
  int64_t Whole(int block) const { return packed - packed % block; }  // bytes in whole blocks
};

inline int Code(uint8_t byte, int64_t slot, int bits) { return (byte >> (slot * bits)) & ((1 << bits) - 1); }

// sums[r] += folded[r] . codes of bytes [begin, end) of one token's row, in blocks of V::kBytes.
template <class V, int R>
inline void DotBlocks(const uint8_t* row, const float* folded, const Shape& s, int64_t begin, int64_t end,
                      float* sums) {
  if (begin >= end) return;
  typename V::Float acc[R];
  for (int r = 0; r < R; ++r) acc[r] = V::Zero();
  for (int64_t p0 = begin; p0 < end; p0 += V::kBytes) {
    const typename V::Int bytes = V::Widen(row + p0);
    for (int j = 0; j < s.per(); ++j) {
      const typename V::Float c = V::Codes(bytes, j * s.bits, s.bits);
      for (int r = 0; r < R; ++r) acc[r] = V::Fma(c, V::Load(folded + r * s.dh + j * s.packed + p0), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) sums[r] += V::Sum(acc[r]);
}

// Scores of R query rows (R <= 4, a template so the accumulators stay in registers) against one n's keys.
// Per group of g tokens the query is folded into the dequantisation: q . (c s + z) = (q s) . c + q . z.
template <int R>
void ScoreRows(const float* q, const uint8_t* codes, const float* scale, const float* zero, float* out,
               const Shape& s, std::vector<float>& folded) {
  const int64_t g = s.tokens / s.groups, wide = s.Whole(8), narrow = s.Whole(4);
  folded.resize(R * s.dh);
  for (int64_t group = 0; group < s.groups; ++group) {
    const float* sc = scale + group * s.dh;
    const float* ze = zero + group * s.dh;
    float offset[R];
    for (int r = 0; r < R; ++r) {
      offset[r] = 0.f;
      for (int64_t d = 0; d < s.dh; ++d) {
        folded[r * s.dh + d] = q[r * s.dh + d] * sc[d];
        offset[r] += q[r * s.dh + d] * ze[d];
      }
    }
    for (int64_t t = group * g; t < (group + 1) * g; ++t) {
      const uint8_t* row = codes + t * s.packed;
      float sums[R];
      for (int r = 0; r < R; ++r) sums[r] = offset[r];
      DotBlocks<Wide, R>(row, folded.data(), s, 0, wide, sums);
      DotBlocks<Narrow, R>(row, folded.data(), s, wide, narrow, sums);
      for (int64_t p = narrow; p < s.packed; ++p)
        for (int j = 0; j < s.per(); ++j)
          for (int r = 0; r < R; ++r) sums[r] += Code(row[p], j, s.bits) * folded[r * s.dh + j * s.packed + p];
      for (int r = 0; r < R; ++r) out[r * s.tokens + t] = sums[r];
    }
  }
}

void Scores(const float* q, const uint8_t* codes, const float* scale, const float* zero, float* out,
            const Shape& s) {
  std::vector<float> folded;
  pangu_kernels::ForRowBlocks(s.rows, [&](int64_t r0, auto rows) {
    ScoreRows<decltype(rows)::value>(q + r0 * s.dh, codes, scale, zero, out + r0 * s.tokens, s, folded);
  });
}

// out[r, channels of bytes [begin, end)] += sum_t weights[t, r, group] codes[t]: one block of V::kBytes and
// one slot at a time over every token, so the R accumulators stay in registers. A block's channels
// j P + p0 .. j P + p0 + kBytes - 1 must share one value group (the caller checks).
template <class V, int R>
void WeighBlocks(const uint8_t* codes, const float* weights, float* out, const Shape& s, int64_t begin,
                 int64_t end) {
  const int64_t gv = s.dh / s.groups;
  for (int64_t p0 = begin; p0 < end; p0 += V::kBytes) {
    for (int j = 0; j < s.per(); ++j) {
      const int64_t d0 = j * s.packed + p0, group = d0 / gv;
      typename V::Float acc[R];
      for (int r = 0; r < R; ++r) acc[r] = V::Zero();
      for (int64_t t = 0; t < s.tokens; ++t) {
        const typename V::Float c = V::Codes(V::Widen(codes + t * s.packed + p0), j * s.bits, s.bits);
        const float* w = weights + t * R * s.groups + group;
        for (int r = 0; r < R; ++r) acc[r] = V::Fma(V::Broadcast(w + r * s.groups), c, acc[r]);
      }
      for (int r = 0; r < R; ++r) V::Store(out + r * s.dh + d0, V::Add(V::Load(out + r * s.dh + d0), acc[r]));
    }
  }
}

// o[r] = sum_t p[r, t] (c[t] s[t, group] + z[t, group]) for one n, with p[r, t] s[t, group] computed once per
// token (`weights`, [T, R, groups]) and the zero term summed apart (R x groups per token).
template <int R>
void WeighRows(const float* p, const uint8_t* codes, const float* scale, const float* zero, float* out,
               const Shape& s, std::vector<float>& weights) {
  const int64_t gv = s.dh / s.groups;
  std::vector<float> zero_term(R * s.groups, 0.f);
  weights.resize(s.tokens * R * s.groups);
  for (int64_t t = 0; t < s.tokens; ++t) {
    for (int r = 0; r < R; ++r) {
      for (int64_t group = 0; group < s.groups; ++group) {
        weights[(t * R + r) * s.groups + group] = p[r * s.tokens + t] * scale[t * s.groups + group];
        zero_term[r * s.groups + group] += p[r * s.tokens + t] * zero[t * s.groups + group];
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int64_t d = 0; d < s.dh; ++d) out[r * s.dh + d] = zero_term[r * s.groups + d / gv];
  // Every block of a row must start a multiple of its width into a value group: whole rows of one width.
  const bool wide_rows = s.packed % 8 == 0 && gv % 8 == 0, narrow_rows = s.packed % 4 == 0 && gv % 4 == 0;
  const int64_t wide = wide_rows ? s.packed : 0, narrow = wide_rows || narrow_rows ? s.packed : 0;
  WeighBlocks<Wide, R>(codes, weights.data(), out, s, 0, wide);
  WeighBlocks<Narrow, R>(codes, weights.data(), out, s, wide, narrow);
  for (int64_t t = 0; t < s.tokens; ++t)
    for (int64_t p0 = narrow; p0 < s.packed; ++p0)
      for (int j = 0; j < s.per(); ++j) {
        const int64_t d = j * s.packed + p0;
        const int c = Code(codes[t * s.packed + p0], j, s.bits);
        for (int r = 0; r < R; ++r) out[r * s.dh + d] += weights[(t * R + r) * s.groups + d / gv] * c;
      }
}

void Weigh(const float* p, const uint8_t* codes, const float* scale, const float* zero, float* out,
           const Shape& s) {
  std::vector<float> weights;
  pangu_kernels::ForRowBlocks(s.rows, [&](int64_t r0, auto rows) {
    WeighRows<decltype(rows)::value>(p + r0 * s.tokens, codes, scale, zero, out + r0 * s.dh, s, weights);
  });
}

// One n per work item: below this many code bytes per item, scheduling costs more than it saves.
constexpr int64_t kMinBytesPerItem = 16 << 10;

int64_t Threads(ffi::ThreadPool& pool, int64_t items, int64_t bytes_per_item) {
  return bytes_per_item < kMinBytesPerItem ? 1 : std::min<int64_t>(pool.num_threads(), items);
}

ffi::Error CheckBits(int32_t bits, int64_t dh, int64_t packed) {
  if (bits != 1 && bits != 2 && bits != 4 && bits != 8) {
    return ffi::Error::InvalidArgument("lowbit: bits must be 1, 2, 4 or 8");
  }
  if (dh * bits != packed * 8) return ffi::Error::InvalidArgument("lowbit: codes are not Dh * bits / 8 bytes");
  return ffi::Error::Success();
}

// q [N, R, Dh], codes [N, T, P], scale / zero [N, T / g, Dh] -> scores [N, R, T] (unscaled).
ffi::Error LowbitScoresImpl(ffi::ThreadPool pool, Floats q, Codes codes, Floats scale, Floats zero,
                            ffi::Result<Floats> out, int32_t bits) {
  const Shape s{q.dimensions()[1], codes.dimensions()[1], q.dimensions()[2], codes.dimensions()[2],
                scale.dimensions()[1], bits};
  const int64_t n_size = q.dimensions()[0];
  if (ffi::Error e = CheckBits(bits, s.dh, s.packed); e.failure()) return e;
  if (codes.dimensions()[0] != n_size || scale.dimensions()[2] != s.dh || !(zero.dimensions() == scale.dimensions()) ||
      s.groups < 1 || s.tokens % s.groups) {
    return ffi::Error::InvalidArgument("lowbit_scores: expected q [N, R, Dh], codes [N, T, P], scale / zero "
                                       "[N, T / g, Dh]");
  }
  const float *qd = q.typed_data(), *sd = scale.typed_data(), *zd = zero.typed_data();
  const uint8_t* cd = codes.typed_data();
  float* od = out->typed_data();
  pangu_kernels::ParallelFor(pool, n_size, Threads(pool, n_size, s.tokens * s.packed), [&](int64_t n) {
    Scores(qd + n * s.rows * s.dh, cd + n * s.tokens * s.packed, sd + n * s.groups * s.dh,
           zd + n * s.groups * s.dh, od + n * s.rows * s.tokens, s);
  });
  return ffi::Error::Success();
}

// p [N, R, T], codes [N, T, P], scale / zero [N, T, Dh / g_v] -> out [N, R, Dh].
ffi::Error LowbitWeightedValuesImpl(ffi::ThreadPool pool, Floats p, Codes codes, Floats scale, Floats zero,
                                    ffi::Result<Floats> out, int32_t bits) {
  const Shape s{p.dimensions()[1], codes.dimensions()[1], out->dimensions()[2], codes.dimensions()[2],
                scale.dimensions()[2], bits};
  const int64_t n_size = p.dimensions()[0];
  if (ffi::Error e = CheckBits(bits, s.dh, s.packed); e.failure()) return e;
  if (codes.dimensions()[0] != n_size || p.dimensions()[2] != s.tokens || scale.dimensions()[1] != s.tokens ||
      !(zero.dimensions() == scale.dimensions()) || s.groups < 1 || s.dh % s.groups) {
    return ffi::Error::InvalidArgument("lowbit_weighted_values: expected p [N, R, T], codes [N, T, P], "
                                       "scale / zero [N, T, Dh / g_v]");
  }
  const float *pd = p.typed_data(), *sd = scale.typed_data(), *zd = zero.typed_data();
  const uint8_t* cd = codes.typed_data();
  float* od = out->typed_data();
  pangu_kernels::ParallelFor(pool, n_size, Threads(pool, n_size, s.tokens * s.packed), [&](int64_t n) {
    Weigh(pd + n * s.rows * s.tokens, cd + n * s.tokens * s.packed, sd + n * s.tokens * s.groups,
          zd + n * s.tokens * s.groups, od + n * s.rows * s.dh, s);
  });
  return ffi::Error::Success();
}

// Both handlers: (pool, floats [N, R, .], codes [N, T, P], scale [N, ., .], zero like scale) -> floats, bits.
auto Binding() {
  return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<Floats>().Arg<Codes>().Arg<Floats>().Arg<Floats>()
      .Ret<Floats>().Attr<int32_t>("bits");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LowbitScores, LowbitScoresImpl, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(LowbitWeightedValues, LowbitWeightedValuesImpl, Binding());
