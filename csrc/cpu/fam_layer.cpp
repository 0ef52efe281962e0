// CPU kernels of the whole FAM layer as one spectral GEMM (docs/DESIGN.md §3.4):
//   out = irfft2(Wc(k) rfft2(x)) + rate2 b,   Wc(k) = rate1 W'(k) + rate2 w0^T
// The spectra are kept frequency-major, (H, K, B, C), so that the channel mixing is one batched complex
// GEMM per frequency through the BLAS torch ships (at::bmm). The combined weight Wc is never stored
// whole: it is formed for a chunk of rows of the half plane at a time (about kChunkBytes, at least one row pair) right
// before the GEMMs that use it, so the weight-sized transients stay small and in cache. Chunks are closed
// under h -> -h (mod H) because the weight's backward on columns 0 and W/2 mixes rows h and -h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <map>
#include <mutex>
#include <tuple>
#include <vector>

#include "../spectral_common.h"
#include "../spectral_math.h"
#include "grad_buffers.h"
#include "simd.h"

namespace dctkd {
namespace cpu {
namespace {

using namespace dctkd::spectral;

constexpr int64_t kChunkBytes = int64_t(1) << 20;  // the combined weight formed at a time, at least one row pair
constexpr int64_t kOB = 16;                        // output channels per work item of the weight kernels

// The frequency stride (complex elements) of the chunk buffer (R, K, I, O): I*O plus 16 (2 or 4 cache lines).
// The weight kernels walk the frequencies at fixed (i, o); I*O is often a power of 2, and a walk at such
// a stride lands every access in one cache set, so each would miss.
int64_t freq_stride(int64_t I, int64_t O) { return I * O + 16; }

// Rows [lo0, lo1) and [hi0, hi1) of the half plane; row pairs {j, H - j} for j in [lo0, lo1).
struct RowChunk {
  int64_t lo0, lo1, hi0, hi1;
  int64_t rows() const { return (lo1 - lo0) + (hi1 - hi0); }
  std::vector<int64_t> list() const {
    std::vector<int64_t> r;
    for (int64_t h = lo0; h < lo1; ++h) r.push_back(h);
    for (int64_t h = hi0; h < hi1; ++h) r.push_back(h);
    return r;
  }
};

RowChunk chunk_of_pairs(int64_t H, int64_t j0, int64_t j1) {
  // the mirrors H - j of j in [max(j0, 1), j1) that are not rows of [j0, j1) themselves
  const int64_t jmin = std::max<int64_t>(j0, 1), jmax = std::min<int64_t>(j1 - 1, H - j1);
  return jmax >= jmin ? RowChunk{j0, j1, H - jmax, H - jmin + 1} : RowChunk{j0, j1, 0, 0};
}

std::vector<RowChunk> row_chunks(int64_t H, int64_t row_bytes) {
  std::vector<RowChunk> out;
  const int64_t pairs = H / 2 + 1;
  for (int64_t j0 = 0; j0 < pairs;) {
    int64_t j1 = j0 + 1;
    while (j1 < pairs && chunk_of_pairs(H, j0, j1 + 1).rows() * row_bytes <= kChunkBytes) ++j1;
    out.push_back(chunk_of_pairs(H, j0, j1));
    j0 = j1;
  }
  return out;
}

// irfft's adjoint doubles the half-plane columns that stand for two conjugate frequencies.
template <typename T>
T column_multiplicity(int64_t k, int64_t W) {
  return (k == 0 || 2 * k == W) ? T(1) : T(2);
}

// Prefetches the chunk's rows of n consecutive weight planes (H x W complex each) from `planes`: the
// weight kernels read or write each plane's rows at a stride of a whole plane, a pattern the hardware
// prefetchers do not follow, so the next work item's rows are requested while this one computes.
template <bool for_write, typename T>
DCTKD_INLINE void prefetch_plane_rows(const T* planes, int64_t n, int64_t H, int64_t W,
                                      const std::vector<int64_t>& rows) {
  constexpr int64_t line = 64 / sizeof(T);
  for (int64_t o = 0; o < n; ++o)
    for (int64_t h : rows) {
      const T* row = planes + 2 * ((o * H + h) * W);
      for (int64_t f = 0; f < 2 * W; f += line) __builtin_prefetch(row + f, for_write, 3);
      __builtin_prefetch(row + 2 * W - 1, for_write, 3);
    }
}

// Where W'(rows[r], k) comes from: W'[m, k] = a w[m, k] + b conj(w[-m, -k]), offsets p and q of the two
// terms in a weights1 plane (complex units), their coefficients (1/2, or zero where the mask drops the
// term) and the multiplicity m of column k.
template <typename T>
struct FoldTerm {
  int64_t p, q;
  T a, b, m;
};

template <typename T>
std::vector<FoldTerm<T>> fold_terms(int64_t H, int64_t W, int64_t rh, int64_t rw, const std::vector<int64_t>& rows) {
  const int64_t K = W / 2 + 1;
  std::vector<FoldTerm<T>> t;
  t.reserve(rows.size() * K);
  for (int64_t h : rows) {
    const int64_t nh = mirror(h, H);
    for (int64_t k = 0; k < K; ++k) {
      const int64_t nk = mirror(k, W);
      t.push_back({h * W + k, nh * W + nk, fam_keep(h, k, H, W, rh, rw) ? T(0.5) : T(0),
                   fam_keep(nh, nk, H, W, rh, rw) ? T(0.5) : T(0), column_multiplicity<T>(k, W)});
    }
  }
  return t;
}

// out[r, k, i, o] = rate1 * W'[i, o, rows[r], k] + rate2 * w0[o, i] (complex, (R, K, I, O), frequency
// stride fs) with W'[m, k] = (M[m, k] w[m, k] + conj(M[-m, -k] w[-m, -k])) / 2 from weights1 w
// (I, O, H, W); its conjugate when conj (so that the backward's GEMM reads Wc^H as a plain transpose,
// without a copy). With r1part, out holds g (as fold_rows_backward reads it) on entry, and each work
// item first adds its share of drate1 = sum Re(conj(W') dWc), dWc = m g, to r1part[item].
template <typename T>
void fold_rows(const T* w1, const T* w0, T r1, T r2, int64_t I, int64_t O, int64_t H, int64_t W, int64_t rh, int64_t rw,
               const std::vector<int64_t>& rows, bool conj, T* out, double* r1part = nullptr) {
  const T sign = conj ? T(-1) : T(1);
  const int64_t oblocks = (O + kOB - 1) / kOB, HW = H * W, fs = freq_stride(I, O);
  const std::vector<FoldTerm<T>> terms = fold_terms<T>(H, W, rh, rw, rows);
  const int64_t RK = terms.size();
  at::parallel_for(0, I * oblocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t i = item / oblocks, o0 = (item % oblocks) * kOB, n = std::min(O, o0 + kOB) - o0;
      if (item + 1 < end) {
        const int64_t i1 = (item + 1) / oblocks, o1 = ((item + 1) % oblocks) * kOB;
        prefetch_plane_rows<false>(w1 + 2 * ((i1 * O + o1) * HW), std::min(O, o1 + kOB) - o1, H, W, rows);
      }
      T c0[kOB];
      for (int64_t o = 0; o < n; ++o) c0[o] = r2 * w0[(o0 + o) * I + i];
      const T* __restrict__ planes = w1 + 2 * ((i * O + o0) * HW);
      double r1acc = 0;
      for (int64_t rk = 0; rk < RK; ++rk) {
        const FoldTerm<T> f = terms[rk];
        const T* __restrict__ p = planes + 2 * f.p;
        const T* __restrict__ q = planes + 2 * f.q;
        T* __restrict__ dst = out + 2 * (rk * fs + i * O + o0);
        T acc = 0;
        for (int64_t o = 0; o < n; ++o) {
          const int64_t e = 2 * o * HW;
          const T re = f.a * p[e] + f.b * q[e], im = f.a * p[e + 1] - f.b * q[e + 1];
          if (r1part != nullptr) acc += re * dst[2 * o] + im * dst[2 * o + 1];
          dst[2 * o] = r1 * re + c0[o];
          dst[2 * o + 1] = sign * r1 * im;
        }
        r1acc += double(f.m * acc);
      }
      if (r1part != nullptr) r1part[item] += r1acc;
    }
  });
}

// The backward of one element (p, q) of a weights1 plane: D[p, q] = (c1 dWc[r1k] + c2 conj(dWc[r2k])) / 2,
// with dWc = m g; c1, c2 zero where the mask or the half plane leaves the term out.
template <typename T>
struct UnfoldTerm {
  int64_t src1, src2;  // rows r*K + k of g
  T c1, c2;
};

// From g[r, k, i, o] = sum_b conj(X[b, i]) G[b, o] at the chunk's rows (complex, (R, K, I, O), frequency
// stride fs) and the multiplicity m_k of each half-plane column (dWc = m_k g is the gradient of the
// combined weight):
//   dweights1[i, o, p, q] = rate1 D[p, q],  D = fam_half_weight_backward(dWc)  (rows p of the chunk)
//   wsum[i, o] += sum_{r, k} Re dWc            (so dw0[o, i] = rate2 wsum[i, o])
// Each work item (i, a block of kOB output channels) first gathers its g, m g, into a small
// (o, r*K + k) table, so the plane-by-plane writes of dweights1 read only from L1.
template <typename T>
void fold_rows_backward(const T* g, T r1, int64_t I, int64_t O, int64_t H, int64_t W, int64_t rh, int64_t rw,
                        const std::vector<int64_t>& rows, const std::vector<int64_t>& row_of, T* dw1, double* wsum) {
  const int64_t K = W / 2 + 1, R = rows.size(), RK = R * K, oblocks = (O + kOB - 1) / kOB, fs = freq_stride(I, O),
                HW = H * W;
  std::vector<UnfoldTerm<T>> terms;
  terms.reserve(R * W);
  for (int64_t r = 0; r < R; ++r) {
    const int64_t p = rows[r], rnp = row_of[mirror(p, H)];
    for (int64_t q = 0; q < W; ++q) {
      const int64_t nq = mirror(q, W);
      const bool keep = fam_keep(p, q, H, W, rh, rw);
      UnfoldTerm<T> t{0, 0, T(0), T(0)};
      if (keep && q < K) t.src1 = r * K + q, t.c1 = T(0.5);
      if (keep && nq < K) t.src2 = rnp * K + nq, t.c2 = T(0.5);
      terms.push_back(t);
    }
  }
  std::vector<T> colmult(RK);
  for (int64_t rk = 0; rk < RK; ++rk) colmult[rk] = column_multiplicity<T>(rk % K, W);
  at::parallel_for(0, I * oblocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> table(2 * kOB * RK);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t i = item / oblocks, o0 = (item % oblocks) * kOB, n = std::min(O, o0 + kOB) - o0;
      if (dw1 != nullptr && item + 1 < end) {
        const int64_t i1 = (item + 1) / oblocks, o1 = ((item + 1) % oblocks) * kOB;
        prefetch_plane_rows<true>(dw1 + 2 * ((i1 * O + o1) * HW), std::min(O, o1 + kOB) - o1, H, W, rows);
      }
      for (int64_t rk = 0; rk < RK; ++rk) {
        const T* __restrict__ src = g + 2 * (rk * fs + i * O + o0);
        const T m = colmult[rk];
        for (int64_t o = 0; o < n; ++o) {
          table[2 * (o * RK + rk)] = m * src[2 * o];
          table[2 * (o * RK + rk) + 1] = m * src[2 * o + 1];
        }
      }
      for (int64_t o = 0; o < n; ++o) {
        const T* __restrict__ dwc = table.data() + 2 * o * RK;
        if (wsum != nullptr) {
          double acc = 0;
          for (int64_t rk = 0; rk < RK; ++rk) acc += double(dwc[2 * rk]);
          wsum[i * O + o0 + o] += acc;
        }
        if (dw1 == nullptr) continue;
        T* __restrict__ plane = dw1 + 2 * ((i * O + o0 + o) * HW);
        for (int64_t r = 0; r < R; ++r) {
          const UnfoldTerm<T>* __restrict__ tr = terms.data() + r * W;
          T* __restrict__ row = plane + 2 * rows[r] * W;
          for (int64_t q = 0; q < W; ++q) {
            const UnfoldTerm<T> t = tr[q];
            const T* v1 = dwc + 2 * t.src1;
            const T* v2 = dwc + 2 * t.src2;
            row[2 * q] = r1 * (t.c1 * v1[0] + t.c2 * v2[0]);
            row[2 * q + 1] = r1 * (t.c1 * v1[1] - t.c2 * v2[1]);
          }
        }
      }
    }
  });
}

