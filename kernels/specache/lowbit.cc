// Attention's two products over SpeCache's mixed cache: T bit-packed KIVI slots, read in place (never
// dequantised into a float cache), k of them held at full precision, then E full-precision rows (the residual):
//   LowbitScores:         s[n, r, t] = q[n, r] . k[n, t]          k_hat per channel over groups of g tokens
//   LowbitWeightedValues: o[n, r]    = sum_t p[n, r, t] v[n, t]   v_hat per token over groups of channels
// where k / v are the held or exact row, else the dequantised slot. On CPU a decode step is bound by the bytes
// it reads: the float32 cache is 32 / b times the codes, and XLA materialises a dequantised copy before its
// matmuls, so a low-bit cache read that way costs more than the full one. Here each token's codes are unpacked
// in registers, and the full-precision rows join in the same call (dense_rows.h), which saves the step the
// small XLA products, concatenations and scatters that assembling the mixed scores and values cost.
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

#include "dense_rows.h"
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
  int64_t exact, held;  // E: full-precision rows after the T low-bit slots (the residual); k: held slots
  int64_t stride() const { return tokens + exact; }  // of a row of scores or weights: T + E slots
  int64_t per() const { return 8 / bits; }
  int64_t Whole(int block) const { return packed - packed % block; }  // bytes in whole blocks
};

inline int Code(uint8_t byte, int64_t slot, int bits) { return (byte >> (slot * bits)) & ((1 << bits) - 1); }

// Tokens scored per pass: U tokens x R rows of independent FMA chains, fewer waits on one chain's latency, and
// each load of the folded query serves U tokens. 16 x 4k 1-bit tokens on the dev machine (AMD EPYC): 0.95 ->
// 0.86 ms for 4 rows, 0.57 -> 0.49 ms for 2, against one token per pass.
template <int R>
constexpr int kScoreTokensPerPass = R <= 2 ? 4 : 2;

// sums[u][r] += folded[r] . codes of bytes [begin, end) of the U consecutive token rows from `rows`, in blocks
// of V::kBytes.
template <class V, int R, int U>
inline void DotBlocks(const uint8_t* rows, const float* folded, const Shape& s, int64_t begin, int64_t end,
                      float (&sums)[U][R]) {
  if (begin >= end) return;
  typename V::Float acc[U][R];
  for (int u = 0; u < U; ++u)
    for (int r = 0; r < R; ++r) acc[u][r] = V::Zero();
  for (int64_t p0 = begin; p0 < end; p0 += V::kBytes) {
    typename V::Int bytes[U];
    for (int u = 0; u < U; ++u) bytes[u] = V::Widen(rows + u * s.packed + p0);
    for (int j = 0; j < s.per(); ++j) {
      typename V::Float c[U];
      for (int u = 0; u < U; ++u) c[u] = V::Codes(bytes[u], j * s.bits, s.bits);
      for (int r = 0; r < R; ++r) {
        const typename V::Float f = V::Load(folded + r * s.dh + j * s.packed + p0);
        for (int u = 0; u < U; ++u) acc[u][r] = V::Fma(c[u], f, acc[u][r]);
      }
    }
  }
  for (int u = 0; u < U; ++u)
    for (int r = 0; r < R; ++r) sums[u][r] += V::Sum(acc[u][r]);
}

// out[r, t + u] = offset[r] + folded[r] . codes[t + u] for the U tokens from t.
template <int R, int U>
inline void ScoreTokens(const uint8_t* codes, const float* folded, const float* offset, float* out, int64_t t,
                        const Shape& s) {
  const int64_t wide = s.Whole(8), narrow = s.Whole(4);
  const uint8_t* rows = codes + t * s.packed;
  float sums[U][R];
  for (int u = 0; u < U; ++u)
    for (int r = 0; r < R; ++r) sums[u][r] = offset[r];
  DotBlocks<Wide, R, U>(rows, folded, s, 0, wide, sums);
  DotBlocks<Narrow, R, U>(rows, folded, s, wide, narrow, sums);
  for (int u = 0; u < U; ++u)
    for (int64_t p = narrow; p < s.packed; ++p)
      for (int j = 0; j < s.per(); ++j)
        for (int r = 0; r < R; ++r)
          sums[u][r] += Code(rows[u * s.packed + p], j, s.bits) * folded[r * s.dh + j * s.packed + p];
  for (int u = 0; u < U; ++u)
    for (int r = 0; r < R; ++r) out[r * s.stride() + t + u] = sums[u][r];
}

