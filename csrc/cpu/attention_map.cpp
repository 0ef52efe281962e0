// CPU kernels of attention_map (docs/DESIGN.md §3.1): a streaming channel reduction and its elementwise
// backward, for NCHW-contiguous and channels_last inputs, fp16/bf16/fp32/fp64.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../dctkd_math.h"
#include "../layout.h"
#include "channel_sweep.h"
#include "cpu_kernels.h"
#include "grad_buffers.h"

namespace dctkd {
namespace cpu {
namespace {

constexpr int64_t kTile = 512;  // spatial positions per NCHW work item: the fp32 tile lives in L1

// Both reductions read x exactly once. NCHW: a tile of positions accumulates over c with
// contiguous, vectorisable inner loops. NHWC: each position reduces its contiguous channel vector
// with 8 independent partial sums (vectorisable without reassociation flags).
template <typename scalar_t, typename acc_t, int kPow>
void reduce_nchw(const scalar_t* x, acc_t* out, int64_t B, int64_t C, int64_t HW, acc_t p, acc_t scale) {
  const int64_t tiles = (HW + kTile - 1) / kTile;
  at::parallel_for(0, B * tiles, 1, [&](int64_t begin, int64_t end) {
    acc_t acc[kTile];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / tiles, t0 = (item % tiles) * kTile;
      const int64_t n = std::min(kTile, HW - t0);
      std::fill(acc, acc + n, acc_t(0));
      const scalar_t* xb = x + b * C * HW + t0;
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t* xc = xb + c * HW;
        for (int64_t i = 0; i < n; ++i) {
          const acc_t v = static_cast<acc_t>(xc[i]);
          if constexpr (kPow == 2) acc[i] += v * v;
          else if constexpr (kPow == 1) acc[i] += std::abs(v);
          else acc[i] += abs_pow<acc_t>(v, p);
        }
      }
      acc_t* o = out + b * HW + t0;
      for (int64_t i = 0; i < n; ++i) o[i] = acc[i] * scale;
    }
  });
}

template <typename scalar_t, typename acc_t, int kPow>
void reduce_nhwc(const scalar_t* x, acc_t* out, int64_t B, int64_t C, int64_t HW, acc_t p, acc_t scale) {
  at::parallel_for(0, B * HW, std::max<int64_t>(1, 4096 / std::max<int64_t>(C, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t pos = begin; pos < end; ++pos) {
      const scalar_t* xp = x + pos * C;
      acc_t part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      int64_t c = 0;
      for (; c + 8 <= C; c += 8) {
        for (int j = 0; j < 8; ++j) {
          const acc_t v = static_cast<acc_t>(xp[c + j]);
          if constexpr (kPow == 2) part[j] += v * v;
          else if constexpr (kPow == 1) part[j] += std::abs(v);
          else part[j] += abs_pow<acc_t>(v, p);
        }
      }
      for (; c < C; ++c) part[0] += abs_pow<acc_t>(static_cast<acc_t>(xp[c]), p);
      out[pos] = ((part[0] + part[1]) + (part[2] + part[3]) + ((part[4] + part[5]) + (part[6] + part[7]))) * scale;
    }
  });
}

template <typename scalar_t, typename acc_t, int kPow>
void backward_nchw(const acc_t* g, const scalar_t* x, scalar_t* dx, int64_t B, int64_t C, int64_t HW, acc_t p,
                   acc_t scale) {
  at::parallel_for(0, B * C, std::max<int64_t>(1, 16384 / std::max<int64_t>(HW, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t bc = begin; bc < end; ++bc) {
      const acc_t* gb = g + (bc / C) * HW;
      const scalar_t* xc = x + bc * HW;
      scalar_t* dc = dx + bc * HW;
      for (int64_t i = 0; i < HW; ++i) {
        const acc_t v = static_cast<acc_t>(xc[i]);
        acc_t d;
        if constexpr (kPow == 2) d = acc_t(2) * v;
        else d = abs_pow_grad<acc_t>(v, p);
        dc[i] = static_cast<scalar_t>(gb[i] * scale * d);
      }
    }
  });
}

template <typename scalar_t, typename acc_t, int kPow>
void backward_nhwc(const acc_t* g, const scalar_t* x, scalar_t* dx, int64_t B, int64_t C, int64_t HW, acc_t p,
                   acc_t scale) {
  at::parallel_for(0, B * HW, std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t pos = begin; pos < end; ++pos) {
      const acc_t gs = g[pos] * scale;
      const scalar_t* xp = x + pos * C;
      scalar_t* dp = dx + pos * C;
      for (int64_t c = 0; c < C; ++c) {
        const acc_t v = static_cast<acc_t>(xp[c]);
        acc_t d;
        if constexpr (kPow == 2) d = acc_t(2) * v;
        else d = abs_pow_grad<acc_t>(v, p);
        dp[c] = static_cast<scalar_t>(gs * d);
      }
    }
  });
}