template <typename F>
void dispatch_real(at::ScalarType t, const char* name, F&& f) {
  if (t == at::kFloat) f(float(0));
  else if (t == at::kDouble) f(double(0));
  else TORCH_CHECK(false, name, ": x: expected float32 or float64, got ", t);
}

template <typename T>
T* real_ptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

struct LayerShape {
  int64_t B, I, O, H, W, K;
};

LayerShape check_layer(const at::Tensor& x, const at::Tensor& weights1, const at::Tensor& w0_weight,
                       const c10::optional<at::Tensor>& w0_bias, const at::Tensor& rate1, const at::Tensor& rate2,
                       double cuton) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "x: expected a float32 or float64 tensor, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 4, "x: expected a 4-D (B, I, H, W) tensor, got shape ", x.sizes());
  const at::ScalarType ct = c10::toComplexType(x.scalar_type());
  TORCH_CHECK(weights1.scalar_type() == ct, "weights1: expected ", ct, " to match x, got ", weights1.scalar_type());
  const int64_t B = x.size(0), I = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(weights1.dim() == 4 && weights1.size(0) == I && weights1.size(2) == H && weights1.size(3) == W,
              "weights1: expected shape (", I, ", O, ", H, ", ", W, ") = (I, O, H, W) of x, got ", weights1.sizes());
  const int64_t O = weights1.size(1);
  TORCH_CHECK(w0_weight.scalar_type() == x.scalar_type() && w0_weight.numel() == O * I &&
                  (w0_weight.dim() == 2 || w0_weight.dim() == 4) && w0_weight.size(0) == O && w0_weight.size(1) == I,
              "w0_weight: expected a (", O, ", ", I, ", 1, 1) tensor of x's dtype, got ", w0_weight.sizes(), " ",
              w0_weight.scalar_type());
  if (w0_bias.has_value() && w0_bias->defined())
    TORCH_CHECK(w0_bias->scalar_type() == x.scalar_type() && w0_bias->dim() == 1 && w0_bias->size(0) == O,
                "w0_bias: expected a (", O, ",) tensor of x's dtype, got ", w0_bias->sizes(), " ",
                w0_bias->scalar_type());
  for (const at::Tensor* r : {&rate1, &rate2})
    TORCH_CHECK(r->scalar_type() == x.scalar_type() && r->numel() == 1,
                "rate1/rate2: expected one-element tensors of x's dtype, got ", r->sizes(), " ", r->scalar_type());
  for (const at::Tensor* t : {&weights1, &w0_weight, &rate1, &rate2})
    TORCH_CHECK(t->device() == x.device(), "fam_layer: expected every tensor on ", x.device(), ", got one on ",
                t->device());
  TORCH_CHECK(cuton >= 0.0 && cuton <= 1.0, "cuton: expected a number in [0, 1], got ", cuton);
  return {B, I, O, H, W, W / 2 + 1};
}

