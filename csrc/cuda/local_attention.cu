// CUDA kernels of local_attention: FAM-KD's per-channel self-attention over K x K windows with zero-padded
// keys and values,
//   logit[b,c,p,j] = q[b,c,p] * (k[b,c,p+j-pad] + rel[c,j]),  out[b,c,p] = sum_j softmax_j(logit) v[b,c,p+j-pad],
// forward and backward. One thread per output element; a block (256 threads = 8 warps) owns a tile of one
// sample whose lanes walk the layout's contiguous dimension: NCHW, 1 channel x 256 pixels; channels_last,
// 32 channels (lanes) x 8 pixels (warps). q, k, v, grad are read in place through their strides (any
// layout); outputs are NCHW-contiguous or channels_last after q (csrc/local_attention_common.h).
//
//  - forward: online softmax over the K*K offsets (running max and sum), exponentials base 2 on
//    q * log2(e); accumulation in float (double for double).
//  - backward, kernel 1 (per pixel): the softmax again, o, then a second pass with
//    a_j = exp2(logit2_j - lse2), dlogit_j = a_j g (v_j - o): dq directly; drel reduced per block and
//    offset (warp shuffles, then the 8 warps in a fixed order) into one partial row per block
//    (rows summed afterwards: deterministic, no atomics); writes lse2 and g * o per pixel.
//  - backward, kernel 2 (gather): dk, dv of a target pixel p' from the pixels p = p' - j + pad that see
//    it, with a_j(p) recomputed from lse2(p): dv = sum a g, dk = sum a q (g v(p') - go(p)).
// Launched on the current stream, no host syncs; allocations (outputs, statistics, partials) sized from
// the shapes only.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>
#include <type_traits>

#include "../local_attention_common.h"
#include "common.cuh"

