// CUDA kernels of the spectral filters (docs/DESIGN.md §3.4): global_filter (depthwise) and spectral_conv
// (channel mixing per frequency), forward and backward, complex64 (complex128 for testing). Complex
// values are read as float2 / double2; everything accumulates in the real type of the data.
// Launched on the current stream, no host syncs; the only allocation besides the outputs is the
// per-split partial sum of global_filter's weight gradient (sized from the shapes only).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../spectral_common.h"
#include "../spectral_math.h"
#include "common.cuh"

namespace dctkd {
namespace cuda {
namespace {

using namespace dctkd::spectral;

template <typename T>
struct Vec2;
template <>
struct Vec2<float> {
  using type = float2;
};
template <>
struct Vec2<double> {
  using type = double2;
};

template <typename T>
__device__ __forceinline__ T mask_at(const T* mask, int mode, int64_t j, int64_t HK, int64_t C) {
  if (mode == 1) return mask[j % HK];
  if (mode == 2) return mask[j / C];
  return T(1);
}

// ------------------------------------------------------------------------------------ global_filter
// x, y: B samples of N = C*H*K complex values (NCHW or channels-last order); w: N values.
// mode 0: no mask; 1: mask[j % HK] (NCHW); 2: mask[j / C] (channels-last). A thread owns one position j
// (its weight and mask stay in registers: one index division per thread, none per element) and
// streams it through the samples b0..b1 of its block row; consecutive threads, consecutive j.
template <typename T>
__global__ void gf_forward_kernel(const typename Vec2<T>::type* __restrict__ x,
                                  const typename Vec2<T>::type* __restrict__ w, const T* __restrict__ mask,
                                  typename Vec2<T>::type* __restrict__ y, int64_t B, int64_t N, int64_t HK, int64_t C,
                                  int64_t b_per_block, int mode) {
  using V = typename Vec2<T>::type;
  const int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (j >= N) return;
  const int64_t b0 = blockIdx.y * b_per_block;
  const int64_t b1 = min(B, b0 + b_per_block);
  const T m = mask_at(mask, mode, j, HK, C);
  V wv = __ldg(&w[j]);
  wv.x *= m;
  wv.y *= m;
#pragma unroll 4
  for (int64_t b = b0; b < b1; ++b) {
    const V a = x[b * N + j];
    V r;
    r.x = a.x * wv.x - a.y * wv.y;
    r.y = a.x * wv.y + a.y * wv.x;
    y[b * N + j] = r;
  }
}

// dx[b, j] = g * conj(w) * m; part[split, j] = m * sum_{b in split} g * conj(x). Each dw element is
// reduced by one thread per split in batch order (deterministic); splits are summed afterwards.
template <typename T>
__global__ void gf_backward_kernel(const typename Vec2<T>::type* __restrict__ g,
                                   const typename Vec2<T>::type* __restrict__ x,
                                   const typename Vec2<T>::type* __restrict__ w, const T* __restrict__ mask,
                                   typename Vec2<T>::type* __restrict__ dx, typename Vec2<T>::type* __restrict__ part,
                                   int64_t B, int64_t N, int64_t HK, int64_t C, int64_t b_per_split, int mode) {
  using V = typename Vec2<T>::type;
  const int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (j >= N) return;
  const int64_t b0 = blockIdx.y * b_per_split;
  const int64_t b1 = min(B, b0 + b_per_split);
  const T m = mask_at(mask, mode, j, HK, C);
  V wv = w[j];
  wv.x *= m;
  wv.y *= m;
  T ar = T(0), ai = T(0);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t off = b * N + j;
    const V gv = g[off];
    if (dx != nullptr) {
      V d;
      d.x = gv.x * wv.x + gv.y * wv.y;
      d.y = gv.y * wv.x - gv.x * wv.y;
      dx[off] = d;
    }
    if (part != nullptr) {
      const V xv = x[off];
      ar += gv.x * xv.x + gv.y * xv.y;
      ai += gv.y * xv.x - gv.x * xv.y;
    }
  }
  if (part != nullptr) {
    V r;
    r.x = ar * m;
    r.y = ai * m;
    part[blockIdx.y * N + j] = r;
  }
}

template <typename T>
typename Vec2<T>::type* vptr(const at::Tensor& t) {
  return reinterpret_cast<typename Vec2<T>::type*>(t.data_ptr());
}

template <typename T>
T* rptr(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<T*>(t.data_ptr()) : nullptr;
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

at::Tensor global_filter_cuda(const at::Tensor& xf, const at::Tensor& w, const c10::optional<at::Tensor>& mask) {
  const c10::cuda::CUDAGuard guard(xf.device());
  const GfForwardArgs a = gf_forward_args(xf, w, mask);
  if (a.empty) return a.y;
  const GfPlan& p = a.p;
  const at::Tensor &m = a.m, &y = a.y, &xd = a.xd, &wd = a.wd;
  const int64_t N = p.R * p.L;
  const int mode = m.defined() ? (p.channels_last ? 2 : 1) : 0;
  const int threads = 256;
  const int64_t jblocks = ceil_div(N, threads);
  // ~8 blocks per SM in all; each block streams a chunk of the batch
  const BatchSplit split = batch_split(p.B, jblocks, 8);
  const int64_t rows = split.splits, b_per = split.per;
  const cudaStream_t stream = current_stream();
  dispatch_complex(xf.scalar_type(), "global_filter", [&](auto tag) {
    using T = decltype(tag);
    const dim3 grid(static_cast<unsigned>(jblocks), static_cast<unsigned>(rows));
    gf_forward_kernel<T><<<grid, threads, 0, stream>>>(vptr<T>(xd), vptr<T>(wd), rptr<T>(m), vptr<T>(y), p.B, N,
                                                       p.H * p.K, p.C, b_per, mode);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> global_filter_backward_cuda(const at::Tensor& grad, const at::Tensor& xf,
                                                               const at::Tensor& w,
                                                               const c10::optional<at::Tensor>& mask, bool need_xf,
                                                               bool need_w) {
  const c10::cuda::CUDAGuard guard(xf.device());
  GfBackwardArgs a = gf_backward_args(grad, xf, w, mask, need_xf, need_w);
  if (a.done) return {a.dx, a.dw};
  const GfPlan& p = a.p;
  const at::Tensor &m = a.m, &gd = a.gd, &xd = a.xd, &wd = a.wd;
  at::Tensor &dx = a.dx, &dw = a.dw;
  const int64_t N = p.R * p.L;
  const int mode = m.defined() ? (p.channels_last ? 2 : 1) : 0;
  const int threads = 256;
  const int64_t jblocks = ceil_div(N, threads);
  // split the batch so that there are enough blocks to fill the GPU; each split writes its partial dw
  const BatchSplit split = batch_split(p.B, jblocks, 4);
  const int64_t splits = split.splits, b_per = split.per;
  at::Tensor part = need_w ? at::empty({splits, N}, w.options()) : at::Tensor();
  const cudaStream_t stream = current_stream();
  dispatch_complex(xf.scalar_type(), "global_filter_backward", [&](auto tag) {
    using T = decltype(tag);
    const dim3 grid(static_cast<unsigned>(jblocks), static_cast<unsigned>(splits));
    gf_backward_kernel<T><<<grid, threads, 0, stream>>>(
        vptr<T>(gd), need_w ? vptr<T>(xd) : nullptr, vptr<T>(wd), rptr<T>(m), need_xf ? vptr<T>(dx) : nullptr,
        need_w ? vptr<T>(part) : nullptr, p.B, N, p.H * p.K, p.C, b_per, mode);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (need_w) {
    const at::Tensor red = splits == 1 ? part[0] : part.sum(0);
    if (p.channels_last) dw.permute({1, 2, 0}).copy_(red.view({p.H, p.K, p.C}));
    else dw.copy_(red.view({p.C, p.H, p.K}));
  }
  return {dx, dw};
}

// ------------------------------------------------------------------------------------ spectral_conv
// out[m, n, f] = mask[f] * sum_k opA(A[m, k, f]) * opB(B[k, n, f]) — the forward and both gradients
// (see csrc/cpu/spectral.cpp). Block: kFT frequencies (threadIdx.x) x 8 (threadIdx.y) threads, a
// kTM x kTN tile of (m, n) for each of its frequencies; thread (x, y) owns frequency f0 + x and a 4 x 8
// micro-tile. k advances in steps of kKC through shared memory, planar re/im, frequency fastest: the
// global loads are coalesced along the frequency and the shared reads are conflict-free.
constexpr int kFT = 32;
constexpr int kTY = 8;
constexpr int kTM = 16;
constexpr int kTN = 16;
constexpr int kRM = 4;  // rows per thread: (threadIdx.y / 2) * 4 ...
constexpr int kRN = 8;  // columns per thread: (threadIdx.y % 2) * 8 ...

template <typename T>
struct KChunk {
  static constexpr int value = 16 / int(sizeof(T));  // 4 for float, 2 for double: 32 KB of shared memory
};

template <typename T, bool kConjA, bool kConjB>
__global__ void __launch_bounds__(kFT* kTY, sizeof(T) == 4 ? 2 : 1)
    cgemm_freq_kernel(const typename Vec2<T>::type* __restrict__ A, int64_t sAm, int64_t sAk,
                      const typename Vec2<T>::type* __restrict__ Bm, int64_t sBk, int64_t sBn,
                      const T* __restrict__ mask, typename Vec2<T>::type* __restrict__ out, int64_t M, int64_t N,
                      int64_t K, int64_t F) {
  using V = typename Vec2<T>::type;
  constexpr int KC = KChunk<T>::value;
  __shared__ T sAr[kTM][KC][kFT], sAi[kTM][KC][kFT];
  __shared__ T sBr[KC][kTN][kFT], sBi[KC][kTN][kFT];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t f0 = int64_t(blockIdx.x) * kFT;
  const int64_t m0 = int64_t(blockIdx.y) * kTM;
  const int64_t n0 = int64_t(blockIdx.z) * kTN;
  const int rm0 = (ty / 2) * kRM, rn0 = (ty % 2) * kRN;
  T accr[kRM][kRN], acci[kRM][kRN];
#pragma unroll
  for (int r = 0; r < kRM; ++r)
#pragma unroll
    for (int c = 0; c < kRN; ++c) accr[r][c] = acci[r][c] = T(0);
  const T sa = kConjA ? T(-1) : T(1), sb = kConjB ? T(-1) : T(1);
  // Staging: thread (tx, ty) always moves frequency f0 + tx; A rows mm = ty / KC + i * (kTY / KC) of
  // k-column ty % KC, B rows r = ty + i * kTY (k = r / kTN, n = r % kTN). Fixed per-thread indices
  // (no per-element index division) and at most 4 loads in flight per loop keep the staging out of
  // the registers that the accumulators need (a flat element loop spilled 88 bytes at 128 registers
  // in fp32; fully unrolled staging, 168).
  static_assert(kTY % KC == 0 && (KC * kTN) % kTY == 0, "staging layout");
  constexpr int kARows = kTY / KC;           // A rows per pass
  constexpr int kAPasses = kTM / kARows;     // passes over A's tile
  constexpr int kBPasses = KC * kTN / kTY;   // passes over B's tile
  const int64_t gf = f0 + tx;
  const bool f_ok = gf < F;
  const int a_kk = ty % KC, a_mm = ty / KC;
  for (int64_t k0 = 0; k0 < K; k0 += KC) {
    {
      const int64_t gk = k0 + a_kk;
      const V* src = A + (m0 + a_mm) * sAm + gk * sAk + gf;
#pragma unroll 4
      for (int i = 0; i < kAPasses; ++i) {
        const int mm = a_mm + i * kARows;
        V v;
        v.x = v.y = T(0);
        if (f_ok && gk < K && m0 + mm < M) v = src[int64_t(i * kARows) * sAm];
        sAr[mm][a_kk][tx] = v.x;
        sAi[mm][a_kk][tx] = sa * v.y;
      }
    }
#pragma unroll 4
    for (int i = 0; i < kBPasses; ++i) {
      const int r = ty + i * kTY, kk = r / kTN, nn = r % kTN;
      const int64_t gk = k0 + kk, gn = n0 + nn;
      V v;
      v.x = v.y = T(0);
      if (f_ok && gk < K && gn < N) v = Bm[gk * sBk + gn * sBn + gf];
      sBr[kk][nn][tx] = v.x;
      sBi[kk][nn][tx] = sb * v.y;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < KC; ++kk) {
      T ar[kRM], ai[kRM], br[kRN], bi[kRN];
#pragma unroll
      for (int r = 0; r < kRM; ++r) {
        ar[r] = sAr[rm0 + r][kk][tx];
        ai[r] = sAi[rm0 + r][kk][tx];
      }
#pragma unroll
      for (int c = 0; c < kRN; ++c) {
        br[c] = sBr[kk][rn0 + c][tx];
        bi[c] = sBi[kk][rn0 + c][tx];
      }
#pragma unroll
      for (int r = 0; r < kRM; ++r)
#pragma unroll
        for (int c = 0; c < kRN; ++c) {
          accr[r][c] += ar[r] * br[c] - ai[r] * bi[c];
          acci[r][c] += ar[r] * bi[c] + ai[r] * br[c];
        }
    }
    __syncthreads();
  }
  const int64_t f = f0 + tx;
  if (f >= F) return;
  const T mk = mask != nullptr ? mask[f] : T(1);
#pragma unroll
  for (int r = 0; r < kRM; ++r) {
    const int64_t gm = m0 + rm0 + r;
    if (gm >= M) continue;
#pragma unroll
    for (int c = 0; c < kRN; ++c) {
      const int64_t gn = n0 + rn0 + c;
      if (gn >= N) continue;
      V v;
      v.x = accr[r][c] * mk;
      v.y = acci[r][c] * mk;
      out[(gm * N + gn) * F + f] = v;
    }
  }
}

template <typename T, bool kConjA, bool kConjB>
void cgemm_freq(const at::Tensor& A, int64_t sAm, int64_t sAk, const at::Tensor& Bt, int64_t sBk, int64_t sBn,
                const at::Tensor& mask, at::Tensor& out, int64_t M, int64_t N, int64_t K, int64_t F) {
  if (out.numel() == 0) return;
  if (K == 0) {
    out.zero_();
    return;
  }
  const int64_t gy = (M + kTM - 1) / kTM, gz = (N + kTN - 1) / kTN;
  TORCH_CHECK(gy <= 65535 && gz <= 65535, "spectral_conv: too many rows or columns for one launch (", M, ", ", N, ")");
  const dim3 grid(static_cast<unsigned>((F + kFT - 1) / kFT), static_cast<unsigned>(gy), static_cast<unsigned>(gz));
  const dim3 block(kFT, kTY);
  cgemm_freq_kernel<T, kConjA, kConjB><<<grid, block, 0, current_stream()>>>(
      vptr<T>(A), sAm, sAk, vptr<T>(Bt), sBk, sBn, rptr<T>(mask), vptr<T>(out), M, N, K, F);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// spectral_conv_host's GEMM on the GPU.
struct CudaFreqGemm {
  template <typename CA, typename CB>
  void operator()(CA, CB, const at::Tensor& A, int64_t sAm, int64_t sAk, const at::Tensor& Bt, int64_t sBk, int64_t sBn,
                  const at::Tensor& mask, at::Tensor& out, int64_t M, int64_t N, int64_t K, int64_t F) const {
    dispatch_complex(A.scalar_type(), "spectral_conv", [&](auto tag) {
      cgemm_freq<decltype(tag), CA::value, CB::value>(A, sAm, sAk, Bt, sBk, sBn, mask, out, M, N, K, F);
    });
  }
};

at::Tensor spectral_conv_cuda(const at::Tensor& xf, const at::Tensor& w, const c10::optional<at::Tensor>& mask) {
  const c10::cuda::CUDAGuard guard(xf.device());
  return spectral_conv_host(xf, w, mask, CudaFreqGemm{});
}

std::tuple<at::Tensor, at::Tensor> spectral_conv_backward_cuda(const at::Tensor& grad, const at::Tensor& xf,
                                                               const at::Tensor& w,
                                                               const c10::optional<at::Tensor>& mask, bool need_xf,
                                                               bool need_w) {
  const c10::cuda::CUDAGuard guard(xf.device());
  return spectral_conv_backward_host(grad, xf, w, mask, need_xf, need_w, CudaFreqGemm{});
}

// ---------------------------------------------------------------------------------- fam_half_weight
// P planes of (H, W) -> (H, K = W/2+1) and back; both gathers, one thread per output element.
template <typename T>
__global__ void half_weight_forward_kernel(const typename Vec2<T>::type* __restrict__ w,
                                           typename Vec2<T>::type* __restrict__ out, int64_t total, int64_t H,
                                           int64_t W, int64_t rh, int64_t rw) {
  using V = typename Vec2<T>::type;
  const int64_t K = W / 2 + 1;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t k = idx % K, m = (idx / K) % H, pl = idx / (K * H);
    const int64_t nm = mirror(m, H), nk = mirror(k, W);
    const T a = fam_keep(m, k, H, W, rh, rw) ? T(0.5) : T(0);
    const T b = fam_keep(nm, nk, H, W, rh, rw) ? T(0.5) : T(0);
    const V p = w[(pl * H + m) * W + k];
    const V q = w[(pl * H + nm) * W + nk];
    V r;
    r.x = a * p.x + b * q.x;
    r.y = a * p.y - b * q.y;
    out[idx] = r;
  }
}

template <typename T>
__global__ void half_weight_backward_kernel(const typename Vec2<T>::type* __restrict__ g,
                                            typename Vec2<T>::type* __restrict__ out, int64_t total, int64_t H,
                                            int64_t W, int64_t rh, int64_t rw) {
  using V = typename Vec2<T>::type;
  const int64_t K = W / 2 + 1;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t q = idx % W, p = (idx / W) % H, pl = idx / (W * H);
    V r;
    r.x = r.y = T(0);
    if (fam_keep(p, q, H, W, rh, rw)) {
      if (q < K) {
        const V a = g[(pl * H + p) * K + q];
        r.x += a.x;
        r.y += a.y;
      }
      const int64_t nq = mirror(q, W);
      if (nq < K) {
        const V b = g[(pl * H + mirror(p, H)) * K + nq];
        r.x += b.x;
        r.y -= b.y;
      }
    }
    r.x *= T(0.5);
    r.y *= T(0.5);
    out[idx] = r;
  }
}

at::Tensor fam_half_weight_cuda(const at::Tensor& w_in, double cuton) {
  check_half_weight(w_in, cuton);
  const c10::cuda::CUDAGuard guard(w_in.device());
  const at::Tensor w = resolved(w_in).contiguous();
  const int64_t H = w.size(-2), W = w.size(-1), K = W / 2 + 1;
  std::vector<int64_t> shape(w.sizes().begin(), w.sizes().end());
  shape.back() = K;
  at::Tensor out = at::empty(shape, w.options());
  const int64_t total = out.numel();
  if (total == 0) return out;
  const int threads = 256;
  const int64_t blocks = capped_grid(ceil_div(total, threads), 32);
  dispatch_complex(w.scalar_type(), "fam_half_weight", [&](auto tag) {
    using T = decltype(tag);
    half_weight_forward_kernel<T><<<blocks, threads, 0, current_stream()>>>(vptr<T>(w), vptr<T>(out), total, H, W,
                                                                            fam_radius(H, cuton), fam_radius(W, cuton));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor fam_half_weight_backward_cuda(const at::Tensor& g_in, double cuton, int64_t width) {
  check_half_weight_grad(g_in, cuton, width);
  const c10::cuda::CUDAGuard guard(g_in.device());
  const at::Tensor g = resolved(g_in).contiguous();
  const int64_t H = g.size(-2), W = width;
  std::vector<int64_t> shape(g.sizes().begin(), g.sizes().end());
  shape.back() = W;
  at::Tensor out = at::empty(shape, g.options());
  const int64_t total = out.numel();
  if (total == 0) return out;
  const int threads = 256;
  const int64_t blocks = capped_grid(ceil_div(total, threads), 32);
  dispatch_complex(g.scalar_type(), "fam_half_weight_backward", [&](auto tag) {
    using T = decltype(tag);
    half_weight_backward_kernel<T><<<blocks, threads, 0, current_stream()>>>(
        vptr<T>(g), vptr<T>(out), total, H, W, fam_radius(H, cuton), fam_radius(W, cuton));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace dctkd

TORCH_LIBRARY_IMPL(dctkd_ext, CUDA, m) {
  m.impl("fam_half_weight", &dctkd::cuda::fam_half_weight_cuda);
  m.impl("fam_half_weight_backward", &dctkd::cuda::fam_half_weight_backward_cuda);
  m.impl("global_filter", &dctkd::cuda::global_filter_cuda);
  m.impl("global_filter_backward", &dctkd::cuda::global_filter_backward_cuda);
  m.impl("spectral_conv", &dctkd::cuda::spectral_conv_cuda);
  m.impl("spectral_conv_backward", &dctkd::cuda::spectral_conv_backward_cuda);
}