// The FFTs go a chunk of the batch at a time, the chunks spread over the threads in one parallel region
// (each FFT single-threaded inside it). torch's CPU FFTs allocate a result the size of what they
// transform (and c2r a complex copy of its input too) before copying into an out= tensor, so this keeps
// those temporaries at about kFftChunkBytes per thread instead of a whole spectrum or two, and costs
// one thread synchronisation per pass instead of several per FFT.
constexpr int64_t kFftChunkBytes = int64_t(1) << 20;

template <typename F>
void for_batch_chunks(const at::Tensor& spectrum, F&& fft) {  // spectrum (H, K, B, C)
  const int64_t B = spectrum.size(2);
  const int64_t item = spectrum.size(0) * spectrum.size(1) * spectrum.size(3) * spectrum.element_size();
  const int64_t step = std::max<int64_t>(1, kFftChunkBytes / std::max<int64_t>(item, 1));
  const at::ThreadLocalState state;  // the caller's dispatch state (inference mode, profiler) in each thread
  at::parallel_for(0, (B + step - 1) / step, 1, [&](int64_t c0, int64_t c1) {
    const at::ThreadLocalStateGuard guard(state);
    for (int64_t c = c0; c < c1; ++c) fft(c * step, std::min(step, B - c * step));
  });
}

