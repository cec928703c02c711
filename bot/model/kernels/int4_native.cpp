// int4 weights x int8 activations on AVX512-VNNI or AVX2, for ChatGLM2's per-row-scaled INT4 linears.
//
// Weights are repacked at load (see native.py) as unsigned nibbles u = q + 8 in tiles of 32 output rows:
//   packed[tile][k8][group g][lane][j] = u[o][8*k8 + j] | u[o][8*k8 + 4 + j] << 4,  o = 32*tile + 16*g + lane
// so one 64-byte load holds 4+4 k-values for 16 rows and VPDPBUSD (u8 x s8, 4 products per int32 lane)
// accumulates 16 output rows per register with no horizontal reduction. AVX2 reads the same layout 32
// bytes (8 rows) at a time and gets the same 4-product int32 lanes from VPMADDUBSW + VPMADDWD; both
// compute the same integers and apply the scales in the same order. Activations are quantized per row
// in blocks of kBlock values (llama.cpp q8 style); the +8 weight offset is removed with the exact correction
//   sum_k u*x = sum_k q*x + 8*sum_k x,
// which, as every output row shares it, folds into one float per token row.
//
// With AMX-INT8 (and the OS's permission for its tile state), calls of kAmxMinTokens or more token rows
// (prefill chunks) take another route to the same integers: each block's two 16-row weight groups are
// unpacked to bytes in L1 and fed to TDPBSUD (s8 activations x u8 weights) against 16 token rows at a
// time. Its int32 block sums equal VPDPBUSD's and the scales are applied in the same order, so a row's
// output does not depend on the route (tested bit for bit).

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "ops.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define INT4_AVX512_VNNI 1
#if defined(__AMX_TILE__) && defined(__AMX_INT8__)
#define INT4_AMX 1
#endif
#elif !defined(__AVX2__) || !defined(__FMA__)
#error "int4_native.cpp needs AVX512-VNNI (with F/BW/VL) or AVX2 + FMA: build with -march=native on such a CPU"
#endif