// fp32 accumulation of float32/bfloat16/float16 (channel_sweep.h). NCHW: one work item per sample
// and tile of up to 4096 positions, so each channel is one long sequential run.
void reduce_vec(const void* x, at::ScalarType t, bool cl, float* out, int64_t B, int64_t C, int64_t HW, double p,
                float scale) {
  const int64_t esize = static_cast<int64_t>(at::elementSize(t));
  const char* xb = static_cast<const char*>(x);
  if (cl) {
    at::parallel_for(0, B * HW, std::max<int64_t>(1, 4096 / std::max<int64_t>(C, 1)), [&](int64_t begin, int64_t end) {
      sweep::map_nhwc(xb + begin * C * esize, t, p, C, end - begin, scale, out + begin);
    });
    return;
  }
  constexpr int64_t kVecTile = 4096;
  const int64_t tiles = (HW + kVecTile - 1) / kVecTile;
  at::parallel_for(0, B * tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / tiles, t0 = (item % tiles) * kVecTile;
      sweep::map_nchw(xb + (b * C * HW + t0) * esize, t, p, C, HW, std::min(kVecTile, HW - t0), scale,
                      out + b * HW + t0);
    }
  });
}

// p = 2: dx = (g * scale) * 2x, the same products as the single pass of dct_at_loss.
void backward_vec(const float* g, const void* x, void* dx, at::ScalarType t, bool cl, int64_t B, int64_t C, int64_t HW,
                  float scale) {
  const int64_t esize = static_cast<int64_t>(at::elementSize(t));
  const char* xb = static_cast<const char*>(x);
  char* db = static_cast<char*>(dx);
  const bool stream = B * C * HW * esize > sweep::kStreamBytes;
  if (cl) {
    at::parallel_for(0, B * HW, std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)), [&](int64_t begin, int64_t end) {
      sweep::grad_nhwc(g + begin, scale, xb + begin * C * esize, db + begin * C * esize, t, C, end - begin, stream);
    });
    return;
  }
  at::parallel_for(0, B * C, std::max<int64_t>(1, 16384 / std::max<int64_t>(HW, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t bc = begin; bc < end;) {
      const int64_t b = bc / C, rows = std::min(end - bc, C - bc % C);
      sweep::grad_nchw(g + b * HW, scale, xb + bc * HW * esize, db + bc * HW * esize, t, rows, HW, HW, stream);
      bc += rows;
    }
  });
}

void check_features(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 4, name, ": expected a 4-D (B, C, H, W) tensor, got ", x.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), name, ": expected a float16/bfloat16/float32/float64 tensor, got ",
              x.scalar_type());
  TORCH_CHECK(x.size(1) > 0, name, ": expected at least one channel");
}

}  // namespace

at::ScalarType acc_dtype_for(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor attention_map_into(const at::Tensor& x_in, double p, bool mean, at::ScalarType acc_type) {
  check_features(x_in, "x");
  const bool cl = reads_channels_last(x_in);
  const at::Tensor x = cl ? x_in : x_in.contiguous();
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), HW = H * W;
  at::Tensor out = at::empty({B, H, W}, x.options().dtype(acc_type));
  if (out.numel() == 0) return out;
  // acc_t is float unless acc_type is double (fp64 inputs, or a caller that asks for it).
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "attention_map_cpu", [&] {
    using in_t = scalar_t;
    auto run = [&](auto acc_tag) {
      using acc_t = decltype(acc_tag);
      const acc_t scale = mean ? acc_t(1) / acc_t(C) : acc_t(1);
      const acc_t pp = static_cast<acc_t>(p);
      const in_t* xp = x.const_data_ptr<in_t>();
      acc_t* op = out.mutable_data_ptr<acc_t>();
      if constexpr (std::is_same_v<acc_t, float>) {
        if (sweep::map_supported(x.scalar_type(), p)) {
          reduce_vec(xp, x.scalar_type(), cl, op, B, C, HW, p, scale);
          return;
        }
      }
      if (cl) {
        if (p == 2.0) reduce_nhwc<in_t, acc_t, 2>(xp, op, B, C, HW, pp, scale);
        else if (p == 1.0) reduce_nhwc<in_t, acc_t, 1>(xp, op, B, C, HW, pp, scale);
        else reduce_nhwc<in_t, acc_t, 0>(xp, op, B, C, HW, pp, scale);
      } else {
        if (p == 2.0) reduce_nchw<in_t, acc_t, 2>(xp, op, B, C, HW, pp, scale);
        else if (p == 1.0) reduce_nchw<in_t, acc_t, 1>(xp, op, B, C, HW, pp, scale);
        else reduce_nchw<in_t, acc_t, 0>(xp, op, B, C, HW, pp, scale);
      }
    };
    if (acc_type == at::kDouble) run(double(0));
    else run(float(0));
  });
  return out;
}

