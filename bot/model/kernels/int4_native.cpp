// int4 weights x int8 activations on AVX512-VNNI or AVX2, for ChatGLM2's per-row-scaled INT4 linears:
// the dispatch over the instruction-set paths (int4_avx512.h, int4_amx.h, int4_avx2.h), the threading,
// the weight repacking and the Python bindings.
//
// Weights are repacked at load (see layout.py) as unsigned nibbles u = q + 8 in tiles of 32 output rows:
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

#include "int4_amx.h"
#include "int4_avx2.h"
#include "int4_avx512.h"
#include "int4_isa.h"
#include "ops.h"

namespace {


#ifndef INT4_AMX
bool use_amx(int64_t) { return false; }
#endif

using Clock = std::chrono::steady_clock;

// When another process holds a core, a parallel call ends waiting at OpenMP's barrier for a descheduled
// thread, one scheduler slice per matmul: a 2-thread decode on a 2-core machine then runs several
// times slower, while one thread loses little (measured: bot/model/README.md, kernel tuning). So after
// a stall that costs a call more than a third of its work, the matmuls run on the calling thread alone
// for kSerialFor, then try the threads again. Long matmuls (prefill) keep their threads: a stall is
// small next to them.
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
  // Serial: a few percent of a prefill matmul, and a parallel call this short would be all stall under
  // contention.
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
// (THP "madvise" mode is common): a decode streams every weight once, and 4 KiB pages slow it down.
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