namespace {

constexpr int64_t kBlock = 32;       // activation values sharing one int8 scale (llama.cpp q8_0)
constexpr int64_t kTileRows = 32;    // output rows per weight tile: two registers of 16 int32 lanes
constexpr int64_t kStepBytes = 128;  // one tile's 8 k-values: 32 rows x 8 nibbles
constexpr int64_t kSteps = kBlock / 8;
constexpr int kMaxTokens = 4;        // token rows sharing each unpacked weight register
// How far ahead the first VPDPBUSD pass over a weight tile (decode: 1-4 token rows, and the first group
// of 5-8) prefetches its weights: 4 blocks, on Intel CPUs only. Measured (2 threads, weights from
// memory): on a Xeon, one row read h_to_4h at 23.3 GB/s, the machine's read bandwidth, against
// 21.6-22.5 GB/s with the hardware prefetcher alone (1 KB and 4 KB did no better), and 4 rows took the
// 28 layers ~119 ms instead of ~134 ms; on an AMD EPYC (Zen 4) the 28 layers read 31.3 GB/s with it and
// 32.8 GB/s without (1 thread: 18.4 vs 21.9), and 1 KB, 4 KB and the T1/NTA hints were slower too.
// Prefetches past the end of the weights are harmless (they never fault).
constexpr int64_t kPrefetchBytes = 2048;
const bool g_prefetch = [] {
  __builtin_cpu_init();  // this may run before libgcc's own initializer does
  return __builtin_cpu_is("intel") > 0;
}();

struct Problem {
  const uint8_t* w;
  const float* wscale;  // per padded output row
  const float* bias;    // nullptr or [out]
  int8_t* q;            // [n, kp], quantized activations
  float* sx;            // [n, nb], their scales
  float* corr;          // [n], their weight-offset corrections
  int64_t out, kp, nb;
};

#ifdef INT4_AVX512_VNNI
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

// Blocks per turn in run_pair (1 KB of a tile's weights): measured with 8 rows on a Xeon, 1 and 2
// blocks alike, 4 and 8 slower.
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

#ifdef INT4_AMX
// Each block's sums leave the tiles through memory (every block has its own activation scales), a
// chain of ~200 cycles per block whatever the token count: measured slower than VPDPBUSD up to ~8 token
// rows, ~12 % faster at 16 and ~20 % at 64 (h_to_4h, 2 threads).
constexpr int64_t kAmxMinTokens = 16;
constexpr int64_t kAmxRows = 16;       // token rows per A tile
constexpr int64_t kAmxMaxTokens = 64;  // token rows per pass over a weight tile (float sums on the stack)

struct TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Tile registers: 0 = A (16 token rows x one block of int8 activations), 1 and 2 = B (one block of a
// 16-output-row weight group, 4 k-values per 32-bit lane as VPDPBUSD reads them), 3 and 4 = C (int32).
void amx_configure() {
  TileConfig c{};
  c.palette_id = 1;
  c.rows[0] = kAmxRows;
  c.colsb[0] = kBlock;
  for (int t = 1; t <= 2; ++t) {
    c.rows[t] = kBlock / 4;
    c.colsb[t] = 64;
  }
  for (int t = 3; t <= 4; ++t) {
    c.rows[t] = kAmxRows;
    c.colsb[t] = 64;
  }
  // GCC 12 does not see LDTILECFG read its operand and drops the stores above without this barrier.
  asm volatile("" : : "m"(c) : "memory");
  _tile_loadconfig(&c);
}

// Linux hands out AMX's 8 KB tile state only to processes that ask (arch_prctl, kernel >= 5.16).
bool amx_permitted() {
  constexpr int kGetPerm = 0x1022, kReqPerm = 0x1023, kXtileData = 18;
  unsigned long features = 0;
  if (syscall(SYS_arch_prctl, kGetPerm, &features) == 0 && (features & (1ul << kXtileData))) return true;
  return syscall(SYS_arch_prctl, kReqPerm, kXtileData) == 0;
}

std::atomic<bool> g_amx{false};

bool use_amx(int64_t n) { return n >= kAmxMinTokens && g_amx.load(std::memory_order_relaxed); }

// Token rows [t0, t0 + count) (count <= kAmxMaxTokens) of one weight tile. p.q has its rows padded to a
// multiple of kAmxRows, so every A tile load reads defined (zero) memory.
template <typename Out>
void amx_tile(const Problem& p, int64_t tile, int64_t t0, int64_t count, Out* y) {
  alignas(64) uint8_t unpacked[2][2][kBlock / 4 * 64];  // [buffer][group g]: 8 rows of 64 bytes
  alignas(64) int32_t c[2][kAmxRows * 16];
  alignas(64) float acc[kAmxMaxTokens][kTileRows] = {};
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const uint8_t* w = p.w + tile * (p.kp / 8) * kStepBytes;
  const int64_t groups = (count + kAmxRows - 1) / kAmxRows;
  for (int64_t b = 0; b < p.nb; ++b) {
    // Alternate buffers, so unpacking this block need not wait for the last block's tile loads.
    uint8_t(&u)[2][kBlock / 4 * 64] = unpacked[b & 1];
    const uint8_t* wb = w + b * kSteps * kStepBytes;
    for (int64_t s = 0; s < kSteps; ++s) {
      for (int g = 0; g < 2; ++g) {
        const __m512i raw = _mm512_loadu_si512(wb + s * kStepBytes + g * 64);
        _mm512_store_si512(u[g] + (2 * s) * 64, _mm512_and_si512(raw, low4));
        _mm512_store_si512(u[g] + (2 * s + 1) * 64, _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4));
      }
    }
    _tile_loadd(1, u[0], 64);
    _tile_loadd(2, u[1], 64);
    for (int64_t group = 0; group < groups; ++group) {
      const int64_t first = group * kAmxRows;
      _tile_loadd(0, p.q + (t0 + first) * p.kp + b * kBlock, p.kp);
      _tile_zero(3);
      _tile_zero(4);
      _tile_dpbsud(3, 0, 1);
      _tile_dpbsud(4, 0, 2);
      _tile_stored(3, c[0], 64);
      _tile_stored(4, c[1], 64);
      const int64_t rows = std::min(kAmxRows, count - first);
      for (int64_t r = 0; r < rows; ++r) {
        const __m512 s = _mm512_set1_ps(p.sx[(t0 + first + r) * p.nb + b]);
        for (int g = 0; g < 2; ++g) {
          float* a = acc[first + r] + g * 16;
          const __m512 sum = _mm512_cvtepi32_ps(_mm512_load_si512(c[g] + r * 16));
          _mm512_store_ps(a, _mm512_fmadd_ps(sum, s, _mm512_load_ps(a)));
        }
      }
    }
  }
  store_tile(p, tile, t0, count, y, [&](int64_t t, int g) { return _mm512_load_ps(acc[t] + g * 16); });
}
#endif

#else
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

// One token row takes the tile's four 8-row groups in one pass, reading the tile front to back (two
// passes over alternate cache lines measured ~3x slower); more token rows take two groups at a time so
// their accumulators fit the 16 ymm registers.
template <int T, typename Out>
void run_tile(const Problem& p, int64_t tile, int64_t t0, Out* y) {
  constexpr int R = T == 1 ? 4 : T <= 4 ? 2 : 1;
  for (int r0 = 0; r0 < kTileRows / 8; r0 += R) run_rows<T, R>(p, tile, t0, r0, y);
}
#endif

#ifndef INT4_AMX
bool use_amx(int64_t) { return false; }
#endif

using Clock = std::chrono::steady_clock;

// When another process holds a core, a parallel call ends waiting at OpenMP's barrier for a descheduled
// thread, one scheduler slice (~4-8 ms) per matmul: a 2-thread decode measured ~4-10x slower on this
// 2-core machine, while one thread lost little. So after a stall that costs a call more than a third of
// its work, the matmuls run on the calling thread alone for kSerialFor, then try the threads again.
// Long matmuls (prefill) keep their threads: a stall is small next to them.
constexpr auto kSerialFor = std::chrono::milliseconds(200);
constexpr auto kStallSlack = std::chrono::microseconds(1000);
constexpr int64_t kLongCallMacs = int64_t{1} << 30;  // ~3 ms on two cores
std::atomic<Clock::rep> g_serial_until{0};

// Calls work(first, last) over [0, items) in chunks. Threads take chunks from a shared counter rather
// than fixed ranges, so a thread that starts late leaves its chunks to the others.
template <typename Work>
void parallel_chunks(int64_t items, bool long_call, const Work& work) {
  const int64_t threads = at::get_num_threads();
  const auto start = Clock::now();
  if (threads <= 1 || items < 2 ||
      (!long_call && start.time_since_epoch().count() < g_serial_until.load(std::memory_order_relaxed))) {
    work(0, items);
    return;
  }
  const int64_t chunk = std::max<int64_t>(1, items / (threads * 16));
  std::atomic<int64_t> next{0};
  Clock::time_point caller_done{};
  Clock::duration longest{0};
  at::parallel_for(0, threads, 1, [&](int64_t thread, int64_t) {
    for (int64_t begin; (begin = next.fetch_add(chunk)) < items;) {
      const auto started = Clock::now();
      work(begin, std::min(begin + chunk, items));
      if (thread == 0) longest = std::max(longest, Clock::now() - started);
    }
    if (thread == 0) caller_done = Clock::now();  // OpenMP's thread 0 is the calling thread
  });
  // Once the caller found no chunk left, the other threads had at most one chunk to finish.
  const auto now = Clock::now();
  const auto stall = now - caller_done;
  if (stall > 2 * longest + kStallSlack && stall > (now - start) / 4) {
    g_serial_until.store((now + kSerialFor).time_since_epoch().count(), std::memory_order_relaxed);
  }
}

// f(std::integral_constant<int, rest>{}) for 1 <= rest <= T (nothing for rest 0): a run-time token
// count as the compile-time one the tile functions take.
template <int T, typename F>
void with_count(int64_t rest, const F& f) {
  if constexpr (T > 0) {
    if (rest == T) {
      f(std::integral_constant<int, T>{});
    } else {
      with_count<T - 1>(rest, f);
    }
  }
}

template <typename X>
void run(const Problem& p, const X* x, int64_t n, int64_t k, X* y, int64_t tiles, bool amx) {
  // Serial: ~1 us per 4096 values, a few percent of a prefill matmul, and a parallel call this short
  // would be all stall under contention.
  for (int64_t r = 0; r < n; ++r) {
    p.corr[r] = quantize_row(x + r * k, k, p.kp, p.q + r * p.kp, p.sx + r * p.nb);
  }
  const bool long_call = n * p.kp * p.out >= kLongCallMacs;
#ifdef INT4_AMX
  if (amx) {
    parallel_chunks(tiles, long_call, [&](int64_t first, int64_t last) {
      amx_configure();  // the tile configuration is per thread
      for (int64_t tile = first; tile < last; ++tile) {
        for (int64_t t0 = 0; t0 < n; t0 += kAmxMaxTokens) amx_tile(p, tile, t0, std::min(kAmxMaxTokens, n - t0), y);
      }
      _tile_release();
    });
    return;
  }
#else
  (void)amx;  // never true in a build without AMX
#endif
  parallel_chunks(tiles, long_call, [&](int64_t first, int64_t last) {
    for (int64_t tile = first; tile < last; ++tile) {
      // Token rows in blocks of kMaxTokens: each weight tile is unpacked once per block while it is hot in
      // L1/L2, so a prefill reads the weights from memory once.
#ifdef INT4_AVX512_VNNI
      if (n > kMaxTokens && n <= 2 * kMaxTokens) {
        with_count<kMaxTokens>(n - kMaxTokens, [&](auto rest) { run_pair<decltype(rest)::value>(p, tile, y); });
        continue;
      }
#endif
      int64_t t0 = 0;
      for (; t0 + kMaxTokens <= n; t0 += kMaxTokens) run_tile<kMaxTokens>(p, tile, t0, y);
      with_count<kMaxTokens - 1>(n - t0, [&](auto rest) { run_tile<decltype(rest)::value>(p, tile, t0, y); });
    }
  });
}

}  // namespace

