// CUDA kernels of the multi-level DCT-KD loss (docs/DESIGN.md §3.3), the same math as csrc/cpu/dct_at_loss.cpp.
//
// Forward, three launches for any number of levels (up to 16 per launch):
//  1. map_kernel (attention_map.cu): one launch reduces S and T of all levels to fp32 maps
//     (reads every feature once: all of the forward's bytes).
//  2. phi_kernel: one block per (level, sample) runs phi on the T and S maps in shared memory, the
//     distance, and by reverse mode dL/dA_S * w_l; writes w_l * dist_l[b] and the (H, W) map
//     gradient. Bytes: 3 * 4 * H * W per block (read 2 maps, write 1); the work is 6 (dct) or 12
//     (fft_real) small matmuls of H W (H + W) FMAs in shared memory.
//  3. sum_levels_kernel: loss[b] = sum_l w_l dist_l[b] in level order (deterministic, no atomics).
//     Skipped for one level, where phi writes the loss directly.
// Backward, one launch: map_kernel's backward, dS = g[b] * dL/dA[b,hw] * (p/C) |S|^(p-1) sign(S)
// for all levels (reads S and the small map gradient, writes dS).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <string>
#include <tuple>
#include <vector>

#include "../dct_at_args.h"
#include "attention_map.cuh"
#include "common.cuh"
#include "small_mm.cuh"

