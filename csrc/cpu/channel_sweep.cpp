// The vectorised channel sweeps of channel_sweep.h. The bodies are written once with the GCC/Clang
// vector extension (16 floats per vector) and always inlined into the entry points, which are cloned
// for x86-64-v4 (one zmm per vector), x86-64-v3 (two ymm) and the baseline (four xmm); the loader
// picks the clone the CPU supports, so the library stays portable. bfloat16 and float16 are widened
// and narrowed in registers with integer operations (exact, round to nearest even as c10 rounds).
#include "channel_sweep.h"

#include <xmmintrin.h>  // SSE streaming stores: part of the baseline x86-64 ISA

#include <algorithm>
#include <cmath>
#include <cstring>

#include "simd.h"

namespace dctkd {
namespace cpu {
namespace sweep {
namespace {

constexpr int kLanes = 16;
typedef float F __attribute__((vector_size(64)));
typedef uint32_t U __attribute__((vector_size(64)));
typedef int32_t I __attribute__((vector_size(64)));
typedef uint16_t H __attribute__((vector_size(32)));
typedef float F8 __attribute__((vector_size(32)));
typedef float F4 __attribute__((vector_size(16)));

DCTKD_INLINE F loadf(const float* p) {
  F v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
DCTKD_INLINE void storef(float* p, F v) { std::memcpy(p, &v, sizeof(v)); }

DCTKD_INLINE F widen(const float* p) { return loadf(p); }
DCTKD_INLINE F widen(const at::BFloat16* p) {
  H h;
  std::memcpy(&h, p, sizeof(h));
  return (F)(__builtin_convertvector(h, U) << 16);
}
// IEEE half -> float, exact for every value (normal, subnormal, inf, nan).
DCTKD_INLINE F widen(const at::Half* p) {
  H h;
  std::memcpy(&h, p, sizeof(h));
  const U w = __builtin_convertvector(h, U);
  const U sign = (w & 0x8000u) << 16;
  U o = (w & 0x7fffu) << 13;
  const U e = o & (0x7c00u << 13);
  o += (127u - 15u) << 23;
  const U inf_nan = (U)(e == (0x7c00u << 13));
  const U sub = (U)(e == 0u);
  o += inf_nan & ((128u - 16u) << 23);
  // subnormal (or zero): renormalise through the float unit
  const F magic = (F)(U{} + (113u << 23));
  const U o_sub = (U)((F)(o + (1u << 23)) - magic);
  o = (sub & o_sub) | (~sub & o);
  return (F)(o | sign);
}

DCTKD_INLINE void narrow(float* p, F v) { storef(p, v); }
// float -> bfloat16, round to nearest even; NaN -> 0x7fc0 (c10's rounding).
DCTKD_INLINE void narrow(at::BFloat16* p, F v) {
  const U u = (U)v;
  U r = (u + (((u >> 16) & 1u) + 0x7fffu)) >> 16;
  const U nan = (U)(v != v);
  r = (nan & 0x7fc0u) | (~nan & r);
  const H h = __builtin_convertvector(r, H);
  std::memcpy(p, &h, sizeof(h));
}
// float -> IEEE half, round to nearest even, overflow to inf, NaN -> 0x7e00 (c10's algorithm).
DCTKD_INLINE void narrow(at::Half* p, F v) {
  const U w = (U)v;
  const F av = (F)(w & 0x7fffffffu);
  F base = (av * 0x1.0p+112f) * 0x1.0p-110f;
  const U shl1 = w + w;
  const U sign = w & 0x80000000u;
  U bias = shl1 & 0xff000000u;
  const U small = (U)(bias < 0x71000000u);
  bias = (small & 0x71000000u) | (~small & bias);
  base = (F)((bias >> 1) + 0x07800000u) + base;
  const U bits = (U)base;
  const U nonsign = ((bits >> 13) & 0x00007c00u) + (bits & 0x00000fffu);
  const U nan = (U)(shl1 > 0xff000000u);
  const U r = (sign >> 16) | (nan & 0x7e00u) | (~nan & nonsign);
  const H h = __builtin_convertvector(r, H);
  std::memcpy(p, &h, sizeof(h));
}

// Streaming (non-temporal) stores of one vector to 16-byte aligned memory: a gradient much larger
// than the caches is written without first reading its lines into them.
DCTKD_INLINE void stream16(void* p, const void* v) {
  __m128 x;
  std::memcpy(&x, v, sizeof(x));
  _mm_stream_ps(static_cast<float*>(p), x);
}
DCTKD_INLINE void narrow_stream(float* p, F v) {
  for (int k = 0; k < 4; ++k) stream16(p + 4 * k, reinterpret_cast<const float*>(&v) + 4 * k);
}
template <typename in_t>
DCTKD_INLINE void narrow_stream(in_t* p, F v) {
  alignas(32) in_t tmp[kLanes];
  narrow(tmp, v);
  stream16(p, tmp);
  stream16(p + 8, tmp + 8);
}
template <bool kStream, typename in_t>
DCTKD_INLINE void put(in_t* p, F v) {
  if constexpr (kStream) narrow_stream(p, v);
  else narrow(p, v);
}

template <int kPow>
DCTKD_INLINE F term(F v) {
  if constexpr (kPow == 2) return v * v;
  else return (F)((U)v & 0x7fffffffu);
}
template <int kPow>
DCTKD_INLINE float term(float v) {
  if constexpr (kPow == 2) return v * v;
  else return std::abs(v);
}

DCTKD_INLINE float hsum(F v) {
  const F8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
               __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const F4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

// Positions are swept in tiles whose fp32 accumulators stay in L1; four channels per pass over the
// tile, so each pass reads four sequential streams and loads / stores the accumulators once.
template <typename in_t, int kPow>
DCTKD_INLINE void map_nchw_body(const in_t* x, int64_t C, int64_t stride, int64_t n, float scale, float* out) {
  constexpr int64_t kTile = 4096;
  alignas(64) float acc[kTile];
  for (int64_t t0 = 0; t0 < n; t0 += kTile) {
    const int64_t m = std::min(kTile, n - t0), mv = m / kLanes * kLanes;
    const in_t* xb = x + t0;
    std::fill(acc, acc + m, 0.f);
    int64_t c = 0;
    for (; c + 4 <= C; c += 4) {
      const in_t* x0 = xb + c * stride;
      const in_t* x1 = x0 + stride;
      const in_t* x2 = x1 + stride;
      const in_t* x3 = x2 + stride;
      // The next pass's four rows are requested into L2 while this pass runs: at 32x32 a row is one
      // 4 KB page, too short a stream for the hardware prefetcher to run ahead on its own.
      const int64_t ahead = c + 8 <= C ? 4 * stride : 0;
      for (int64_t i = 0; i < mv; i += kLanes) {
        __builtin_prefetch(x0 + ahead + i, 0, 2);
        __builtin_prefetch(x1 + ahead + i, 0, 2);
        __builtin_prefetch(x2 + ahead + i, 0, 2);
        __builtin_prefetch(x3 + ahead + i, 0, 2);
        F a = loadf(acc + i);
        a += term<kPow>(widen(x0 + i));
        a += term<kPow>(widen(x1 + i));
        a += term<kPow>(widen(x2 + i));
        a += term<kPow>(widen(x3 + i));
        storef(acc + i, a);
      }
      for (int64_t i = mv; i < m; ++i) {
        float a = acc[i];
        a += term<kPow>(static_cast<float>(x0[i]));
        a += term<kPow>(static_cast<float>(x1[i]));
        a += term<kPow>(static_cast<float>(x2[i]));
        a += term<kPow>(static_cast<float>(x3[i]));
        acc[i] = a;
      }
    }
    for (; c < C; ++c) {
      const in_t* x0 = xb + c * stride;
      for (int64_t i = 0; i < mv; i += kLanes) storef(acc + i, loadf(acc + i) + term<kPow>(widen(x0 + i)));
      for (int64_t i = mv; i < m; ++i) acc[i] += term<kPow>(static_cast<float>(x0[i]));
    }
    float* o = out + t0;
    for (int64_t i = 0; i < mv; i += kLanes) storef(o + i, loadf(acc + i) * scale);
    for (int64_t i = mv; i < m; ++i) o[i] = acc[i] * scale;
  }
}

template <typename in_t, int kPow>
DCTKD_INLINE void map_nhwc_body(const in_t* x, int64_t C, int64_t npos, float scale, float* out) {
  const int64_t cv = C / kLanes * kLanes;
  for (int64_t pos = 0; pos < npos; ++pos) {
    const in_t* xp = x + pos * C;
    F a0 = F{}, a1 = F{};
    int64_t c = 0;
    for (; c + 2 * kLanes <= cv; c += 2 * kLanes) {
      a0 += term<kPow>(widen(xp + c));
      a1 += term<kPow>(widen(xp + c + kLanes));
    }
    if (c < cv) a0 += term<kPow>(widen(xp + c));
    float s = hsum(a0 + a1);
    for (c = cv; c < C; ++c) s += term<kPow>(static_cast<float>(xp[c]));
    out[pos] = s * scale;
  }
}

template <bool kStream, typename in_t>
DCTKD_INLINE void grad_nchw_rows(const float* g, float scale, const in_t* x, in_t* dx, int64_t C, int64_t stride,
                                 int64_t n) {
  const int64_t nv = n / kLanes * kLanes;
  for (int64_t c = 0; c < C; ++c) {
    const in_t* xc = x + c * stride;
    in_t* dc = dx + c * stride;
    for (int64_t i = 0; i < nv; i += kLanes) put<kStream>(dc + i, (loadf(g + i) * scale) * (widen(xc + i) * 2.f));
    for (int64_t i = nv; i < n; ++i) dc[i] = static_cast<in_t>((g[i] * scale) * (static_cast<float>(xc[i]) * 2.f));
  }
}

// Streaming stores only where every row starts on a cache line: a row that ends inside a line leaves
// that line partly written twice, and each partial non-temporal line costs a read-modify-write in
// memory (with 14x14 maps, 784-byte rows, the R50-R18 loss spent about 3x as long writing its gradient).
inline bool whole_lines(const void* p, int64_t stride_bytes) {
  return reinterpret_cast<uintptr_t>(p) % 64 == 0 && stride_bytes % 64 == 0;
}

template <typename in_t>
DCTKD_INLINE void grad_nchw_body(const float* g, float scale, const in_t* x, in_t* dx, int64_t C, int64_t stride,
                                 int64_t n, bool stream) {
  if (stream && whole_lines(dx, stride * static_cast<int64_t>(sizeof(in_t)))) {
    grad_nchw_rows<true>(g, scale, x, dx, C, stride, n);
    _mm_sfence();
  } else {
    grad_nchw_rows<false>(g, scale, x, dx, C, stride, n);
  }
}

template <bool kStream, typename in_t>
DCTKD_INLINE void grad_nhwc_rows(const float* g, float scale, const in_t* x, in_t* dx, int64_t C, int64_t npos) {
  const int64_t cv = C / kLanes * kLanes;
  for (int64_t pos = 0; pos < npos; ++pos) {
    const float gs = g[pos] * scale;
    const in_t* xp = x + pos * C;
    in_t* dp = dx + pos * C;
    for (int64_t c = 0; c < cv; c += kLanes) put<kStream>(dp + c, gs * (widen(xp + c) * 2.f));
    for (int64_t c = cv; c < C; ++c) dp[c] = static_cast<in_t>(gs * (static_cast<float>(xp[c]) * 2.f));
  }
}

template <typename in_t>
DCTKD_INLINE void grad_nhwc_body(const float* g, float scale, const in_t* x, in_t* dx, int64_t C, int64_t npos,
                                 bool stream) {
  if (stream && whole_lines(dx, C * static_cast<int64_t>(sizeof(in_t)))) {
    grad_nhwc_rows<true>(g, scale, x, dx, C, npos);
    _mm_sfence();
  } else {
    grad_nhwc_rows<false>(g, scale, x, dx, C, npos);
  }
}

}  // namespace

DCTKD_TARGET_CLONES void map_nchw(const void* x, at::ScalarType t, double p, int64_t C, int64_t stride, int64_t n,
                                  float scale, float* out) {
  const bool sq = p == 2.0;
  switch (t) {
    case at::kFloat:
      if (sq) map_nchw_body<float, 2>(static_cast<const float*>(x), C, stride, n, scale, out);
      else map_nchw_body<float, 1>(static_cast<const float*>(x), C, stride, n, scale, out);
      break;
    case at::kBFloat16:
      if (sq) map_nchw_body<at::BFloat16, 2>(static_cast<const at::BFloat16*>(x), C, stride, n, scale, out);
      else map_nchw_body<at::BFloat16, 1>(static_cast<const at::BFloat16*>(x), C, stride, n, scale, out);
      break;
    case at::kHalf:
      if (sq) map_nchw_body<at::Half, 2>(static_cast<const at::Half*>(x), C, stride, n, scale, out);
      else map_nchw_body<at::Half, 1>(static_cast<const at::Half*>(x), C, stride, n, scale, out);
      break;
    default: TORCH_CHECK(false, "channel sweep: unsupported type ", t);
  }
}

DCTKD_TARGET_CLONES void map_nhwc(const void* x, at::ScalarType t, double p, int64_t C, int64_t npos, float scale,
                                  float* out) {
  const bool sq = p == 2.0;
  switch (t) {
    case at::kFloat:
      if (sq) map_nhwc_body<float, 2>(static_cast<const float*>(x), C, npos, scale, out);
      else map_nhwc_body<float, 1>(static_cast<const float*>(x), C, npos, scale, out);
      break;
    case at::kBFloat16:
      if (sq) map_nhwc_body<at::BFloat16, 2>(static_cast<const at::BFloat16*>(x), C, npos, scale, out);
      else map_nhwc_body<at::BFloat16, 1>(static_cast<const at::BFloat16*>(x), C, npos, scale, out);
      break;
    case at::kHalf:
      if (sq) map_nhwc_body<at::Half, 2>(static_cast<const at::Half*>(x), C, npos, scale, out);
      else map_nhwc_body<at::Half, 1>(static_cast<const at::Half*>(x), C, npos, scale, out);
      break;
    default: TORCH_CHECK(false, "channel sweep: unsupported type ", t);
  }
}

DCTKD_TARGET_CLONES void grad_nchw(const float* g, float scale, const void* x, void* dx, at::ScalarType t, int64_t C,
                                   int64_t stride, int64_t n, bool stream) {
  switch (t) {
    case at::kFloat:
      grad_nchw_body<float>(g, scale, static_cast<const float*>(x), static_cast<float*>(dx), C, stride, n, stream);
      break;
    case at::kBFloat16:
      grad_nchw_body<at::BFloat16>(g, scale, static_cast<const at::BFloat16*>(x), static_cast<at::BFloat16*>(dx), C,
                                   stride, n, stream);
      break;
    case at::kHalf:
      grad_nchw_body<at::Half>(g, scale, static_cast<const at::Half*>(x), static_cast<at::Half*>(dx), C, stride, n,
                               stream);
      break;
    default: TORCH_CHECK(false, "channel sweep: unsupported type ", t);
  }
}

DCTKD_TARGET_CLONES void grad_nhwc(const float* g, float scale, const void* x, void* dx, at::ScalarType t, int64_t C,
                                   int64_t npos, bool stream) {
  switch (t) {
    case at::kFloat:
      grad_nhwc_body<float>(g, scale, static_cast<const float*>(x), static_cast<float*>(dx), C, npos, stream);
      break;
    case at::kBFloat16:
      grad_nhwc_body<at::BFloat16>(g, scale, static_cast<const at::BFloat16*>(x), static_cast<at::BFloat16*>(dx), C,
                                   npos, stream);
      break;
    case at::kHalf:
      grad_nhwc_body<at::Half>(g, scale, static_cast<const at::Half*>(x), static_cast<at::Half*>(dx), C, npos, stream);
      break;
    default: TORCH_CHECK(false, "channel sweep: unsupported type ", t);
  }
}

}  // namespace sweep
}  // namespace cpu
}  // namespace dctkd