namespace chatglm {

torch::Tensor int4_linear(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& wscale,
                          int64_t out, const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous [N, in] tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "x must be float32 or bfloat16");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous(),
              "packed weights must be contiguous uint8");
  TORCH_CHECK(wscale.scalar_type() == at::kFloat && wscale.is_contiguous() && wscale.dim() == 1 &&
                  wscale.size(0) % kTileRows == 0 && wscale.size(0) >= out,
              "weight scales must be float32 [padded out]");
  const int64_t n = x.size(0), k = x.size(1), tiles = wscale.size(0) / kTileRows;
  TORCH_CHECK(tiles > 0 && packed.numel() % (tiles * kTileRows / 2) == 0,
              "packed weights do not match the scales");
  const int64_t kp = packed.numel() / (tiles * kTileRows / 2);
  TORCH_CHECK(kp % kBlock == 0 && k <= kp && kp - k < kBlock, "x has ", k,
              " features, weights are packed for ", kp);
  const float* bias_ptr = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == out,
                "bias must be float32 [out]");
    bias_ptr = bias->data_ptr<float>();
  }
  const int64_t nb = kp / kBlock;
  // Decided once per call: the AMX route needs q's rows padded to whole A tiles with zeros, so that
  // every tile load reads defined memory.
  const bool amx = use_amx(n);
  const int64_t q_rows = amx ? (n + 15) / 16 * 16 : n;
  auto q = torch::empty({q_rows, kp}, x.options().dtype(at::kChar));
  if (q_rows > n) q.narrow(0, n, q_rows - n).zero_();
  auto sx = torch::empty({n, nb}, x.options().dtype(at::kFloat));
  auto corr = torch::empty({n}, x.options().dtype(at::kFloat));
  auto y = torch::empty({n, out}, x.options());
  if (n == 0 || out == 0) return y;
  const Problem p{packed.data_ptr<uint8_t>(), wscale.data_ptr<float>(), bias_ptr, q.data_ptr<int8_t>(),
                  sx.data_ptr<float>(), corr.data_ptr<float>(), out, kp, nb};
  if (x.scalar_type() == at::kFloat) {
    run(p, x.data_ptr<float>(), n, k, y.data_ptr<float>(), tiles, amx);
  } else {
    run(p, x.data_ptr<at::BFloat16>(), n, k, y.data_ptr<at::BFloat16>(), tiles, amx);
  }
  return y;
}

}  // namespace chatglm

