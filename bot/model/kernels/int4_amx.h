// The AMX-INT8 route (TDPBSUD) for calls of many token rows, on AVX512-VNNI CPUs that have it: the
// same integer block sums as VPDPBUSD, the scales applied in the same order.
#pragma once

#include "int4_avx512.h"

namespace {

#ifdef INT4_AMX
// Each block's sums leave the tiles through memory (every block has its own activation scales), a
// chain of ~200 cycles per block whatever the token count, so AMX pays off only from many token rows
// on (measured: bot/model/README.md, kernel tuning).
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

}  // namespace