// Maps this small are transformed by one real GEMM per batch chunk against the dense DFT matrices:
// torch's CPU FFTs of maps up to 14 x 14 cost more per map than the GEMM's H W x 2 H K multiply-adds
// (about 5x more at 8 x 8; at 16 x 16 the FFT is ahead).
constexpr int64_t kDenseDftMaxMacs = 45000;

// The real matrices of the orthonormal rfft2 of an H x W map and of its inverse, with
// t = 2 pi (h p / H + k q / W) between map pixel (p, q) and half-spectrum entry (h, k):
//   fwd (H W x 2 H K)  [cos t, -sin t] / sqrt(H W)   (columns: re, im of (h, k))
//   inv (2 H K x H W)  c_k [cos t; -sin t] / sqrt(H W)
// torch's irfft2 transforms over H and then takes c2r over W, which reads only the real part of
// columns 0 and W/2 (c_k = 1 there, 2 elsewhere); inv drops those imaginary parts the same way.
struct DenseDft {
  at::Tensor fwd, inv;
};

// The matrices of an H x W map in `type`, built once per size and kept; null where the map is too large
// for them (kDenseDftMaxMacs) and torch.fft transforms it.
const DenseDft* dense_dft_bases(int64_t H, int64_t W, at::ScalarType type) {
  if (H * W * 2 * H * (W / 2 + 1) > kDenseDftMaxMacs) return nullptr;
  static std::mutex mu;
  static auto* cache = new std::map<std::tuple<int64_t, int64_t, at::ScalarType>, DenseDft>();  // never freed
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_tuple(H, W, type);
  auto it = cache->find(key);
  if (it != cache->end()) return &it->second;
  const int64_t K = W / 2 + 1, HW = H * W, F = 2 * H * K;
  at::Tensor fwd = at::empty({HW, F}, at::kDouble), inv = at::empty({F, HW}, at::kDouble);
  double *f = fwd.data_ptr<double>(), *g = inv.data_ptr<double>();
  const double scale = 1.0 / std::sqrt(double(HW)), two_pi = 2.0 * M_PI;
  for (int64_t p = 0; p < H; ++p)
    for (int64_t q = 0; q < W; ++q)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t k = 0; k < K; ++k) {
          const double t = two_pi * (double(h * p % H) / double(H) + double(k * q % W) / double(W));
          const double c = std::cos(t) * scale, sn = -std::sin(t) * scale, m = column_multiplicity<double>(k, W);
          const int64_t pix = p * W + q, fr = 2 * (h * K + k);
          f[pix * F + fr] = c;
          f[pix * F + fr + 1] = sn;
          g[fr * HW + pix] = m * c;
          g[(fr + 1) * HW + pix] = m * sn;
        }
  return &cache->emplace(key, DenseDft{fwd.to(type), inv.to(type)}).first->second;
}

