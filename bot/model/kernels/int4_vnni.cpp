// int4 weights x int8 activations on AVX512-VNNI, for ChatGLM2's per-row-scaled INT4 linears.
//
// Weights are repacked at load (see vnni.py) as unsigned nibbles u = q + 8 in tiles of 32 output rows:
//   packed[tile][k8][group g][lane][j] = u[o][8*k8 + j] | u[o][8*k8 + 4 + j] << 4,  o = 32*tile + 16*g + lane
// so one 64-byte load holds 4+4 k-values for 16 rows and VPDPBUSD (u8 x s8, 4 products per int32 lane)
// accumulates 16 output rows per register with no horizontal reduction. Activations are quantized per row
// in blocks of kBlock values (llama.cpp q8 style); the +8 weight offset is removed with the exact correction
//   sum_k u*x = sum_k q*x + 8*sum_k x,
// which, as every output row shares it, folds into one float per token row.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>

#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VL__) || !defined(__AVX512VNNI__)
#error "int4_vnni.cpp needs AVX512F/BW/VL and AVX512-VNNI: build with -march=native on such a CPU"
#endif

namespace {

constexpr int64_t kBlock = 128;      // activation values sharing one int8 scale
constexpr int64_t kTileRows = 32;    // output rows per weight tile: two registers of 16 int32 lanes
constexpr int64_t kStepBytes = 128;  // one tile's 8 k-values: 32 rows x 8 nibbles
constexpr int64_t kSteps = kBlock / 8;
constexpr int kMaxTokens = 4;        // token rows sharing each unpacked weight register

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

// acc[t][g] = sum_b scale[t][b] * (u . q) over all blocks, for one weight tile and T token rows.
template <int T>
inline void tile_dot(const uint8_t* w, const int8_t* q, int64_t kp, const float* sx, int64_t nb,
                     __m512 (&acc)[T][2]) {
  // With few token rows, separate accumulators for the low and high nibbles halve the VPDPBUSD
  // dependency chains so the GEMV is not latency-bound.
  constexpr int P = T <= 2 ? 2 : 1;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  for (int t = 0; t < T; ++t) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m512i ia[T][2][P];
    for (int t = 0; t < T; ++t)
      for (int g = 0; g < 2; ++g)
        for (int p = 0; p < P; ++p) ia[t][g][p] = _mm512_setzero_si512();
    const uint8_t* wb = w + b * kSteps * kStepBytes;
    const int8_t* qb = q + b * kBlock;
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

struct Problem {
  const uint8_t* w;
  const float* wscale;  // per padded output row
  const float* bias;    // nullptr or [out]
  const int8_t* q;      // [n, kp]
  const float* sx;      // [n, nb]
  const float* corr;    // [n]
  int64_t out, kp, nb;
};

template <int T, typename Out>
void run_tile(const Problem& p, int64_t tile, int64_t t0, Out* y) {
  __m512 acc[T][2];
  tile_dot<T>(p.w + tile * (p.kp / 8) * kStepBytes, p.q + t0 * p.kp, p.kp, p.sx + t0 * p.nb, p.nb, acc);
  for (int g = 0; g < 2; ++g) {
    const int64_t o = tile * kTileRows + g * 16;
    const __mmask16 m = tail_mask(p.out - o);
    if (m == 0) continue;
    const __m512 ws = _mm512_loadu_ps(p.wscale + o);
    const __m512 b = p.bias ? _mm512_maskz_loadu_ps(m, p.bias + o) : _mm512_setzero_ps();
    for (int t = 0; t < T; ++t) {
      const __m512 v = _mm512_fmadd_ps(_mm512_add_ps(acc[t][g], _mm512_set1_ps(p.corr[t0 + t])), ws, b);
      store16(y + (t0 + t) * p.out + o, v, m);
    }
  }
}

template <typename X>
void run(const Problem& p, const X* x, int64_t n, int64_t k, int8_t* q, float* sx, float* corr, X* y,
         int64_t tiles) {
  at::parallel_for(0, n, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) corr[r] = quantize_row(x + r * k, k, p.kp, q + r * p.kp, sx + r * p.nb);
  });
  // Threads take chunks of tiles from a shared counter rather than fixed ranges: on a machine shared with
  // other work a descheduled thread would otherwise hold up the whole matmul until it runs again.
  const int64_t threads = at::get_num_threads();
  const int64_t chunk = std::max<int64_t>(1, tiles / (threads * 16));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t begin; (begin = next.fetch_add(chunk)) < tiles;) {
      for (int64_t tile = begin; tile < std::min(begin + chunk, tiles); ++tile) {
        // Token rows in blocks of kMaxTokens: each weight tile is unpacked once per block while it is hot
        // in L1/L2, so a prefill reads the weights from memory once.
        int64_t t0 = 0;
        for (; t0 + kMaxTokens <= n; t0 += kMaxTokens) run_tile<kMaxTokens>(p, tile, t0, y);
        switch (n - t0) {
          case 3: run_tile<3>(p, tile, t0, y); break;
          case 2: run_tile<2>(p, tile, t0, y); break;
          case 1: run_tile<1>(p, tile, t0, y); break;
          default: break;
        }
      }
    }
  });
}

