// Attention's two products over SpeCache's mixed cache: T bit-packed KIVI slots, read in place (never
// dequantised into a float cache), k of them held at full precision, then E full-precision rows (the residual):
//   LowbitScores:         s[n, r, t] = q[n, r] . k[n, t]          k_hat per channel over groups of g tokens
//   LowbitWeightedValues: o[n, r]    = sum_t p[n, r, t] v[n, t]   v_hat per token over groups of channels
//   LowbitProbabilities:  softmax over the visible t of (capped) s[n, r, t]
// where k / v are the held or exact row, else the dequantised slot. On CPU a decode step is bound by the bytes
// it reads: the float32 cache is 32 / b times the codes, and XLA materialises a dequantised copy before its
// matmuls, so a low-bit cache read that way costs more than the full one. Here each token's codes are unpacked
// in registers, and the full-precision rows join in the same call (dense_rows.h), which saves the step the
// small XLA products, concatenations and scatters that assembling the mixed scores and values cost.
//
// Bit layout (reference.py): a row of Dh b-bit codes packs into P = Dh b / 8 bytes, and slot j of byte p holds
// channel j P + p. Eight consecutive bytes widened to eight int32 lanes therefore give, per slot, the eight
// consecutive channels j P + p0 .. j P + p0 + 7: one shift, mask and convert per slot, no shuffles (1-bit codes
// built with AVX-512: one mask test, `Bits`). A row's last P % 8 bytes go four at a time (SSE), then one by one;
// values take the 8- or 4-byte path when P and the channel groups are multiples of it, else the scalar one.
// The batch-head axis n is split over XLA's thread pool (parallel_for.h).

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "dense_rows.h"
#include "parallel_for.h"
#include "row_blocks.h"
#include "simd.h"
#include "softmax.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using Codes = ffi::Buffer<ffi::U8, 3>;
using Floats = ffi::Buffer<ffi::F32, 3>;

// One block of bytes widened to int32 lanes: eight with AVX (Wide) or four with SSE (Narrow, for rows of
// P % 8 == 4 bytes, e.g. 1-bit codes of Dh = 32). Both share the loops below: Codes gives a slot's codes as
// floats, MulAdd adds them times a weight (the folded query, or a token's weight) into an accumulator.
struct Wide {
  static constexpr int kBytes = 8;
  static constexpr int kAccumulators = 8;  // beside the codes' and weights' registers (16 in all with AVX2)
  using Float = __m256;
  using Int = __m256i;
  using Code = __m256;
  static Int Widen(const uint8_t* bytes) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes)));
  }
  static Code Codes(Int bytes, int shift, int bits) {
    const Int field = _mm256_srl_epi32(bytes, _mm_cvtsi32_si128(shift));
    return _mm256_cvtepi32_ps(_mm256_and_si256(field, _mm256_set1_epi32((1 << bits) - 1)));
  }
  static Float MulAdd(Code c, Float weight, Float acc) { return _mm256_fmadd_ps(c, weight, acc); }
  static Float Zero() { return _mm256_setzero_ps(); }
  static Float Load(const float* p) { return _mm256_loadu_ps(p); }
  static void Store(float* p, Float v) { _mm256_storeu_ps(p, v); }
  static Float Broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  static Float Add(Float a, Float b) { return _mm256_add_ps(a, b); }
  // sums[i] = the sum of acc[i]'s lanes, eight at a time where there are eight.
  template <int N>
  static void Sums(const Float (&acc)[N], float (&sums)[N]) {
    int i = 0;
    for (; i + 8 <= N; i += 8) pangu_kernels::HorizontalSums8(acc + i, sums + i);
    for (; i < N; ++i) sums[i] = pangu_kernels::HorizontalSum(acc[i]);
  }
};

