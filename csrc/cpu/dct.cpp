// CPU kernels of dct2d / idct2d (docs/DESIGN.md §3.2): orthonormal DCT-II over the last two dims as
// C = D_H A D_W^T, and its exact inverse A = D_H^T C D_W, parallel over the leading dims; each
// product split into its even and odd halves.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <map>
#include <memory>
#include <mutex>
#include <type_traits>
#include <vector>

#include "cpu_kernels.h"
#include "small_matmul.h"

namespace dctkd {
namespace cpu {
namespace {

// The orthonormal DCT-II matrix is even/odd symmetric, D[k, n-1-m] = (-1)^k D[k, m], so each
// product with it splits into two half-size products (the first butterfly of a fast DCT): half the
// multiply-adds of the dense form. With ce = ceil(n/2), h = floor(n/2):
//   De (ce x ce) = D[even k, m < ce], Do (h x h) = D[odd k, m < h], and their transposes.
template <typename T>
struct DctHalves {
  int64_t n, ce, h;
  std::vector<T> de, det, dodd, dodt;
  explicit DctHalves(int64_t n_)
      : n(n_), ce((n_ + 1) / 2), h(n_ / 2), de(ce * ce), det(ce * ce), dodd(h * h), dodt(h * h) {
    for (int64_t k = 0; k < ce; ++k)
      for (int64_t m = 0; m < ce; ++m) {
        const T v = static_cast<T>(dct_basis(2 * k, m, n));
        de[k * ce + m] = v;
        det[m * ce + k] = v;
      }
    for (int64_t k = 0; k < h; ++k)
      for (int64_t m = 0; m < h; ++m) {
        const T v = static_cast<T>(dct_basis(2 * k + 1, m, n));
        dodd[k * h + m] = v;
        dodt[m * h + k] = v;
      }
  }
};

template <typename T>
const DctHalves<T>& cached_halves(int64_t n) {
  static std::mutex mu;
  static std::map<int64_t, std::unique_ptr<DctHalves<T>>> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto& slot = cache[n];
  if (!slot) slot = std::make_unique<DctHalves<T>>(n);
  return *slot;
}

// Scratch of one thread: four half-size blocks of at most n_rows x n_cols each.
template <typename T>
struct HalfScratch {
  std::vector<T> a, b, c, d;
  explicit HalfScratch(int64_t size) : a(size), b(size), c(size), d(size) {}
};

// Y (M x W) = X D^T (forward) or X D (inverse), along the rows of X.
template <typename T>
void along_rows(const T* X, T* Y, int64_t M, const DctHalves<T>& q, bool inverse, HalfScratch<T>& s) {
  const int64_t W = q.n, ce = q.ce, h = q.h;
  T *u = s.a.data(), *v = s.b.data(), *pe = s.c.data(), *po = s.d.data();
  if (!inverse) {
    for (int64_t i = 0; i < M; ++i) {
      const T* x = X + i * W;
      for (int64_t m = 0; m < h; ++m) {
        u[i * ce + m] = x[m] + x[W - 1 - m];
        v[i * h + m] = x[m] - x[W - 1 - m];
      }
      if (ce > h) u[i * ce + h] = x[h];
    }
    matmul(u, q.det.data(), pe, M, ce, ce);  // even outputs
    if (h > 0) matmul(v, q.dodt.data(), po, M, h, h);  // odd outputs
    for (int64_t i = 0; i < M; ++i) {
      T* y = Y + i * W;
      for (int64_t k = 0; k < ce; ++k) y[2 * k] = pe[i * ce + k];
      for (int64_t k = 0; k < h; ++k) y[2 * k + 1] = po[i * h + k];
    }
  } else {
    for (int64_t i = 0; i < M; ++i) {
      const T* x = X + i * W;
      for (int64_t k = 0; k < ce; ++k) u[i * ce + k] = x[2 * k];
      for (int64_t k = 0; k < h; ++k) v[i * h + k] = x[2 * k + 1];
    }
    matmul(u, q.de.data(), pe, M, ce, ce);
    if (h > 0) matmul(v, q.dodd.data(), po, M, h, h);
    for (int64_t i = 0; i < M; ++i) {
      T* y = Y + i * W;
      for (int64_t m = 0; m < h; ++m) {
        y[m] = pe[i * ce + m] + po[i * h + m];
        y[W - 1 - m] = pe[i * ce + m] - po[i * h + m];
      }
      if (ce > h) y[h] = pe[i * ce + h];
    }
  }
}

// Z (H x N) = D Y (forward) or D^T Y (inverse), along the columns of Y.
template <typename T>
void along_cols(const T* Y, T* Z, int64_t N, const DctHalves<T>& q, bool inverse, HalfScratch<T>& s) {
  const int64_t H = q.n, ce = q.ce, h = q.h;
  T *u = s.a.data(), *v = s.b.data(), *pe = s.c.data(), *po = s.d.data();
  if (!inverse) {
    for (int64_t m = 0; m < h; ++m) {
      const T* top = Y + m * N;
      const T* bot = Y + (H - 1 - m) * N;
      for (int64_t j = 0; j < N; ++j) {
        u[m * N + j] = top[j] + bot[j];
        v[m * N + j] = top[j] - bot[j];
      }
    }
    if (ce > h) std::copy(Y + h * N, Y + (h + 1) * N, u + h * N);
    matmul(q.de.data(), u, pe, ce, ce, N);
    if (h > 0) matmul(q.dodd.data(), v, po, h, h, N);
    for (int64_t k = 0; k < ce; ++k) std::copy(pe + k * N, pe + (k + 1) * N, Z + 2 * k * N);
    for (int64_t k = 0; k < h; ++k) std::copy(po + k * N, po + (k + 1) * N, Z + (2 * k + 1) * N);
  } else {
    for (int64_t k = 0; k < ce; ++k) std::copy(Y + 2 * k * N, Y + (2 * k + 1) * N, u + k * N);
    for (int64_t k = 0; k < h; ++k) std::copy(Y + (2 * k + 1) * N, Y + (2 * k + 2) * N, v + k * N);
    matmul(q.det.data(), u, pe, ce, ce, N);
    if (h > 0) matmul(q.dodt.data(), v, po, h, h, N);
    for (int64_t m = 0; m < h; ++m) {
      T* top = Z + m * N;
      T* bot = Z + (H - 1 - m) * N;
      for (int64_t j = 0; j < N; ++j) {
        top[j] = pe[m * N + j] + po[m * N + j];
        bot[j] = pe[m * N + j] - po[m * N + j];
      }
    }
    if (ce > h) std::copy(pe + h * N, pe + (h + 1) * N, Z + h * N);
  }
}

template <typename in_t, typename acc_t>
void dct2d_maps(const in_t* x, in_t* y, int64_t N, int64_t H, int64_t W, bool inverse) {
  const DctHalves<acc_t>& qh = cached_halves<acc_t>(H);
  const DctHalves<acc_t>& qw = cached_halves<acc_t>(W);
  constexpr bool same = std::is_same_v<in_t, acc_t>;
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> a(same ? 0 : H * W), tmp(H * W), out(same ? 0 : H * W);
    HalfScratch<acc_t> scratch(std::max(H, W) * ((std::max(H, W) + 1) / 2));
    for (int64_t i = begin; i < end; ++i) {
      const in_t* xi = x + i * H * W;
      in_t* yi = y + i * H * W;
      if constexpr (same) {
        along_rows(xi, tmp.data(), H, qw, inverse, scratch);
        along_cols(tmp.data(), yi, W, qh, inverse, scratch);
      } else {
        for (int64_t j = 0; j < H * W; ++j) a[j] = static_cast<acc_t>(xi[j]);
        along_rows(a.data(), tmp.data(), H, qw, inverse, scratch);
        along_cols(tmp.data(), out.data(), W, qh, inverse, scratch);
        for (int64_t j = 0; j < H * W; ++j) yi[j] = static_cast<in_t>(out[j]);
      }
    }
  });
}

at::Tensor dct2d_common(const at::Tensor& a_in, bool inverse) {
  const char* name = inverse ? "c" : "a";
  TORCH_CHECK(a_in.dim() >= 2, name, ": expected a tensor with at least 2 dims (..., H, W), got ", a_in.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(a_in.scalar_type()), name,
              ": expected a float16/bfloat16/float32/float64 tensor, got ", a_in.scalar_type());
  const at::Tensor a = a_in.contiguous();
  const int64_t H = a.size(-2), W = a.size(-1);
  at::Tensor y = at::empty(a.sizes(), a.options());
  if (a.numel() == 0) return y;
  const int64_t N = a.numel() / (H * W);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "dct2d_cpu", [&] {
    if (a.scalar_type() == at::kDouble)
      dct2d_maps<scalar_t, double>(a.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), N, H, W, inverse);
    else dct2d_maps<scalar_t, float>(a.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), N, H, W, inverse);
  });
  return y;
}

at::Tensor dct2d_cpu(const at::Tensor& a) { return dct2d_common(a, false); }
at::Tensor idct2d_cpu(const at::Tensor& c) { return dct2d_common(c, true); }

}  // namespace
}  // namespace cpu
}  // namespace dctkd

TORCH_LIBRARY_IMPL(dctkd_ext, CPU, m) {
  m.impl("dct2d", &dctkd::cpu::dct2d_cpu);
  m.impl("idct2d", &dctkd::cpu::idct2d_cpu);
}
