// CPU kernels of the multi-level DCT-KD loss (docs/DESIGN.md §3.3).
// Per level: (a) the streaming channel reduction of S and T (attention_map.cpp, reads each once);
// (b) per sample, phi on both maps, the distance, and by hand-written reverse mode dL/dA_S;
// backward: one elementwise pass dS = g[b] * dL/dA[b,h,w] * (p/C) |S|^(p-1) sign(S).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <string>
#include <vector>

#include "../dct_at_args.h"
#include "../dctkd_math.h"
#include "cpu_kernels.h"
#include "small_matmul.h"

namespace dctkd {
namespace cpu {
namespace {

template <typename T>
struct PhiConfig {
  Norm map_norm;
  bool center;
  Transform transform;
  bool coef_abs;
  Norm coef_norm;
  Distance distance;
  T eps;
};

// What a normalisation's backward needs from its forward.
template <typename T>
struct NormState {
  int64_t imin = 0, imax = 0;
  T denom = T(1), nrm = T(0);
};

template <typename T>
void norm_forward(const T* in, T* out, int64_t n, Norm kind, T eps, NormState<T>& st) {
  if (kind == Norm::None) {
    for (int64_t i = 0; i < n; ++i) out[i] = in[i];
    return;
  }
  if (kind == Norm::L2) {
    T ss = 0;
    for (int64_t i = 0; i < n; ++i) ss += in[i] * in[i];
    st.nrm = std::sqrt(ss);
    st.denom = st.nrm + eps;
    for (int64_t i = 0; i < n; ++i) out[i] = in[i] / st.denom;
    return;
  }
  // min / max: the first index of each wins ties, as torch.min(x, dim) / torch.max(x, dim) do.
  int64_t imin = 0, imax = 0;
  for (int64_t i = 1; i < n; ++i) {
    if (in[i] < in[imin]) imin = i;
    if (in[i] > in[imax]) imax = i;
  }
  st.imin = imin;
  st.imax = imax;
  const T lo = in[imin], hi = in[imax];
  st.denom = (kind == Norm::MinMax) ? (hi - lo + eps) : (hi + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = (in[i] - lo) / st.denom;
}

// g_in from g_out; `in` / `out` are the forward's input and output.
template <typename T>
void norm_backward(const T* g, const T* in, const T* out, T* g_in, int64_t n, Norm kind, const NormState<T>& st) {
  if (kind == Norm::None) {
    for (int64_t i = 0; i < n; ++i) g_in[i] = g[i];
    return;
  }
  T sum_g = 0, sum_gu = 0;
  for (int64_t i = 0; i < n; ++i) {
    sum_g += g[i];
    sum_gu += g[i] * out[i];
  }
  const T d = st.denom;
  for (int64_t i = 0; i < n; ++i) g_in[i] = g[i] / d;
  if (kind == Norm::L2) {
    // d||a||/da = a / ||a||, taken as 0 at a == 0 (as torch.linalg.norm's backward does).
    if (st.nrm > T(0)) {
      const T coef = -sum_gu / (d * st.nrm);
      for (int64_t i = 0; i < n; ++i) g_in[i] += coef * in[i];
    }
    return;
  }
  // u = (a - lo) / d: d u_j / d lo = (u_j - 1) / d for minmax (d = hi - lo + eps), -1 / d for max;
  // d u_j / d hi = -u_j / d for both.
  g_in[st.imin] += (kind == Norm::MinMax) ? (sum_gu - sum_g) / d : -sum_g / d;
  g_in[st.imax] += -sum_gu / d;
}

// c = transform(v) for an H x W map; the backward of fft_real is the same map (its bases are symmetric).
template <typename T>
void transform_apply(const T* v, T* c, T* tmp, T* tmp2, int64_t H, int64_t W, Transform tr, bool backward,
                     const Bases<T>& bh, const Bases<T>& bw) {
  if (tr == Transform::Identity) {
    for (int64_t i = 0; i < H * W; ++i) c[i] = v[i];
  } else if (tr == Transform::Dct) {
    // forward: D_H v D_W^T ; backward: D_H^T g D_W
    matmul(v, backward ? bw.d.data() : bw.dt.data(), tmp, H, W, W);
    matmul(backward ? bh.dt.data() : bh.d.data(), tmp, c, H, H, W);
  } else {
    // Re(FFT2(v)) = C_H v C_W - S_H v S_W
    matmul(v, bw.c.data(), tmp, H, W, W);
    matmul(bh.c.data(), tmp, c, H, H, W);
    matmul(v, bw.s.data(), tmp, H, W, W);
    matmul(bh.s.data(), tmp, tmp2, H, H, W);
    for (int64_t i = 0; i < H * W; ++i) c[i] -= tmp2[i];
  }
}

// Centring followed by a frequency transform: the DC coefficient is identically zero.
template <typename T>
bool centred_dc(const PhiConfig<T>& cfg) {
  return cfg.center && cfg.transform != Transform::Identity;
}

// Buffers and saved state of phi for one map.
template <typename T>
struct PhiTrace {
  std::vector<T> a, u, v, c, cabs, z;
  NormState<T> n1, n2;
  explicit PhiTrace(int64_t n) : a(n), u(n), v(n), c(n), cabs(n), z(n) {}
};

template <typename T>
void phi_forward(PhiTrace<T>& tr, T* tmp, T* tmp2, int64_t H, int64_t W, const PhiConfig<T>& cfg,
                 const Bases<T>& bh, const Bases<T>& bw) {
  const int64_t n = H * W;
  norm_forward(tr.a.data(), tr.u.data(), n, cfg.map_norm, cfg.eps, tr.n1);
  T mean = 0;
  if (cfg.center) {
    for (int64_t i = 0; i < n; ++i) mean += tr.u[i];
    mean /= T(n);
  }
  for (int64_t i = 0; i < n; ++i) tr.v[i] = tr.u[i] - mean;
  transform_apply(tr.v.data(), tr.c.data(), tmp, tmp2, H, W, cfg.transform, false, bh, bw);
  // A centred map has a DC coefficient of exactly 0 under both transforms; rounding would leave
  // noise there whose random sign then feeds min|C| and its gradient. Store the exact value.
  if (centred_dc(cfg)) tr.c[0] = T(0);
  for (int64_t i = 0; i < n; ++i) tr.cabs[i] = cfg.coef_abs ? std::abs(tr.c[i]) : tr.c[i];
  norm_forward(tr.cabs.data(), tr.z.data(), n, cfg.coef_norm, cfg.eps, tr.n2);
}

// g (length n, holding dL/dz) -> dL/da written to g_a. Uses tmp buffers; overwrites g.
template <typename T>
void phi_backward(const PhiTrace<T>& tr, T* g, T* g_a, T* tmp, T* tmp2, T* tmp3, int64_t H, int64_t W,
                  const PhiConfig<T>& cfg, const Bases<T>& bh, const Bases<T>& bw) {
  const int64_t n = H * W;
  norm_backward(g, tr.cabs.data(), tr.z.data(), tmp3, n, cfg.coef_norm, tr.n2);
  if (cfg.coef_abs)  // d|c|/dc = sign(c), 0 at 0 (as torch.abs)
    for (int64_t i = 0; i < n; ++i) tmp3[i] = tr.c[i] > T(0) ? tmp3[i] : (tr.c[i] < T(0) ? -tmp3[i] : T(0));
  if (centred_dc(cfg)) {
    // Centring's backward (subtract the mean) equals dropping the DC coefficient's gradient before
    // the transform's backward (the DC basis is the constant map): exact, with no cancellation.
    tmp3[0] = T(0);
  }
  transform_apply(tmp3, g, tmp, tmp2, H, W, cfg.transform, true, bh, bw);
  if (cfg.center && !centred_dc(cfg)) {
    T mean = 0;
    for (int64_t i = 0; i < n; ++i) mean += g[i];
    mean /= T(n);
    for (int64_t i = 0; i < n; ++i) g[i] -= mean;
  }
  norm_backward(g, tr.a.data(), tr.u.data(), g_a, n, cfg.map_norm, tr.n1);
}

// One level: maps (B, H, W) of S and T in acc type -> dist[b] and gmap[b] = w * d dist_b / d A_S[b].
template <typename T>
void level_loss(const T* as, const T* at, T* dist, T* gmap, int64_t B, int64_t H, int64_t W, T weight,
                const PhiConfig<T>& cfg) {
  const int64_t n = H * W;
  const bool dct = cfg.transform == Transform::Dct, dft = cfg.transform == Transform::FftReal;
  const Bases<T> bh(H, dct, dft), bw(W, dct, dft);
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    PhiTrace<T> ts(n), tt(n);
    std::vector<T> tmp(n), tmp2(n), tmp3(n), g(n);
    for (int64_t b = begin; b < end; ++b) {
      std::copy(as + b * n, as + (b + 1) * n, ts.a.begin());
      std::copy(at + b * n, at + (b + 1) * n, tt.a.begin());
      phi_forward(ts, tmp.data(), tmp2.data(), H, W, cfg, bh, bw);
      phi_forward(tt, tmp.data(), tmp2.data(), H, W, cfg, bh, bw);
      T ss = 0;
      for (int64_t i = 0; i < n; ++i) {
        g[i] = ts.z[i] - tt.z[i];
        ss += g[i] * g[i];
      }
      // d dist / d z_S, scaled by the level weight. l2 at exactly zero distance: gradient 0.
      T d, gscale;
      if (cfg.distance == Distance::L2) {
        d = std::sqrt(ss);
        gscale = d > T(0) ? weight / d : T(0);
      } else if (cfg.distance == Distance::Mse) {
        d = ss / T(n);
        gscale = weight * T(2) / T(n);
      } else {
        d = ss;
        gscale = weight * T(2);
      }
      dist[b] = d;
      for (int64_t i = 0; i < n; ++i) g[i] *= gscale;
      phi_backward(ts, g.data(), gmap + b * n, tmp.data(), tmp2.data(), tmp3.data(), H, W, cfg, bh, bw);
    }
  });
}

std::tuple<at::Tensor, std::vector<at::Tensor>> dct_at_loss_cpu(
    at::TensorList student, at::TensorList teacher, at::ArrayRef<double> weights, double p, std::string map_norm,
    bool center, std::string transform, bool coef_abs, std::string coef_norm, std::string distance, double eps) {
  check_levels(student, teacher, weights);
  const LossOptions o = parse_loss_options(p, map_norm, transform, coef_norm, distance, eps);

  bool any_double = false;
  for (size_t l = 0; l < student.size(); ++l)
    any_double = any_double || student[l].scalar_type() == at::kDouble || teacher[l].scalar_type() == at::kDouble;
  const at::ScalarType acc = any_double ? at::kDouble : at::kFloat;
  const int64_t B = student[0].size(0);
  at::Tensor loss = at::zeros({B}, student[0].options().dtype(acc));
  std::vector<at::Tensor> grad_maps;
  grad_maps.reserve(student.size());
  for (size_t l = 0; l < student.size(); ++l) {
    const int64_t H = student[l].size(2), W = student[l].size(3);
    const at::Tensor as = attention_map_into(student[l], p, true, acc);
    const at::Tensor at_ = attention_map_into(teacher[l], p, true, acc);
    at::Tensor gmap = at::empty({B, H, W}, as.options());
    at::Tensor level_dist = at::empty({B}, as.options());
    if (B > 0 && H * W > 0) {
      AT_DISPATCH_FLOATING_TYPES(acc, "dct_at_loss_cpu", [&] {
        const PhiConfig<scalar_t> cfg{o.map_norm, center, o.transform, coef_abs, o.coef_norm, o.distance,
                                         static_cast<scalar_t>(eps)};
        level_loss<scalar_t>(as.const_data_ptr<scalar_t>(), at_.const_data_ptr<scalar_t>(),
                             level_dist.mutable_data_ptr<scalar_t>(), gmap.mutable_data_ptr<scalar_t>(), B, H, W,
                             static_cast<scalar_t>(weights[l]), cfg);
      });
    } else {
      level_dist.zero_();
      gmap.zero_();
    }
    loss.add_(level_dist, weights[l]);
    grad_maps.push_back(gmap);
  }
  return {loss, grad_maps};
}

std::vector<at::Tensor> dct_at_loss_backward_cpu(const at::Tensor& grad_loss, at::TensorList grad_maps,
                                                 at::TensorList student, double p) {
  TORCH_CHECK(grad_maps.size() == student.size(), "grad_maps: expected ", student.size(), " levels, got ",
              grad_maps.size());
  TORCH_CHECK(grad_loss.dim() == 1, "grad_loss: expected a 1-D (B,) tensor, got ", grad_loss.dim(), "-D");
  std::vector<at::Tensor> grads;
  grads.reserve(student.size());
  for (size_t l = 0; l < student.size(); ++l) {
    const int64_t B = student[l].size(0);
    TORCH_CHECK(grad_loss.size(0) == B, "grad_loss: expected ", B, " values, got ", grad_loss.size(0));
    // Fold the per-sample upstream gradient into the (small) map gradient, then one pass over S.
    const at::Tensor g = grad_maps[l] * grad_loss.to(grad_maps[l].scalar_type()).view({B, 1, 1});
    grads.push_back(attention_map_backward_impl(g, student[l], p, true));
  }
  return grads;
}

}  // namespace
}  // namespace cpu
}  // namespace dctkd

TORCH_LIBRARY_IMPL(dctkd_ext, CPU, m) {
  m.impl("dct_at_loss", &dctkd::cpu::dct_at_loss_cpu);
  m.impl("dct_at_loss_backward", &dctkd::cpu::dct_at_loss_backward_cpu);
}