#if defined(__AVX512BW__) && defined(__AVX512VL__)
constexpr bool kMaskedBits = true;
// 1-bit codes with AVX-512's mask registers (the build api.py asks for where the CPU has them): bit j of eight
// bytes is slot j's eight channels' mask, and the weight is added where it is set: one test per slot instead
// of a widening, shift, mask and convert, and 32 registers, so twice the accumulators. Scores of 4 rows over
// 16 x 4k tokens, one thread (a scratch benchmark of the inner loop): 1.05 ms with Wide, 0.70 with Bits. The
// values weigh with Wide: with 16 accumulators live over their token loop GCC stored each to the stack every
// token (1.37 ms against Wide's 0.83), and Bits with 8 (0.65 in that benchmark) is not yet measured in a model.
struct Bits : Wide {
  static constexpr int kAccumulators = 16;
  using Int = __m128i;
  using Code = __mmask8;
  static Int Widen(const uint8_t* bytes) { return _mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes)); }
  static Code Codes(Int bytes, int shift, int /*bits: 1*/) {
    return static_cast<Code>(_mm_test_epi8_mask(bytes, _mm_set1_epi8(static_cast<char>(1 << shift))));
  }
  static Float MulAdd(Code c, Float weight, Float acc) { return _mm256_mask_add_ps(acc, c, acc, weight); }
};
#else
constexpr bool kMaskedBits = false;
using Bits = Wide;
#endif

struct Narrow {
  static constexpr int kBytes = 4;
  static constexpr int kAccumulators = 8;
  using Float = __m128;
  using Int = __m128i;
  using Code = __m128;
  static Int Widen(const uint8_t* bytes) {
    int32_t word;
    std::memcpy(&word, bytes, sizeof(word));
    return _mm_cvtepu8_epi32(_mm_cvtsi32_si128(word));
  }
  static Code Codes(Int bytes, int shift, int bits) {
    const Int field = _mm_srl_epi32(bytes, _mm_cvtsi32_si128(shift));
    return _mm_cvtepi32_ps(_mm_and_si128(field, _mm_set1_epi32((1 << bits) - 1)));
  }
  static Float MulAdd(Code c, Float weight, Float acc) { return _mm_fmadd_ps(c, weight, acc); }
  static Float Zero() { return _mm_setzero_ps(); }
  static Float Load(const float* p) { return _mm_loadu_ps(p); }
  static void Store(float* p, Float v) { _mm_storeu_ps(p, v); }
  static Float Broadcast(const float* p) { return _mm_broadcast_ss(p); }
  static Float Add(Float a, Float b) { return _mm_add_ps(a, b); }
  template <int N>
  static void Sums(const Float (&acc)[N], float (&sums)[N]) {
    for (int i = 0; i < N; ++i) {
      const Float v = _mm_hadd_ps(acc[i], acc[i]);
      sums[i] = _mm_cvtss_f32(_mm_hadd_ps(v, v));
    }
  }
};

// Tokens scored (or value slots weighed) per pass for R rows: U x R accumulators, independent FMA (add)
// chains, each load of a folded query row (each widening of a token's bytes) serving U tokens (slots).
template <class V, int R>
constexpr int kPerPass = std::min(4, V::kAccumulators / R);

struct Shape {
  int64_t rows, tokens, dh, packed, groups;  // R, T, Dh, P, and T / g (keys) or Dh / g_v (values)
  int bits;
  int64_t exact, held;  // E: full-precision rows after the T low-bit slots (the residual); k: held slots
  int64_t stride() const { return tokens + exact; }  // of a row of scores or weights: T + E slots
  int64_t per() const { return 8 / bits; }
  int64_t Whole(int block) const { return packed - packed % block; }  // bytes in whole blocks
};

inline int Code(uint8_t byte, int64_t slot, int bits) { return (byte >> (slot * bits)) & ((1 << bits) - 1); }