// dst[c * ldd + r] = src[r * lds + c] (conjugated when conj) for r < rows, c < cols: a complex matrix
// transposed between the map-major (b, C, H, K) order the FFTs and the DFT GEMMs use and the frequency-major
// (H, K, B, C) order of the spectra. Tiles of kTile x kTile keep both sides' cache lines in use; the
// general strided copy_ moves these about 5x slower than a plain copy. A complex element is moved as one
// or two 64-bit words and conjugated by flipping the sign bit of its imaginary part (what negation does).
constexpr int64_t kTile = 16;

template <typename T>
void transpose_complex(const T* src, int64_t lds, T* dst, int64_t ldd, int64_t rows, int64_t cols, bool conj) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "float or double parts");
  constexpr int64_t words = sizeof(T) / 4;  // 64-bit words per complex element
  const uint64_t flip = conj ? uint64_t(1) << 63 : 0;
  typedef uint64_t word __attribute__((may_alias));
  const word* s = reinterpret_cast<const word*>(src);
  word* d = reinterpret_cast<word*>(dst);
  for (int64_t r0 = 0; r0 < rows; r0 += kTile)
    for (int64_t c0 = 0; c0 < cols; c0 += kTile) {
      const int64_t r1 = std::min(rows, r0 + kTile), c1 = std::min(cols, c0 + kTile);
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t r = r0; r < r1; ++r) {
          const word* e = s + words * (r * lds + c);
          word* o = d + words * (c * ldd + r);
          if (words == 1) {
            o[0] = e[0] ^ flip;  // the imaginary part is the high half
          } else {
            o[0] = e[0];
            o[words - 1] = e[words - 1] ^ flip;
          }
        }
    }
}

