// The AVX512-VNNI path (VPDPBUSD): activation quantization, the tile dot products and the stores.
#pragma once

#include "int4_isa.h"

#ifdef INT4_AVX512_VNNI
namespace {
constexpr const char* kIsa = "avx512-vnni";

inline __mmask16 tail_mask(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : n <= 0 ? 0 : static_cast<__mmask16>((1u << n) - 1);
}

inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }

inline __m512 load16(const at::BFloat16* p, __mmask16 m) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

inline void store16(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }

inline void store16(at::BFloat16* p, __m512 v, __mmask16 m) {
  // Round to nearest even, as torch's float -> bfloat16 conversion does; NaN maps to the quiet NaN.
  __m512i b = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  b = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  b = _mm512_mask_mov_epi32(b, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(b));
}

// Quantizes one activation row x[0:k] into q[0:kp] (zero-padded) with one scale per kBlock values.
// Returns the weight-offset correction -8 * sum_b scale_b * sum(q_b).
template <typename In>
float quantize_row(const In* x, int64_t k, int64_t kp, int8_t* q, float* scales) {
  float corr = 0.f;
  for (int64_t k0 = 0; k0 < kp; k0 += kBlock) {
    __m512 amax = _mm512_setzero_ps();
    for (int64_t c = 0; c < kBlock; c += 16) {
      amax = _mm512_max_ps(amax, _mm512_abs_ps(load16(x + k0 + c, tail_mask(k - k0 - c))));
    }
    const float d = _mm512_reduce_max_ps(amax) / 127.f;
    const __m512 inv = _mm512_set1_ps(d > 0.f ? 1.f / d : 0.f);
    __m512i sum = _mm512_setzero_si512();
    for (int64_t c = 0; c < kBlock; c += 16) {
      const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(load16(x + k0 + c, tail_mask(k - k0 - c)), inv));
      sum = _mm512_add_epi32(sum, v);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k0 + c), _mm512_cvtsepi32_epi8(v));
    }
    scales[k0 / kBlock] = d;
    corr += d * static_cast<float>(_mm512_reduce_add_epi32(sum));
  }
  return -8.f * corr;
}

// acc[t][g] += sum_b scale[t][b] * (u . q) over blocks [b0, b1), for one weight tile and T token rows,
// in block order (so splitting the blocks into ranges gives the same floats). `prefetch`: the weights
// come from memory (the first token rows over them; later ones find them in cache).
template <int T>
inline void tile_dot(const uint8_t* w, const int8_t* q, int64_t kp, const float* sx, int64_t nb, int64_t b0,
                     int64_t b1, bool prefetch, __m512 (&acc)[T][2]) {
  // With few token rows, separate accumulators for the low and high nibbles halve the VPDPBUSD
  // dependency chains so the GEMV is not latency-bound.
  constexpr int P = T <= 2 ? 2 : 1;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  for (int64_t b = b0; b < b1; ++b) {
    __m512i ia[T][2][P];
    for (int t = 0; t < T; ++t)
      for (int g = 0; g < 2; ++g)
        for (int p = 0; p < P; ++p) ia[t][g][p] = _mm512_setzero_si512();
    const uint8_t* wb = w + b * kSteps * kStepBytes;
    const int8_t* qb = q + b * kBlock;
    if (prefetch) {  // memory-bound: keep more lines in flight than the hardware prefetcher does
      for (int64_t line = 0; line < kSteps * kStepBytes; line += 64) {
        _mm_prefetch(reinterpret_cast<const char*>(wb + kPrefetchBytes + line), _MM_HINT_T0);
      }
    }
#pragma GCC unroll 4
    for (int64_t s = 0; s < kSteps; ++s) {
      const __m512i r0 = _mm512_loadu_si512(wb + s * kStepBytes);
      const __m512i r1 = _mm512_loadu_si512(wb + s * kStepBytes + 64);
      const __m512i lo0 = _mm512_and_si512(r0, low4);
      const __m512i hi0 = _mm512_and_si512(_mm512_srli_epi16(r0, 4), low4);
      const __m512i lo1 = _mm512_and_si512(r1, low4);
      const __m512i hi1 = _mm512_and_si512(_mm512_srli_epi16(r1, 4), low4);
#pragma GCC unroll 4
      for (int t = 0; t < T; ++t) {
        int32_t xl, xh;
        std::memcpy(&xl, qb + t * kp + s * 8, 4);
        std::memcpy(&xh, qb + t * kp + s * 8 + 4, 4);
        const __m512i vl = _mm512_set1_epi32(xl);
        const __m512i vh = _mm512_set1_epi32(xh);
        ia[t][0][0] = _mm512_dpbusd_epi32(ia[t][0][0], lo0, vl);
        ia[t][1][0] = _mm512_dpbusd_epi32(ia[t][1][0], lo1, vl);
        ia[t][0][P - 1] = _mm512_dpbusd_epi32(ia[t][0][P - 1], hi0, vh);
        ia[t][1][P - 1] = _mm512_dpbusd_epi32(ia[t][1][P - 1], hi1, vh);
      }
    }
    for (int t = 0; t < T; ++t) {
      const __m512 s = _mm512_set1_ps(sx[t * nb + b]);
      for (int g = 0; g < 2; ++g) {
        const __m512i sum = P == 2 ? _mm512_add_epi32(ia[t][g][0], ia[t][g][P - 1]) : ia[t][g][0];
        acc[t][g] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), s, acc[t][g]);
      }
    }
  }
}