namespace dctkd {
namespace cuda {
namespace {

constexpr int kPhiThreads = 512;
constexpr int kPhiWarps = kPhiThreads / 32;
constexpr int kMaxLevels = 16;
constexpr int kMaxSide = 1024;  // largest H or W phi takes (its per-block memory grows as H^2 + W^2 + 5 H W)

// ----------------------------------------------------------------------------------- parameters
template <typename T>
struct PhiLevel {
  const T* as;  // student map (B, H, W)
  const T* at;  // teacher map (B, H, W)
  T* gmap;      // out: w_l * d dist_l / d A_S, (B, H, W)
  T weight;
  int H, W;
  int block_begin;  // first block of this level
};

// Largest global scratch of one phi launch when a map does not fit in shared memory (a macro so
// that the CPU emulation can test several waves with small maps).
#ifndef DCTKD_PHI_SCRATCH_BYTES
#define DCTKD_PHI_SCRATCH_BYTES (int64_t(1) << 30)
#endif
constexpr int64_t kPhiScratchBytes = DCTKD_PHI_SCRATCH_BYTES;

template <typename T>
struct PhiParams {
  PhiLevel<T> lv[kMaxLevels];
  int nlev;
  int B;
  T* wdist;  // out: (nlev, B) w_l * dist_l[b]
  unsigned char* scratch;  // per-block memory when it does not fit in shared memory
  int64_t scratch_stride;
  int block_offset;  // job of block 0: the global-scratch path runs the jobs in waves (bounded scratch)
  int map_norm, transform, coef_norm, distance, center, coef_abs;
  T eps;
};

// Per-block memory of phi for one level: fp64 tables, then in acc type four bases (L_H as
// H x Hp twice, L_W as W x Wp twice: forward and backward for dct, cos and sin for fft_real), the
// buffers B0 (teacher, then the gradient), B1 (student coefficients), B3 (student map) and the
// transposed intermediates P1, P2. Offsets are multiples of 4 elements (16-byte loads).
struct PhiLayout {
  int64_t tab_bytes, lh1, lh2, lw1, lw2, b0, b1, b3, p1, p2, bytes;
};

__host__ __device__ inline PhiLayout phi_layout(int64_t H, int64_t W, int transform, int64_t tsize) {
  PhiLayout L{};
  const bool bases = transform != static_cast<int>(Transform::Identity);
  const bool fft = transform == static_cast<int>(Transform::FftReal);
  const int64_t ntab = bases ? (fft ? 2 * H + 2 * W : 4 * H + 4 * W) : 0;
  L.tab_bytes = (ntab * 8 + 15) / 16 * 16;
  const int64_t n4 = round_up4(H * W), hh = H * round_up4(H), ww = W * round_up4(W);
  int64_t o = 0;
  if (bases) {
    L.lh1 = o;
    o += hh;
    L.lh2 = o;
    o += hh;
    L.lw1 = o;
    o += ww;
    L.lw2 = o;
    o += ww;
  }
  L.b0 = o;
  o += n4;
  L.b1 = o;
  o += n4;
  L.b3 = o;
  o += n4;
  const int64_t np = round_up4(W * odd_ld(H));  // a transposed intermediate
  if (bases) {
    L.p1 = o;
    o += np;
  }
  if (fft) {
    L.p2 = o;
    o += np;
  }
  L.bytes = L.tab_bytes + o * tsize;
  return L;
}

// ------------------------------------------------------------------------- block reductions
// Fixed-order trees (lane 0 of a xor butterfly, then warp 0 over the warps): bitwise reproducible.
template <typename T>
struct RedScratch {
  T s[2][kPhiWarps];
  T s_out[2];
  T lo[kPhiWarps], hi[kPhiWarps];
  int ilo[kPhiWarps], ihi[kPhiWarps];
  T lo_out, hi_out;
  int ilo_out, ihi_out;
};

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// a, b <- their sums over the block (every thread gets lane 0's result).
template <typename T>
__device__ void block_sum2(T& a, T& b, RedScratch<T>& rs) {
  const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
  a = warp_sum(a);
  b = warp_sum(b);
  if (lane == 0) {
    rs.s[0][w] = a;
    rs.s[1][w] = b;
  }
  __syncthreads();
  if (w == 0) {
    a = lane < kPhiWarps ? rs.s[0][lane] : T(0);
    b = lane < kPhiWarps ? rs.s[1][lane] : T(0);
    a = warp_sum(a);
    b = warp_sum(b);
    if (lane == 0) {
      rs.s_out[0] = a;
      rs.s_out[1] = b;
    }
  }
  __syncthreads();
  a = rs.s_out[0];
  b = rs.s_out[1];
}

// Min and max with their FIRST index (as torch.min/max(dim)); index -1 marks "no element".
template <typename T>
struct MinMax {
  T lo, hi;
  int ilo, ihi;
};

template <typename T>
__device__ __forceinline__ void minmax_merge(MinMax<T>& a, T lo, int ilo, T hi, int ihi) {
  if (ilo >= 0 && (a.ilo < 0 || lo < a.lo || (lo == a.lo && ilo < a.ilo))) {
    a.lo = lo;
    a.ilo = ilo;
  }
  if (ihi >= 0 && (a.ihi < 0 || hi > a.hi || (hi == a.hi && ihi < a.ihi))) {
    a.hi = hi;
    a.ihi = ihi;
  }
}

template <typename T>
__device__ __forceinline__ void warp_minmax(MinMax<T>& m) {
  for (int o = 16; o > 0; o >>= 1) {
    const T lo = __shfl_xor_sync(0xffffffffu, m.lo, o);
    const T hi = __shfl_xor_sync(0xffffffffu, m.hi, o);
    const int ilo = __shfl_xor_sync(0xffffffffu, m.ilo, o);
    const int ihi = __shfl_xor_sync(0xffffffffu, m.ihi, o);
    minmax_merge(m, lo, ilo, hi, ihi);
  }
}

template <typename T>
__device__ void block_minmax(MinMax<T>& m, RedScratch<T>& rs) {
  const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
  warp_minmax(m);
  if (lane == 0) {
    rs.lo[w] = m.lo;
    rs.hi[w] = m.hi;
    rs.ilo[w] = m.ilo;
    rs.ihi[w] = m.ihi;
  }
  __syncthreads();
  if (w == 0) {
    MinMax<T> r{T(0), T(0), -1, -1};
    if (lane < kPhiWarps) {
      r.lo = rs.lo[lane];
      r.hi = rs.hi[lane];
      r.ilo = rs.ilo[lane];
      r.ihi = rs.ihi[lane];
    }
    warp_minmax(r);
    if (lane == 0) {
      rs.lo_out = r.lo;
      rs.hi_out = r.hi;
      rs.ilo_out = r.ilo;
      rs.ihi_out = r.ihi;
    }
  }
  __syncthreads();
  m.lo = rs.lo_out;
  m.hi = rs.hi_out;
  m.ilo = rs.ilo_out;
  m.ihi = rs.ihi_out;
}

// ---------------------------------------------------------------------------- normalisations
// What a normalisation's backward needs from its forward (csrc/cpu NormState, plus lo).
template <typename T>
struct NormSt {
  T lo, denom, nrm;
  int imin, imax;
};

template <typename T>
__device__ __forceinline__ T in_val(T v, bool absf) {
  return absf ? fabs(v) : v;
}

template <typename T>
__device__ __forceinline__ T norm_apply(T v, int kind, const NormSt<T>& st) {
  if (kind == static_cast<int>(Norm::None)) return v;
  if (kind == static_cast<int>(Norm::L2)) return div_rn(v, st.denom);
  return div_rn(v - st.lo, st.denom);  // minmax, max
}

// Statistics of `kind` over in(i) = absf ? |buf[i]| : buf[i]. buf must be complete (barrier before).
template <typename T>
__device__ NormSt<T> norm_stats(const T* buf, int n, int kind, bool absf, T eps, RedScratch<T>& rs) {
  NormSt<T> st{T(0), T(1), T(0), 0, 0};
  if (kind == static_cast<int>(Norm::None)) return st;
  if (kind == static_cast<int>(Norm::L2)) {
    T ss = T(0), unused = T(0);
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      const T v = in_val(buf[i], absf);
      ss += v * v;
    }
    block_sum2(ss, unused, rs);
    st.nrm = sqrt_rn(ss);
    st.denom = st.nrm + eps;
    return st;
  }
  MinMax<T> m{T(0), T(0), -1, -1};
  for (int i = threadIdx.x; i < n; i += blockDim.x) {  // ascending i: strict compares keep the first index
    const T v = in_val(buf[i], absf);
    if (m.ilo < 0 || v < m.lo) {
      m.lo = v;
      m.ilo = i;
    }
    if (m.ihi < 0 || v > m.hi) {
      m.hi = v;
      m.ihi = i;
    }
  }
  block_minmax(m, rs);
  st.lo = m.lo;
  st.imin = m.ilo;
  st.imax = m.ihi;
  st.denom = kind == static_cast<int>(Norm::MinMax) ? (m.hi - m.lo) + eps : m.hi + eps;
  return st;
}

// G (in place): dL/d(in) from dL/d(out) for out = norm(in), in(i) = absf ? |inbuf[i]| : inbuf[i];
// out is recomputed from in and the saved statistics. Ends with a barrier unless kind is none.
template <typename T>
__device__ void norm_backward(T* G, const T* inbuf, int n, int kind, bool absf, const NormSt<T>& st,
                              RedScratch<T>& rs) {
  if (kind == static_cast<int>(Norm::None)) return;
  T sg = T(0), sgu = T(0);
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const T g = G[i];
    sg += g;
    sgu += g * norm_apply(in_val(inbuf[i], absf), kind, st);
  }
  block_sum2(sg, sgu, rs);
  const T d = st.denom;
  if (kind == static_cast<int>(Norm::L2)) {
    // d||a||/da = a / ||a||, taken as 0 at a == 0 (as torch.linalg.norm's backward does).
    const bool has = st.nrm > T(0);
    const T coef = has ? div_rn(-sgu, d * st.nrm) : T(0);
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      T v = div_rn(G[i], d);
      if (has) v += coef * in_val(inbuf[i], absf);
      G[i] = v;
    }
    __syncthreads();
    return;
  }
  for (int i = threadIdx.x; i < n; i += blockDim.x) G[i] = div_rn(G[i], d);
  __syncthreads();
  if (threadIdx.x == 0) {
    // u = (a - lo) / d: du_j/dlo = (u_j - 1)/d (minmax), -1/d (max); du_j/dhi = -u_j/d.
    G[st.imin] += kind == static_cast<int>(Norm::MinMax) ? div_rn(sgu - sg, d) : div_rn(-sg, d);
    G[st.imax] += div_rn(-sgu, d);
  }
  __syncthreads();
}