at::Tensor attention_map_backward_impl(const at::Tensor& grad_in, const at::Tensor& x_in, double p, bool mean) {
  check_features(x_in, "x");
  const int64_t B = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3), HW = H * W;
  TORCH_CHECK(grad_in.dim() == 3 && grad_in.size(0) == B && grad_in.size(1) == H && grad_in.size(2) == W,
              "grad: expected shape (", B, ", ", H, ", ", W, ") to match x, got ", grad_in.sizes());
  const bool cl = reads_channels_last(x_in);
  const at::Tensor x = cl ? x_in : x_in.contiguous();
  const at::ScalarType acc_type = acc_dtype_for(x.scalar_type());
  const at::Tensor g = grad_in.to(acc_type).contiguous();
  at::Tensor dx = cached_empty_like(x);  // keeps x's memory format
  if (dx.numel() == 0) return dx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "attention_map_backward_cpu", [&] {
    using in_t = scalar_t;
    auto run = [&](auto acc_tag) {
      using acc_t = decltype(acc_tag);
      const acc_t scale = mean ? acc_t(1) / acc_t(C) : acc_t(1);
      const acc_t pp = static_cast<acc_t>(p);
      const acc_t* gp = g.const_data_ptr<acc_t>();
      const in_t* xp = x.const_data_ptr<in_t>();
      in_t* dp = dx.mutable_data_ptr<in_t>();
      if constexpr (std::is_same_v<acc_t, float>) {
        if (sweep::grad_supported(x.scalar_type(), p)) {
          backward_vec(gp, xp, dp, x.scalar_type(), cl, B, C, HW, scale);
          return;
        }
      }
      if (cl) {
        if (p == 2.0) backward_nhwc<in_t, acc_t, 2>(gp, xp, dp, B, C, HW, pp, scale);
        else backward_nhwc<in_t, acc_t, 0>(gp, xp, dp, B, C, HW, pp, scale);
      } else {
        if (p == 2.0) backward_nchw<in_t, acc_t, 2>(gp, xp, dp, B, C, HW, pp, scale);
        else backward_nchw<in_t, acc_t, 0>(gp, xp, dp, B, C, HW, pp, scale);
      }
    };
    if (acc_type == at::kDouble) run(double(0));
    else run(float(0));
  });
  return dx;
}

namespace {

bool parse_reduce_arg(const std::string& reduce) {
  Reduce r;
  TORCH_CHECK(parse_reduce(reduce, &r), "reduce: expected \"mean\" or \"sum\", got \"", reduce, "\"");
  return r == Reduce::Mean;
}

at::Tensor attention_map_cpu(const at::Tensor& x, double p, std::string reduce) {
  TORCH_CHECK(p > 0, "p: expected a positive exponent, got ", p);
  return attention_map_into(x, p, parse_reduce_arg(reduce), acc_dtype_for(x.scalar_type()));
}

at::Tensor attention_map_backward_cpu(const at::Tensor& grad, const at::Tensor& x, double p, std::string reduce) {
  TORCH_CHECK(p > 0, "p: expected a positive exponent, got ", p);
  return attention_map_backward_impl(grad, x, p, parse_reduce_arg(reduce));
}

}  // namespace
}  // namespace cpu
}  // namespace dctkd

TORCH_LIBRARY_IMPL(dctkd_ext, CPU, m) {
  m.impl("attention_map", &dctkd::cpu::attention_map_cpu);
  m.impl("attention_map_backward", &dctkd::cpu::attention_map_backward_cpu);
}
