// Attention of one new token per cache row over bfloat16 keys/values, for batched decoding.
//
// PyTorch's path (model.decode_attention) converts each row's whole K and V to float32 and runs two
// batched matmuls, a masked fill and a softmax per layer, which dominated batched decode steps
// (bench/attention.py measures both; bot/model/README.md). This reads
// K and V once, converts them block by block in cache, and works in float32: per (row, key/value
// group), the group's query heads sit in the lanes of one 16-float vector, so each slot costs 2 x 128
// multiply-adds with a broadcast operand and no horizontal sums. Each (row, group) is computed the same
// way whatever the batch, so a row's output does not depend on the rows beside it. Written with GCC
// vector extensions: one 512-bit register per vector with AVX-512, two 256-bit ones with AVX2.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "ops.h"
#include "vec.h"

namespace chatglm {
namespace {

constexpr int kLanes = 16;  // query heads per key/value group that one vector holds
constexpr int kSlotBlock = 64;  // slots whose keys/values are converted to float32 at a time

// One (row, group): out[h][d] for the group's `heads` query heads over slots [0, slots).
void row_group(const at::BFloat16* q, const at::BFloat16* k, const at::BFloat16* v, int64_t slots,
               int64_t heads, int64_t dim, float scale, at::BFloat16* out, std::vector<v16>& scratch) {
  // scratch (vector-aligned): query transposed [dim][16], scores [slots][16], output transposed
  // [dim][16], keys or values of one block as floats [64][dim]
  scratch.resize(2 * dim + slots + kSlotBlock * dim / kLanes);
  v16* qt = scratch.data();
  v16* score = qt + dim;
  v16* acc = score + slots;
  float* block = reinterpret_cast<float*>(acc + dim);
  for (int64_t d = 0; d < dim; ++d) {
    v16 column{};
    for (int64_t h = 0; h < heads; ++h) column[h] = bf16_to_float(q[h * dim + d]) * scale;
    qt[d] = column;
  }
  v16 top = splat(-std::numeric_limits<float>::infinity());
  for (int64_t t0 = 0; t0 < slots; t0 += kSlotBlock) {
    const int64_t n = std::min<int64_t>(kSlotBlock, slots - t0);
    for (int64_t i = 0; i < n * dim; ++i) block[i] = bf16_to_float(k[t0 * dim + i]);
    for (int64_t t = 0; t < n; ++t) {
      const float* kt = block + t * dim;
      v16 acc[4] = {};  // four chains, so the multiply-adds do not wait on each other
      for (int64_t d = 0; d < dim; d += 4) {
        for (int j = 0; j < 4; ++j) acc[j] += qt[d + j] * kt[d + j];
      }
      const v16 s = (acc[0] + acc[1]) + (acc[2] + acc[3]);
      score[t0 + t] = s;
      top = s > top ? s : top;
    }
  }
  v16 total{};
  for (int64_t t = 0; t < slots; ++t) {
    score[t] = exp_nonpositive(score[t] - top);
    total += score[t];
  }
  // out^T[d] (16 heads in the lanes) += p[t] * v[t][d], a chunk of dim at a time in registers.
  constexpr int kChunk = 16;
  std::fill(acc, acc + dim, v16{});
  for (int64_t t0 = 0; t0 < slots; t0 += kSlotBlock) {
    const int64_t n = std::min<int64_t>(kSlotBlock, slots - t0);
    for (int64_t i = 0; i < n * dim; ++i) block[i] = bf16_to_float(v[t0 * dim + i]);
    for (int64_t d0 = 0; d0 < dim; d0 += kChunk) {
      v16 part[kChunk];
      for (int j = 0; j < kChunk; ++j) part[j] = acc[d0 + j];
      for (int64_t t = 0; t < n; ++t) {
        const v16 p = score[t0 + t];
        const float* vt = block + t * dim + d0;
        for (int j = 0; j < kChunk; ++j) part[j] += p * vt[j];
      }
      for (int j = 0; j < kChunk; ++j) acc[d0 + j] = part[j];
    }
  }
  const v16 inverse = 1.0f / total;
  for (int64_t d = 0; d < dim; ++d) {
    const v16 o = acc[d] * inverse;
    for (int64_t h = 0; h < heads; ++h) out[h * dim + d] = at::BFloat16(o[h]);
  }
}

}  // namespace

torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                               const torch::Tensor& positions) {
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous() && q.scalar_type() == at::kBFloat16,
              "q must be a contiguous bfloat16 [B, H, D] tensor");
  TORCH_CHECK(k.dim() == 4 && k.is_contiguous() && k.scalar_type() == at::kBFloat16 && v.sizes() == k.sizes() &&
                  v.is_contiguous() && v.scalar_type() == at::kBFloat16,
              "k and v must be contiguous bfloat16 [B, G, T, D] tensors of one shape");
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t groups = k.size(1), length = k.size(2);
  TORCH_CHECK(k.size(0) == batch && k.size(3) == dim && groups > 0 && heads % groups == 0 &&
                  heads / groups <= kLanes && dim % 16 == 0,
              "shapes do not match: q ", q.sizes(), ", k ", k.sizes());
  TORCH_CHECK(positions.dim() == 1 && positions.size(0) == batch && positions.scalar_type() == at::kLong,
              "positions must be int64 [B]");
  const auto pos = positions.contiguous();
  const int64_t* p = pos.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(p[b] >= 0 && p[b] < length, "position ", p[b], " outside the ", length, " cache slots");
  }
  auto out = torch::empty_like(q);
  const int64_t per_group = heads / groups;
  const float scale = 1.0f / std::sqrt(static_cast<float>(dim));
  const auto* qd = q.data_ptr<at::BFloat16>();
  const auto* kd = k.data_ptr<at::BFloat16>();
  const auto* vd = v.data_ptr<at::BFloat16>();
  auto* od = out.data_ptr<at::BFloat16>();
  at::parallel_for(0, batch * groups, 1, [&](int64_t first, int64_t last) {
    std::vector<v16> scratch;
    for (int64_t task = first; task < last; ++task) {
      const int64_t b = task / groups, g = task % groups;
      const int64_t cache = (b * groups + g) * length * dim;
      const int64_t head = (b * heads + g * per_group) * dim;
      row_group(qd + head, kd + cache, vd + cache, p[b] + 1, per_group, dim, scale, od + head, scratch);
    }
  });
  return out;
}

}  // namespace chatglm
