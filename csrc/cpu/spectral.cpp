// CPU kernels of the spectral filters (docs/DESIGN.md §3.4): the depthwise global filter and the channel-mixing
// spectral convolution, forward and backward, complex64 (and complex128 for testing). Complex values
// are read as interleaved (re, im) pairs of the real type; everything accumulates in that real type
// (fp32 for complex64, fp64 for complex128).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../spectral_common.h"
#include "../spectral_math.h"
#include "simd.h"

namespace dctkd {
namespace cpu {
namespace {

using namespace dctkd::spectral;

// ------------------------------------------------------------------------------------ global_filter
// Data are B samples of R rows of L complex values; w holds R rows of L. NCHW: rows are channels
// (R = C, L = H*K) and the mask varies along the row; channels-last: rows are frequencies
// (R = H*K, L = C) and the mask is one value per row.
template <typename T>
void gf_forward(const T* x, const T* w, const T* mask, T* y, int64_t B, int64_t R, int64_t L, bool mask_per_row) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(L, 1));
  at::parallel_for(0, B * R, grain, [&](int64_t begin, int64_t end) {
    for (int64_t br = begin; br < end; ++br) {
      const int64_t r = br % R;
      const T* __restrict__ xr = x + 2 * br * L;
      const T* __restrict__ wr = w + 2 * r * L;
      T* __restrict__ yr = y + 2 * br * L;
      if (mask == nullptr || mask_per_row) {
        const T m = mask == nullptr ? T(1) : mask[r];
        for (int64_t j = 0; j < L; ++j) {
          const T a = xr[2 * j], b = xr[2 * j + 1], c = wr[2 * j], d = wr[2 * j + 1];
          yr[2 * j] = (a * c - b * d) * m;
          yr[2 * j + 1] = (a * d + b * c) * m;
        }
      } else {
        for (int64_t j = 0; j < L; ++j) {
          const T a = xr[2 * j], b = xr[2 * j + 1], c = wr[2 * j], d = wr[2 * j + 1], m = mask[j];
          yr[2 * j] = (a * c - b * d) * m;
          yr[2 * j + 1] = (a * d + b * c) * m;
        }
      }
    }
  });
}

// One row of gf_backward: dxr = g * conj(w) * m and ac += g * conj(x), either one or both (one pass over
// g). Cloned for AVX-512 and AVX2 as well as the baseline (simd.h), picked at load time: with SSE only,
// the shuffles of the interleaved complex products, not memory, bound this loop.
template <typename T>
DCTKD_INLINE void gf_backward_row_impl(const T* __restrict__ gr, const T* __restrict__ xr, const T* __restrict__ wr,
                                       const T* mrow, T mr, T* __restrict__ dxr, T* __restrict__ ac, int64_t L) {
  if (dxr != nullptr && ac != nullptr) {
    for (int64_t j = 0; j < L; ++j) {
      const T m = mrow != nullptr ? mrow[j] * mr : mr;
      const T a = gr[2 * j], bb = gr[2 * j + 1], c = wr[2 * j], d = wr[2 * j + 1];
      const T xc = xr[2 * j], xd = xr[2 * j + 1];
      dxr[2 * j] = (a * c + bb * d) * m;  // g * conj(w)
      dxr[2 * j + 1] = (bb * c - a * d) * m;
      ac[2 * j] += a * xc + bb * xd;  // g * conj(x)
      ac[2 * j + 1] += bb * xc - a * xd;
    }
  } else if (dxr != nullptr) {
    for (int64_t j = 0; j < L; ++j) {
      const T m = mrow != nullptr ? mrow[j] * mr : mr;
      const T a = gr[2 * j], bb = gr[2 * j + 1], c = wr[2 * j], d = wr[2 * j + 1];
      dxr[2 * j] = (a * c + bb * d) * m;
      dxr[2 * j + 1] = (bb * c - a * d) * m;
    }
  } else {
    for (int64_t j = 0; j < L; ++j) {
      const T a = gr[2 * j], bb = gr[2 * j + 1], xc = xr[2 * j], xd = xr[2 * j + 1];
      ac[2 * j] += a * xc + bb * xd;
      ac[2 * j + 1] += bb * xc - a * xd;
    }
  }
}

DCTKD_TARGET_CLONES void gf_backward_row(const float* gr, const float* xr, const float* wr, const float* mrow, float mr,
                                         float* dxr, float* ac, int64_t L) {
  gf_backward_row_impl(gr, xr, wr, mrow, mr, dxr, ac, L);
}
DCTKD_TARGET_CLONES void gf_backward_row(const double* gr, const double* xr, const double* wr, const double* mrow,
                                         double mr, double* dxr, double* ac, int64_t L) {
  gf_backward_row_impl(gr, xr, wr, mrow, mr, dxr, ac, L);
}

// dx = g * conj(w) * m (when dx != nullptr); dw = m * sum_b g * conj(x) (when dw != nullptr).
// Parallel over weight rows, so each dw element is reduced by one thread in a fixed order (b = 0, 1, ...).
// A thread takes its rows a block at a time (kGfAccBytes of accumulators) and walks the samples b
// outermost, so it reads the block's rows of each sample as one contiguous run rather than one row per
// jump of a whole sample (which the hardware prefetchers follow poorly).
constexpr int64_t kGfAccBytes = int64_t(128) << 10;

template <typename T>
void gf_backward(const T* g, const T* x, const T* w, const T* mask, T* dx, T* dw, int64_t B, int64_t R, int64_t L,
                 bool mask_per_row) {
  const int64_t block = std::max<int64_t>(1, kGfAccBytes / std::max<int64_t>(2 * L * int64_t(sizeof(T)), 1));
  at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> acc(dw != nullptr ? 2 * L * std::min(block, end - begin) : 0);
    const T* mrow = (mask != nullptr && !mask_per_row) ? mask : nullptr;
    for (int64_t r0 = begin; r0 < end; r0 += block) {
      const int64_t r1 = std::min(end, r0 + block);
      if (dw != nullptr) std::fill(acc.begin(), acc.end(), T(0));
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t r = r0; r < r1; ++r) {
          const T* __restrict__ wr = w + 2 * r * L;
          const T mr = (mask != nullptr && mask_per_row) ? mask[r] : T(1);
          const int64_t off = 2 * (b * R + r) * L;
          const T* __restrict__ gr = g + off;
          const T* __restrict__ xr = x + off;
          gf_backward_row(gr, xr, wr, mrow, mr, dx != nullptr ? dx + off : nullptr,
                          dw != nullptr ? acc.data() + 2 * (r - r0) * L : nullptr, L);
        }
      }
      if (dw != nullptr) {
        for (int64_t r = r0; r < r1; ++r) {
          const T mr = (mask != nullptr && mask_per_row) ? mask[r] : T(1);
          const T* ac = acc.data() + 2 * (r - r0) * L;
          T* dwr = dw + 2 * r * L;
          for (int64_t j = 0; j < L; ++j) {
            const T m = mrow != nullptr ? mrow[j] * mr : mr;
            dwr[2 * j] = ac[2 * j] * m;
            dwr[2 * j + 1] = ac[2 * j + 1] * m;
          }
        }
      }
    }
  });
}

