// The small per-token steps of a bfloat16 forward, one call each instead of 3-8 PyTorch ops: RMSNorm,
// SwiGLU, and RoPE with the key/value cache write. In a decode step these ops move a few KB each, so
// PyTorch's per-op cost dominated them (bot/model/README.md). Each works in
// float32 and rounds to bfloat16 once per output; every token row is computed the same way whatever
// the batch, so a row's result does not depend on the rows beside it.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>

#include "ops.h"
#include "vec.h"

namespace chatglm {
namespace {

constexpr int64_t kGrainRows = 16;  // token rows per parallel task: a decode step's few rows stay serial

void check_bf16_rows(const torch::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kBFloat16, name,
              " must be a contiguous bfloat16 [N, C] tensor");
  TORCH_CHECK(x.size(1) % 16 == 0, name, "'s last dimension must be a multiple of 16, got ", x.size(1));
}

}  // namespace

// weight * x / sqrt(mean(x^2) + eps) per row, as the official RMSNorm (in float32).
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  check_bf16_rows(x, "x");
  const int64_t n = x.size(0), c = x.size(1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == c && weight.is_contiguous() &&
                  weight.scalar_type() == at::kBFloat16,
              "weight must be a contiguous bfloat16 [", c, "] tensor");
  auto y = torch::empty_like(x);
  const auto* xd = x.data_ptr<at::BFloat16>();
  const auto* wd = weight.data_ptr<at::BFloat16>();
  auto* yd = y.data_ptr<at::BFloat16>();
  at::parallel_for(0, n, kGrainRows, [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      const at::BFloat16* row = xd + r * c;
      v16 squares{};
      for (int64_t i = 0; i < c; i += 16) {
        const v16 v = load_bf16(row + i);
        squares += v * v;
      }
      float sum = 0.f;
      for (int lane = 0; lane < 16; ++lane) sum += squares[lane];
      const float inv = 1.f / std::sqrt(sum / static_cast<float>(c) + static_cast<float>(eps));
      for (int64_t i = 0; i < c; i += 16) store_bf16(yd + r * c + i, load_bf16(row + i) * inv * load_bf16(wd + i));
    }
  });
  return y;
}

// x [N, 2F] -> silu(x[:, :F]) * x[:, F:]  ([N, F]), ChatGLM2's MLP activation.
torch::Tensor swiglu(const torch::Tensor& x) {
  check_bf16_rows(x, "x");
  TORCH_CHECK(x.size(1) % 32 == 0, "x's last dimension must be a multiple of 32, got ", x.size(1));
  const int64_t n = x.size(0), f = x.size(1) / 2;
  auto y = torch::empty({n, f}, x.options());
  const auto* xd = x.data_ptr<at::BFloat16>();
  auto* yd = y.data_ptr<at::BFloat16>();
  at::parallel_for(0, n, kGrainRows, [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      for (int64_t i = 0; i < f; i += 16) {
        const v16 gate = load_bf16(xd + r * 2 * f + i), up = load_bf16(xd + r * 2 * f + f + i);
        // sigmoid from e^-|gate|, which cannot overflow: 1 / (1 + e) for gate >= 0, e / (1 + e) below.
        const v16 e = exp_nonpositive(gate < 0 ? gate : -gate);
        const v16 sigmoid = (gate < 0 ? e : splat(1.f)) / (1.f + e);
        store_bf16(yd + r * f + i, gate * sigmoid * up);
      }
    }
  });
  return y;
}

// In place on qkv [N, (H + 2G) * D] (per token: H query heads, G key heads, G value heads): rotates the
// first 2 * P dims of each query and key head in interleaved pairs by the angles of the token's
// position (rope [T, P, 2]: cos, sin), then writes the token's keys and values into slot positions[i]
// of cache row rows[i] (k_cache, v_cache [R, G, T, D]).
void rope_cache_write(const torch::Tensor& qkv, const torch::Tensor& positions, const torch::Tensor& rows,
                      const torch::Tensor& rope, int64_t heads, const torch::Tensor& k_cache,
                      const torch::Tensor& v_cache) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.is_contiguous() && qkv.scalar_type() == at::kBFloat16,
              "qkv must be a contiguous bfloat16 [N, W] tensor");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && k_cache.scalar_type() == at::kBFloat16 &&
                  v_cache.sizes() == k_cache.sizes() && v_cache.is_contiguous() &&
                  v_cache.scalar_type() == at::kBFloat16,
              "k_cache and v_cache must be contiguous bfloat16 [R, G, T, D] tensors of one shape");
  const int64_t n = qkv.size(0), cache_rows = k_cache.size(0), groups = k_cache.size(1);
  const int64_t slots = k_cache.size(2), dim = k_cache.size(3);
  TORCH_CHECK(heads > 0 && qkv.size(1) == (heads + 2 * groups) * dim, "qkv has ", qkv.size(1),
              " features, expected (", heads, " + 2 * ", groups, ") * ", dim);
  TORCH_CHECK(rope.dim() == 3 && rope.size(2) == 2 && rope.size(0) == slots && 2 * rope.size(1) <= dim &&
                  rope.is_contiguous() && rope.scalar_type() == at::kBFloat16,
              "rope must be a contiguous bfloat16 [", slots, ", P, 2] tensor with 2 * P <= ", dim);
  TORCH_CHECK(positions.dim() == 1 && positions.size(0) == n && positions.scalar_type() == at::kLong &&
                  rows.dim() == 1 && rows.size(0) == n && rows.scalar_type() == at::kLong,
              "positions and rows must be int64 [", n, "]");
  const auto pos = positions.contiguous(), row = rows.contiguous();
  const int64_t* pd = pos.data_ptr<int64_t>();
  const int64_t* rd = row.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(pd[i] >= 0 && pd[i] < slots, "position ", pd[i], " outside the ", slots, " cache slots");
    TORCH_CHECK(rd[i] >= 0 && rd[i] < cache_rows, "row ", rd[i], " outside the ", cache_rows, " cache rows");
  }
  const int64_t pairs = rope.size(1), width = qkv.size(1);
  auto* xd = qkv.data_ptr<at::BFloat16>();
  const auto* angles = rope.data_ptr<at::BFloat16>();
  auto* kd = k_cache.data_ptr<at::BFloat16>();
  auto* vd = v_cache.data_ptr<at::BFloat16>();
  at::parallel_for(0, n, kGrainRows, [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) {
      at::BFloat16* token = xd + i * width;
      const at::BFloat16* angle = angles + pd[i] * pairs * 2;
      for (int64_t h = 0; h < heads + groups; ++h) {
        at::BFloat16* head = token + h * dim;
        for (int64_t j = 0; j < pairs; ++j) {
          const float a = head[2 * j], b = head[2 * j + 1];
          const float cos = angle[2 * j], sin = angle[2 * j + 1];
          head[2 * j] = a * cos - b * sin;
          head[2 * j + 1] = b * cos + a * sin;
        }
      }
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t slot = ((rd[i] * groups + g) * slots + pd[i]) * dim;
        std::memcpy(kd + slot, token + (heads + g) * dim, dim * sizeof(at::BFloat16));
        std::memcpy(vd + slot, token + (heads + groups + g) * dim, dim * sizeof(at::BFloat16));
      }
    }
  });
}

}  // namespace chatglm