torch::Tensor int4_linear(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& wscale,
                          int64_t out, const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous [N, in] tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be float32 or bfloat16");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous(), "packed weights must be contiguous uint8");
  TORCH_CHECK(wscale.scalar_type() == at::kFloat && wscale.is_contiguous() && wscale.dim() == 1 &&
                  wscale.size(0) % kTileRows == 0 && wscale.size(0) >= out,
              "weight scales must be float32 [padded out]");
  const int64_t n = x.size(0), k = x.size(1), tiles = wscale.size(0) / kTileRows;
  TORCH_CHECK(tiles > 0 && packed.numel() % (tiles * kTileRows / 2) == 0, "packed weights do not match the scales");
  const int64_t kp = packed.numel() / (tiles * kTileRows / 2);
  TORCH_CHECK(kp % kBlock == 0 && k <= kp && kp - k < kBlock, "x has ", k, " features, weights are packed for ", kp);
  const float* bias_ptr = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == out,
                "bias must be float32 [out]");
    bias_ptr = bias->data_ptr<float>();
  }
  const int64_t nb = kp / kBlock;
  auto q = torch::empty({n, kp}, x.options().dtype(at::kChar));
  auto sx = torch::empty({n, nb}, x.options().dtype(at::kFloat));
  auto corr = torch::empty({n}, x.options().dtype(at::kFloat));
  auto y = torch::empty({n, out}, x.options());
  if (n == 0 || out == 0) return y;
  const Problem p{packed.data_ptr<uint8_t>(), wscale.data_ptr<float>(), bias_ptr, q.data_ptr<int8_t>(),
                  sx.data_ptr<float>(), corr.data_ptr<float>(), out, kp, nb};
  if (x.scalar_type() == at::kFloat) {
    run(p, x.data_ptr<float>(), n, k, q.data_ptr<int8_t>(), sx.data_ptr<float>(), corr.data_ptr<float>(),
        y.data_ptr<float>(), tiles);
  } else {
    run(p, x.data_ptr<at::BFloat16>(), n, k, q.data_ptr<int8_t>(), sx.data_ptr<float>(), corr.data_ptr<float>(),
        y.data_ptr<at::BFloat16>(), tiles);
  }
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int4_linear", &int4_linear, "y[N, out] = x[N, in] @ W.T (+ bias), int4 W x int8 x on AVX512-VNNI",
        pybind11::arg("x"), pybind11::arg("packed"), pybind11::arg("scale"), pybind11::arg("out_features"),
        pybind11::arg("bias") = pybind11::none());
}
