// The kernels one translation unit calls in another, and the Python module binds (int4_native.cpp).
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <vector>

namespace chatglm {

// int4_native.cpp
torch::Tensor int4_linear(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& wscale,
                          int64_t out, const c10::optional<torch::Tensor>& bias);

// attention.cpp
torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                               const torch::Tensor& positions);

// pointwise.cpp
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps);
torch::Tensor swiglu(const torch::Tensor& x);
void rope_cache_write(const torch::Tensor& qkv, const torch::Tensor& positions, const torch::Tensor& rows,
                      const torch::Tensor& rope, int64_t heads, const torch::Tensor& k_cache,
                      const torch::Tensor& v_cache);

// decode_step.cpp: adds the DecodeStep class to the module.
void bind_decode_step(pybind11::module& m);

}  // namespace chatglm