// Scores of R query rows (R <= 4, a template so the accumulators stay in registers) against one n's keys.
// Per group of g tokens the query is folded into the dequantisation: q . (c s + z) = (q s) . c + q . z.
template <int R>
void ScoreRows(const float* q, const uint8_t* codes, const float* scale, const float* zero, float* out,
               const Shape& s, std::vector<float>& folded) {
  constexpr int U = kScoreTokensPerPass<R>;
  const int64_t g = s.tokens / s.groups;
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
    int64_t t = group * g;
    for (; t + U <= (group + 1) * g; t += U) ScoreTokens<R, U>(codes, folded.data(), offset, out, t, s);
    for (; t < (group + 1) * g; ++t) ScoreTokens<R, 1>(codes, folded.data(), offset, out, t, s);
  }
}

// Slots weighed per pass over the tokens: S x R accumulators in registers, one widening of each token's
// bytes serving S slots, and S times fewer passes over the codes and weights. 16 x 4k 1-bit tokens on the dev
// machine: 1.29 -> 1.15 ms for 4 rows, 0.99 -> 0.72 ms for 2, against one slot per pass (more slots: no gain).
template <int R>
constexpr int kValueSlotsPerPass = R <= 2 ? 4 : 2;

// out[r, channels of slots j0 .. j0 + S - 1 of bytes p0 .. p0 + kBytes - 1] += sum_t weights[t, r, group]
// codes[t]. A block's channels j P + p0 .. j P + p0 + kBytes - 1 must share one value group (the caller checks).
template <class V, int R, int S>
void WeighSlots(const uint8_t* codes, const float* weights, float* out, const Shape& s, int64_t p0, int j0) {
  const int64_t gv = s.dh / s.groups;
  int64_t d0[S], group[S];
  typename V::Float acc[S][R];
  for (int i = 0; i < S; ++i) {
    d0[i] = (j0 + i) * s.packed + p0;
    group[i] = d0[i] / gv;
    for (int r = 0; r < R; ++r) acc[i][r] = V::Zero();
  }
  for (int64_t t = 0; t < s.tokens; ++t) {
    const typename V::Int bytes = V::Widen(codes + t * s.packed + p0);
    const float* w = weights + t * R * s.groups;
    for (int i = 0; i < S; ++i) {
      const typename V::Float c = V::Codes(bytes, (j0 + i) * s.bits, s.bits);
      for (int r = 0; r < R; ++r) acc[i][r] = V::Fma(V::Broadcast(w + r * s.groups + group[i]), c, acc[i][r]);
    }
  }
  for (int i = 0; i < S; ++i)
    for (int r = 0; r < R; ++r) {
      float* o = out + r * s.dh + d0[i];
      V::Store(o, V::Add(V::Load(o), acc[i][r]));
    }
}