namespace {

// Zeroed memory for packed weights on 2 MiB-aligned transparent huge pages where the kernel allows them
// (THP "madvise" mode is common): a decode streams every weight once, and 4 KiB pages cost it ~10-15%.
torch::Tensor alloc_weights(int64_t nbytes) {
  TORCH_CHECK(nbytes > 0, "nbytes must be positive");
  constexpr uintptr_t kHuge = 2u << 20;
  const size_t len = (static_cast<size_t>(nbytes) + kHuge - 1) / kHuge * kHuge;
  void* raw = mmap(nullptr, len + kHuge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  TORCH_CHECK(raw != MAP_FAILED, "cannot map ", len, " bytes for weights");
  const uintptr_t base = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t aligned = (base + kHuge - 1) & ~(kHuge - 1);
  if (aligned > base) munmap(raw, aligned - base);
  if (base + kHuge > aligned) munmap(reinterpret_cast<void*>(aligned + len), base + kHuge - aligned);
  void* data = reinterpret_cast<void*>(aligned);
  madvise(data, len, MADV_HUGEPAGE);  // only a hint: without THP the memory is ordinary pages
  return torch::from_blob(data, {nbytes}, [len](void* p) { munmap(p, len); }, torch::dtype(torch::kUInt8));
}

// The official checkpoint's int8 [out, in/2] (even column in the high nibble) in the tile layout above.
torch::Tensor pack_official(const torch::Tensor& qweight) {
  TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.dim() == 2 && qweight.is_contiguous() &&
                  qweight.numel() > 0,
              "qweight must be a contiguous non-empty int8 [out, in/2] tensor");
  const int64_t out = qweight.size(0), half = qweight.size(1), k = 2 * half;
  const int64_t tiles = (out + kTileRows - 1) / kTileRows, kp = (k + kBlock - 1) / kBlock * kBlock;
  auto packed = alloc_weights(tiles * kp * kTileRows / 2);
  const auto* src = reinterpret_cast<const uint8_t*>(qweight.data_ptr<int8_t>());
  uint8_t* dst = packed.data_ptr<uint8_t>();
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      for (int64_t k8 = 0; k8 < kp / 8; ++k8) {
        uint8_t* step = dst + (tile * (kp / 8) + k8) * kStepBytes;
        for (int64_t r = 0; r < kTileRows; ++r) {
          // Source bytes b[i] hold columns 8*k8 + 2i (high nibble) and 8*k8 + 2i + 1 (low nibble);
          // padding reads as q = 0.
          const int64_t o = tile * kTileRows + r;
          uint8_t b[4] = {0, 0, 0, 0};
          for (int64_t i = 0; i < 4 && o < out && k8 * 4 + i < half; ++i) b[i] = src[o * half + k8 * 4 + i];
          const uint8_t lo[4] = {static_cast<uint8_t>(b[0] >> 4), static_cast<uint8_t>(b[0] & 15),
                                 static_cast<uint8_t>(b[1] >> 4), static_cast<uint8_t>(b[1] & 15)};
          const uint8_t hi[4] = {static_cast<uint8_t>(b[2] >> 4), static_cast<uint8_t>(b[2] & 15),
                                 static_cast<uint8_t>(b[3] >> 4), static_cast<uint8_t>(b[3] & 15)};
          // q + 8 of a 4-bit two's complement value is the value with its top bit flipped: xor 0x88.
          for (int j = 0; j < 4; ++j) step[r * 4 + j] = static_cast<uint8_t>((lo[j] | hi[j] << 4) ^ 0x88);
        }
      }
    }
  });
  return packed;
}

}  // namespace


