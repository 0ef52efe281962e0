// The host side of the spectral-filter ops (docs/DESIGN.md §3.4): argument checks, layout rules and the
// preparation every backend does before its kernels, shared by the CPU (csrc/cpu/spectral.cpp,
// csrc/cpu/fam_layer.cpp) and CUDA (csrc/cuda/spectral.cu) files. The Python face
// (dctkd_ext/ops/spectral.py) checks the same things first with friendlier messages; these checks
// guard direct torch.ops.dctkd_ext.* calls.
#pragma once
#include <ATen/ATen.h>

#include <tuple>
#include <type_traits>

#include "layout.h"

namespace dctkd {
namespace spectral {

inline bool is_complex_kernel_dtype(at::ScalarType t) { return t == at::kComplexFloat || t == at::kComplexDouble; }

inline at::ScalarType real_dtype_of(at::ScalarType t) { return t == at::kComplexDouble ? at::kDouble : at::kFloat; }

inline void check_complex(const at::Tensor& t, const char* name, int64_t ndim, const char* layout) {
  TORCH_CHECK(is_complex_kernel_dtype(t.scalar_type()), name, ": expected a complex64 (or complex128) tensor, got ",
              t.scalar_type(), " (use torch.view_as_complex on a (..., 2) float tensor)");
  TORCH_CHECK(t.dim() == ndim, name, ": expected a ", ndim, "-D ", layout, " tensor, got shape ", t.sizes());
}

// Values as the kernels read them: conj / neg views materialised.
inline at::Tensor resolved(const at::Tensor& t) { return t.resolve_conj().resolve_neg(); }

// The mask as the kernels read it: (H, K) contiguous in the real dtype of xf, or undefined.
inline at::Tensor prepare_mask(const c10::optional<at::Tensor>& mask, const at::Tensor& xf, int64_t H, int64_t K) {
  if (!mask.has_value() || !mask->defined()) return at::Tensor();
  const at::Tensor& m = *mask;
  TORCH_CHECK(!m.is_complex(), "mask: expected a real (or bool) tensor, got ", m.scalar_type());
  TORCH_CHECK(m.dim() == 2 && m.size(0) == H && m.size(1) == K, "mask: expected shape (", H, ", ", K,
              ") to match the last two dims of xf, got ", m.sizes());
  TORCH_CHECK(m.device() == xf.device(), "mask: expected a tensor on ", xf.device(), " like xf, got one on ",
              m.device());
  return m.to(real_dtype_of(xf.scalar_type())).contiguous();
}

inline void check_global_filter(const at::Tensor& xf, const at::Tensor& w) {
  check_complex(xf, "xf", 4, "(B, C, H, K)");
  check_complex(w, "w", 3, "(C, H, K)");
  TORCH_CHECK(w.scalar_type() == xf.scalar_type(), "w: expected dtype ", xf.scalar_type(), " like xf, got ",
              w.scalar_type());
  TORCH_CHECK(w.size(0) == xf.size(1) && w.size(1) == xf.size(2) && w.size(2) == xf.size(3), "w: expected shape (",
              xf.size(1), ", ", xf.size(2), ", ", xf.size(3), ") = (C, H, K) of xf, got ", w.sizes());
  TORCH_CHECK(w.device() == xf.device(), "w: expected a tensor on ", xf.device(), " like xf, got one on ", w.device());
}

inline void check_spectral_conv(const at::Tensor& xf, const at::Tensor& w) {
  check_complex(xf, "xf", 4, "(B, I, H, K)");
  check_complex(w, "w", 4, "(I, O, H, K)");
  TORCH_CHECK(w.scalar_type() == xf.scalar_type(), "w: expected dtype ", xf.scalar_type(), " like xf, got ",
              w.scalar_type());
  TORCH_CHECK(w.size(0) == xf.size(1) && w.size(2) == xf.size(2) && w.size(3) == xf.size(3), "w: expected shape (",
              xf.size(1), ", O, ", xf.size(2), ", ", xf.size(3), ") = (I, O, H, K) of xf, got ", w.sizes());
  TORCH_CHECK(w.device() == xf.device(), "w: expected a tensor on ", xf.device(), " like xf, got one on ", w.device());
}

inline void check_grad(const at::Tensor& grad, at::IntArrayRef expected, const at::Tensor& xf) {
  TORCH_CHECK(grad.scalar_type() == xf.scalar_type(), "grad: expected dtype ", xf.scalar_type(), ", got ",
              grad.scalar_type());
  TORCH_CHECK(grad.sizes() == expected, "grad: expected shape ", expected, ", got ", grad.sizes());
  TORCH_CHECK(grad.device() == xf.device(), "grad: expected a tensor on ", xf.device(), ", got one on ", grad.device());
}

// global_filter's data as the kernels read them. Data: B samples of R rows of L complex values, w: R rows
// of L. NCHW: rows are channels (R = C, L = H*K); channels-last: rows are frequencies (R = H*K, L = C).
// Tensors in the order the kernels read them: (B, C, H, K) or, channels-last, (B, H, K, C).
struct GfPlan {
  bool channels_last;
  int64_t B, C, H, K, R, L;
  explicit GfPlan(const at::Tensor& xf)
      : channels_last(reads_channels_last(xf)), B(xf.size(0)), C(xf.size(1)), H(xf.size(2)), K(xf.size(3)) {
    R = channels_last ? H * K : C;
    L = channels_last ? C : H * K;
  }
  at::Tensor data(const at::Tensor& t) const {  // (B, C, H, K) logical -> kernel order, contiguous
    const at::Tensor r = resolved(t);
    return channels_last ? r.permute({0, 2, 3, 1}).contiguous() : r.contiguous();
  }
  at::Tensor weight(const at::Tensor& w) const {  // (C, H, K) logical -> kernel order, contiguous
    const at::Tensor r = resolved(w);
    return channels_last ? r.permute({1, 2, 0}).contiguous() : r.contiguous();
  }
  at::Tensor new_data(const at::TensorOptions& o) const {  // (B, C, H, K) logical, in kernel order
    return channels_last ? at::empty({B, H, K, C}, o).permute({0, 3, 1, 2}) : at::empty({B, C, H, K}, o);
  }
  at::Tensor new_weight(const at::TensorOptions& o) const {  // (C, H, K) logical, in kernel order
    return channels_last ? at::empty({H, K, C}, o).permute({2, 0, 1}) : at::empty({C, H, K}, o);
  }
};

inline void check_half_weight(const at::Tensor& w, double cuton) {
  TORCH_CHECK(is_complex_kernel_dtype(w.scalar_type()), "w: expected a complex64 (or complex128) tensor, got ",
              w.scalar_type());
  TORCH_CHECK(w.dim() >= 2, "w: expected a tensor (..., H, W) with at least 2 dims, got shape ", w.sizes());
  TORCH_CHECK(cuton >= 0.0 && cuton <= 1.0, "cuton: expected a number in [0, 1], got ", cuton);
}

inline void check_half_weight_grad(const at::Tensor& g, double cuton, int64_t width) {
  TORCH_CHECK(is_complex_kernel_dtype(g.scalar_type()), "grad: expected a complex64 (or complex128) tensor, got ",
              g.scalar_type());
  TORCH_CHECK(g.dim() >= 2 && width >= 1 && g.size(-1) == width / 2 + 1, "grad: expected a tensor (..., H, ",
              width / 2 + 1, ") for width ", width, ", got shape ", g.sizes());
  TORCH_CHECK(cuton >= 0.0 && cuton <= 1.0, "cuton: expected a number in [0, 1], got ", cuton);
}

// The placeholder returned for an output that was not asked for (need_xf / need_w false).
inline at::Tensor not_needed(const at::Tensor& like) { return at::empty({0}, like.options()); }

// f(T(0)) with T = float for complex64, double for complex128.
template <typename F>
void dispatch_complex(at::ScalarType t, const char* name, F&& f) {
  if (t == at::kComplexFloat) f(float(0));
  else if (t == at::kComplexDouble) f(double(0));
  else TORCH_CHECK(false, name, ": unsupported dtype ", t);
}

// ------------------------------------------------------------------------ host side of the ops
// What every backend does before its kernels: the checks, the mask, the inputs in the order the
// kernels read them and the outputs allocated. Each backend then launches its own kernels.

// global_filter forward: `empty` when there is nothing to compute (y is then the whole answer).
struct GfForwardArgs {
  GfPlan p;
  at::Tensor m, y, xd, wd;
  bool empty;
};

inline GfForwardArgs gf_forward_args(const at::Tensor& xf, const at::Tensor& w, const c10::optional<at::Tensor>& mask) {
  check_global_filter(xf, w);
  GfForwardArgs a{GfPlan(xf), {}, {}, {}, {}, false};
  a.m = prepare_mask(mask, xf, a.p.H, a.p.K);
  a.y = a.p.new_data(xf.options());
  a.empty = a.y.numel() == 0;
  if (!a.empty) {
    a.xd = a.p.data(xf);
    a.wd = a.p.weight(w);
  }
  return a;
}

// global_filter backward: `done` when dx and dw are already the answer (nothing asked, or empty data:
// dw is then zero). xf is read only for dw (a caller that wants dxf alone may pass a shape-only,
// e.g. expanded, xf).
struct GfBackwardArgs {
  GfPlan p;
  at::Tensor m, dx, dw, gd, xd, wd;
  bool done;
};

inline GfBackwardArgs gf_backward_args(const at::Tensor& grad, const at::Tensor& xf, const at::Tensor& w,
                                       const c10::optional<at::Tensor>& mask, bool need_xf, bool need_w) {
  check_global_filter(xf, w);
  check_grad(grad, xf.sizes(), xf);
  GfBackwardArgs a{GfPlan(xf), {}, {}, {}, {}, {}, {}, false};
  a.m = prepare_mask(mask, xf, a.p.H, a.p.K);
  a.dx = need_xf ? a.p.new_data(xf.options()) : not_needed(xf);
  a.dw = need_w ? a.p.new_weight(w.options()) : not_needed(w);
  if (!need_xf && !need_w) {
    a.done = true;
  } else if (xf.numel() == 0) {
    if (need_w) a.dw.zero_();
    a.done = true;
  } else {
    a.gd = a.p.data(grad);
    a.xd = need_w ? a.p.data(xf) : at::Tensor();
    a.wd = a.p.weight(w);
  }
  return a;
}

// spectral_conv: the forward and both gradients are one frequency-batched complex GEMM each,
//   out[m, n, f] = mask[f] sum_k opA(A[m, k, f]) opB(B[k, n, f])   (opX: conj when kConjX),
// run by the backend's `gemm(std::integral_constant<bool, kConjA>, std::integral_constant<bool, kConjB>,
// A, sAm, sAk, B, sBk, sBn, mask, out, M, N, K, F)`.
template <typename Gemm>
at::Tensor spectral_conv_host(const at::Tensor& xf, const at::Tensor& w, const c10::optional<at::Tensor>& mask,
                              const Gemm& gemm) {
  check_spectral_conv(xf, w);
  const int64_t B = xf.size(0), I = xf.size(1), H = xf.size(2), K = xf.size(3), O = w.size(1), F = H * K;
  const at::Tensor m = prepare_mask(mask, xf, H, K);
  const at::Tensor x = resolved(xf).contiguous(), wc = resolved(w).contiguous();
  at::Tensor y = at::empty({B, O, H, K}, xf.options());
  // out[b, o] = sum_i x[b, i] w[i, o]
  gemm(std::false_type{}, std::false_type{}, x, I * F, F, wc, O * F, F, m, y, B, O, I, F);
  return y;
}

template <typename Gemm>
std::tuple<at::Tensor, at::Tensor> spectral_conv_backward_host(const at::Tensor& grad, const at::Tensor& xf,
                                                               const at::Tensor& w,
                                                               const c10::optional<at::Tensor>& mask, bool need_xf,
                                                               bool need_w, const Gemm& gemm) {
  check_spectral_conv(xf, w);
  const int64_t B = xf.size(0), I = xf.size(1), H = xf.size(2), K = xf.size(3), O = w.size(1), F = H * K;
  check_grad(grad, {B, O, H, K}, xf);
  const at::Tensor m = prepare_mask(mask, xf, H, K);
  at::Tensor dx = need_xf ? at::empty({B, I, H, K}, xf.options()) : not_needed(xf);
  at::Tensor dw = need_w ? at::empty({I, O, H, K}, w.options()) : not_needed(w);
  if (!need_xf && !need_w) return {dx, dw};
  // xf is read only for dw (a caller that wants dxf alone may pass a shape-only, e.g. expanded, xf)
  const at::Tensor g = resolved(grad).contiguous(), wc = resolved(w).contiguous();
  const at::Tensor x = need_w ? resolved(xf).contiguous() : at::Tensor();
  // dx[b, i] = sum_o g[b, o] conj(w[i, o]):  A = g (m=b, k=o), B[k=o, n=i] = w[i, o]
  if (need_xf) gemm(std::false_type{}, std::true_type{}, g, O * F, F, wc, F, O * F, m, dx, B, I, O, F);
  // dw[i, o] = sum_b conj(x[b, i]) g[b, o]:  A[m=i, k=b] = x[b, i], B = g (k=b, n=o)
  if (need_w) gemm(std::true_type{}, std::false_type{}, x, F, I * F, g, O * F, F, m, dw, I, O, B, F);
  return {dx, dw};
}

}  // namespace spectral
}  // namespace dctkd