// sums[u][r] += folded[r] . codes of bytes [begin, end) of the U consecutive token rows from `rows`, in blocks
// of V::kBytes.
template <class V, int R, int U>
inline void DotBlocks(const uint8_t* rows, const float* folded, const Shape& s, int64_t begin, int64_t end,
                      float (&sums)[U][R]) {
  if (begin >= end) return;
  typename V::Float acc[U * R];
  for (auto& a : acc) a = V::Zero();
  for (int64_t p0 = begin; p0 < end; p0 += V::kBytes) {
    typename V::Int bytes[U];
    for (int u = 0; u < U; ++u) bytes[u] = V::Widen(rows + u * s.packed + p0);
    for (int j = 0; j < s.per(); ++j) {
      typename V::Code c[U];
      for (int u = 0; u < U; ++u) c[u] = V::Codes(bytes[u], j * s.bits, s.bits);
      for (int r = 0; r < R; ++r) {
        const typename V::Float f = V::Load(folded + r * s.dh + j * s.packed + p0);
        for (int u = 0; u < U; ++u) acc[u * R + r] = V::MulAdd(c[u], f, acc[u * R + r]);
      }
    }
  }
  float partial[U * R];
  V::Sums(acc, partial);
  for (int u = 0; u < U; ++u)
    for (int r = 0; r < R; ++r) sums[u][r] += partial[u * R + r];
}

// out[r, t + u] = offset[r] + folded[r] . codes[t + u] for the U tokens from t: whole blocks of 8 bytes as V,
// then of 4, then byte by byte.
template <class V, int R, int U>
inline void ScoreTokens(const uint8_t* codes, const float* folded, const float* offset, float* out, int64_t t,
                        const Shape& s) {
  const int64_t wide = s.Whole(8), narrow = s.Whole(4);
  const uint8_t* rows = codes + t * s.packed;
  float sums[U][R];
  for (int u = 0; u < U; ++u)
    for (int r = 0; r < R; ++r) sums[u][r] = offset[r];
  DotBlocks<V, R, U>(rows, folded, s, 0, wide, sums);
  DotBlocks<Narrow, R, U>(rows, folded, s, wide, narrow, sums);
  for (int u = 0; u < U; ++u)
    for (int64_t p = narrow; p < s.packed; ++p)
      for (int j = 0; j < s.per(); ++j)
        for (int r = 0; r < R; ++r)
          sums[u][r] += Code(rows[u * s.packed + p], j, s.bits) * folded[r * s.dh + j * s.packed + p];
  for (int u = 0; u < U; ++u)
    for (int r = 0; r < R; ++r) out[r * s.stride() + t + u] = sums[u][r];
}

// Scores of R query rows (R <= 4, a template so the accumulators stay in registers) against one n's keys, V
// (Wide or Bits) for the whole blocks. Per group of g tokens the query is folded into the dequantisation:
// q . (c s + z) = (q s) . c + q . z.
template <class V, int R>
void ScoreRows(const float* q, const uint8_t* codes, const float* scale, const float* zero, float* out,
               const Shape& s, std::vector<float>& folded) {
  constexpr int U = kPerPass<V, R>;
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
    for (; t + U <= (group + 1) * g; t += U) ScoreTokens<V, R, U>(codes, folded.data(), offset, out, t, s);
    for (; t < (group + 1) * g; ++t) ScoreTokens<V, R, 1>(codes, folded.data(), offset, out, t, s);
  }
}

// A token's weights p[r, t] s[t, group] for the R <= 4 rows of one value group: four lanes, R used.
constexpr int kWeightLanes = 4;

// out[r, channels of slots j0 .. j0 + S - 1 of bytes p0 .. p0 + kBytes - 1] += sum_t weights[t, group, r]
// codes[t]. A block's channels j P + p0 .. j P + p0 + kBytes - 1 must share one value group (the caller checks).
template <class V, int R, int S>
void WeighSlots(const uint8_t* codes, const float* weights, float* out, const Shape& s, int64_t p0, int j0) {
  // The token loop's offsets and shifts, computed once.
  const int64_t packed = s.packed, tokens = s.tokens, stride = s.groups * kWeightLanes, gv = s.dh / s.groups;
  const int bits = s.bits;
  int64_t d0[S], group[S];
  int shift[S];
  for (int i = 0; i < S; ++i) {
    d0[i] = (j0 + i) * packed + p0;
    group[i] = d0[i] / gv * kWeightLanes;  // slot i's R weights start here in a token's weights
    shift[i] = (j0 + i) * bits;
  }
  typename V::Float acc[S * R];
  for (auto& a : acc) a = V::Zero();
  const uint8_t* row = codes + p0;
  const float* w = weights;
  for (int64_t t = 0; t < tokens; ++t, row += packed, w += stride) {
    const typename V::Int bytes = V::Widen(row);
    for (int i = 0; i < S; ++i) {
      const typename V::Code c = V::Codes(bytes, shift[i], bits);
      const float* wi = w + group[i];
      for (int r = 0; r < R; ++r) acc[i * R + r] = V::MulAdd(c, V::Broadcast(wi + r), acc[i * R + r]);
    }
  }
  for (int i = 0; i < S; ++i)
    for (int r = 0; r < R; ++r) {
      float* o = out + r * s.dh + d0[i];
      V::Store(o, V::Add(V::Load(o), acc[i * R + r]));
    }
}

