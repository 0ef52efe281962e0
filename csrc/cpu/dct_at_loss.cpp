// CPU kernels of the multi-level DCT-KD loss (docs/DESIGN.md §3.3), one pass over the features: per
// (sample, level) the channel sweeps of T[b] and S[b], phi on both maps, the distance, dL/dA_S by
// hand-written reverse mode and (dct_at_loss_fused, when asked) the student's gradient dS[b] while
// S[b] is still in cache. Backward of the two-pass form: one elementwise pass
// dS = g[b] * dL/dA[b,h,w] * (p/C) |S|^(p-1) sign(S).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "../dct_at_args.h"
#include "../dctkd_math.h"
#include "../layout.h"
#include "attention_map_sample.h"
#include "cpu_kernels.h"
#include "grad_buffers.h"
#include "map_transforms.h"
#include "simd.h"

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

// Sums over a map in 16 interleaved partial sums, added up in a fixed order at the end: a single
// running sum is a chain of dependent adds (the compiler may not reorder float adds), about four
// cycles an element; this runs at the vector width. Deterministic for a given n.
template <typename T>
DCTKD_INLINE T sum_prod(const T* a, const T* b, int64_t n) {
  constexpr int P = 16;
  T part[P] = {};
  int64_t i = 0;
  for (; i + P <= n; i += P)
    for (int j = 0; j < P; ++j) part[j] += b ? a[i + j] * b[i + j] : a[i + j];
  T total = 0;
  for (; i < n; ++i) total += b ? a[i] * b[i] : a[i];
  for (int j = 0; j < P; ++j) total += part[j];
  return total;
}
template <typename T>
DCTKD_INLINE T sum_of(const T* a, int64_t n) {
  return sum_prod<T>(a, nullptr, n);
}

// The first i with in[i] == v (v occurs in in[0, n)), L values compared at a time.
template <typename T>
DCTKD_INLINE int64_t first_equal(const T* in, int64_t n, T v) {
  constexpr int L = 16 / sizeof(T);
  typedef T V __attribute__((vector_size(16)));
  V vv;
  for (int j = 0; j < L; ++j) vv[j] = v;
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    V x;
    std::memcpy(&x, in + i, sizeof(V));
    const auto eq = x == vv;
    bool any = false;
    for (int j = 0; j < L; ++j) any = any || eq[j] != 0;
    if (any) break;
  }
  while (!(in[i] == v)) ++i;
  return i;
}

// The first index of the minimum and of the maximum of in[0, n), n >= 1: the first index of each
// wins ties, as torch.min(x, dim) / torch.max(x, dim) do, and a NaN never wins unless it is in[0]
// (the strict comparisons of a scan from in[0]). The values come from a vector reduction, then a
// scan finds their first occurrence: no index-dependent loads in the reduction.
template <typename T>
DCTKD_INLINE void first_min_max(const T* in, int64_t n, int64_t& imin, int64_t& imax) {
  imin = imax = 0;
  T lo = in[0], hi = in[0];
  if (lo != lo) return;
  // 16-byte vectors (native on every x86-64), four of each in flight.
  constexpr int L = 16 / sizeof(T), U = 4;
  typedef T V __attribute__((vector_size(16)));
  int64_t i = 0;
  if (n >= U * L) {
    V vlo[U], vhi[U];
    for (int u = 0; u < U; ++u)
      for (int j = 0; j < L; ++j) vlo[u][j] = vhi[u][j] = lo;
    for (; i + U * L <= n; i += U * L)
      for (int u = 0; u < U; ++u) {
        V x;
        std::memcpy(&x, in + i + u * L, sizeof(V));
        vlo[u] = x < vlo[u] ? x : vlo[u];
        vhi[u] = x > vhi[u] ? x : vhi[u];
      }
    for (int u = 0; u < U; ++u)
      for (int j = 0; j < L; ++j) {
        lo = vlo[u][j] < lo ? vlo[u][j] : lo;
        hi = vhi[u][j] > hi ? vhi[u][j] : hi;
      }
  }
  for (; i < n; ++i) {
    lo = in[i] < lo ? in[i] : lo;
    hi = in[i] > hi ? in[i] : hi;
  }
  imin = first_equal(in, n, lo);
  imax = first_equal(in, n, hi);
}