// (B, C, H, W) real -> its rfft2 spectrum into out (H, K, B, C), frequency-major (conjugated when conj):
// each batch chunk is transformed into map-major order and transposed into place.
void spectrum_freq_major_into(const at::Tensor& out, const at::Tensor& x, bool conj = false) {
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), K = W / 2 + 1;
  const DenseDft* dft = dense_dft_bases(H, W, x.scalar_type());
  dispatch_real(x.scalar_type(), "fam_layer_spectrum", [&](auto tag) {
    using T = decltype(tag);
    T* outp = real_ptr<T>(out);
    for_batch_chunks(out, [&](int64_t b0, int64_t n) {
      const at::Tensor maps = x.narrow(0, b0, n);
      const at::Tensor spec = dft != nullptr ? at::mm(maps.reshape({n * C, H * W}), dft->fwd)
                                             : at::view_as_real(at::fft_rfft2(maps, c10::nullopt, {-2, -1}, "ortho"));
      transpose_complex(spec.data_ptr<T>(), H * K, outp + 2 * b0 * C, B * C, n * C, H * K, conj);
    });
  });
}

// (H, K, B, C) spectrum -> (B, C, H, W) real into y. Each chunk is first transposed to (b, C, H, K) order: the
// inverse FFT of contiguous maps takes about 2/3 of the time it takes on the permuted view, copy included.
void real_of_freq_major_into(const at::Tensor& y, const at::Tensor& yt) {
  const int64_t B = y.size(0), C = y.size(1), H = y.size(2), W = y.size(3), K = W / 2 + 1;
  const DenseDft* dft = dense_dft_bases(H, W, y.scalar_type());
  dispatch_real(y.scalar_type(), "fam_layer_inverse", [&](auto tag) {
    using T = decltype(tag);
    const T* ytp = real_ptr<T>(yt);
    for_batch_chunks(yt, [&](int64_t b0, int64_t n) {
      at::Tensor dst = y.narrow(0, b0, n);
      at::Tensor maps = at::empty({n, C, H, K}, yt.options());
      transpose_complex(ytp + 2 * b0 * C, B * C, real_ptr<T>(maps), H * K, H * K, n * C, false);
      if (dft != nullptr) {
        at::Tensor dst_rows = dst.view({n * C, H * W});
        at::mm_out(dst_rows, at::view_as_real(maps).view({n * C, 2 * H * K}), dft->inv);
      } else {
        at::fft_irfft2_out(dst, maps, at::IntArrayRef{H, W}, {-2, -1}, "ortho");
      }
    });
  });
}

// One batched GEMM over the frequencies of n rows of frequency-major (R, K, M, N) tensors, each taken
// from its row offset. op 't': transposed (a strided view the BLAS reads as is).
at::Tensor rows_of(const at::Tensor& t, int64_t off, int64_t n) {
  return t.narrow(0, off, n).reshape({n * t.size(1), t.size(2), t.size(3)});
}

void bmm_rows(const at::Tensor& out, int64_t out_off, const at::Tensor& a, int64_t a_off, char op_a,
              const at::Tensor& b, int64_t b_off, char op_b, int64_t n) {
  if (n <= 0) return;
  at::Tensor A = rows_of(a, a_off, n), Bm = rows_of(b, b_off, n);
  if (op_a == 't') A = A.transpose(1, 2);
  if (op_b == 't') Bm = Bm.transpose(1, 2);
  at::Tensor dst = rows_of(out, out_off, n);  // a view of contiguous rows: bmm writes into out
  at::bmm_out(dst, A, Bm);
}

// One buffer for the largest chunk, reused by every chunk.
at::Tensor chunk_buffer(const std::vector<RowChunk>& chunks, const LayerShape& s, const at::TensorOptions& opt) {
  int64_t rows = 0;
  for (const RowChunk& c : chunks) rows = std::max(rows, c.rows());
  const int64_t fs = freq_stride(s.I, s.O);
  return at::empty({rows * s.K * fs}, opt).as_strided({rows, s.K, s.I, s.O}, {s.K * fs, fs, s.O, 1});
}