// Whether calls of many token rows take the AMX route; never where the build or the OS lacks AMX.
bool set_amx(bool enabled) {
#ifdef INT4_AMX
  static const bool permitted = amx_permitted();
  g_amx.store(enabled && permitted);
  return enabled && permitted;
#else
  (void)enabled;
  return false;
#endif
}

bool amx_enabled() {
#ifdef INT4_AMX
  return g_amx.load();
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("isa") = kIsa;
  set_amx(true);
#ifdef INT4_AMX
  m.attr("amx_min_tokens") = kAmxMinTokens;
#else
  m.attr("amx_min_tokens") = 0;
#endif
  m.def("set_amx", &set_amx, "let calls of many token rows use AMX where available; returns whether they do",
        pybind11::arg("enabled"));
  m.def("amx_enabled", &amx_enabled, "whether calls of many token rows use AMX");
  m.def("int4_linear", &chatglm::int4_linear, "y[N, out] = x[N, in] @ W.T (+ bias), int4 W x int8 x",
        pybind11::arg("x"), pybind11::arg("packed"), pybind11::arg("scale"), pybind11::arg("out_features"),
        pybind11::arg("bias") = pybind11::none(),
        // The event loop shares this process: let it run while the matmul does.
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("decode_attention", &chatglm::decode_attention,
        "out[B, H, D] = softmax(q k^T / sqrt(D)) v over cache slots 0..positions[b] (bfloat16 in and out)",
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("positions"),
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("rms_norm", &chatglm::rms_norm, "weight * x / sqrt(mean(x^2) + eps) per row (bfloat16 [N, C])",
        pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("eps"),
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("swiglu", &chatglm::swiglu, "silu(x[:, :F]) * x[:, F:] for bfloat16 x [N, 2F]", pybind11::arg("x"),
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("rope_cache_write", &chatglm::rope_cache_write,
        "rotate qkv's query and key heads in place, then write its keys and values into the caches",
        pybind11::arg("qkv"), pybind11::arg("positions"), pybind11::arg("rows"), pybind11::arg("rope"),
        pybind11::arg("heads"), pybind11::arg("k_cache"), pybind11::arg("v_cache"),
        pybind11::call_guard<pybind11::gil_scoped_release>());
  chatglm::bind_decode_step(m);
  m.def("pack_official", &pack_official, "repack official int4 weights for int4_linear",
        pybind11::arg("qweight"), pybind11::call_guard<pybind11::gil_scoped_release>());
}
