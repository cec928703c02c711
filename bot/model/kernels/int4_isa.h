// The int4 kernel's instruction set, picked at compile time by -march=native, and what every path
// shares: the weight layout's constants and one matmul's arguments (Problem).
#pragma once

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cstdint>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define INT4_AVX512_VNNI 1
#if defined(__AMX_TILE__) && defined(__AMX_INT8__)
#define INT4_AMX 1
#endif
#elif !defined(__AVX2__) || !defined(__FMA__)
#error "the int4 kernel needs AVX512-VNNI (with F/BW/VL) or AVX2 + FMA: build with -march=native on such a CPU"
#endif

namespace {

constexpr int64_t kBlock = 32;       // activation values sharing one int8 scale (llama.cpp q8_0)
constexpr int64_t kTileRows = 32;    // output rows per weight tile: two registers of 16 int32 lanes
constexpr int64_t kStepBytes = 128;  // one tile's 8 k-values: 32 rows x 8 nibbles
constexpr int64_t kSteps = kBlock / 8;
constexpr int kMaxTokens = 4;        // token rows sharing each unpacked weight register
// How far ahead the first VPDPBUSD pass over a weight tile (decode: 1-4 token rows, and the first group
// of 5-8) prefetches its weights: 4 blocks, on Intel CPUs only; on AMD the hardware prefetcher alone
// is faster (measured: bot/model/README.md, kernel tuning). Prefetches past the end of the weights
// are harmless (they never fault).
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

}  // namespace