template <typename T>
T* real_ptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

at::Tensor global_filter_cpu(const at::Tensor& xf, const at::Tensor& w, const c10::optional<at::Tensor>& mask) {
  const GfForwardArgs a = gf_forward_args(xf, w, mask);
  if (a.empty) return a.y;
  const GfPlan& p = a.p;
  dispatch_complex(xf.scalar_type(), "global_filter", [&](auto tag) {
    using T = decltype(tag);
    gf_forward<T>(real_ptr<T>(a.xd), real_ptr<T>(a.wd), a.m.defined() ? real_ptr<T>(a.m) : nullptr, real_ptr<T>(a.y),
                  p.B, p.R, p.L, p.channels_last);
  });
  return a.y;
}

std::tuple<at::Tensor, at::Tensor> global_filter_backward_cpu(const at::Tensor& grad, const at::Tensor& xf,
                                                              const at::Tensor& w,
                                                              const c10::optional<at::Tensor>& mask, bool need_xf,
                                                              bool need_w) {
  const GfBackwardArgs a = gf_backward_args(grad, xf, w, mask, need_xf, need_w);
  if (a.done) return {a.dx, a.dw};
  const GfPlan& p = a.p;
  dispatch_complex(xf.scalar_type(), "global_filter_backward", [&](auto tag) {
    using T = decltype(tag);
    gf_backward<T>(real_ptr<T>(a.gd), need_w ? real_ptr<T>(a.xd) : nullptr, real_ptr<T>(a.wd),
                   a.m.defined() ? real_ptr<T>(a.m) : nullptr, need_xf ? real_ptr<T>(a.dx) : nullptr,
                   need_w ? real_ptr<T>(a.dw) : nullptr, p.B, p.R, p.L, p.channels_last);
  });
  return {a.dx, a.dw};
}

