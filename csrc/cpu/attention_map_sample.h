// The attention map of ONE sample and its gradient, for kernels that work sample by sample (the
// single-pass dct_at_loss): the sample's (C, H, W) block is contiguous in both NCHW and
// channels_last, so one pointer and the layout flag describe it. fp32 accumulation (fp64 for
// fp64), fp16/bf16 converted in registers. fp32 accumulation with p = 2 or 1 (the map) and p = 2
// (the gradient) runs the vectorised sweeps of channel_sweep.h; the templates below serve fp64 and
// other exponents.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "../dctkd_math.h"
#include "channel_sweep.h"

namespace dctkd {
namespace cpu {
namespace sample {

// Exponent of the fast paths: 2 (x*x), 1 (|x|), 0 (any p).
inline int pow_kind(double p) { return p == 2.0 ? 2 : (p == 1.0 ? 1 : 0); }

template <typename acc_t, int kPow>
inline acc_t term(acc_t v, acc_t p) {
  if constexpr (kPow == 2) return v * v;
  else if constexpr (kPow == 1) return std::abs(v);
  else return abs_pow<acc_t>(v, p);
}

template <typename acc_t, int kPow>
inline acc_t term_grad(acc_t v, acc_t p) {
  if constexpr (kPow == 2) return acc_t(2) * v;
  else return abs_pow_grad<acc_t>(v, p);
}

// out[i] = scale * sum_c |x[c, i]|^p. NCHW: a tile of positions accumulates over c (contiguous,
// vectorisable); the accumulator tile (16 KB in fp32) lives in L1 and covers a whole map up to
// 64x64, so the sample's block is read as one sequential stream (short runs per channel defeat
// the hardware prefetcher: a 512-position tile made the sweep twice as slow at 32x32).
template <typename in_t, typename acc_t, int kPow>
void map_nchw(const in_t* x, int64_t C, int64_t HW, acc_t p, acc_t scale, acc_t* out) {
  constexpr int64_t kTile = 4096;
  acc_t acc[kTile];
  for (int64_t t0 = 0; t0 < HW; t0 += kTile) {
    const int64_t n = std::min(kTile, HW - t0);
    std::fill(acc, acc + n, acc_t(0));
    for (int64_t c = 0; c < C; ++c) {
      const in_t* xc = x + c * HW + t0;
      for (int64_t i = 0; i < n; ++i) acc[i] += term<acc_t, kPow>(static_cast<acc_t>(xc[i]), p);
    }
    for (int64_t i = 0; i < n; ++i) out[t0 + i] = acc[i] * scale;
  }
}

// channels_last: each position reduces its contiguous channel vector with 8 partial sums.
template <typename in_t, typename acc_t, int kPow>
void map_nhwc(const in_t* x, int64_t C, int64_t HW, acc_t p, acc_t scale, acc_t* out) {
  for (int64_t pos = 0; pos < HW; ++pos) {
    const in_t* xp = x + pos * C;
    acc_t part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t c = 0;
    for (; c + 8 <= C; c += 8)
      for (int j = 0; j < 8; ++j) part[j] += term<acc_t, kPow>(static_cast<acc_t>(xp[c + j]), p);
    for (; c < C; ++c) part[0] += term<acc_t, kPow>(static_cast<acc_t>(xp[c]), p);
    out[pos] = ((part[0] + part[1]) + (part[2] + part[3]) + ((part[4] + part[5]) + (part[6] + part[7]))) * scale;
  }
}

// dx[c, i] = (g[i] * scale) * d|x|^p/dx.
template <typename in_t, typename acc_t, int kPow>
void grad_nchw(const acc_t* g, acc_t scale, const in_t* x, in_t* dx, int64_t C, int64_t HW, acc_t p) {
  for (int64_t c = 0; c < C; ++c) {
    const in_t* xc = x + c * HW;
    in_t* dc = dx + c * HW;
    for (int64_t i = 0; i < HW; ++i)
      dc[i] = static_cast<in_t>((g[i] * scale) * term_grad<acc_t, kPow>(static_cast<acc_t>(xc[i]), p));
  }
}

template <typename in_t, typename acc_t, int kPow>
void grad_nhwc(const acc_t* gs, acc_t scale, const in_t* x, in_t* dx, int64_t C, int64_t HW, acc_t p) {
  for (int64_t pos = 0; pos < HW; ++pos) {
    const acc_t g = gs[pos] * scale;
    const in_t* xp = x + pos * C;
    in_t* dp = dx + pos * C;
    for (int64_t c = 0; c < C; ++c) dp[c] = static_cast<in_t>(g * term_grad<acc_t, kPow>(static_cast<acc_t>(xp[c]), p));
  }
}

// Calls f(static_cast<in_t*>(nullptr)) for the element type t.
template <typename F>
void with_type(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(static_cast<float*>(nullptr)); break;
    case at::kDouble: f(static_cast<double*>(nullptr)); break;
    case at::kHalf: f(static_cast<at::Half*>(nullptr)); break;
    case at::kBFloat16: f(static_cast<at::BFloat16*>(nullptr)); break;
    default: TORCH_CHECK(false, "expected a float16/bfloat16/float32/float64 tensor, got ", t);
  }
}

// One sample's block of a level: base pointer, element type, layout, sizes.
struct Block {
  const void* x = nullptr;
  void* dx = nullptr;  // the gradient's block, or null
  bool stream = false;  // write dx with non-temporal stores (sweep::grad_*)
  at::ScalarType type = at::kFloat;
  bool channels_last = false;
  int64_t C = 0, HW = 0;
};

template <typename acc_t>
void attention_map(const Block& blk, int64_t b, double p, acc_t scale, acc_t* out) {
  if constexpr (std::is_same_v<acc_t, float>) {
    if (sweep::map_supported(blk.type, p)) {
      const int64_t off = b * blk.C * blk.HW * static_cast<int64_t>(at::elementSize(blk.type));
      const void* x = static_cast<const char*>(blk.x) + off;
      if (blk.channels_last) sweep::map_nhwc(x, blk.type, p, blk.C, blk.HW, scale, out);
      else sweep::map_nchw(x, blk.type, p, blk.C, blk.HW, blk.HW, scale, out);
      return;
    }
  }
  with_type(blk.type, [&](auto tag) {
    using in_t = std::remove_pointer_t<decltype(tag)>;
    const in_t* x = static_cast<const in_t*>(blk.x) + b * blk.C * blk.HW;
    const acc_t pp = static_cast<acc_t>(p);
    const int k = pow_kind(p);
    if (blk.channels_last) {
      if (k == 2) map_nhwc<in_t, acc_t, 2>(x, blk.C, blk.HW, pp, scale, out);
      else if (k == 1) map_nhwc<in_t, acc_t, 1>(x, blk.C, blk.HW, pp, scale, out);
      else map_nhwc<in_t, acc_t, 0>(x, blk.C, blk.HW, pp, scale, out);
    } else {
      if (k == 2) map_nchw<in_t, acc_t, 2>(x, blk.C, blk.HW, pp, scale, out);
      else if (k == 1) map_nchw<in_t, acc_t, 1>(x, blk.C, blk.HW, pp, scale, out);
      else map_nchw<in_t, acc_t, 0>(x, blk.C, blk.HW, pp, scale, out);
    }
  });
}

// dx = (g[i] * scale) * d|x|^p/dx; scale holds the rest of the factors (1/C).
template <typename acc_t>
void attention_map_grad(const Block& blk, int64_t b, double p, const acc_t* g, acc_t scale) {
  if constexpr (std::is_same_v<acc_t, float>) {
    if (sweep::grad_supported(blk.type, p)) {
      const int64_t off = b * blk.C * blk.HW * static_cast<int64_t>(at::elementSize(blk.type));
      const void* x = static_cast<const char*>(blk.x) + off;
      void* dx = static_cast<char*>(blk.dx) + off;
      if (blk.channels_last) sweep::grad_nhwc(g, scale, x, dx, blk.type, blk.C, blk.HW, blk.stream);
      else sweep::grad_nchw(g, scale, x, dx, blk.type, blk.C, blk.HW, blk.HW, blk.stream);
      return;
    }
  }
  with_type(blk.type, [&](auto tag) {
    using in_t = std::remove_pointer_t<decltype(tag)>;
    const int64_t off = b * blk.C * blk.HW;
    const in_t* x = static_cast<const in_t*>(blk.x) + off;
    in_t* dx = static_cast<in_t*>(blk.dx) + off;
    const acc_t pp = static_cast<acc_t>(p);
    if (blk.channels_last) {
      if (p == 2.0) grad_nhwc<in_t, acc_t, 2>(g, scale, x, dx, blk.C, blk.HW, pp);
      else grad_nhwc<in_t, acc_t, 0>(g, scale, x, dx, blk.C, blk.HW, pp);
    } else {
      if (p == 2.0) grad_nchw<in_t, acc_t, 2>(g, scale, x, dx, blk.C, blk.HW, pp);
      else grad_nchw<in_t, acc_t, 0>(g, scale, x, dx, blk.C, blk.HW, pp);
    }
  });
}

}  // namespace sample
}  // namespace cpu
}  // namespace dctkd
