// CPU kernels of local_attention (docs/DESIGN.md §3.5): forward and backward, fp16/bf16/fp32/fp64 inputs of any
// strides (NCHW, channels_last, views), fp32 accumulation (fp64 for fp64).
//
// Work item: one (b, c) plane, owned by one thread (at::parallel_for over B*C). Its q, k, v (and grad) are read
// once, through their strides, into plane buffers in the accumulation type whose rows have the padded width
// Wk = W + 2 pad; k, v (and the dk, dv accumulators) also carry the pad rows and columns, zero. A pixel is the
// index P = y * Wk + x of the padded-width frame, so the window offset (a, b) of every pixel is the constant
// displacement a * Wk + b in the k / v buffers: each pass over the plane is one flat loop over P in vectors of
// 8 lanes, with no boundary branches. The pixels x >= W of that frame (and the tail to a whole vector) have
// q = grad = 0: they add exact zeros to dk, dv and drel and are not written out.
//
// Per vector of pixels the offsets are swept three times (the logits are one FMA each, recomputed from L1):
// the maximum logit, then exp(logit - max) with its sums, then (backward) the gradients, so forward + backward
// evaluate 2 K^2 exponentials per pixel and no K^2-sized array leaves the thread. dk and dv are gathered per
// plane from K^2 share planes in the thread's scratch (no atomics, see backward_sweep); drel is summed per
// plane in a fixed lane order,
// then over the batch in a fixed order: the results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "../local_attention_common.h"
#include "simd.h"