// ------------------------------------------------------------------------------------ spectral_conv
// One batched complex GEMM over the F = H*K frequencies serves the forward and both gradients:
//   out[m, n, f] = mask[f] * sum_k opA(A[m, k, f]) * opB(B[k, n, f])      (out contiguous (M, N, F))
// with element strides (sAm, sAk) and (sBk, sBn) in complex units, the frequency contiguous, and
// opA/opB the identity or conj. Work items are (MT rows of out) x (FC frequencies): the A tile is
// packed once into planar re/im arrays and reused for every column n; for each n the B column
// panel (K x FC) is packed once and reused by the MT rows, two rows at a time against registers.
constexpr int64_t kFC = 16;  // frequencies per work item (the vectorised inner dimension)
constexpr int64_t kMT = 8;   // rows of out per work item

// The inner product of two packed rows of A against the packed B panel: acc{0,1} = sum_k a{0,1}[k] * b[k]
// over kFC frequencies. Kept in one small always-inline body so that the AVX2/FMA version below (picked
// at run time) and the baseline build compile the same code with the accumulators in registers.
template <typename T>
static inline __attribute__((always_inline)) void micro_2rows(const T* __restrict__ a0r, const T* __restrict__ a0i,
                                                              const T* __restrict__ a1r, const T* __restrict__ a1i,
                                                              const T* __restrict__ bR, const T* __restrict__ bI,
                                                              int64_t K, T* __restrict__ acc) {
  T r0[kFC] = {}, i0[kFC] = {}, r1[kFC] = {}, i1[kFC] = {};
  for (int64_t k = 0; k < K; ++k) {
    const T* __restrict__ br = bR + k * kFC;
    const T* __restrict__ bi = bI + k * kFC;
    const T* __restrict__ x0r = a0r + k * kFC;
    const T* __restrict__ x0i = a0i + k * kFC;
    const T* __restrict__ x1r = a1r + k * kFC;
    const T* __restrict__ x1i = a1i + k * kFC;
    for (int64_t f = 0; f < kFC; ++f) {
      r0[f] += x0r[f] * br[f] - x0i[f] * bi[f];
      i0[f] += x0r[f] * bi[f] + x0i[f] * br[f];
      r1[f] += x1r[f] * br[f] - x1i[f] * bi[f];
      i1[f] += x1r[f] * bi[f] + x1i[f] * br[f];
    }
  }
  for (int64_t f = 0; f < kFC; ++f) {
    acc[f] = r0[f];
    acc[kFC + f] = i0[f];
    acc[2 * kFC + f] = r1[f];
    acc[3 * kFC + f] = i1[f];
  }
}

#ifdef DCTKD_HAVE_TARGET_AVX2_FMA
template <typename T>
DCTKD_TARGET_AVX2_FMA void micro_2rows_avx2(const T* a0r, const T* a0i, const T* a1r, const T* a1i, const T* bR,
                                            const T* bI, int64_t K, T* acc) {
  micro_2rows<T>(a0r, a0i, a1r, a1i, bR, bI, K, acc);
}
#endif

template <typename T>
void micro_2rows_default(const T* a0r, const T* a0i, const T* a1r, const T* a1i, const T* bR, const T* bI, int64_t K,
                         T* acc) {
  micro_2rows<T>(a0r, a0i, a1r, a1i, bR, bI, K, acc);
}