// ------------------------------------------------------------------------------------ transforms
struct Bases {
  const void* lh1;
  const void* lh2;
  const void* lw1;
  const void* lw2;
};

// X <- L_H X L_W^T in place (P1, P2 scratch), as two matmuls with transposed outputs:
// dct forward: D_H X D_W^T; dct backward: D_H^T X D_W; fft_real (either way, the matrices are
// symmetric): C_H X C_W - S_H X S_W. Starts and ends with a barrier.
template <typename T>
__device__ void transform_inplace(T* X, T* P1, T* P2, const T* lh1, const T* lh2, const T* lw1, const T* lw2, int H,
                                  int W, int tr, bool backward) {
  const int Hp = static_cast<int>(round_up4(H)), Wp = static_cast<int>(round_up4(W));
  const int Hq = static_cast<int>(odd_ld(H));
  __syncthreads();
  if (tr == static_cast<int>(Transform::Dct)) {
    const T* LH = backward ? lh2 : lh1;
    const T* LW = backward ? lw2 : lw1;
    mm_t<T, 0>(LH, nullptr, Hp, X, nullptr, W, P1, nullptr, Hq, H, W, H);  // P1 = (L_H X)^T
    __syncthreads();
    mm_t<T, 0>(LW, nullptr, Wp, P1, nullptr, Hq, X, nullptr, W, W, H, W);  // X = L_H X L_W^T
  } else {
    mm_t<T, 1>(lh1, lh2, Hp, X, nullptr, W, P1, P2, Hq, H, W, H);  // P1 = (C_H X)^T, P2 = (S_H X)^T
    __syncthreads();
    mm_t<T, 2>(lw1, lw2, Wp, P1, P2, Hq, X, nullptr, W, W, H, W);  // X = C_H X C_W - S_H X S_W
  }
  __syncthreads();
}

