// The AVX2 path (VPMADDUBSW + VPMADDWD): the same layout read 8 rows at a time, the same integers.
#pragma once

#include "int4_isa.h"

#ifndef INT4_AVX512_VNNI
namespace {

constexpr const char* kIsa = "avx2";

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

inline __m256 load8(const at::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// Stores n <= 8 values; a short tail goes through a buffer (AVX2 has no masked 16-bit stores).
inline void store8(float* p, __m256 v, int64_t n) {
  if (n >= 8) {
    _mm256_storeu_ps(p, v);
    return;
  }
  alignas(32) float buf[8];
  _mm256_store_ps(buf, v);
  std::memcpy(p, buf, n * sizeof(float));
}

inline void store8(at::BFloat16* p, __m256 v, int64_t n) {
  if (n < 8) {
    alignas(32) float buf[8];
    _mm256_store_ps(buf, v);
    for (int64_t i = 0; i < n; ++i) p[i] = at::BFloat16(buf[i]);  // c10 rounds as the vector path does
    return;
  }
  // Round to nearest even, as torch's float -> bfloat16 conversion does; NaN maps to the quiet NaN.
  __m256i b = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  b = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  b = _mm256_blendv_epi8(b, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(nan));
  const __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
}

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

inline int32_t hsum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
}

// As the AVX512 quantize_row: same scales, same rounding, same int8 values.
template <typename In>
float quantize_row(const In* x, int64_t k, int64_t kp, int8_t* q, float* scales) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  float corr = 0.f;
  for (int64_t k0 = 0; k0 < kp; k0 += kBlock) {
    __m256 v[4];
    if (k0 + kBlock <= k) {
      for (int c = 0; c < 4; ++c) v[c] = load8(x + k0 + 8 * c);
    } else {  // the zero-padded last block
      alignas(32) float buf[kBlock] = {};
      for (int64_t i = k0; i < k; ++i) buf[i - k0] = static_cast<float>(x[i]);
      for (int c = 0; c < 4; ++c) v[c] = _mm256_load_ps(buf + 8 * c);
    }
    __m256 amax = _mm256_setzero_ps();
    for (int c = 0; c < 4; ++c) amax = _mm256_max_ps(amax, _mm256_and_ps(v[c], abs_mask));
    const float d = hmax(amax) / 127.f;
    const __m256 inv = _mm256_set1_ps(d > 0.f ? 1.f / d : 0.f);
    __m256i iv[4];
    __m256i sum = _mm256_setzero_si256();
    for (int c = 0; c < 4; ++c) {
      iv[c] = _mm256_cvtps_epi32(_mm256_mul_ps(v[c], inv));
      sum = _mm256_add_epi32(sum, iv[c]);
    }
    // The packs work per 128-bit lane: gather the 4-byte groups back into order.
    const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(iv[0], iv[1]), _mm256_packs_epi32(iv[2], iv[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + k0),
                        _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    scales[k0 / kBlock] = d;
    corr += d * static_cast<float>(hsum(sum));
  }
  return -8.f * corr;
}

// Rows [8 * r0, 8 * (r0 + R)) of one weight tile for T token rows. Within a block, the VPMADDUBSW pair
// sums add up in int16 lanes: 16 products of |u| <= 15 and |q| <= 127 stay below 32767, so one VPMADDWD
// per block widens them.
template <int T, int R, typename Out>
void run_rows(const Problem& p, int64_t tile, int64_t t0, int r0, Out* y) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  const uint8_t* w = p.w + tile * (p.kp / 8) * kStepBytes + r0 * 32;
  const int8_t* q = p.q + t0 * p.kp;
  const float* sx = p.sx + t0 * p.nb;
  __m256 acc[T][R];
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) acc[t][r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < p.nb; ++b) {
    __m256i ia[T][R];
    for (int t = 0; t < T; ++t)
      for (int r = 0; r < R; ++r) ia[t][r] = _mm256_setzero_si256();
    const uint8_t* wb = w + b * kSteps * kStepBytes;
    const int8_t* qb = q + b * kBlock;
#pragma GCC unroll 4
    for (int64_t s = 0; s < kSteps; ++s) {
      __m256i lo[R], hi[R];
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + s * kStepBytes + r * 32));
        lo[r] = _mm256_and_si256(raw, low4);
        hi[r] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
      }
#pragma GCC unroll 8
      for (int t = 0; t < T; ++t) {
        int32_t xl, xh;
        std::memcpy(&xl, qb + t * p.kp + s * 8, 4);
        std::memcpy(&xh, qb + t * p.kp + s * 8 + 4, 4);
        const __m256i vl = _mm256_set1_epi32(xl), vh = _mm256_set1_epi32(xh);
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
          const __m256i sum = _mm256_add_epi16(_mm256_maddubs_epi16(lo[r], vl), _mm256_maddubs_epi16(hi[r], vh));
          ia[t][r] = _mm256_add_epi16(ia[t][r], sum);
        }
      }
    }
    for (int t = 0; t < T; ++t) {
      const __m256 s = _mm256_set1_ps(sx[t * p.nb + b]);
      for (int r = 0; r < R; ++r) {
        acc[t][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(ia[t][r], ones)), s, acc[t][r]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    const int64_t o = tile * kTileRows + (r0 + r) * 8;
    const int64_t n = std::min<int64_t>(8, p.out - o);
    if (n <= 0) continue;
    const __m256 ws = _mm256_loadu_ps(p.wscale + o);
    __m256 bias = _mm256_setzero_ps();
    if (p.bias != nullptr) {
      alignas(32) float buf[8] = {};
      std::memcpy(buf, p.bias + o, n * sizeof(float));
      bias = _mm256_load_ps(buf);
    }
    for (int t = 0; t < T; ++t) {
      const __m256 v = _mm256_fmadd_ps(_mm256_add_ps(acc[t][r], _mm256_set1_ps(p.corr[t0 + t])), ws, bias);
      store8(y + (t0 + t) * p.out + o, v, n);
    }
  }
}

// One token row takes the tile's four 8-row groups in one pass, reading the tile front to back (not in
// two passes over alternate cache lines, which is far slower); more token rows take two groups at a
// time so their accumulators fit the 16 ymm registers.
template <int T, typename Out>
void run_tile(const Problem& p, int64_t tile, int64_t t0, Out* y) {
  constexpr int R = T == 1 ? 4 : T <= 4 ? 2 : 1;
  for (int r0 = 0; r0 < kTileRows / 8; r0 += R) run_rows<T, R>(p, tile, t0, r0, y);
}

}  // namespace
#endif
