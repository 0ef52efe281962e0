// The folded per-map transforms of map_transforms.h.
#include "map_transforms.h"

#include <algorithm>
#include <map>
#include <memory>
#include <mutex>

#include "../dctkd_math.h"
#include "simd.h"
#include "small_matmul.h"

namespace dctkd {
namespace cpu {

template <typename T>
DctHalves<T>::DctHalves(int64_t n_)
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

namespace {
int64_t round_up8(int64_t n) { return (n + 7) / 8 * 8; }
}  // namespace

template <typename T>
DftHalves<T>::DftHalves(int64_t n_)
    : n(n_),
      nh(n_ / 2 + 1),
      nhp(round_up8(nh)),
      no((n_ - 1) / 2),
      cos(nh * nh),
      cos_b(nh * nhp, T(0)),
      sin_t(no * nhp, T(0)),
      sin_a(nh * no) {
  for (int64_t k = 0; k < nh; ++k)
    for (int64_t m = 0; m < nh; ++m) cos[k * nh + m] = cos_b[m * nhp + k] = static_cast<T>(dft_cos(k, m, n));
  for (int64_t m = 1; m <= no; ++m)
    for (int64_t k = 0; k < nh; ++k) {
      const T v = static_cast<T>(dft_sin(k, m, n));
      sin_t[(m - 1) * nhp + k] = v;
      sin_a[k * no + (m - 1)] = v;
    }
}

namespace {

template <typename Table>
const Table& cached(int64_t n) {
  static std::mutex mu;
  static std::map<int64_t, std::unique_ptr<Table>> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto& slot = cache[n];
  if (!slot) slot = std::make_unique<Table>(n);
  return *slot;
}

// Y (M x W) = X D^T (forward) or X D (inverse), along the rows of X.
template <typename T>
DCTKD_INLINE void dct_along_rows(const T* X, T* Y, int64_t M, const DctHalves<T>& q, bool inverse, MapScratch<T>& s) {
  const int64_t W = q.n, ce = q.ce, h = q.h;
  T *u = s.a, *v = s.b, *pe = s.c, *po = s.d;
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
DCTKD_INLINE void dct_along_cols(const T* Y, T* Z, int64_t N, const DctHalves<T>& q, bool inverse, MapScratch<T>& s) {
  const int64_t H = q.n, ce = q.ce, h = q.h;
  T *u = s.a, *v = s.b, *pe = s.c, *po = s.d;
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

}  // namespace

template <typename T>
const DctHalves<T>& dct_halves(int64_t n) {
  return cached<DctHalves<T>>(n);
}
template <typename T>
const DftHalves<T>& dft_halves(int64_t n) {
  return cached<DftHalves<T>>(n);
}

template <typename T>
MapScratch<T>::MapScratch(int64_t max_side) {
  // One uninitialised block: every transform writes its scratch before reading it.
  const int64_t half = max_side * round_up8(max_side / 2 + 1);
  store.reset(new T[max_side * max_side + 6 * half]);
  full = store.get();
  T** parts[] = {&a, &b, &c, &d, &e, &f};
  for (int i = 0; i < 6; ++i) *parts[i] = full + max_side * max_side + i * half;
}

template <typename T>
DCTKD_TARGET_CLONES void dct2_map(const T* x, T* y, const DctHalves<T>& qh, const DctHalves<T>& qw, bool inverse,
                                  MapScratch<T>& s) {
  dct_along_rows(x, s.full, qh.n, qw, inverse, s);
  dct_along_cols(s.full, y, qw.n, qh, inverse, s);
}

// Rows: P = v C_W and Q = v S_W at the nh_W frequencies k2 <= W/2 (the rest follow from
// P[:, W-k] = P[:, k], Q[:, W-k] = -Q[:, k]), from the pair sums and differences of each row.
// Columns: the same fold over h gives X = C_H P and Y = S_H Q at k1 <= H/2; c = X - Y there,
// c[k1, W-k2] = X + Y, and the rows k1 > H/2 are c[k1, k2] = c[H-k1, (W-k2) mod W].
template <typename T>
DCTKD_TARGET_CLONES void real_dft2_map(const T* v, T* c, const DftHalves<T>& qh, const DftHalves<T>& qw,
                                       MapScratch<T>& s) {
  const int64_t H = qh.n, W = qw.n, nhw = qw.nh, ldf = qw.nhp, now = qw.no, nhh = qh.nh, noh = qh.no;
  T *E = s.a, *O = s.b, *P = s.c, *Q = s.d;
  for (int64_t i = 0; i < H; ++i) {
    const T* x = v + i * W;
    T* e = E + i * nhw;
    T* o = O + i * now;
    e[0] = x[0];
    for (int64_t m = 1; m <= now; ++m) {
      e[m] = x[m] + x[W - m];
      o[m - 1] = x[m] - x[W - m];
    }
    if (W % 2 == 0 && W > 1) e[W / 2] = x[W / 2];
  }
  // P and Q have rows of ldf (whole vectors; the padding columns come out 0).
  matmul(E, nhw, qw.cos_b.data(), ldf, P, ldf, H, nhw, ldf);
  if (now > 0) matmul(O, now, qw.sin_t.data(), ldf, Q, ldf, H, now, ldf);
  // Fold the rows of P and Q the same way (E and O are free again).
  T *Pe = E, *Qo = O, *X = s.e, *Y = s.f;
  std::copy(P, P + ldf, Pe);
  for (int64_t m = 1; m <= noh; ++m)
    for (int64_t j = 0; j < ldf; ++j) {
      Pe[m * ldf + j] = P[m * ldf + j] + P[(H - m) * ldf + j];
      if (now > 0) Qo[(m - 1) * ldf + j] = Q[m * ldf + j] - Q[(H - m) * ldf + j];
    }
  if (H % 2 == 0 && H > 1) std::copy(P + (H / 2) * ldf, P + (H / 2 + 1) * ldf, Pe + (H / 2) * ldf);
  matmul(qh.cos.data(), nhh, Pe, ldf, X, ldf, nhh, nhh, ldf);
  const bool any_sin = noh > 0 && now > 0;  // S_H Q is zero when either size has no odd pairs
  if (any_sin) matmul(qh.sin_a.data(), noh, Qo, ldf, Y, ldf, nhh, noh, ldf);
  for (int64_t k1 = 0; k1 < nhh; ++k1) {
    T* row = c + k1 * W;
    const T* x = X + k1 * ldf;
    const T* y = Y + k1 * ldf;
    if (any_sin) {
      for (int64_t k2 = 0; k2 < nhw; ++k2) row[k2] = x[k2] - y[k2];
      for (int64_t k2 = nhw; k2 < W; ++k2) row[k2] = x[W - k2] + y[W - k2];
    } else {
      for (int64_t k2 = 0; k2 < nhw; ++k2) row[k2] = x[k2];
      for (int64_t k2 = nhw; k2 < W; ++k2) row[k2] = x[W - k2];
    }
  }
  for (int64_t k1 = nhh; k1 < H; ++k1) {
    const T* src = c + (H - k1) * W;
    T* row = c + k1 * W;
    row[0] = src[0];
    for (int64_t k2 = 1; k2 < W; ++k2) row[k2] = src[W - k2];
  }
}

#define DCTKD_MAP_TRANSFORMS(T)                                                                            \
  template struct DctHalves<T>;                                                                            \
  template struct DftHalves<T>;                                                                            \
  template struct MapScratch<T>;                                                                           \
  template const DctHalves<T>& dct_halves<T>(int64_t);                                                     \
  template const DftHalves<T>& dft_halves<T>(int64_t);                                                     \
  template void dct2_map<T>(const T*, T*, const DctHalves<T>&, const DctHalves<T>&, bool, MapScratch<T>&); \
  template void real_dft2_map<T>(const T*, T*, const DftHalves<T>&, const DftHalves<T>&, MapScratch<T>&);
DCTKD_MAP_TRANSFORMS(float)
DCTKD_MAP_TRANSFORMS(double)
#undef DCTKD_MAP_TRANSFORMS

}  // namespace cpu
}  // namespace dctkd