// The channels of bytes [begin, end), in blocks of V::kBytes and S slots per pass where S divides the slots.
template <class V, int R>
void WeighBlocks(const uint8_t* codes, const float* weights, float* out, const Shape& s, int64_t begin,
                 int64_t end) {
  constexpr int S = kPerPass<V, R>;
  for (int64_t p0 = begin; p0 < end; p0 += V::kBytes) {
    if (s.per() % S == 0) {
      for (int j0 = 0; j0 < s.per(); j0 += S) WeighSlots<V, R, S>(codes, weights, out, s, p0, j0);
    } else {
      for (int j0 = 0; j0 < s.per(); ++j0) WeighSlots<V, R, 1>(codes, weights, out, s, p0, j0);
    }
  }
}

// o[r] = sum_t p[r, t] (c[t] s[t, group] + z[t, group]) for one n, with p[r, t] s[t, group] computed once per
// token (`weights`, [T, groups, kWeightLanes]: the R rows of a slot's group side by side, one SSE multiply per
// token and group) and the zero term summed apart.
template <int R>
void WeighRows(const float* p, const uint8_t* codes, const float* scale, const float* zero, float* out,
               const Shape& s, std::vector<float>& weights) {
  const int64_t gv = s.dh / s.groups;
  std::vector<float> zero_term(s.groups * kWeightLanes, 0.f);
  weights.resize(s.tokens * s.groups * kWeightLanes);
  for (int64_t t = 0; t < s.tokens; ++t) {
    alignas(16) float column[kWeightLanes] = {};
    for (int r = 0; r < R; ++r) column[r] = p[r * s.stride() + t];
    const __m128 pt = _mm_load_ps(column);
    for (int64_t group = 0; group < s.groups; ++group) {
      const int64_t i = t * s.groups + group;
      _mm_storeu_ps(&weights[i * kWeightLanes], _mm_mul_ps(pt, _mm_set1_ps(scale[i])));
      float* z = &zero_term[group * kWeightLanes];
      _mm_storeu_ps(z, _mm_fmadd_ps(pt, _mm_set1_ps(zero[i]), _mm_loadu_ps(z)));
    }
  }
  for (int r = 0; r < R; ++r)
    for (int64_t d = 0; d < s.dh; ++d) out[r * s.dh + d] = zero_term[d / gv * kWeightLanes + r];
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
        for (int r = 0; r < R; ++r) out[r * s.dh + d] += weights[(t * s.groups + d / gv) * kWeightLanes + r] * c;
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
    if (kMaskedBits && s.bits == 1) {
      ScoreRows<Bits, R>(qr, c.codes, c.scale, c.zero, o, s, folded);
    } else {
      ScoreRows<Wide, R>(qr, c.codes, c.scale, c.zero, o, s, folded);
    }
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

// body(n, c, a_n) for each n of the batch-head axis, over XLA's thread pool: c the n's Cache, a_n its q or p.
template <class Body>
void ForEachN(ffi::ThreadPool& pool, const Floats& a, const Codes& codes, const Floats& scale, const Floats& zero,
              const Index& held, const Floats& held_rows, const Floats& exact_rows, const Shape& s, Body body) {
  const int64_t n_size = a.dimensions()[0], scale_size = scale.element_count() / n_size;
  const int64_t threads = pangu_kernels::ThreadsWorth(pool, s.tokens * s.packed, kMinBytesPerItem);
  pangu_kernels::ParallelFor(pool, n_size, threads, [&](int64_t n) {
    const Cache c{codes.typed_data() + n * s.tokens * s.packed, scale.typed_data() + n * scale_size,
                  zero.typed_data() + n * scale_size, held.typed_data() + n * s.held,
                  held_rows.typed_data() + n * s.held * s.dh, exact_rows.typed_data() + n * s.exact * s.dh};
    body(n, c, a.typed_data() + n * a.element_count() / n_size);
  });
}

// Scores (kScores; out [N, R, T + E]) or weighted values (out [N, R, Dh]) over each n's mixed cache.
template <bool kScores>
ffi::Error Product(ffi::ThreadPool pool, Floats a, Codes codes, Floats scale, Floats zero, Index held,
                   Floats held_rows, Floats exact_rows, ffi::Result<Floats> out, int32_t bits) {
  ffi::ErrorOr<Shape> checked = Check<kScores>(a, codes, scale, zero, held, held_rows, exact_rows, bits);
  if (checked.has_error()) return checked.error();
  const Shape s = checked.value();
  ForEachN(pool, a, codes, scale, zero, held, held_rows, exact_rows, s, [&](int64_t n, const Cache& c,
                                                                            const float* an) {
    if constexpr (kScores) {
      MixedScores(an, c, out->typed_data() + n * s.rows * s.stride(), s);
    } else {
      MixedWeightedValues(an, c, out->typed_data() + n * s.rows * s.dh, s);
    }
  });
  return ffi::Error::Success();
}

using Mask = ffi::Buffer<ffi::PRED, 3>;

// Attention probabilities over each n's mixed cache, out [N, R, T + E]: the scores, capped (softcap > 0:
// c tanh(s / c)), then the softmax over the slots visible [B, R, T + E] marks for the n's batch row (N = B K),
// while the n's rows are still in cache: it saves XLA's passes of the mask, maximum, exponential and sums.
ffi::Error Probabilities(ffi::ThreadPool pool, Floats q, Codes codes, Floats scale, Floats zero, Index held,
                         Floats held_rows, Floats exact_rows, Mask visible, ffi::Result<Floats> out, int32_t bits,
                         float softcap) {
  ffi::ErrorOr<Shape> checked = Check<true>(q, codes, scale, zero, held, held_rows, exact_rows, bits);
  if (checked.has_error()) return checked.error();
  const Shape s = checked.value();
  const int64_t n_size = q.dimensions()[0], batch = visible.dimensions()[0];
  if (batch < 1 || n_size % batch || visible.dimensions()[1] != s.rows || visible.dimensions()[2] != s.stride()) {
    return ffi::Error::InvalidArgument("lowbit_probabilities: expected visible [B, R, T + E] with N a multiple of B");
  }
  ForEachN(pool, q, codes, scale, zero, held, held_rows, exact_rows, s, [&](int64_t n, const Cache& c,
                                                                            const float* qn) {
    float* o = out->typed_data() + n * s.rows * s.stride();
    MixedScores(qn, c, o, s);
    const bool* seen = visible.typed_data() + n / (n_size / batch) * s.rows * s.stride();
    for (int64_t r = 0; r < s.rows; ++r)
      pangu_kernels::MaskedSoftmax(o + r * s.stride(), seen + r * s.stride(), s.stride(), softcap);
  });
  return ffi::Error::Success();
}

auto Binding() {
  return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<Floats>().Arg<Codes>().Arg<Floats>().Arg<Floats>()
      .Arg<Index>().Arg<Floats>().Arg<Floats>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LowbitScores, Product<true>, Binding().Ret<Floats>().Attr<int32_t>("bits"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(LowbitWeightedValues, Product<false>, Binding().Ret<Floats>().Attr<int32_t>("bits"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(LowbitProbabilities, Probabilities,
                              Binding().Arg<Mask>().Ret<Floats>().Attr<int32_t>("bits").Attr<float>("softcap"));