namespace dctkd {
namespace cpu {
namespace {

namespace la = dctkd::local_attention;

// Vectors of 32 bytes (8 floats, 4 doubles): one ymm register on x86-64-v3 and v4. GCC splits wider vector-extension
// types, but lowers their comparisons lane by lane, which the softmax's max would pay for at every offset.
constexpr int64_t kLanes = 16;  // the pixel count's rounding and the scratch's lanes per offset: a multiple of both

typedef float VF __attribute__((vector_size(32)));
typedef int32_t VI __attribute__((vector_size(32)));
typedef double VD __attribute__((vector_size(32)));

template <typename T>
struct Vec;
template <>
struct Vec<float> {
  using type = VF;
  static constexpr int64_t lanes = 8;
};
template <>
struct Vec<double> {
  using type = VD;
  static constexpr int64_t lanes = 4;
};

template <typename V, typename T>
DCTKD_INLINE V vload(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename V, typename T>
DCTKD_INLINE void vstore(T* p, V v) {
  std::memcpy(p, &v, sizeof(v));
}
// a > b ? a : b per lane, as bit operations on the comparison mask (GCC lowers a vector ?: wider than the
// target's registers lane by lane)
template <typename V>
DCTKD_INLINE V vmax(V a, V b) {
  const auto gt = a > b;
  using M = decltype(gt);
  return (V)((gt & (M)a) | (~gt & (M)b));
}

// exp(x) for x <= 0 (the kernels only take exp(logit - max)), about 1 ulp: Cephes' expf range reduction
// x = n ln2 + r with a degree-6 polynomial on |r| <= ln2 / 2, scaled by 2^n through the exponent bits;
// 0 below the smallest normal result.
DCTKD_INLINE VF vexp(VF x) {
  const VI under = x < -87.3365f;
  x = vmax(VF{} - 87.3365f, x);  // this order keeps a NaN
  const VF n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest
  VF r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  VF p = VF{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const VI scale = (__builtin_convertvector(n, VI) + 127) << 23;
  return (VF)((VI)(p * (VF)scale) & ~under);
}
DCTKD_INLINE VD vexp(VD x) {  // float64 is the testing precision: libm per lane
  for (int i = 0; i < 4; ++i) x[i] = std::exp(x[i]);
  return x;
}

// The plane loops. q, g: npix values (padded-width frame); k, v, dk, dv: npix + (K - 1) (Wk + 1) values, pixel P's
// offset j at P + offs[j]. rel: the K^2 terms of the plane's channel. E: scratch of K^2 * lanes values, the
// logits of one vector step and then their exponentials: exp reads the logits back from memory, so that a
// contracted multiply-subtract cannot make exp(logit - max) of the largest logit differ from exp(0) = 1.
//
// KKc: the number of offsets when it is known at compile time (9, the head's 3 x 3 windows), else 0 and KK
// says it. With it known, the offset loops unroll whole and E and R live in registers: the exponentials still
// take the logits as computed, since a logit is also used by the maximum's comparison, which no
// multiply-add can absorb.
template <typename T, int KKc>
DCTKD_INLINE typename Vec<T>::type logits_max(const T* q, const T* k, const T* rel, const int64_t* offs, int64_t KK,
                                              int64_t P, T* E) {
  using V = typename Vec<T>::type;
  constexpr int64_t L = Vec<T>::lanes;
  if (KKc) KK = KKc;
  const V qv = vload<V>(q + P);
  V m = qv * (vload<V>(k + P + offs[0]) + rel[0]);
  vstore(E, m);
#pragma GCC unroll 9
  for (int64_t j = 1; j < KK; ++j) {
    const V l = qv * (vload<V>(k + P + offs[j]) + rel[j]);
    vstore(E + j * L, l);
    m = vmax(l, m);
  }
  return m;
}

template <typename T, int KKc>
DCTKD_INLINE void forward_sweep(const T* q, const T* k, const T* v, const T* rel, const int64_t* offs, int64_t KK,
                                int64_t npix, T* out, T* E_scratch) {
  using V = typename Vec<T>::type;
  constexpr int64_t L = Vec<T>::lanes;
  alignas(32) T E_local[KKc ? KKc * L : 1];
  T* E = KKc ? E_local : E_scratch;
  if (KKc) KK = KKc;
  for (int64_t P = 0; P < npix; P += L) {
    const V m = logits_max<T, KKc>(q, k, rel, offs, KK, P, E);
    V s = {}, acc = {};
#pragma GCC unroll 9
    for (int64_t j = 0; j < KK; ++j) {
      const V e = vexp(vload<V>(E + j * L) - m);
      s += e;
      acc += e * vload<V>(v + P + offs[j]);
    }
    vstore(out + P, acc / s);
  }
}

// R: scratch of K^2 * lanes values, the drel partial sums. dk and dv are gathered, not scattered: the sweep
// stores each offset's share, dl q and attn * grad, at its own pixel in a plane of Sk / Sv (offset j's plane at
// j * ss, pixel P at lead + P, zero outside the npix written), and gather_shares then sums dk[t] over
// the offsets. Adding into dk at P + offs[j] directly would read, at every offset, a vector that overlaps one
// stored at the offset before (the offsets of a window row are one pixel apart), which the store-to-load
// forwarding of x86 cores cannot serve: each such read waits for the store to retire.
template <typename T, int KKc>
DCTKD_INLINE void backward_sweep(const T* q, const T* g, const T* k, const T* v, const T* rel, const int64_t* offs,
                                 int64_t KK, int64_t npix, T* dq, T* Sk, T* Sv, int64_t ss, int64_t lead, T* drel,
                                 T* E_scratch, T* R_scratch) {
  using V = typename Vec<T>::type;
  constexpr int64_t L = Vec<T>::lanes;
  alignas(32) T E_local[KKc ? KKc * L : 1], R_local[KKc ? KKc * L : 1];
  T* E = KKc ? E_local : E_scratch;
  T* R = KKc ? R_local : R_scratch;
  if (KKc) KK = KKc;
  for (int64_t j = 0; j < KK; ++j) vstore(R + j * L, V{});
  for (int64_t P = 0; P < npix; P += L) {
    const V qv = vload<V>(q + P);
    const V m = logits_max<T, KKc>(q, k, rel, offs, KK, P, E);
    V s = {}, sv = {};
#pragma GCC unroll 9
    for (int64_t j = 0; j < KK; ++j) {
      const V e = vexp(vload<V>(E + j * L) - m);
      vstore(E + j * L, e);
      s += e;
      sv += e * vload<V>(v + P + offs[j]);
    }
    const V inv = T(1) / s;
    const V o = sv * inv;
    const V gs = vload<V>(g + P) * inv;
    V dqv = {};
#pragma GCC unroll 9
    for (int64_t j = 0; j < KK; ++j) {
      const V ag = vload<V>(E + j * L) * gs;  // attn_j * grad
      const V dl = ag * (vload<V>(v + P + offs[j]) - o);
      const V dlq = dl * qv;
      dqv += dl * (vload<V>(k + P + offs[j]) + rel[j]);
      if (Sk) vstore(Sk + j * ss + lead + P, dlq);
      if (Sv) vstore(Sv + j * ss + lead + P, ag);
      if (drel) vstore(R + j * L, vload<V>(R + j * L) + dlq);
    }
    if (dq) vstore(dq + P, dqv);
  }
  if (drel) {
    for (int64_t j = 0; j < KK; ++j) {
      T sum = 0;
      for (int64_t i = 0; i < L; ++i) sum += R[j * L + i];
      drel[j] = sum;
    }
  }
}

// d[t] = sum over j (in order) of S[j * ss + lead + t - offs[j]] for t in [t0, t0 + n), n a multiple of the lanes.
template <typename T, int KKc>
DCTKD_INLINE void gather_shares(const T* S, int64_t ss, int64_t lead, const int64_t* offs, int64_t KK, int64_t t0,
                                int64_t n, T* d) {
  using V = typename Vec<T>::type;
  constexpr int64_t L = Vec<T>::lanes;
  if (KKc) KK = KKc;
  for (int64_t t = t0; t < t0 + n; t += L) {
    V acc = vload<V>(S + lead + t - offs[0]);
#pragma GCC unroll 9
    for (int64_t j = 1; j < KK; ++j) acc += vload<V>(S + j * ss + lead + t - offs[j]);
    vstore(d + t, acc);
  }
}

// Entry points, cloned for x86-64-v4 / v3 / the baseline (csrc/cpu/simd.h); one call per plane.
template <typename T>
DCTKD_TARGET_CLONES void forward_plane(const T* q, const T* k, const T* v, const T* rel, const int64_t* offs,
                                       int64_t KK, int64_t npix, T* out, T* E) {
  if (KK == 9) forward_sweep<T, 9>(q, k, v, rel, offs, KK, npix, out, E);
  else forward_sweep<T, 0>(q, k, v, rel, offs, KK, npix, out, E);
}

template <typename T>
DCTKD_TARGET_CLONES void backward_plane(const T* q, const T* g, const T* k, const T* v, const T* rel,
                                        const int64_t* offs, int64_t KK, int64_t npix, int64_t interior, T* dq, T* dk,
                                        T* dv, T* Sk, T* Sv, int64_t ss, int64_t lead, T* drel, T* E, T* R) {
  Sk = dk ? Sk : nullptr;
  Sv = dv ? Sv : nullptr;
  if (KK == 9) backward_sweep<T, 9>(q, g, k, v, rel, offs, KK, npix, dq, Sk, Sv, ss, lead, drel, E, R);
  else backward_sweep<T, 0>(q, g, k, v, rel, offs, KK, npix, dq, Sk, Sv, ss, lead, drel, E, R);
  // the frame's pixels [interior, interior + npix) hold every pixel of the plane
  for (auto [S, d] : {std::make_pair(Sk, dk), std::make_pair(Sv, dv)}) {
    if (!d) continue;
    if (KK == 9) gather_shares<T, 9>(S, ss, lead, offs, KK, interior, npix, d);
    else gather_shares<T, 0>(S, ss, lead, offs, KK, interior, npix, d);
  }
}

// ------------------------------------------------------------------------------------------------ host side
// A (B, C, H, W) tensor's plane (b, c) as base pointer and row / column strides.
template <typename scalar_t>
struct Planes {
  scalar_t* data;
  int64_t sb, sc, sh, sw;
  explicit Planes(const at::Tensor& t)
      : data(static_cast<scalar_t*>(t.data_ptr())),
        sb(t.stride(0)),
        sc(t.stride(1)),
        sh(t.stride(2)),
        sw(t.stride(3)) {}
  scalar_t* plane(int64_t b, int64_t c) const { return data + b * sb + c * sc; }
};

template <typename scalar_t, typename T>
void load_plane(const Planes<scalar_t>& t, int64_t b, int64_t c, int64_t H, int64_t W, T* dst, int64_t ld) {
  const scalar_t* src = t.plane(b, c);
  for (int64_t y = 0; y < H; ++y) {
    const scalar_t* s = src + y * t.sh;
    T* d = dst + y * ld;
    if (t.sw == 1) {
      for (int64_t x = 0; x < W; ++x) d[x] = static_cast<T>(s[x]);
    } else {
      for (int64_t x = 0; x < W; ++x) d[x] = static_cast<T>(s[x * t.sw]);
    }
  }
}

template <typename scalar_t, typename T>
void store_plane(const T* src, int64_t ld, int64_t H, int64_t W, const Planes<scalar_t>& t, int64_t b, int64_t c) {
  scalar_t* dst = t.plane(b, c);
  for (int64_t y = 0; y < H; ++y) {
    const T* s = src + y * ld;
    scalar_t* d = dst + y * t.sh;
    if (t.sw == 1) {
      for (int64_t x = 0; x < W; ++x) d[x] = static_cast<scalar_t>(s[x]);
    } else {
      for (int64_t x = 0; x < W; ++x) d[x * t.sw] = static_cast<scalar_t>(s[x]);
    }
  }
}

// The padded-width frame of one plane (see the top of the file).
struct Frame {
  int64_t B, C, H, W, KK, pad, Wk, npix, klen, interior;
  std::vector<int64_t> offs;
  Frame(const at::Tensor& q, int64_t K)
      : B(q.size(0)), C(q.size(1)), H(q.size(2)), W(q.size(3)), KK(K * K), pad(K / 2), Wk(W + K - 1) {
    npix = (H * Wk + kLanes - 1) / kLanes * kLanes;
    klen = npix + (K - 1) * (Wk + 1);
    interior = pad * Wk + pad;  // k[y, x] at interior + y * Wk + x
    for (int64_t a = 0; a < K; ++a)
      for (int64_t b = 0; b < K; ++b) offs.push_back(a * Wk + b);
  }
  int64_t grain() const { return std::max<int64_t>(1, 4096 / (H * W)); }
};

template <typename scalar_t, typename T>
void forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& rel,
                  const at::Tensor& out, int64_t K) {
  const Frame f(q, K);
  const Planes<scalar_t> qs(q), ks(k), vs(v), os(out);
  const T* relp = rel.data_ptr<T>();
  at::parallel_for(0, f.B * f.C, f.grain(), [&](int64_t begin, int64_t end) {
    // zero once: the frame's pad and slack stay zero, every plane overwrites the same interior
    std::vector<T> qb(f.npix, T(0)), kb(f.klen, T(0)), vb(f.klen, T(0)), ob(f.npix), E(f.KK * kLanes);
    for (int64_t bc = begin; bc < end; ++bc) {
      const int64_t b = bc / f.C, c = bc % f.C;
      load_plane(qs, b, c, f.H, f.W, qb.data(), f.Wk);
      load_plane(ks, b, c, f.H, f.W, kb.data() + f.interior, f.Wk);
      load_plane(vs, b, c, f.H, f.W, vb.data() + f.interior, f.Wk);
      forward_plane<T>(qb.data(), kb.data(), vb.data(), relp + c * f.KK, f.offs.data(), f.KK, f.npix, ob.data(),
                       E.data());
      store_plane(ob.data(), f.Wk, f.H, f.W, os, b, c);
    }
  });
}

// drel_part: (B, C, K^2) per-plane partial sums, or undefined.
template <typename scalar_t, typename T>
void backward_impl(const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& rel, int64_t K, const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv,
                   const at::Tensor& drel_part) {
  const Frame f(q, K);
  const Planes<scalar_t> gs(grad), qs(q), ks(k), vs(v);
  const bool need_q = dq.defined(), need_k = dk.defined(), need_v = dv.defined(), need_rel = drel_part.defined();
  const T* relp = rel.data_ptr<T>();
  T* partp = need_rel ? drel_part.data_ptr<T>() : nullptr;
  at::parallel_for(0, f.B * f.C, f.grain(), [&](int64_t begin, int64_t end) {
    constexpr int64_t L = kLanes;
    std::vector<T> qb(f.npix, T(0)), gb(f.npix, T(0)), kb(f.klen, T(0)), vb(f.klen, T(0));
    std::vector<T> dqb(need_q ? f.npix : 0), dkb(need_k ? f.klen : 0), dvb(need_v ? f.klen : 0);
    std::vector<T> E(f.KK * L), R(f.KK * L);
    // the per-offset share planes of dk and dv (see backward_sweep), zero outside what each plane writes
    const int64_t lead = f.klen - f.npix, ss = (f.npix + 2 * lead + L - 1) / L * L;
    std::vector<T> Sk(need_k ? f.KK * ss : 0, T(0)), Sv(need_v ? f.KK * ss : 0, T(0));
    const Planes<scalar_t> dqs(need_q ? dq : q), dks(need_k ? dk : k), dvs(need_v ? dv : v);
    for (int64_t bc = begin; bc < end; ++bc) {
      const int64_t b = bc / f.C, c = bc % f.C;
      load_plane(qs, b, c, f.H, f.W, qb.data(), f.Wk);
      load_plane(gs, b, c, f.H, f.W, gb.data(), f.Wk);
      load_plane(ks, b, c, f.H, f.W, kb.data() + f.interior, f.Wk);
      load_plane(vs, b, c, f.H, f.W, vb.data() + f.interior, f.Wk);
      backward_plane<T>(qb.data(), gb.data(), kb.data(), vb.data(), relp + c * f.KK, f.offs.data(), f.KK, f.npix,
                        f.interior, need_q ? dqb.data() : nullptr, need_k ? dkb.data() : nullptr,
                        need_v ? dvb.data() : nullptr, Sk.data(), Sv.data(), ss, lead,
                        need_rel ? partp + bc * f.KK : nullptr, E.data(), R.data());
      if (need_q) store_plane(dqb.data(), f.Wk, f.H, f.W, dqs, b, c);
      if (need_k) store_plane(dkb.data() + f.interior, f.Wk, f.H, f.W, dks, b, c);
      if (need_v) store_plane(dvb.data() + f.interior, f.Wk, f.H, f.W, dvs, b, c);
    }
  });
}

template <typename F>
void dispatch(const at::Tensor& q, at::ScalarType acc, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "local_attention", [&] {
    if (acc == at::kDouble) f(scalar_t(0), double(0));
    else f(scalar_t(0), float(0));
  });
}

at::Tensor local_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& rel,
                               int64_t kernel_size) {
  la::check_inputs(q, k, v, rel, kernel_size);
  at::Tensor out = la::new_feature(q);
  if (out.numel() == 0) return out;
  const at::ScalarType acc = la::acc_dtype(q, rel);
  const at::Tensor relc = rel.to(acc).contiguous();
  dispatch(q, acc, [&](auto s, auto a) { forward_impl<decltype(s), decltype(a)>(q, k, v, relc, out, kernel_size); });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> local_attention_backward_cpu(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& rel,
    int64_t kernel_size, bool need_q, bool need_k, bool need_v, bool need_rel) {
  la::check_inputs(q, k, v, rel, kernel_size);
  la::check_grad(grad, q);
  at::Tensor dq = need_q ? la::new_feature(q) : la::not_needed(q);
  at::Tensor dk = need_k ? la::new_feature(q) : la::not_needed(k);
  at::Tensor dv = need_v ? la::new_feature(q) : la::not_needed(v);
  if (!need_rel) {
    if ((!need_q && !need_k && !need_v) || q.numel() == 0) return {dq, dk, dv, la::not_needed(rel)};
  }
  const int64_t B = q.size(0), C = q.size(1), KK = kernel_size * kernel_size;
  const at::ScalarType acc = la::acc_dtype(q, rel);
  if (q.numel() == 0) return {dq, dk, dv, at::zeros({C, KK}, rel.options())};
  const at::Tensor relc = rel.to(acc).contiguous();
  at::Tensor part = need_rel ? at::empty({B, C, KK}, rel.options().dtype(acc)) : at::Tensor();
  dispatch(q, acc, [&](auto s, auto a) {
    backward_impl<decltype(s), decltype(a)>(grad, q, k, v, relc, kernel_size, need_q ? dq : at::Tensor(),
                                            need_k ? dk : at::Tensor(), need_v ? dv : at::Tensor(), part);
  });
  if (!need_rel) return {dq, dk, dv, la::not_needed(rel)};
  // drel = sum over b of the per-plane partials, b in order
  at::Tensor drel = at::empty({C, KK}, rel.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES(acc, "local_attention_drel", [&] {
    const scalar_t* p = part.data_ptr<scalar_t>();
    scalar_t* d = drel.data_ptr<scalar_t>();
    for (int64_t i = 0; i < C * KK; ++i) {
      scalar_t sum = 0;
      for (int64_t b = 0; b < B; ++b) sum += p[b * C * KK + i];
      d[i] = sum;
    }
  });
  return {dq, dk, dv, drel.to(rel.scalar_type())};
}

}  // namespace
}  // namespace cpu
}  // namespace dctkd

TORCH_LIBRARY_IMPL(dctkd_ext, CPU, m) {
  m.impl("local_attention", &dctkd::cpu::local_attention_cpu);
  m.impl("local_attention_backward", &dctkd::cpu::local_attention_backward_cpu);
}