// phi forward of the map A into X (A == X allowed): normalise, centre, transform, exact zero DC
// (centred + transformed), then the coefficient statistics. With store_z, X ends as z = coef_norm(|C|);
// otherwise X keeps C (the student's, needed by the reverse mode).
template <typename T>
__device__ void phi_forward(const T* A, T* X, T* P1, T* P2, const T* lh1, const T* lh2, const T* lw1, const T* lw2,
                            int H, int W, const PhiParams<T>& P, bool store_z, NormSt<T>& s1, NormSt<T>& s2,
                            RedScratch<T>& rs) {
  const int n = H * W;
  s1 = norm_stats(A, n, P.map_norm, false, P.eps, rs);
  for (int i = threadIdx.x; i < n; i += blockDim.x) X[i] = norm_apply(A[i], P.map_norm, s1);
  if (P.center) {
    T sum = T(0), unused = T(0);
    for (int i = threadIdx.x; i < n; i += blockDim.x) sum += X[i];
    block_sum2(sum, unused, rs);
    const T mean = div_rn(sum, static_cast<T>(n));
    for (int i = threadIdx.x; i < n; i += blockDim.x) X[i] = X[i] - mean;
  }
  if (P.transform != static_cast<int>(Transform::Identity)) {
    transform_inplace(X, P1, P2, lh1, lh2, lw1, lw2, H, W, P.transform, false);
    // A centred map's DC coefficient is exactly 0 under both transforms: store the exact value.
    if (P.center && threadIdx.x == 0) X[0] = T(0);
  }
  __syncthreads();
  s2 = norm_stats(X, n, P.coef_norm, P.coef_abs != 0, P.eps, rs);
  if (store_z) {
    // own elements only: no barrier needed against the statistics' reads (they ended with one)
    for (int i = threadIdx.x; i < n; i += blockDim.x) X[i] = norm_apply(in_val(X[i], P.coef_abs != 0), P.coef_norm, s2);
  }
}

