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

}  // namespace
