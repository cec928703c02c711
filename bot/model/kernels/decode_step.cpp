// A whole decode step of the transformer layers in one call, for bfloat16 models whose linears all run
// on the int4 kernel: each layer is RMSNorm, qkv, RoPE with the cache write, attention, dense + residual,
// RMSNorm, h_to_4h, SwiGLU, 4h_to_h + residual. It calls the same kernels in the same order as the
// compiled modules of native_layers.py do, so its output is the same bit for bit; what it saves is the
// Python and dispatcher cost between them (measured: bot/model/README.md, kernel tuning), and it holds
// no GIL while it runs.

#include <torch/extension.h>

#include <cstdint>
#include <vector>

#include "ops.h"

namespace chatglm {
namespace {

// One int4 linear: packed weights, float32 scales, out_features, optional float32 bias.
struct Linear {
  torch::Tensor packed, scale;
  int64_t out = 0;
  c10::optional<torch::Tensor> bias;

  torch::Tensor operator()(const torch::Tensor& x) const { return int4_linear(x, packed, scale, out, bias); }
};

struct Layer {
  torch::Tensor input_norm, post_norm, k_cache, v_cache;
  Linear qkv, dense, up, down;
};

}  // namespace

class DecodeStep {
 public:
  // layers[i]: input_norm, post_norm, k_cache, v_cache, then (packed, scale, bias or an empty tensor) for
  // qkv, dense, h_to_4h and 4h_to_h; outs[i]: the four linears' out_features.
  DecodeStep(const std::vector<std::vector<torch::Tensor>>& layers, const std::vector<std::vector<int64_t>>& outs,
             torch::Tensor rope, int64_t heads, double eps)
      : rope_(std::move(rope)), heads_(heads), eps_(eps) {
    TORCH_CHECK(!layers.empty() && layers.size() == outs.size(), "one entry of tensors and of sizes per layer");
    for (size_t i = 0; i < layers.size(); ++i) {
      const auto& t = layers[i];
      TORCH_CHECK(t.size() == 16 && outs[i].size() == 4, "layer ", i, ": 16 tensors and 4 sizes expected");
      auto linear = [&](size_t first, int64_t out) {
        const torch::Tensor& bias = t[first + 2];
        return Linear{t[first], t[first + 1], out,
                      bias.numel() ? c10::optional<torch::Tensor>(bias) : c10::optional<torch::Tensor>()};
      };
      layers_.push_back(Layer{t[0], t[1], t[2], t[3], linear(4, outs[i][0]), linear(7, outs[i][1]),
                              linear(10, outs[i][2]), linear(13, outs[i][3])});
    }
    TORCH_CHECK(layers_[0].k_cache.dim() == 4, "caches must be [R, G, T, D]");
    dim_ = layers_[0].k_cache.size(3);
  }

  // x [B, C] (the embedded tokens), one token per row b at positions[b] in cache row first_row + b ->
  // the last layer's output [B, C].
  torch::Tensor run(torch::Tensor x, const torch::Tensor& positions, int64_t first_row) const {
    const int64_t batch = x.size(0);
    const auto rows = torch::arange(first_row, first_row + batch, positions.options());
    const int64_t q_size = heads_ * dim_;
    for (const Layer& layer : layers_) {
      auto qkv = layer.qkv(rms_norm(x, layer.input_norm, eps_));
      rope_cache_write(qkv, positions, rows, rope_, heads_, layer.k_cache, layer.v_cache);
      const auto q = qkv.narrow(1, 0, q_size).reshape({batch, heads_, dim_}).contiguous();
      const auto attended = decode_attention(q, layer.k_cache.narrow(0, first_row, batch),
                                             layer.v_cache.narrow(0, first_row, batch), positions);
      x = x + layer.dense(attended.view({batch, q_size}));
      x = x + layer.down(swiglu(layer.up(rms_norm(x, layer.post_norm, eps_))));
    }
    return x;
  }

 private:
  std::vector<Layer> layers_;
  torch::Tensor rope_;
  int64_t heads_, dim_ = 0;
  double eps_;
};

void bind_decode_step(pybind11::module& m) {
  pybind11::class_<DecodeStep>(m, "DecodeStep")
      .def(pybind11::init<const std::vector<std::vector<torch::Tensor>>&, const std::vector<std::vector<int64_t>>&,
                          torch::Tensor, int64_t, double>(),
           pybind11::arg("layers"), pybind11::arg("outs"), pybind11::arg("rope"), pybind11::arg("heads"),
           pybind11::arg("eps"))
      .def("run", &DecodeStep::run, "the layers for one new token per row", pybind11::arg("x"),
           pybind11::arg("positions"), pybind11::arg("first_row"),
           pybind11::call_guard<pybind11::gil_scoped_release>());
}

}  // namespace chatglm