// One block per (level, sample): phi(T), phi(S), the distance and dL/dA_S * w_l.
template <typename T, bool kSmem>
__global__ void __launch_bounds__(kPhiThreads, 2) phi_kernel(const __grid_constant__ PhiParams<T> P) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ RedScratch<T> rs;
  int li = 0;
  const int job = static_cast<int>(blockIdx.x) + P.block_offset;  // (level, sample)
  while (li + 1 < P.nlev && job >= P.lv[li + 1].block_begin) ++li;
  const PhiLevel<T> L = P.lv[li];
  const int b = job - L.block_begin;
  const int H = L.H, W = L.W, n = H * W;
  T* wd = P.wdist + int64_t(li) * P.B + b;
  if (n == 0) {
    if (threadIdx.x == 0) *wd = L.weight * T(0);
    return;
  }
  unsigned char* base = kSmem ? smem : P.scratch + int64_t(blockIdx.x) * P.scratch_stride;
  const PhiLayout lay = phi_layout(H, W, P.transform, sizeof(T));
  T* tb = reinterpret_cast<T*>(base + lay.tab_bytes);
  T* lh1 = tb + lay.lh1;
  T* lh2 = tb + lay.lh2;
  T* lw1 = tb + lay.lw1;
  T* lw2 = tb + lay.lw2;
  T* B0 = tb + lay.b0;
  T* B1 = tb + lay.b1;
  T* B3 = tb + lay.b3;
  T* P1 = tb + lay.p1;
  T* P2 = tb + lay.p2;
  const int tr = P.transform;
  const int Hp = static_cast<int>(round_up4(H)), Wp = static_cast<int>(round_up4(W));
  // Centring followed by a transform: the DC coefficient is identically zero (csrc/cpu centred_dc).
  const bool centred_dc = P.center && tr != static_cast<int>(Transform::Identity);

  // 1. bases from fp64 tables, and the two maps
  if (tr == static_cast<int>(Transform::Dct)) {
    double* tab_h = reinterpret_cast<double*>(base);
    double* tab_w = tab_h + 4 * H;
    dct_table(tab_h, H);
    dct_table(tab_w, W);
    __syncthreads();
    fill_basis(lh1, H, Hp, kDctT, tab_h);  // forward:  L = D_H
    fill_basis(lh2, H, Hp, kDctN, tab_h);  // backward: L = D_H^T
    fill_basis(lw1, W, Wp, kDctT, tab_w);
    fill_basis(lw2, W, Wp, kDctN, tab_w);
  } else if (tr == static_cast<int>(Transform::FftReal)) {
    double* c_h = reinterpret_cast<double*>(base);
    double* s_h = c_h + H;
    double* c_w = s_h + H;
    double* s_w = c_w + W;
    dft_tables(c_h, s_h, H);
    dft_tables(c_w, s_w, W);
    __syncthreads();
    fill_basis(lh1, H, Hp, kTable, c_h);
    fill_basis(lh2, H, Hp, kTable, s_h);
    fill_basis(lw1, W, Wp, kTable, c_w);
    fill_basis(lw2, W, Wp, kTable, s_w);
  }
  const T* at = L.at + int64_t(b) * n;
  const T* as = L.as + int64_t(b) * n;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    B0[i] = at[i];
    B3[i] = as[i];
  }
  __syncthreads();

  // 2. teacher: z_T in place in B0; student: C_S in B1 from A_S in B3 (kept for the reverse mode)
  NormSt<T> t1, t2, s1, s2;
  phi_forward(B0, B0, P1, P2, lh1, lh2, lw1, lw2, H, W, P, true, t1, t2, rs);
  phi_forward(B3, B1, P1, P2, lh1, lh2, lw1, lw2, H, W, P, false, s1, s2, rs);
  const bool cabs = P.coef_abs != 0;

  // 3. distance; B0 <- d dist / d z_S * w  (l2 at exactly zero distance: gradient 0)
  T ss = T(0), unused = T(0);
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const T diff = norm_apply(in_val(B1[i], cabs), P.coef_norm, s2) - B0[i];
    B0[i] = diff;
    ss += diff * diff;
  }
  block_sum2(ss, unused, rs);
  T d, gscale;
  if (P.distance == static_cast<int>(Distance::L2)) {
    d = sqrt_rn(ss);
    gscale = d > T(0) ? div_rn(L.weight, d) : T(0);
  } else if (P.distance == static_cast<int>(Distance::Mse)) {
    d = div_rn(ss, static_cast<T>(n));
    gscale = div_rn(L.weight * T(2), static_cast<T>(n));
  } else {
    d = ss;
    gscale = L.weight * T(2);
  }
  if (threadIdx.x == 0) *wd = L.weight * d;
  for (int i = threadIdx.x; i < n; i += blockDim.x) B0[i] *= gscale;

  // 4. reverse mode of phi(S): coef_norm, |.|, transform, centre, map_norm
  norm_backward(B0, B1, n, P.coef_norm, cabs, s2, rs);
  if (cabs) {  // d|c|/dc = sign(c), 0 at 0 (as torch.abs)
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      const T c = B1[i], g = B0[i];
      B0[i] = c > T(0) ? g : (c < T(0) ? -g : T(0));
    }
  }
  if (tr != static_cast<int>(Transform::Identity)) {
    // Centring's backward equals dropping the DC coefficient's gradient before the transform's
    // backward (the DC basis is the constant map): exact. Element 0 is thread 0's own.
    if (centred_dc && threadIdx.x == 0) B0[0] = T(0);
    transform_inplace(B0, P1, P2, lh1, lh2, lw1, lw2, H, W, tr, true);
  }
  if (P.center && !centred_dc) {
    T sum = T(0);
    for (int i = threadIdx.x; i < n; i += blockDim.x) sum += B0[i];
    block_sum2(sum, unused, rs);
    const T mean = div_rn(sum, static_cast<T>(n));
    for (int i = threadIdx.x; i < n; i += blockDim.x) B0[i] -= mean;
  }
  norm_backward(B0, B3, n, P.map_norm, false, s1, rs);
  __syncthreads();
  T* gout = L.gmap + int64_t(b) * n;
  for (int i = threadIdx.x; i < n; i += blockDim.x) gout[i] = B0[i];
}