namespace dctkd {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// channels_last tiles of the per-pixel backward: 8 passes of 8 pixels share one drel partial row.
constexpr int kClIters = 8;

struct Strides {
  int64_t b, c, h, w;
};

Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

// Everything a kernel indexes by. Pointers of tensors a launch does not use may be null.
template <typename T, typename Acc>
struct LaParams {
  const T* q;
  const T* k;
  const T* v;
  const T* g;
  const Acc* rel;  // (C, K*K) contiguous, in Acc
  T* out;          // out (forward) or dq
  T* dk;
  T* dv;
  Acc* lse;   // lse2 per pixel (strides so)
  Acc* go;    // g * o per pixel (strides so)
  Acc* part;  // drel partials: (B * p_tiles, C, K*K)
  Strides sq, sk, sv, sg, so;
  int64_t C, H, W, K;
  int64_t c_tiles, p_tiles;  // per sample
};

__device__ __forceinline__ float exp2_acc(float x) { return exp2f(x); }
__device__ __forceinline__ double exp2_acc(double x) { return exp2(x); }
__device__ __forceinline__ float log2_acc(float x) { return log2f(x); }
__device__ __forceinline__ double log2_acc(double x) { return log2(x); }

template <typename Acc>
__device__ __forceinline__ Acc warp_sum(Acc v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The element of thread t in pass `it` of block tile `tile`: (b, c, y, x) and whether it exists.
template <bool kCL>
struct Element {
  int64_t b, c, y, x, row;
  bool active;
  template <typename P>
  __device__ __forceinline__ Element(const P& p, int64_t tile, int it, int iters) {
    const int t = threadIdx.x, lane = t % 32, warp = t / 32;
    const int64_t per_b = p.c_tiles * p.p_tiles;
    b = tile / per_b;
    const int64_t r = tile - b * per_b;
    int64_t ct, pt, pix;
    if (kCL) {  // channel tiles fastest: consecutive blocks share pixels
      pt = r / p.c_tiles;
      ct = r - pt * p.c_tiles;
      c = ct * 32 + lane;
      pix = (pt * iters + it) * kWarps + warp;
    } else {
      ct = r / p.p_tiles;
      pt = r - ct * p.p_tiles;
      c = ct;
      pix = (pt * iters + it) * kThreads + t;
    }
    row = b * p.p_tiles + pt;
    active = c < p.C && pix < p.H * p.W;
    y = active ? pix / p.W : 0;
    x = active ? pix - y * p.W : 0;
  }
};

__device__ __forceinline__ int64_t offset_of(const Strides& s, int64_t b, int64_t c, int64_t y, int64_t x) {
  return b * s.b + c * s.c + y * s.h + x * s.w;
}

// Online softmax over the window of (b, c, y, x): running max m2 and sum l of exp2(logit2_j - m2), and
// acc = sum_j exp2(logit2_j - m2) v_j, for logit2_j = s (k_j + rel_j), s = q log2(e).
template <typename T, typename Acc>
__device__ __forceinline__ void softmax_stats(const LaParams<T, Acc>& p, int64_t b, int64_t c, int64_t y, int64_t x,
                                              Acc s, Acc& m2, Acc& l, Acc& acc) {
  const int64_t K = p.K, pad = K / 2;
  const Acc* rel = p.rel + c * K * K;
  const T* kb = p.k + b * p.sk.b + c * p.sk.c;
  const T* vb = p.v + b * p.sv.b + c * p.sv.c;
  bool first = true;
  for (int64_t a = 0; a < K; ++a) {
    const int64_t ny = y + a - pad;
    const bool in_y = ny >= 0 && ny < p.H;
    for (int64_t bb = 0; bb < K; ++bb) {
      const int64_t nx = x + bb - pad;
      Acc kj = Acc(0), vj = Acc(0);
      if (in_y && nx >= 0 && nx < p.W) {
        kj = static_cast<Acc>(kb[ny * p.sk.h + nx * p.sk.w]);
        vj = static_cast<Acc>(vb[ny * p.sv.h + nx * p.sv.w]);
      }
      const Acc t = s * (kj + rel[a * K + bb]);
      if (first) {
        m2 = t;
        l = Acc(1);
        acc = vj;
        first = false;
      } else {
        const Acc m_new = t > m2 ? t : m2;
        const Acc alpha = exp2_acc(m2 - m_new), e = exp2_acc(t - m_new);
        l = l * alpha + e;
        acc = acc * alpha + e * vj;
        m2 = m_new;
      }
    }
  }
}

constexpr double kLog2e = 1.4426950408889634;

template <typename T, typename Acc, bool kCL>
__global__ void __launch_bounds__(kThreads) la_forward_kernel(const LaParams<T, Acc> p) {
  const Element<kCL> e(p, blockIdx.x, 0, 1);
  if (!e.active) return;
  const Acc q = static_cast<Acc>(p.q[offset_of(p.sq, e.b, e.c, e.y, e.x)]);
  Acc m2, l, acc;
  softmax_stats(p, e.b, e.c, e.y, e.x, q * Acc(kLog2e), m2, l, acc);
  p.out[offset_of(p.so, e.b, e.c, e.y, e.x)] = static_cast<T>(div_rn(acc, l));
}

// Per-pixel backward over `iters` passes of the block's tile: dq (kNeedQ), lse2 and g*o (kNeedStats),
// the block's drel partial row (kNeedRel: every thread takes part in the reductions, active or not).
template <typename T, typename Acc, bool kCL, bool kNeedQ, bool kNeedRel, bool kNeedStats>
__global__ void __launch_bounds__(kThreads) la_backward_pixel_kernel(const LaParams<T, Acc> p, int iters) {
  __shared__ Acc red[2][kThreads];
  const int t = threadIdx.x, lane = t % 32, warp = t / 32;
  const int64_t K = p.K, KK = K * K, pad = K / 2;
  // the entries of the block's partial row this thread writes: (channel cc, all offsets)
  const Element<kCL> e0(p, blockIdx.x, 0, iters);
  const bool writer = warp == 0 && (kCL ? e0.c < p.C : lane == 0);
  Acc* const part_row = kNeedRel && writer ? p.part + (e0.row * p.C + e0.c) * KK : nullptr;
  int par = 0;
  for (int it = 0; it < iters; ++it) {
    const Element<kCL> e(p, blockIdx.x, it, iters);
    Acc q = Acc(0), g = Acc(0), o = Acc(0), lse2 = Acc(0);
    if (e.active) {
      q = static_cast<Acc>(p.q[offset_of(p.sq, e.b, e.c, e.y, e.x)]);
      g = static_cast<Acc>(p.g[offset_of(p.sg, e.b, e.c, e.y, e.x)]);
      Acc m2, l, acc;
      softmax_stats(p, e.b, e.c, e.y, e.x, q * Acc(kLog2e), m2, l, acc);
      o = div_rn(acc, l);
      lse2 = m2 + log2_acc(l);
      if (kNeedStats) {
        const int64_t off = offset_of(p.so, e.b, e.c, e.y, e.x);
        p.lse[off] = lse2;
        p.go[off] = g * o;
      }
    }
    if (!kNeedQ && !kNeedRel) continue;
    const Acc s = q * Acc(kLog2e);
    const int64_t c = e.active ? e.c : 0;
    const Acc* rel = p.rel + c * KK;
    const T* kb = p.k + e.b * p.sk.b + c * p.sk.c;
    const T* vb = p.v + e.b * p.sv.b + c * p.sv.c;
    Acc dq = Acc(0);
    for (int64_t a = 0; a < K; ++a) {
      const int64_t ny = e.y + a - pad;
      const bool in_y = ny >= 0 && ny < p.H;
      for (int64_t bb = 0; bb < K; ++bb) {
        const int64_t nx = e.x + bb - pad;
        Acc d = Acc(0);
        if (e.active) {
          Acc kj = Acc(0), vj = Acc(0);
          if (in_y && nx >= 0 && nx < p.W) {
            kj = static_cast<Acc>(kb[ny * p.sk.h + nx * p.sk.w]);
            vj = static_cast<Acc>(vb[ny * p.sv.h + nx * p.sv.w]);
          }
          const Acc kr = kj + rel[a * K + bb];
          const Acc dl = exp2_acc(s * kr - lse2) * g * (vj - o);
          if (kNeedQ) dq += dl * kr;
          d = dl * q;
        }
        if (kNeedRel) {
          // sum of d over the tile's pixels: lanes (NCHW), then the 8 warps in order
          if (!kCL) d = warp_sum(d);
          red[par][t] = d;
          __syncthreads();
          if (writer) {
            Acc sum = Acc(0);
            for (int w = 0; w < kWarps; ++w) sum += red[par][w * 32 + (kCL ? lane : 0)];
            Acc* dst = part_row + a * K + bb;
            *dst = it == 0 ? sum : *dst + sum;  // this block's own entry: no other writer
          }
          par ^= 1;  // double buffer: one barrier per offset
        }
      }
    }
    if (kNeedQ && e.active) p.out[offset_of(p.so, e.b, e.c, e.y, e.x)] = static_cast<T>(dq);
  }
}

template <typename T, typename Acc, bool kCL, bool kNeedK, bool kNeedV>
__global__ void __launch_bounds__(kThreads) la_backward_gather_kernel(const LaParams<T, Acc> p) {
  const Element<kCL> e(p, blockIdx.x, 0, 1);
  if (!e.active) return;
  const int64_t K = p.K, pad = K / 2;
  const Acc kt = static_cast<Acc>(p.k[offset_of(p.sk, e.b, e.c, e.y, e.x)]);
  const Acc vt = static_cast<Acc>(p.v[offset_of(p.sv, e.b, e.c, e.y, e.x)]);
  const Acc* rel = p.rel + e.c * K * K;
  const T* qb = p.q + e.b * p.sq.b + e.c * p.sq.c;
  const T* gb = p.g + e.b * p.sg.b + e.c * p.sg.c;
  const int64_t ob = e.b * p.so.b + e.c * p.so.c;
  Acc dk = Acc(0), dv = Acc(0);
  for (int64_t a = 0; a < K; ++a) {
    const int64_t ny = e.y - (a - pad);
    if (ny < 0 || ny >= p.H) continue;
    for (int64_t bb = 0; bb < K; ++bb) {
      const int64_t nx = e.x - (bb - pad);
      if (nx < 0 || nx >= p.W) continue;
      const Acc qn = static_cast<Acc>(qb[ny * p.sq.h + nx * p.sq.w]);
      const Acc gn = static_cast<Acc>(gb[ny * p.sg.h + nx * p.sg.w]);
      const int64_t sn = ob + ny * p.so.h + nx * p.so.w;
      const Acc an = exp2_acc(qn * Acc(kLog2e) * (kt + rel[a * K + bb]) - p.lse[sn]);
      if (kNeedV) dv += an * gn;
      if (kNeedK) dk += an * qn * (gn * vt - p.go[sn]);
    }
  }
  const int64_t off = offset_of(p.so, e.b, e.c, e.y, e.x);
  if (kNeedK) p.dk[off] = static_cast<T>(dk);
  if (kNeedV) p.dv[off] = static_cast<T>(dv);
}

// ------------------------------------------------------------------------------------------------ host
cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

template <typename T, typename Acc>
LaParams<T, Acc> make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& rel,
                             int64_t K, bool cl, int iters) {
  LaParams<T, Acc> p{};
  p.q = q.const_data_ptr<T>();
  p.k = k.const_data_ptr<T>();
  p.v = v.const_data_ptr<T>();
  p.rel = rel.const_data_ptr<Acc>();
  p.sq = strides_of(q);
  p.sk = strides_of(k);
  p.sv = strides_of(v);
  p.C = q.size(1);
  p.H = q.size(2);
  p.W = q.size(3);
  p.K = K;
  const int64_t px = (cl ? kWarps : kThreads) * int64_t(iters);
  p.c_tiles = cl ? ceil_div(p.C, 32) : p.C;
  p.p_tiles = ceil_div(p.H * p.W, px);
  return p;
}

int64_t blocks_of(const at::Tensor& q, int64_t c_tiles, int64_t p_tiles) {
  const int64_t blocks = q.size(0) * c_tiles * p_tiles;
  TORCH_CHECK(blocks <= INT32_MAX, "local_attention: too many tiles for one launch (", blocks, ")");
  return blocks;
}

// f(std::true_type) or f(std::false_type): a runtime flag as a template argument.
template <typename F>
void dispatch_bool(bool flag, F&& f) {
  if (flag) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

at::Tensor local_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& rel,
                                int64_t kernel_size) {
  local_attention::check_inputs(q, k, v, rel, kernel_size);
  TORCH_CHECK(q.is_cuda(), "q: expected a CUDA tensor, got one on ", q.device());
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = local_attention::new_feature(q);
  if (out.numel() == 0) return out;
  const bool cl = reads_channels_last(q);
  const at::Tensor rel_acc = rel.to(q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "local_attention_cuda", [&] {
    using Acc = at::opmath_type<scalar_t>;
    auto p = make_params<scalar_t, Acc>(q, k, v, rel_acc, kernel_size, cl, 1);
    p.out = out.data_ptr<scalar_t>();
    p.so = strides_of(out);
    const int64_t blocks = blocks_of(q, p.c_tiles, p.p_tiles);
    dispatch_bool(cl, [&](auto kcl) {
      constexpr auto kernel = la_forward_kernel<scalar_t, Acc, decltype(kcl)::value>;
      kernel<<<static_cast<unsigned>(blocks), kThreads, 0, current_stream()>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

template <bool kCL, typename T, typename Acc>
void launch_pixel(const LaParams<T, Acc>& p, int64_t blocks, int iters, bool need_q, bool need_rel, bool need_stats) {
  dispatch_bool(need_q, [&](auto nq) {
    dispatch_bool(need_rel, [&](auto nr) {
      dispatch_bool(need_stats, [&](auto ns) {
        constexpr auto kernel =
            la_backward_pixel_kernel<T, Acc, kCL, decltype(nq)::value, decltype(nr)::value, decltype(ns)::value>;
        kernel<<<static_cast<unsigned>(blocks), kThreads, 0, current_stream()>>>(p, iters);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
}

template <bool kCL, typename T, typename Acc>
void launch_gather(const LaParams<T, Acc>& p, int64_t blocks, bool need_k, bool need_v) {
  dispatch_bool(need_k, [&](auto nk) {
    dispatch_bool(need_v, [&](auto nv) {
      constexpr auto kernel = la_backward_gather_kernel<T, Acc, kCL, decltype(nk)::value, decltype(nv)::value>;
      kernel<<<static_cast<unsigned>(blocks), kThreads, 0, current_stream()>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> local_attention_backward_cuda(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& rel,
    int64_t kernel_size, bool need_q, bool need_k, bool need_v, bool need_rel) {
  local_attention::check_inputs(q, k, v, rel, kernel_size);
  local_attention::check_grad(grad, q);
  TORCH_CHECK(q.is_cuda(), "q: expected a CUDA tensor, got one on ", q.device());
  const c10::cuda::CUDAGuard guard(q.device());
  const at::ScalarType acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor dq = need_q ? local_attention::new_feature(q) : at::empty({0}, q.options());
  at::Tensor dk = need_k ? local_attention::new_feature(q) : at::empty({0}, q.options());
  at::Tensor dv = need_v ? local_attention::new_feature(q) : at::empty({0}, q.options());
  const bool need_stats = need_k || need_v;
  const bool cl = reads_channels_last(q);
  const int iters = cl ? kClIters : 1;
  const int64_t B = q.size(0), C = q.size(1), HW = q.size(2) * q.size(3), KK = kernel_size * kernel_size;
  const int64_t p_tiles = ceil_div(HW, (cl ? kWarps : kThreads) * int64_t(iters));
  at::Tensor part = at::empty({need_rel ? B * p_tiles : 0, C, KK}, q.options().dtype(acc));
  at::Tensor lse = need_stats ? local_attention::new_feature(q, acc) : at::Tensor();
  at::Tensor go = need_stats ? local_attention::new_feature(q, acc) : at::Tensor();
  if (q.numel() > 0 && (need_q || need_rel || need_stats)) {
    const at::Tensor rel_acc = rel.to(acc).contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "local_attention_backward_cuda", [&] {
      using Acc = at::opmath_type<scalar_t>;
      dispatch_bool(cl, [&](auto kcl) {
        constexpr bool kCL = decltype(kcl)::value;
        auto p = make_params<scalar_t, Acc>(q, k, v, rel_acc, kernel_size, cl, iters);
        p.g = grad.const_data_ptr<scalar_t>();
        p.sg = strides_of(grad);
        p.out = need_q ? dq.data_ptr<scalar_t>() : nullptr;
        p.so = strides_of(need_q ? dq : (need_stats ? lse : q));
        if (need_stats) {
          p.lse = lse.data_ptr<Acc>();
          p.go = go.data_ptr<Acc>();
        }
        p.part = need_rel ? part.data_ptr<Acc>() : nullptr;
        launch_pixel<kCL>(p, blocks_of(q, p.c_tiles, p.p_tiles), iters, need_q, need_rel, need_stats);
        if (need_stats) {
          // one pixel per thread: the forward's tiles
          auto pg = make_params<scalar_t, Acc>(q, k, v, rel_acc, kernel_size, cl, 1);
          pg.g = p.g;
          pg.sg = p.sg;
          pg.lse = p.lse;
          pg.go = p.go;
          pg.so = p.so;
          pg.dk = need_k ? dk.data_ptr<scalar_t>() : nullptr;
          pg.dv = need_v ? dv.data_ptr<scalar_t>() : nullptr;
          launch_gather<kCL>(pg, blocks_of(q, pg.c_tiles, pg.p_tiles), need_k, need_v);
        }
      });
    });
  }
  // the blocks' partial rows in a fixed order (B = 0 or an empty map: zeros)
  at::Tensor drel = need_rel ? part.sum(0).to(rel.scalar_type()) : at::empty({0}, rel.options());
  return {dq, dk, dv, drel};
}

}  // namespace
}  // namespace cuda
}  // namespace dctkd

TORCH_LIBRARY_IMPL(dctkd_ext, CUDA, m) {
  m.impl("local_attention", &dctkd::cuda::local_attention_cuda);
  m.impl("local_attention_backward", &dctkd::cuda::local_attention_backward_cuda);
}
