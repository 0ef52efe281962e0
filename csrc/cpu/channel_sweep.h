// Vectorised channel sweeps of the attention map with fp32 accumulation (channel_sweep.cpp): the
// reduction over channels of |x|^p (p = 2 or 1) and the gradient pass of p = 2, for float32,
// bfloat16 and float16 features in NCHW or channels_last. Each entry point is compiled for the
// baseline x86-64 ISA, x86-64-v3 (AVX2/FMA/F16C) and x86-64-v4 (AVX-512), one chosen at load time.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>

namespace dctkd {
namespace cpu {
namespace sweep {

// Whether the sweeps handle this element type and exponent (float32/bfloat16/float16; p 2 or 1 for
// the map, p 2 for the gradient); the callers keep a scalar loop for the rest.
inline bool map_supported(at::ScalarType t, double p) {
  return (t == at::kFloat || t == at::kBFloat16 || t == at::kHalf) && (p == 2.0 || p == 1.0);
}
inline bool grad_supported(at::ScalarType t, double p) {
  return (t == at::kFloat || t == at::kBFloat16 || t == at::kHalf) && p == 2.0;
}

// NCHW: out[i] = scale * sum_{c < C} |x[c * stride + i]|^p for positions i < n; each position sums
// its channels in order c = 0, 1, ...
void map_nchw(const void* x, at::ScalarType t, double p, int64_t C, int64_t stride, int64_t n, float scale, float* out);
// channels_last: out[pos] = scale * sum_c |x[pos * C + c]|^p for pos < npos.
void map_nhwc(const void* x, at::ScalarType t, double p, int64_t C, int64_t npos, float scale, float* out);

// NCHW, p = 2: dx[c * stride + i] = (g[i] * scale) * (2 x[c * stride + i]) for c < C, i < n,
// rounded to x's type as static_cast does. stream: write dx with non-temporal stores (for a
// gradient too large to stay in cache, where its rows start on cache lines; the values are the same
// either way).
void grad_nchw(const float* g, float scale, const void* x, void* dx, at::ScalarType t, int64_t C, int64_t stride,
               int64_t n, bool stream);
// channels_last, p = 2: dx[pos * C + c] = (g[pos] * scale) * (2 x[pos * C + c]) for pos < npos.
void grad_nhwc(const float* g, float scale, const void* x, void* dx, at::ScalarType t, int64_t C, int64_t npos,
               bool stream);

// Gradients above this size are streamed past the caches (a few times the L2 of a core).
constexpr int64_t kStreamBytes = int64_t(8) << 20;

}  // namespace sweep
}  // namespace cpu
}  // namespace dctkd