// The channels of bytes [begin, end), in blocks of V::kBytes and S slots per pass where S divides the slots.
template <class V, int R>
void WeighBlocks(const uint8_t* codes, const float* weights, float* out, const Shape& s, int64_t begin,
                 int64_t end) {
  constexpr int S = kValueSlotsPerPass<R>;
  for (int64_t p0 = begin; p0 < end; p0 += V::kBytes) {
    if (s.per() % S == 0) {
      for (int j0 = 0; j0 < s.per(); j0 += S) WeighSlots<V, R, S>(codes, weights, out, s, p0, j0);
    } else {
      for (int j0 = 0; j0 < s.per(); ++j0) WeighSlots<V, R, 1>(codes, weights, out, s, p0, j0);
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
        weights[(t * R + r) * s.groups + group] = p[r * s.stride() + t] * scale[t * s.groups + group];
        zero_term[r * s.groups + group] += p[r * s.stride() + t] * zero[t * s.groups + group];
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

// row[d] = v_hat[t, d] for one token's Dh channels: channel j P + p sits in slot j of byte p.
inline void DequantizeRow(const uint8_t* codes, const float* scale, const float* zero, int64_t t, const Shape& s,
                          float* row) {
  for (int j = 0; j < s.per(); ++j)
    for (int64_t p = 0; p < s.packed; ++p) row[j * s.packed + p] = Code(codes[t * s.packed + p], j, s.bits);
  const int64_t gv = s.dh / s.groups;
  for (int64_t group = 0; group < s.groups; ++group)
    for (int64_t d = group * gv; d < (group + 1) * gv; ++d)
      row[d] = row[d] * scale[t * s.groups + group] + zero[t * s.groups + group];
}

// One n's operands: the low-bit codes, scale and zero; the held slots [k] (outside [0, T): none) with their
// full-precision rows [k, Dh]; the E full-precision rows after the low-bit slots [E, Dh].
struct Cache {
  const uint8_t* codes;
  const float *scale, *zero;
  const int32_t* held;
  const float *held_rows, *exact_rows;
};

bool Holds(const Cache& c, int64_t e, const Shape& s) { return c.held[e] >= 0 && c.held[e] < s.tokens; }

// Scores of q [R, Dh] (scaled) over one n's mixed cache -> out [R, T + E]: q . k_hat at the low-bit slots, then
// q . k of each held row written over its slot, and of the E exact rows after them.
void MixedScores(const float* q, const Cache& c, float* out, const Shape& s) {
  std::vector<float> folded, held_scores;
  pangu_kernels::ForRowBlocks(s.rows, [&](int64_t r0, auto rows) {
    constexpr int R = decltype(rows)::value;
    const float* qr = q + r0 * s.dh;
    float* o = out + r0 * s.stride();
    ScoreRows<R>(qr, c.codes, c.scale, c.zero, o, s, folded);
    pangu_kernels::DenseScoreRows<R>(qr, c.exact_rows, o + s.tokens, s.exact, s.dh, s.stride());
    held_scores.resize(R * s.held);
    pangu_kernels::DenseScoreRows<R>(qr, c.held_rows, held_scores.data(), s.held, s.dh, s.held);
    for (int64_t e = 0; e < s.held; ++e)
      if (Holds(c, e, s))
        for (int r = 0; r < R; ++r) o[r * s.stride() + c.held[e]] = held_scores[r * s.held + e];
  });
}

// sum_t p[r, t] v[t] over one n's mixed cache for weights p [R, T + E] -> out [R, Dh]: the low-bit values
// weighted in place, each held slot's correction p (v - v_hat), and the E exact rows.
void MixedWeightedValues(const float* p, const Cache& c, float* out, const Shape& s) {
  std::vector<float> weights, corrections(s.held * s.dh, 0.f), held_weights;
  for (int64_t e = 0; e < s.held; ++e) {
    if (!Holds(c, e, s)) continue;
    float* row = corrections.data() + e * s.dh;
    DequantizeRow(c.codes, c.scale, c.zero, c.held[e], s, row);
    for (int64_t d = 0; d < s.dh; ++d) row[d] = c.held_rows[e * s.dh + d] - row[d];
  }
  pangu_kernels::ForRowBlocks(s.rows, [&](int64_t r0, auto rows) {
    constexpr int R = decltype(rows)::value;
    const float* pr = p + r0 * s.stride();
    float* o = out + r0 * s.dh;
    WeighRows<R>(pr, c.codes, c.scale, c.zero, o, s, weights);
    pangu_kernels::DenseWeighRows<R>(pr + s.tokens, c.exact_rows, o, s.exact, s.dh, s.stride());
    held_weights.assign(R * s.held, 0.f);
    for (int64_t e = 0; e < s.held; ++e)
      if (Holds(c, e, s))
        for (int r = 0; r < R; ++r) held_weights[r * s.held + e] = pr[r * s.stride() + c.held[e]];
    pangu_kernels::DenseWeighRows<R>(held_weights.data(), corrections.data(), o, s.held, s.dh, s.held);
  });
}

// One n per work item: below this many code bytes per item, scheduling costs more than it saves.
constexpr int64_t kMinBytesPerItem = 16 << 10;

using Index = ffi::Buffer<ffi::S32, 2>;

// Checks the operands of either product and gives its Shape. a: q [N, R, Dh] (scores) or p [N, R, T + E]
// (weighted values); codes [N, T, P]; scale / zero [N, T / g, Dh] (keys) or [N, T, Dh / g_v] (values); held
// [N, k]; held_rows [N, k, Dh]; exact_rows [N, E, Dh].
template <bool kScores>
ffi::ErrorOr<Shape> Check(const Floats& a, const Codes& codes, const Floats& scale, const Floats& zero,
                          const Index& held, const Floats& held_rows, const Floats& exact_rows, int32_t bits) {
  if (bits != 1 && bits != 2 && bits != 4 && bits != 8) {
    return ffi::Unexpected(ffi::Error::InvalidArgument("lowbit: bits must be 1, 2, 4 or 8"));
  }
  const int64_t n = a.dimensions()[0], t = codes.dimensions()[1], packed = codes.dimensions()[2];
  const int64_t dh = packed * 8 / bits, e = exact_rows.dimensions()[1], k = held.dimensions()[1];
  const int64_t groups = kScores ? scale.dimensions()[1] : scale.dimensions()[2];
  const bool same_n = codes.dimensions()[0] == n && scale.dimensions()[0] == n && held.dimensions()[0] == n &&
                      held_rows.dimensions()[0] == n && exact_rows.dimensions()[0] == n;
  const bool rows =
      held_rows.dimensions()[1] == k && held_rows.dimensions()[2] == dh && exact_rows.dimensions()[2] == dh;
  const bool grouped = groups >= 1 && zero.dimensions() == scale.dimensions() &&
                       (kScores ? scale.dimensions()[2] == dh && t % groups == 0
                                : scale.dimensions()[1] == t && dh % groups == 0);
  if (!same_n || !rows || !grouped || a.dimensions()[2] != (kScores ? dh : t + e)) {
    return ffi::Unexpected(ffi::Error::InvalidArgument(
        kScores ? "lowbit_scores: expected q [N, R, Dh], codes [N, T, Dh * bits / 8], scale / zero [N, T / g, Dh], "
                  "held [N, k], held rows [N, k, Dh], exact rows [N, E, Dh]"
                : "lowbit_weighted_values: expected p [N, R, T + E], codes [N, T, Dh * bits / 8], scale / zero "
                  "[N, T, Dh / g_v], held [N, k], held rows [N, k, Dh], exact rows [N, E, Dh]"));
  }
  return Shape{a.dimensions()[1], t, dh, packed, groups, bits, e, k};
}

// Scores (kScores; out [N, R, T + E]) or weighted values (out [N, R, Dh]) over each n's mixed cache.
template <bool kScores>
ffi::Error Product(ffi::ThreadPool pool, Floats a, Codes codes, Floats scale, Floats zero, Index held,
                   Floats held_rows, Floats exact_rows, ffi::Result<Floats> out, int32_t bits) {
  ffi::ErrorOr<Shape> checked = Check<kScores>(a, codes, scale, zero, held, held_rows, exact_rows, bits);
  if (checked.has_error()) return checked.error();
  const Shape s = checked.value();
  const int64_t n_size = a.dimensions()[0], scale_size = scale.element_count() / n_size;
  const int64_t threads = pangu_kernels::ThreadsWorth(pool, s.tokens * s.packed, kMinBytesPerItem);
  pangu_kernels::ParallelFor(pool, n_size, threads, [&](int64_t n) {
    const Cache c{codes.typed_data() + n * s.tokens * s.packed, scale.typed_data() + n * scale_size,
                  zero.typed_data() + n * scale_size, held.typed_data() + n * s.held,
                  held_rows.typed_data() + n * s.held * s.dh, exact_rows.typed_data() + n * s.exact * s.dh};
    const float* an = a.typed_data() + n * a.element_count() / n_size;
    if constexpr (kScores) {
      MixedScores(an, c, out->typed_data() + n * s.rows * s.stride(), s);
    } else {
      MixedWeightedValues(an, c, out->typed_data() + n * s.rows * s.dh, s);
    }
  });
  return ffi::Error::Success();
}

auto Binding() {
  return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<Floats>().Arg<Codes>().Arg<Floats>().Arg<Floats>()
      .Arg<Index>().Arg<Floats>().Arg<Floats>().Ret<Floats>().Attr<int32_t>("bits");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LowbitScores, Product<true>, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(LowbitWeightedValues, Product<false>, Binding());