template <typename T>
DCTKD_INLINE void norm_forward(const T* in, T* out, int64_t n, Norm kind, T eps, NormState<T>& st) {
  if (kind == Norm::None) {
    for (int64_t i = 0; i < n; ++i) out[i] = in[i];
    return;
  }
  if (kind == Norm::L2) {
    const T ss = sum_prod(in, in, n);
    st.nrm = std::sqrt(ss);
    st.denom = st.nrm + eps;
    for (int64_t i = 0; i < n; ++i) out[i] = in[i] / st.denom;
    return;
  }
  first_min_max(in, n, st.imin, st.imax);
  const T lo = in[st.imin], hi = in[st.imax];
  st.denom = (kind == Norm::MinMax) ? (hi - lo + eps) : (hi + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = (in[i] - lo) / st.denom;
}

// g_in from g_out; `in` / `out` are the forward's input and output.
template <typename T>
DCTKD_INLINE void norm_backward(const T* g, const T* in, const T* out, T* g_in, int64_t n, Norm kind,
                                const NormState<T>& st) {
  if (kind == Norm::None) {
    for (int64_t i = 0; i < n; ++i) g_in[i] = g[i];
    return;
  }
  const T sum_g = sum_of(g, n), sum_gu = sum_prod(g, out, n);
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

// The transform tables of one map size (map_transforms.h); only the kind in use is set.
template <typename T>
struct MapTables {
  const DctHalves<T>* dct_h = nullptr;
  const DctHalves<T>* dct_w = nullptr;
  const DftHalves<T>* dft_h = nullptr;
  const DftHalves<T>* dft_w = nullptr;
};

// c = transform(v) for an H x W map; the backward of fft_real is the same map (its bases are symmetric).
template <typename T>
DCTKD_INLINE void transform_apply(const T* v, T* c, int64_t H, int64_t W, Transform tr, bool backward,
                                  const MapTables<T>& tb, MapScratch<T>& scratch) {
  if (tr == Transform::Identity) {
    for (int64_t i = 0; i < H * W; ++i) c[i] = v[i];
  } else if (tr == Transform::Dct) {
    // forward: D_H v D_W^T ; backward: D_H^T g D_W
    dct2_map(v, c, *tb.dct_h, *tb.dct_w, backward, scratch);
  } else {
    real_dft2_map(v, c, *tb.dft_h, *tb.dft_w, scratch);
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
DCTKD_INLINE void phi_forward(PhiTrace<T>& tr, int64_t H, int64_t W, const PhiConfig<T>& cfg, const MapTables<T>& tb,
                              MapScratch<T>& scratch) {
  const int64_t n = H * W;
  norm_forward(tr.a.data(), tr.u.data(), n, cfg.map_norm, cfg.eps, tr.n1);
  T mean = 0;
  if (cfg.center) { mean = sum_of(tr.u.data(), n) / T(n); }
  for (int64_t i = 0; i < n; ++i) tr.v[i] = tr.u[i] - mean;
  transform_apply(tr.v.data(), tr.c.data(), H, W, cfg.transform, false, tb, scratch);
  // A centred map has a DC coefficient of exactly 0 under both transforms; rounding would leave
  // noise there whose random sign then feeds min|C| and its gradient. Store the exact value.
  if (centred_dc(cfg)) tr.c[0] = T(0);
  for (int64_t i = 0; i < n; ++i) tr.cabs[i] = cfg.coef_abs ? std::abs(tr.c[i]) : tr.c[i];
  norm_forward(tr.cabs.data(), tr.z.data(), n, cfg.coef_norm, cfg.eps, tr.n2);
}

// g (length n, holding dL/dz) -> dL/da written to g_a. Uses tmp3 (length n); overwrites g.
template <typename T>
DCTKD_INLINE void phi_backward(const PhiTrace<T>& tr, T* g, T* g_a, T* tmp3, int64_t H, int64_t W,
                               const PhiConfig<T>& cfg, const MapTables<T>& tb, MapScratch<T>& scratch) {
  const int64_t n = H * W;
  norm_backward(g, tr.cabs.data(), tr.z.data(), tmp3, n, cfg.coef_norm, tr.n2);
  if (cfg.coef_abs)  // d|c|/dc = sign(c), 0 at 0 (as torch.abs)
    for (int64_t i = 0; i < n; ++i) tmp3[i] = tr.c[i] > T(0) ? tmp3[i] : (tr.c[i] < T(0) ? -tmp3[i] : T(0));
  if (centred_dc(cfg)) {
    // Centring's backward (subtract the mean) equals dropping the DC coefficient's gradient before
    // the transform's backward (the DC basis is the constant map): exact, with no cancellation.
    tmp3[0] = T(0);
  }
  transform_apply(tmp3, g, H, W, cfg.transform, true, tb, scratch);
  if (cfg.center && !centred_dc(cfg)) {
    const T mean = sum_of(g, n) / T(n);
    for (int64_t i = 0; i < n; ++i) g[i] -= mean;
  }
  norm_backward(g, tr.a.data(), tr.u.data(), g_a, n, cfg.map_norm, tr.n1);
}

// One level as the single pass reads it: S and T in the layout the kernel reads (NCHW-contiguous or
// channels_last; anything else copied to NCHW first), the level's outputs, its bases.
template <typename T>
struct LevelPlan {
  at::Tensor s, t, gmap, ds;
  sample::Block sb, tb;
  int64_t H = 0, W = 0;
  T weight = T(1);
  MapTables<T> tables;
};

inline sample::Block block_of(const at::Tensor& x) {
  sample::Block blk;
  blk.x = x.const_data_ptr();
  blk.type = x.scalar_type();
  blk.channels_last = reads_channels_last(x);
  blk.C = x.size(1);
  blk.HW = x.size(2) * x.size(3);
  return blk;
}

// The work of one (sample, level) between its channel sweeps: phi of both maps, the distance
// (returned) and dL/dA_S written to gm. Its loops are short and run in L1, so it is cloned for the
// vector widths of x86-64-v4 / v3 / the baseline like the sweeps.
template <typename T>
DCTKD_TARGET_CLONES T phi_item(PhiTrace<T>& ts, PhiTrace<T>& tt, T* g, T* tmp3, T* gm, int64_t H, int64_t W, T weight,
                               const PhiConfig<T>& cfg, const MapTables<T>& tb, MapScratch<T>& scratch) {
  const int64_t n = H * W;
  phi_forward(ts, H, W, cfg, tb, scratch);
  phi_forward(tt, H, W, cfg, tb, scratch);
  for (int64_t i = 0; i < n; ++i) g[i] = ts.z[i] - tt.z[i];
  const T ss = sum_prod(g, g, n);
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
  for (int64_t i = 0; i < n; ++i) g[i] *= gscale;
  phi_backward(ts, g, gm, tmp3, H, W, cfg, tb, scratch);
  return d;
}

// The single pass: one work item per (sample, level), samples outermost so both threads get every
// level. Per item: the channel sweeps of T[b] then S[b] (S last, so it is still in L2 when its
// gradient is written), phi of both maps, the distance (into row dist_row[l] of dist), dL/dA_S by
// hand-written reverse mode, and, when grad_scale is given,
// dS[b] = grad_scale[b] * dL/dA_S[b] * (p/C) |S[b]|^(p-1) sign(S[b]).
template <typename T>
void loss_single_pass(std::vector<LevelPlan<T>>& levels, const std::vector<int64_t>& dist_row, T* dist,
                      const T* grad_scale, int64_t B, double p, const PhiConfig<T>& cfg) {
  const int64_t L = static_cast<int64_t>(levels.size());
  int64_t maxn = 1, max_side = 1;
  for (const auto& lv : levels) {
    maxn = std::max(maxn, lv.H * lv.W);
    max_side = std::max({max_side, lv.H, lv.W});
  }
  at::parallel_for(0, B * L, 1, [&](int64_t begin, int64_t end) {
    PhiTrace<T> ts(maxn), tt(maxn);
    std::vector<T> tmp(maxn), tmp3(maxn), g(maxn);
    MapScratch<T> scratch(max_side);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / L, l = item % L;
      LevelPlan<T>& lv = levels[l];
      const int64_t H = lv.H, W = lv.W, n = H * W;
      sample::attention_map<T>(lv.tb, b, p, T(1) / T(lv.tb.C), tt.a.data());
      sample::attention_map<T>(lv.sb, b, p, T(1) / T(lv.sb.C), ts.a.data());
      T* gm = lv.gmap.template mutable_data_ptr<T>() + b * n;
      dist[dist_row[l] * B + b] = phi_item(ts, tt, g.data(), tmp3.data(), gm, H, W, lv.weight, cfg, lv.tables, scratch);
      if (grad_scale != nullptr) {
        // The same products in the same order as dct_at_loss_backward: (dL/dA * g_b) * (1/C), then * d|S|^p/dS.
        const T k = grad_scale[b], inv_c = T(1) / T(lv.sb.C);
        for (int64_t i = 0; i < n; ++i) tmp[i] = gm[i] * k;
        sample::attention_map_grad<T>(lv.sb, b, p, tmp.data(), inv_c);
      }
    }
  });
}

using LossResult = std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>;

LossResult loss_impl(at::TensorList student, at::TensorList teacher, at::ArrayRef<double> weights, double p,
                     const std::string& map_norm, bool center, const std::string& transform, bool coef_abs,
                     const std::string& coef_norm, const std::string& distance, double eps,
                     const std::optional<at::Tensor>& grad_scale_in) {
  check_levels(student, teacher, weights);
  const LossOptions o = parse_loss_options(p, map_norm, transform, coef_norm, distance, eps);
  bool any_double = false;
  for (size_t l = 0; l < student.size(); ++l)
    any_double = any_double || student[l].scalar_type() == at::kDouble || teacher[l].scalar_type() == at::kDouble;
  const at::ScalarType acc = any_double ? at::kDouble : at::kFloat;
  const int64_t B = student[0].size(0);
  const int64_t L = static_cast<int64_t>(student.size());
  const bool want_grad = grad_scale_in.has_value();
  at::Tensor grad_scale;
  if (want_grad) {
    const at::Tensor& gs = *grad_scale_in;
    TORCH_CHECK(gs.dim() == 1 && gs.size(0) == B, "grad_scale: expected a 1-D (", B, ",) tensor, got shape ",
                gs.sizes());
    TORCH_CHECK(at::isFloatingType(gs.scalar_type()), "grad_scale: expected a floating tensor, got ", gs.scalar_type());
    TORCH_CHECK(gs.device() == student[0].device(), "grad_scale: expected a tensor on ", student[0].device(),
                ", got one on ", gs.device());
    grad_scale = gs.to(acc).contiguous();
  }

  at::Tensor loss = at::zeros({B}, student[0].options().dtype(acc));
  at::Tensor dist = at::zeros({L, B}, student[0].options().dtype(acc));
  std::vector<at::Tensor> grad_maps, d_student;
  AT_DISPATCH_FLOATING_TYPES(acc, "dct_at_loss_cpu", [&] {
    using T = scalar_t;
    const bool dct = o.transform == Transform::Dct, dft = o.transform == Transform::FftReal;
    std::vector<LevelPlan<T>> levels(L);
    bool any_work = false;
    for (int64_t l = 0; l < L; ++l) {
      LevelPlan<T>& lv = levels[l];
      lv.s = reads_channels_last(student[l]) ? student[l] : student[l].contiguous();
      lv.t = reads_channels_last(teacher[l]) ? teacher[l] : teacher[l].contiguous();
      lv.H = lv.s.size(2);
      lv.W = lv.s.size(3);
      lv.weight = static_cast<T>(weights[l]);
      lv.gmap = at::empty({B, lv.H, lv.W}, loss.options());  // every (sample, level) item writes its map
      lv.sb = block_of(lv.s);
      lv.tb = block_of(lv.t);
      if (want_grad) {
        lv.ds = cached_empty_like(lv.s);  // keeps the layout the kernel reads
        lv.sb.dx = lv.ds.mutable_data_ptr();
      }
      if (lv.H * lv.W == 0) {
        // an empty map: no transform runs
      } else if (dct) {
        lv.tables.dct_h = &dct_halves<T>(lv.H);
        lv.tables.dct_w = &dct_halves<T>(lv.W);
      } else if (dft) {
        lv.tables.dft_h = &dft_halves<T>(lv.H);
        lv.tables.dft_w = &dft_halves<T>(lv.W);
      }
      any_work = any_work || lv.H * lv.W > 0;
    }
    if (want_grad) {
      // The student's gradient goes past the caches when all of it is much larger than they are.
      int64_t ds_bytes = 0;
      for (const auto& lv : levels) ds_bytes += lv.ds.nbytes();
      for (auto& lv : levels) lv.sb.stream = ds_bytes > sweep::kStreamBytes;
    }
    if (B > 0 && any_work) {
      // A level with an empty map contributes 0 and gets a zero gradient; the rest go through the pass.
      std::vector<LevelPlan<T>> work;
      std::vector<int64_t> index;
      for (int64_t l = 0; l < L; ++l) {
        if (levels[l].H * levels[l].W > 0) {
          work.push_back(levels[l]);
          index.push_back(l);
        } else if (want_grad) {
          levels[l].ds.zero_();
        }
      }
      const PhiConfig<T> cfg{o.map_norm, center, o.transform, coef_abs, o.coef_norm, o.distance, static_cast<T>(eps)};
      loss_single_pass<T>(work, index, dist.mutable_data_ptr<T>(), want_grad ? grad_scale.const_data_ptr<T>() : nullptr,
                          B, p, cfg);
    } else if (want_grad) {
      for (auto& lv : levels) lv.ds.zero_();
    }
    for (int64_t l = 0; l < L; ++l) {
      grad_maps.push_back(levels[l].gmap);
      if (want_grad) d_student.push_back(levels[l].ds);
    }
  });
  for (int64_t l = 0; l < L; ++l) loss.add_(dist[l], weights[l]);
  return {loss, grad_maps, d_student};
}

std::tuple<at::Tensor, std::vector<at::Tensor>> dct_at_loss_cpu(
    at::TensorList student, at::TensorList teacher, at::ArrayRef<double> weights, double p, std::string map_norm,
    bool center, std::string transform, bool coef_abs, std::string coef_norm, std::string distance, double eps) {
  auto r = loss_impl(student, teacher, weights, p, map_norm, center, transform, coef_abs, coef_norm, distance, eps,
                     std::nullopt);
  return {std::get<0>(r), std::get<1>(r)};
}

LossResult dct_at_loss_fused_cpu(at::TensorList student, at::TensorList teacher, at::ArrayRef<double> weights, double p,
                                 std::string map_norm, bool center, std::string transform, bool coef_abs,
                                 std::string coef_norm, std::string distance, double eps,
                                 const std::optional<at::Tensor>& grad_scale) {
  return loss_impl(student, teacher, weights, p, map_norm, center, transform, coef_abs, coef_norm, distance, eps,
                   grad_scale);
}

std::vector<at::Tensor> dct_at_loss_backward_cpu(const at::Tensor& grad_loss, at::TensorList grad_maps,
                                                 at::TensorList student, double p) {
  check_backward_levels(grad_loss, grad_maps, student);
  std::vector<at::Tensor> grads;
  grads.reserve(student.size());
  for (size_t l = 0; l < student.size(); ++l) {
    const int64_t B = student[l].size(0);
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
  m.impl("dct_at_loss_fused", &dctkd::cpu::dct_at_loss_fused_cpu);
  m.impl("dct_at_loss_backward", &dctkd::cpu::dct_at_loss_backward_cpu);
}