// Rows [t0, t0 + count) of one tile's 32 outputs from their float sums sum(t, g) (16 rows of group g):
// (sum + corr) * weight scale + bias.
template <typename Out, typename Sum>
void store_tile(const Problem& p, int64_t tile, int64_t t0, int64_t count, Out* y, const Sum& sum) {
  for (int g = 0; g < 2; ++g) {
    const int64_t o = tile * kTileRows + g * 16;
    const __mmask16 m = tail_mask(p.out - o);
    if (m == 0) continue;
    const __m512 ws = _mm512_loadu_ps(p.wscale + o);
    const __m512 b = p.bias ? _mm512_maskz_loadu_ps(m, p.bias + o) : _mm512_setzero_ps();
    for (int64_t t = 0; t < count; ++t) {
      const __m512 v = _mm512_fmadd_ps(_mm512_add_ps(sum(t, g), _mm512_set1_ps(p.corr[t0 + t])), ws, b);
      store16(y + (t0 + t) * p.out + o, v, m);
    }
  }
}

template <int T>
inline void zero(__m512 (&acc)[T][2]) {
  for (int t = 0; t < T; ++t) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
}

template <int T, typename Out>
void run_tile(const Problem& p, int64_t tile, int64_t t0, Out* y) {
  __m512 acc[T][2];
  zero(acc);
  tile_dot<T>(p.w + tile * (p.kp / 8) * kStepBytes, p.q + t0 * p.kp, p.kp, p.sx + t0 * p.nb, p.nb, 0, p.nb,
              g_prefetch && t0 == 0, acc);
  store_tile(p, tile, t0, T, y, [&](int64_t t, int g) { return acc[t][g]; });
}

// Blocks per turn in run_pair (1 KB of a tile's weights): the fastest of 1, 2, 4 and 8 (measured:
// bot/model/README.md, kernel tuning).
constexpr int64_t kPairChunk = 2;

// kMaxTokens + R token rows (a batched decode step of 5-8 rows) over one weight tile: the two token
// groups take turns chunk by chunk, so the second group's work overlaps the first group's memory
// reads instead of following them (as run_tile per group does). Same floats as run_tile: every row
// still adds its blocks in order.
template <int R, typename Out>
void run_pair(const Problem& p, int64_t tile, Out* y) {
  __m512 first[kMaxTokens][2], second[R][2];
  zero(first);
  zero(second);
  const uint8_t* w = p.w + tile * (p.kp / 8) * kStepBytes;
  const int8_t* q2 = p.q + kMaxTokens * p.kp;
  const float* sx2 = p.sx + kMaxTokens * p.nb;
  for (int64_t b0 = 0; b0 < p.nb; b0 += kPairChunk) {
    const int64_t b1 = std::min(b0 + kPairChunk, p.nb);
    tile_dot<kMaxTokens>(w, p.q, p.kp, p.sx, p.nb, b0, b1, g_prefetch, first);
    tile_dot<R>(w, q2, p.kp, sx2, p.nb, b0, b1, false, second);
  }
  store_tile(p, tile, 0, kMaxTokens, y, [&](int64_t t, int g) { return first[t][g]; });
  store_tile(p, tile, kMaxTokens, R, y, [&](int64_t t, int g) { return second[t][g]; });
}

}  // namespace
#endif