template <typename T, bool kConjA, bool kConjB>
void cgemm_freq(const T* A, int64_t sAm, int64_t sAk, const T* Bm, int64_t sBk, int64_t sBn, const T* mask, T* out,
                int64_t M, int64_t N, int64_t K, int64_t F) {
  const int64_t m_tiles = (M + kMT - 1) / kMT, f_tiles = (F + kFC - 1) / kFC;
  const T sa = kConjA ? T(-1) : T(1), sb = kConjB ? T(-1) : T(1);
  const bool avx2 = cpu_has_avx2_fma();
  (void)avx2;
  at::parallel_for(0, m_tiles * f_tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> aR(kMT * K * kFC), aI(kMT * K * kFC), bR(K * kFC), bI(K * kFC);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t m0 = (item / f_tiles) * kMT, f0 = (item % f_tiles) * kFC;
      const int64_t ml = std::min(kMT, M - m0), fl = std::min(kFC, F - f0);
      // pack A[m0:m0+ml, :, f0:f0+fl] (zero-padded to kFC frequencies)
      for (int64_t mm = 0; mm < ml; ++mm)
        for (int64_t k = 0; k < K; ++k) {
          const T* src = A + 2 * ((m0 + mm) * sAm + k * sAk + f0);
          T* dr = aR.data() + (mm * K + k) * kFC;
          T* di = aI.data() + (mm * K + k) * kFC;
          for (int64_t f = 0; f < kFC; ++f) {
            dr[f] = f < fl ? src[2 * f] : T(0);
            di[f] = f < fl ? sa * src[2 * f + 1] : T(0);
          }
        }
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t k = 0; k < K; ++k) {
          const T* src = Bm + 2 * (k * sBk + n * sBn + f0);
          T* dr = bR.data() + k * kFC;
          T* di = bI.data() + k * kFC;
          for (int64_t f = 0; f < kFC; ++f) {
            dr[f] = f < fl ? src[2 * f] : T(0);
            di[f] = f < fl ? sb * src[2 * f + 1] : T(0);
          }
        }
        for (int64_t mm = 0; mm < ml; mm += 2) {
          const bool two = mm + 1 < ml;
          const T* a0r = aR.data() + mm * K * kFC;
          const T* a0i = aI.data() + mm * K * kFC;
          const T* a1r = two ? a0r + K * kFC : a0r;
          const T* a1i = two ? a0i + K * kFC : a0i;
          T acc[4 * kFC];
#ifdef DCTKD_HAVE_TARGET_AVX2_FMA
          if (avx2) micro_2rows_avx2<T>(a0r, a0i, a1r, a1i, bR.data(), bI.data(), K, acc);
          else
#endif
            micro_2rows_default<T>(a0r, a0i, a1r, a1i, bR.data(), bI.data(), K, acc);
          const T* r0 = acc;
          const T* i0 = acc + kFC;
          const T* r1 = acc + 2 * kFC;
          const T* i1 = acc + 3 * kFC;
          for (int rr = 0; rr < (two ? 2 : 1); ++rr) {
            const T* accr = rr == 0 ? r0 : r1;
            const T* acci = rr == 0 ? i0 : i1;
            T* dst = out + 2 * (((m0 + mm + rr) * N + n) * F + f0);
            for (int64_t f = 0; f < fl; ++f) {
              const T mk = mask != nullptr ? mask[f0 + f] : T(1);
              dst[2 * f] = accr[f] * mk;
              dst[2 * f + 1] = acci[f] * mk;
            }
          }
        }
      }
    }
  });
}

template <typename T, bool kConjA, bool kConjB>
void cgemm_or_zero(const at::Tensor& A, int64_t sAm, int64_t sAk, const at::Tensor& Bt, int64_t sBk, int64_t sBn,
                   const at::Tensor& mask, at::Tensor& out, int64_t M, int64_t N, int64_t K, int64_t F) {
  if (out.numel() == 0) return;
  if (K == 0) {
    out.zero_();
    return;
  }
  cgemm_freq<T, kConjA, kConjB>(real_ptr<T>(A), sAm, sAk, real_ptr<T>(Bt), sBk, sBn,
                                mask.defined() ? real_ptr<T>(mask) : nullptr, real_ptr<T>(out), M, N, K, F);
}

// spectral_conv_host's GEMM on the CPU.
struct CpuFreqGemm {
  template <typename CA, typename CB>
  void operator()(CA, CB, const at::Tensor& A, int64_t sAm, int64_t sAk, const at::Tensor& Bt, int64_t sBk, int64_t sBn,
                  const at::Tensor& mask, at::Tensor& out, int64_t M, int64_t N, int64_t K, int64_t F) const {
    dispatch_complex(A.scalar_type(), "spectral_conv", [&](auto tag) {
      cgemm_or_zero<decltype(tag), CA::value, CB::value>(A, sAm, sAk, Bt, sBk, sBn, mask, out, M, N, K, F);
    });
  }
};

at::Tensor spectral_conv_cpu(const at::Tensor& xf, const at::Tensor& w, const c10::optional<at::Tensor>& mask) {
  return spectral_conv_host(xf, w, mask, CpuFreqGemm{});
}

std::tuple<at::Tensor, at::Tensor> spectral_conv_backward_cpu(const at::Tensor& grad, const at::Tensor& xf,
                                                              const at::Tensor& w,
                                                              const c10::optional<at::Tensor>& mask, bool need_xf,
                                                              bool need_w) {
  return spectral_conv_backward_host(grad, xf, w, mask, need_xf, need_w, CpuFreqGemm{});
}