at::Tensor fam_layer_forward_cpu(const at::Tensor& x_in, const at::Tensor& weights1, const at::Tensor& w0_weight,
                                 const c10::optional<at::Tensor>& w0_bias, const at::Tensor& rate1,
                                 const at::Tensor& rate2, double cuton) {
  const LayerShape s = check_layer(x_in, weights1, w0_weight, w0_bias, rate1, rate2, cuton);
  const at::Tensor x = x_in.contiguous();
  at::Tensor y;
  if (x.numel() == 0 || s.O == 0) {
    y = at::zeros({s.B, s.O, s.H, s.W}, x.options());
  } else {
    const at::TensorOptions co = x.options().dtype(c10::toComplexType(x.scalar_type()));
    at::Tensor xt = at::empty({s.H, s.K, s.B, s.I}, co);
    spectrum_freq_major_into(xt, x);
    at::Tensor yt = at::empty({s.H, s.K, s.B, s.O}, co);
    const at::Tensor w1 = resolved(weights1).contiguous(), w0 = w0_weight.reshape({s.O, s.I}).contiguous();
    dispatch_real(x.scalar_type(), "fam_layer_forward", [&](auto tag) {
      using T = decltype(tag);
      const T r1 = rate1.item<T>(), r2 = rate2.item<T>();
      const int64_t rh = fam_radius(s.H, cuton), rw = fam_radius(s.W, cuton);
      const std::vector<RowChunk> chunks = row_chunks(s.H, s.K * s.I * s.O * 2 * int64_t(sizeof(T)));
      at::Tensor buf = chunk_buffer(chunks, s, xt.options());
      for (const RowChunk& c : chunks) {
        fold_rows<T>(real_ptr<T>(w1), real_ptr<T>(w0), r1, r2, s.I, s.O, s.H, s.W, rh, rw, c.list(), false,
                     real_ptr<T>(buf));
        const int64_t nlo = c.lo1 - c.lo0, nhi = c.hi1 - c.hi0;
        bmm_rows(yt, c.lo0, xt, c.lo0, 'n', buf, 0, 'n', nlo);
        bmm_rows(yt, c.hi0, xt, c.hi0, 'n', buf, nlo, 'n', nhi);
      }
    });
    xt.reset();  // not needed by the inverse FFT
    y = at::empty({s.B, s.O, s.H, s.W}, x.options());
    real_of_freq_major_into(y, yt);
  }
  if (w0_bias.has_value() && w0_bias->defined()) y.add_((rate2 * *w0_bias).view({1, s.O, 1, 1}));
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fam_layer_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& weights1, const at::Tensor& w0_weight,
    const c10::optional<at::Tensor>& w0_bias, const at::Tensor& rate1, const at::Tensor& rate2, double cuton,
    std::array<bool, 6> needs) {
  const LayerShape s = check_layer(x_in, weights1, w0_weight, w0_bias, rate1, rate2, cuton);
  TORCH_CHECK(grad_in.scalar_type() == x_in.scalar_type() && grad_in.sizes() == at::IntArrayRef({s.B, s.O, s.H, s.W}),
              "grad: expected a (", s.B, ", ", s.O, ", ", s.H, ", ", s.W, ") tensor of x's dtype, got ",
              grad_in.sizes(), " ", grad_in.scalar_type());
  const bool has_bias = w0_bias.has_value() && w0_bias->defined();
  const bool need_x = needs[0], need_w1 = needs[1], need_w0 = needs[2], need_b = needs[3] && has_bias,
             need_r1 = needs[4], need_r2 = needs[5];
  const bool need_wsum = need_w0 || need_r2, need_g = need_w1 || need_wsum || need_r1;
  const at::Tensor x = x_in.contiguous(), grad = grad_in.contiguous();
  const at::TensorOptions ro = x.options();
  const at::TensorOptions co = ro.dtype(c10::toComplexType(x.scalar_type()));
  auto empty0 = [&]() { return at::empty({0}, ro); };
  at::Tensor dx = empty0(), dw1 = at::empty({0}, co), dw0 = empty0(), db = empty0(), dr1 = empty0(), dr2 = empty0();
  const bool need_gsum = need_b || (need_r2 && has_bias);
  at::Tensor gsum;  // sum over b, h, w of grad per output channel: the bias' share of db and drate2
  at::Tensor wsum = need_wsum ? at::zeros({s.I, s.O}, ro.dtype(at::kDouble)) : at::Tensor();
  if ((need_x || need_g) && grad.numel() > 0 && x.numel() > 0) {
    at::Tensor gt = at::empty({s.H, s.K, s.B, s.O}, co);
    spectrum_freq_major_into(gt, grad);
    // the DC term of the orthonormal spectrum is the sum over (h, w) divided by sqrt(H W)
    if (need_gsum) gsum = at::real(gt.select(0, 0).select(0, 0)).sum(0).mul_(std::sqrt(double(s.H * s.W)));
    // One (H, K, B, I) spectrum buffer serves twice: first for conj(X), then for dX, whose inverse FFT runs
    // after G's spectrum is released.
    at::Tensor spec = at::empty({s.H, s.K, s.B, s.I}, co);
    const at::Tensor w1 = resolved(weights1).contiguous(), w0 = w0_weight.reshape({s.O, s.I}).contiguous();
    if (need_w1) dw1 = cached_empty_like(w1);  // weight-sized: from the cache, not fresh pages each step
    const int64_t items = s.I * ((s.O + kOB - 1) / kOB);
    at::Tensor r1part = need_r1 ? at::zeros({items}, ro.dtype(at::kDouble)) : at::Tensor();
    dispatch_real(x.scalar_type(), "fam_layer_backward", [&](auto tag) {
      using T = decltype(tag);
      const T r1 = rate1.item<T>(), r2 = rate2.item<T>();
      const int64_t rh = fam_radius(s.H, cuton), rw = fam_radius(s.W, cuton);
      const std::vector<RowChunk> chunks = row_chunks(s.H, s.K * s.I * s.O * 2 * int64_t(sizeof(T)));
      at::Tensor buf = chunk_buffer(chunks, s, co);
      // Chunk by chunk: g = X^H G at the chunk's frequencies (X kept conjugated) and the weights'
      // gradients from it; then conj(Wc) formed over g in the same buffer (drate1's share read from g
      // first) and dX = G Wc^H written over the chunk's rows of X, which g no longer needs.
      if (need_g) spectrum_freq_major_into(spec, x, true);
      std::vector<int64_t> row_of(s.H, -1);
      for (const RowChunk& c : chunks) {
        const std::vector<int64_t> rows = c.list();
        const int64_t nlo = c.lo1 - c.lo0, nhi = c.hi1 - c.hi0;
        if (need_g) {
          bmm_rows(buf, 0, spec, c.lo0, 't', gt, c.lo0, 'n', nlo);
          bmm_rows(buf, nlo, spec, c.hi0, 't', gt, c.hi0, 'n', nhi);
          for (int64_t r = 0; r < int64_t(rows.size()); ++r) row_of[rows[r]] = r;
          if (need_w1 || need_wsum)
            fold_rows_backward<T>(real_ptr<T>(buf), r1, s.I, s.O, s.H, s.W, rh, rw, rows, row_of,
                                  need_w1 ? real_ptr<T>(dw1) : nullptr, need_wsum ? wsum.data_ptr<double>() : nullptr);
          for (int64_t h : rows) row_of[h] = -1;
        }
        if (need_x || need_r1)
          fold_rows<T>(real_ptr<T>(w1), real_ptr<T>(w0), r1, r2, s.I, s.O, s.H, s.W, rh, rw, rows, true,
                       real_ptr<T>(buf), need_r1 ? r1part.data_ptr<double>() : nullptr);
        if (need_x) {
          bmm_rows(spec, c.lo0, gt, c.lo0, 'n', buf, 0, 't', nlo);
          bmm_rows(spec, c.hi0, gt, c.hi0, 'n', buf, nlo, 't', nhi);
        }
      }
      if (need_x) {
        gt.reset();  // neither is needed by the inverse FFT
        buf.reset();
        dx = at::empty(x.sizes(), ro);
        real_of_freq_major_into(dx, spec);
      }
    });
    if (need_r1) dr1 = r1part.sum().reshape({1}).to(x.scalar_type());
  } else {
    if (need_x) dx = at::zeros(x.sizes(), ro);
    if (need_w1) dw1 = at::zeros(weights1.sizes(), co);
    if (need_r1) dr1 = at::zeros({1}, ro);
  }
  if (need_gsum && !gsum.defined()) gsum = grad.sum({0, 2, 3});
  if (need_w0) dw0 = (rate2.to(at::kDouble) * wsum.t()).to(x.scalar_type()).reshape(w0_weight.sizes()).contiguous();
  if (need_b) db = rate2 * gsum;
  if (need_r2) {
    at::Tensor v = need_wsum ? (w0_weight.reshape({s.O, s.I}).t().to(at::kDouble) * wsum).sum()
                             : at::zeros({}, ro.dtype(at::kDouble));
    if (has_bias) v = v + (w0_bias->to(at::kDouble) * gsum.to(at::kDouble)).sum();
    dr2 = v.reshape({1}).to(x.scalar_type());
  }
  return {dx, dw1, dw0, db, dr1, dr2};
}

}  // namespace
}  // namespace cpu
}  // namespace dctkd

TORCH_LIBRARY_IMPL(dctkd_ext, CPU, m) {
  m.impl("fam_layer_forward", &dctkd::cpu::fam_layer_forward_cpu);
  m.impl("fam_layer_backward", &dctkd::cpu::fam_layer_backward_cpu);
}
