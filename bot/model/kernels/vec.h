// Float vectors of 16 lanes with GCC vector extensions (one 512-bit register with AVX-512, two 256-bit
// ones with AVX2), bfloat16 loads and stores, and e^x: shared by attention.cpp and pointwise.cpp.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <cstring>

namespace chatglm {

using v16 = float __attribute__((vector_size(64)));
using v16i = int32_t __attribute__((vector_size(64)));
using v16u = uint32_t __attribute__((vector_size(64)));
using v16h = uint16_t __attribute__((vector_size(32)));

inline v16 splat(float x) { return v16{} + x; }

inline float bf16_to_float(const at::BFloat16& x) { return static_cast<float>(x); }

// 16 bfloat16 values as floats (exact: a bfloat16 is the top half of a float).
inline v16 load_bf16(const at::BFloat16* p) {
  v16h h;
  std::memcpy(&h, p, sizeof h);
  const v16u bits = __builtin_convertvector(h, v16u) << 16;
  v16 out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

// Rounds to nearest even, as torch's float -> bfloat16 conversion does; NaN maps to the quiet NaN.
inline void store_bf16(at::BFloat16* p, v16 x) {
  v16u bits;
  std::memcpy(&bits, &x, sizeof bits);
  bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16;
  bits = x != x ? v16u{} + 0x7FC0 : bits;
  const v16h h = __builtin_convertvector(bits, v16h);
  std::memcpy(p, &h, sizeof h);
}

// e^x for x <= 0 (scores minus their maximum), ~2 ulp: x = n ln2 + r, |r| <= ln2 / 2, a degree-6
// polynomial for e^r, then 2^n through the exponent bits. Below -87 the result is 0.
inline v16 exp_nonpositive(v16 x) {
  const v16 lo = splat(-87.0f);
  x = x < lo ? lo : x;
  const v16 magic = splat(12582912.0f);  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const v16 n = (x * 1.44269504088896341f + magic) - magic;
  const v16 r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // ln 2 split in two for exact products
  v16 p = splat(1.0f / 720);
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const v16i bits = (__builtin_convertvector(n, v16i) + 127) << 23;
  v16 scale;
  std::memcpy(&scale, &bits, sizeof scale);
  v16 result = p * scale;
  return x <= lo ? splat(0.0f) : result;
}

}  // namespace chatglm