// ---------------------------------------------------------------------------------- fam_half_weight
// P planes of (H, W) -> (H, K); both directions are gathers, one pass, parallel over planes x rows.
template <typename T>
void half_weight_forward(const T* w, T* out, int64_t P, int64_t H, int64_t W, int64_t rh, int64_t rw) {
  const int64_t K = W / 2 + 1;
  at::parallel_for(0, P * H, std::max<int64_t>(1, 4096 / std::max<int64_t>(K, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t pr = begin; pr < end; ++pr) {
      const int64_t pl = pr / H, m = pr % H, nm = mirror(m, H);
      const T* plane = w + 2 * pl * H * W;
      T* o = out + 2 * pr * K;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t nk = mirror(k, W);
        const T a = fam_keep(m, k, H, W, rh, rw) ? T(0.5) : T(0);
        const T b = fam_keep(nm, nk, H, W, rh, rw) ? T(0.5) : T(0);
        const T* p = plane + 2 * (m * W + k);
        const T* q = plane + 2 * (nm * W + nk);
        o[2 * k] = a * p[0] + b * q[0];
        o[2 * k + 1] = a * p[1] - b * q[1];
      }
    }
  });
}

template <typename T>
void half_weight_backward(const T* g, T* out, int64_t P, int64_t H, int64_t W, int64_t rh, int64_t rw) {
  const int64_t K = W / 2 + 1;
  at::parallel_for(0, P * H, std::max<int64_t>(1, 4096 / std::max<int64_t>(W, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t pr = begin; pr < end; ++pr) {
      const int64_t pl = pr / H, p = pr % H, np = mirror(p, H);
      const T* plane = g + 2 * pl * H * K;
      T* o = out + 2 * pr * W;
      for (int64_t q = 0; q < W; ++q) {
        T re = 0, im = 0;
        if (fam_keep(p, q, H, W, rh, rw)) {
          if (q < K) {
            re += plane[2 * (p * K + q)];
            im += plane[2 * (p * K + q) + 1];
          }
          const int64_t nq = mirror(q, W);
          if (nq < K) {
            re += plane[2 * (np * K + nq)];
            im -= plane[2 * (np * K + nq) + 1];
          }
        }
        o[2 * q] = T(0.5) * re;
        o[2 * q + 1] = T(0.5) * im;
      }
    }
  });
}

at::Tensor fam_half_weight_cpu(const at::Tensor& w_in, double cuton) {
  check_half_weight(w_in, cuton);
  const at::Tensor w = resolved(w_in).contiguous();
  const int64_t H = w.size(-2), W = w.size(-1), K = W / 2 + 1;
  std::vector<int64_t> shape(w.sizes().begin(), w.sizes().end());
  shape.back() = K;
  at::Tensor out = at::empty(shape, w.options());
  if (out.numel() == 0) return out;
  const int64_t P = w.numel() / (H * W);
  dispatch_complex(w.scalar_type(), "fam_half_weight", [&](auto tag) {
    using T = decltype(tag);
    half_weight_forward<T>(real_ptr<T>(w), real_ptr<T>(out), P, H, W, fam_radius(H, cuton), fam_radius(W, cuton));
  });
  return out;
}

at::Tensor fam_half_weight_backward_cpu(const at::Tensor& g_in, double cuton, int64_t width) {
  check_half_weight_grad(g_in, cuton, width);
  const at::Tensor g = resolved(g_in).contiguous();
  const int64_t H = g.size(-2), W = width;
  std::vector<int64_t> shape(g.sizes().begin(), g.sizes().end());
  shape.back() = W;
  at::Tensor out = at::empty(shape, g.options());
  if (out.numel() == 0) return out;
  const int64_t P = out.numel() / (H * W);
  dispatch_complex(g.scalar_type(), "fam_half_weight_backward", [&](auto tag) {
    using T = decltype(tag);
    half_weight_backward<T>(real_ptr<T>(g), real_ptr<T>(out), P, H, W, fam_radius(H, cuton), fam_radius(W, cuton));
  });
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace dctkd

TORCH_LIBRARY_IMPL(dctkd_ext, CPU, m) {
  m.impl("fam_half_weight", &dctkd::cpu::fam_half_weight_cpu);
  m.impl("fam_half_weight_backward", &dctkd::cpu::fam_half_weight_backward_cpu);
  m.impl("global_filter", &dctkd::cpu::global_filter_cpu);
  m.impl("global_filter_backward", &dctkd::cpu::global_filter_backward_cpu);
  m.impl("spectral_conv", &dctkd::cpu::spectral_conv_cpu);
  m.impl("spectral_conv_backward", &dctkd::cpu::spectral_conv_backward_cpu);
}