// loss[b] = sum_l wdist[l, b], in level order.
template <typename T>
__global__ void sum_levels_kernel(const T* __restrict__ wdist, T* __restrict__ loss, int L, int B) {
  const int b = blockIdx.x * blockDim.x + threadIdx.x;
  if (b >= B) return;
  T s = T(0);
  for (int l = 0; l < L; ++l) s += wdist[int64_t(l) * B + b];
  loss[b] = s;
}

// ----------------------------------------------------------------------------------- host side
// The checks shared with the CPU kernel (csrc/dct_at_args.h), plus: the tensors are on a CUDA device.
void check_levels_cuda(const at::TensorList& student, const at::TensorList& teacher, at::ArrayRef<double> weights) {
  check_levels(student, teacher, weights);
  TORCH_CHECK(student[0].device().is_cuda(), "student_feats[0]: expected a CUDA tensor, got one on ",
              student[0].device());
}

template <typename T>
void launch_phi(const std::vector<PhiLevel<T>>& levels, int B, T* wdist, const PhiParams<T>& opts,
                const at::TensorOptions& byte_opts, cudaStream_t stream) {
  const int64_t smem_optin = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin);
  for (size_t first = 0; first < levels.size(); first += kMaxLevels) {
    const size_t last = std::min(levels.size(), first + kMaxLevels);
    PhiParams<T> P = opts;
    int64_t blocks = 0, bytes = 0;
    int n = 0;
    for (size_t l = first; l < last; ++l) {
      P.lv[n] = levels[l];
      P.lv[n].block_begin = static_cast<int>(blocks);
      blocks += B;
      bytes = std::max(bytes, phi_layout(levels[l].H, levels[l].W, opts.transform, sizeof(T)).bytes);
      ++n;
    }
    TORCH_CHECK(blocks <= INT_MAX, "dctkd_ext CUDA: too many (level, sample) pairs in one call");
    P.nlev = n;
    P.B = B;
    P.wdist = wdist + int64_t(first) * B;
    const dim3 grid(static_cast<unsigned>(blocks));
    // Shared memory when the largest level fits (56 x 56 does, even in fp64, on Hopper); else a
    // per-block global scratch, whose size depends on the shapes only.
    // (+256: the static RedScratch as the compiler pads it)
    P.block_offset = 0;
    if (bytes + int64_t(sizeof(RedScratch<T>)) + 256 <= smem_optin) {
      P.scratch = nullptr;
      P.scratch_stride = 0;
      auto kernel = phi_kernel<T, true>;
      allow_dynamic_smem(kernel, bytes);
      kernel<<<grid, kPhiThreads, bytes, stream>>>(P);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      // Scratch for at most `wave` blocks (<= ~1 GiB, at least one block), the jobs in waves of
      // launches on one stream (each wave reuses it): B * L blocks of a 1024 x 1024 map would
      // otherwise take B * L * 36 MB (fp32).
      const int64_t stride = (bytes + 255) / 256 * 256;
      const int64_t wave = std::max<int64_t>(1, std::min<int64_t>(blocks, kPhiScratchBytes / stride));
      at::Tensor scratch = at::empty({wave * stride}, byte_opts);
      P.scratch = scratch.mutable_data_ptr<unsigned char>();
      P.scratch_stride = stride;
      for (int64_t first_block = 0; first_block < blocks; first_block += wave) {
        P.block_offset = static_cast<int>(first_block);
        const dim3 wgrid(static_cast<unsigned>(std::min(wave, blocks - first_block)));
        phi_kernel<T, false><<<wgrid, kPhiThreads, 0, stream>>>(P);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
  }
}

std::tuple<at::Tensor, std::vector<at::Tensor>> dct_at_loss_cuda(
    at::TensorList student, at::TensorList teacher, at::ArrayRef<double> weights, double p, std::string map_norm,
    bool center, std::string transform, bool coef_abs, std::string coef_norm, std::string distance, double eps) {
  check_levels_cuda(student, teacher, weights);
  const LossOptions o = parse_loss_options(p, map_norm, transform, coef_norm, distance, eps);

  const c10::cuda::CUDAGuard guard(student[0].device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const size_t L = student.size();
  bool acc_double = false;
  for (size_t l = 0; l < L; ++l)
    acc_double = acc_double || student[l].scalar_type() == at::kDouble || teacher[l].scalar_type() == at::kDouble;
  const at::ScalarType acc = acc_double ? at::kDouble : at::kFloat;
  const at::TensorOptions opts = student[0].options().dtype(acc);
  const int64_t B = student[0].size(0);
  TORCH_CHECK(B <= INT_MAX, "student_feats[0]: batch ", B, " is too large");
  for (size_t l = 0; l < L; ++l)
    TORCH_CHECK(student[l].size(2) <= kMaxSide && student[l].size(3) <= kMaxSide, "student_feats[", l, "]: maps of ",
                student[l].size(2), " x ", student[l].size(3),
                " are too large for the CUDA dct_at_loss kernel (at most ", kMaxSide, " per side; pool them first)");

  at::Tensor loss = at::empty({B}, opts);
  std::vector<at::Tensor> grad_maps;
  grad_maps.reserve(L);
  for (size_t l = 0; l < L; ++l) grad_maps.push_back(at::empty({B, student[l].size(2), student[l].size(3)}, opts));
  if (B == 0) return {loss, grad_maps};

  // 1. all maps, S and T of every level, in one fp32 (fp64) buffer; one reduction launch
  std::vector<at::Tensor> feats;  // NCHW- or channels_last-contiguous inputs, alive until the launch
  std::vector<int64_t> offset(L);
  int64_t total = 0;
  for (size_t l = 0; l < L; ++l) {
    offset[l] = total;
    total += 2 * B * student[l].size(2) * student[l].size(3);
  }
  at::Tensor maps = at::empty({std::max<int64_t>(total, 1)}, opts);
  const int64_t esize = acc_double ? 8 : 4;
  unsigned char* maps_ptr = static_cast<unsigned char*>(maps.data_ptr());
  std::vector<MapJob> jobs;
  for (size_t l = 0; l < L; ++l) {
    const int64_t n = B * student[l].size(2) * student[l].size(3);
    for (int which = 0; which < 2; ++which) {
      const at::Tensor& x_in = which == 0 ? student[l] : teacher[l];
      const bool cl = reads_channels_last(x_in);
      feats.push_back(cl ? x_in : x_in.contiguous());
      jobs.push_back(make_map_job(feats.back(), cl, maps_ptr + (offset[l] + which * n) * esize, nullptr, nullptr, true,
                                  acc_double, p == 2.0, false));
    }
  }
  launch_map_jobs(jobs, false, acc_double, p, stream);

  // 2. phi, distances and map gradients: one block per (level, sample); 3. the sum over levels
  at::Tensor wdist = L == 1 ? loss : at::empty({static_cast<int64_t>(L), B}, opts);
  AT_DISPATCH_FLOATING_TYPES(acc, "dct_at_loss_cuda", [&] {
    using T = scalar_t;
    PhiParams<T> P;
    memset(&P, 0, sizeof(P));
    P.map_norm = static_cast<int>(o.map_norm);
    P.transform = static_cast<int>(o.transform);
    P.coef_norm = static_cast<int>(o.coef_norm);
    P.distance = static_cast<int>(o.distance);
    P.center = center ? 1 : 0;
    P.coef_abs = coef_abs ? 1 : 0;
    P.eps = static_cast<T>(eps);
    std::vector<PhiLevel<T>> levels(L);
    const T* mp = maps.const_data_ptr<T>();
    for (size_t l = 0; l < L; ++l) {
      const int64_t n = B * student[l].size(2) * student[l].size(3);
      levels[l].as = mp + offset[l];
      levels[l].at = mp + offset[l] + n;
      levels[l].gmap = grad_maps[l].mutable_data_ptr<T>();
      levels[l].weight = static_cast<T>(weights[l]);
      levels[l].H = static_cast<int>(student[l].size(2));
      levels[l].W = static_cast<int>(student[l].size(3));
    }
    launch_phi<T>(levels, static_cast<int>(B), wdist.mutable_data_ptr<T>(), P, opts.dtype(at::kByte), stream);
    if (L > 1) {
      const int threads = 128;
      sum_levels_kernel<T><<<static_cast<unsigned>(ceil_div(B, threads)), threads, 0, stream>>>(
          wdist.const_data_ptr<T>(), loss.mutable_data_ptr<T>(), static_cast<int>(L), static_cast<int>(B));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {loss, grad_maps};
}

std::vector<at::Tensor> dct_at_loss_backward_cuda(const at::Tensor& grad_loss, at::TensorList grad_maps,
                                                  at::TensorList student, double p) {
  check_backward_levels(grad_loss, grad_maps, student);
  std::vector<at::Tensor> grads;
  if (student.empty()) return grads;
  const at::Device dev = grad_loss.device();
  TORCH_CHECK(dev.is_cuda(), "grad_loss: expected a CUDA tensor, got one on ", dev);
  bool acc_double = false;
  for (size_t l = 0; l < student.size(); ++l) acc_double = acc_double || student[l].scalar_type() == at::kDouble;
  const c10::cuda::CUDAGuard guard(dev);
  const at::ScalarType acc = acc_double ? at::kDouble : at::kFloat;
  const at::Tensor gl = grad_loss.to(acc).contiguous();
  std::vector<at::Tensor> keep;  // inputs converted for the kernel, alive until the launch
  std::vector<MapJob> jobs;
  grads.reserve(student.size());
  for (size_t l = 0; l < student.size(); ++l) {
    const bool cl = reads_channels_last(student[l]);
    const at::Tensor x = cl ? student[l] : student[l].contiguous();
    const at::Tensor g = grad_maps[l].to(acc).contiguous();
    at::Tensor dx = at::empty_like(x);  // keeps S's memory format
    keep.push_back(x);
    keep.push_back(g);
    grads.push_back(dx);
    if (dx.numel() == 0) continue;
    jobs.push_back(
        make_map_job(x, cl, dx.data_ptr(), g.const_data_ptr(), gl.const_data_ptr(), true, acc_double, p == 2.0, true));
  }
  launch_map_jobs(jobs, true, acc_double, p, c10::cuda::getCurrentCUDAStream());
  return grads;
}

}  // namespace
}  // namespace cuda
}  // namespace dctkd

TORCH_LIBRARY_IMPL(dctkd_ext, CUDA, m) {
  m.impl("dct_at_loss", &dctkd::cuda::dct_at_loss_cuda);
  m.impl("dct_at_loss_backward", &dctkd::cuda::dct_at_loss_backward_cuda);
}
