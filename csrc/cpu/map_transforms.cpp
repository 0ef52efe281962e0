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

namespace {
int64_t round_up8(int64_t n) { return (n + 7) / 8 * 8; }
}  // namespace

template <typename T>
DctHalves<T>::DctHalves(int64_t n_)
    : n(n_),
      ce((n_ + 1) / 2),
      h(n_ / 2),
      cep(round_up8(ce)),
      hp(round_up8(h)),
      de(ce * cep, T(0)),
      det(ce * cep, T(0)),
      dodd(h * hp, T(0)),
      dodt(h * hp, T(0)) {
  for (int64_t k = 0; k < ce; ++k)
    for (int64_t m = 0; m < ce; ++m) {
      const T v = static_cast<T>(dct_basis(2 * k, m, n));
      de[k * cep + m] = v;
      det[m * cep + k] = v;
    }
  for (int64_t k = 0; k < h; ++k)
    for (int64_t m = 0; m < h; ++m) {
      const T v = static_cast<T>(dct_basis(2 * k + 1, m, n));
      dodd[k * hp + m] = v;
      dodt[m * hp + k] = v;
    }
}

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

// The DCT of a map works on a "split" layout: each row holds its even-frequency half (cep wide)
// and then its odd-frequency half (hp wide), and the rows are in the same even-then-odd order, so
// every product runs on whole vectors and only the final (or first) step interleaves.

// out[2k] = src[k], out[2k+1] = src[cep + k]: one split row back to frequency order.
template <typename T>
DCTKD_INLINE void zip_row(const T* src, T* out, const DctHalves<T>& q) {
  const T* odd = src + q.cep;
  for (int64_t k = 0; k < q.h; ++k) {
    out[2 * k] = src[k];
    out[2 * k + 1] = odd[k];
  }
  if (q.ce > q.h) out[2 * q.h] = src[q.h];
}

// The inverse of zip_row; the padding columns are zeroed (they enter the next product's padding).
template <typename T>
DCTKD_INLINE void unzip_row(const T* in, T* dst, const DctHalves<T>& q) {
  T* odd = dst + q.cep;
  for (int64_t k = 0; k < q.h; ++k) {
    dst[k] = in[2 * k];
    odd[k] = in[2 * k + 1];
  }
  if (q.ce > q.h) dst[q.h] = in[2 * q.h];
  std::fill(dst + q.ce, odd, T(0));
  std::fill(odd + q.h, odd + q.hp, T(0));
}

// e[m] = x[m] + x[n-1-m], o[m] = x[m] - x[n-1-m] (m < h), e[h] = x[h] for odd n: the first
// butterfly, along a row (stride 1) of length n = q.n.
template <typename T>
DCTKD_INLINE void fold_row(const T* x, T* e, T* o, const DctHalves<T>& q) {
  const int64_t n = q.n;
  for (int64_t m = 0; m < q.h; ++m) {
    e[m] = x[m] + x[n - 1 - m];
    o[m] = x[m] - x[n - 1 - m];
  }
  if (q.ce > q.h) e[q.h] = x[q.h];
}

// Its adjoint: x[m] = e[m] + o[m], x[n-1-m] = e[m] - o[m].
template <typename T>
DCTKD_INLINE void unfold_row(const T* e, const T* o, T* x, const DctHalves<T>& q) {
  const int64_t n = q.n;
  for (int64_t m = 0; m < q.h; ++m) {
    x[m] = e[m] + o[m];
    x[n - 1 - m] = e[m] - o[m];
  }
  if (q.ce > q.h) x[q.h] = e[q.h];
}

// The same two butterflies across the rows (length ld each) of an n-row block.
template <typename T>
DCTKD_INLINE void fold_rows(const T* Y, T* E, T* O, int64_t ld, const DctHalves<T>& q) {
  for (int64_t m = 0; m < q.h; ++m) {
    const T* top = Y + m * ld;
    const T* bot = Y + (q.n - 1 - m) * ld;
    T* e = E + m * ld;
    T* o = O + m * ld;
    for (int64_t j = 0; j < ld; ++j) {
      e[j] = top[j] + bot[j];
      o[j] = top[j] - bot[j];
    }
  }
  if (q.ce > q.h) std::copy(Y + q.h * ld, Y + (q.h + 1) * ld, E + q.h * ld);
}

template <typename T>
DCTKD_INLINE void unfold_rows(const T* E, const T* O, T* Y, int64_t ld, const DctHalves<T>& q) {
  for (int64_t m = 0; m < q.h; ++m) {
    const T* e = E + m * ld;
    const T* o = O + m * ld;
    T* top = Y + m * ld;
    T* bot = Y + (q.n - 1 - m) * ld;
    for (int64_t j = 0; j < ld; ++j) {
      top[j] = e[j] + o[j];
      bot[j] = e[j] - o[j];
    }
  }
  if (q.ce > q.h) std::copy(E + q.h * ld, E + (q.h + 1) * ld, Y + q.h * ld);
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
  // Parts of max_side rows of a half-spectrum padded to whole vectors; full holds two parts (the
  // DCT's split layout, or one whole map), and a + b, c + d are contiguous.
  const int64_t part = max_side * round_up8(max_side / 2 + 1);
  store.reset(new T[8 * part]);
  full = store.get();
  T** parts[] = {&a, &b, &c, &d, &e, &f};
  for (int i = 0; i < 6; ++i) *parts[i] = full + (2 + i) * part;
}

// Forward: fold each row, multiply by the halves of D_W^T into the split layout (H x ld), fold
// across rows, multiply by the halves of D_H (even rows first), zip each row back. The inverse runs
// the same steps transposed, in reverse order.
template <typename T>
DCTKD_TARGET_CLONES void dct2_map(const T* x, T* y, const DctHalves<T>& qh, const DctHalves<T>& qw, bool inverse,
                                  MapScratch<T>& s) {
  const int64_t H = qh.n, W = qw.n, ld = qw.cep + qw.hp;
  T* split = s.full;  // H x ld
  T* even = s.a;      // up to 2 parts: ce_H x ld, or H x cep_W
  T* odd = s.c;       // up to 2 parts: h_H x ld, or H x hp_W
  T* split_odd = split + qh.ce * ld;  // the odd rows of the split layout, in frequency order
  if (!inverse) {
    for (int64_t i = 0; i < H; ++i) fold_row(x + i * W, even + i * qw.cep, odd + i * qw.hp, qw);
    matmul(even, qw.cep, qw.det.data(), qw.cep, split, ld, H, qw.ce, qw.cep);
    if (qw.h > 0) matmul(odd, qw.hp, qw.dodt.data(), qw.hp, split + qw.cep, ld, H, qw.h, qw.hp);
    fold_rows(split, even, odd, ld, qh);
    matmul(qh.de.data(), qh.cep, even, ld, split, ld, qh.ce, qh.ce, ld);
    if (qh.h > 0) matmul(qh.dodd.data(), qh.hp, odd, ld, split_odd, ld, qh.h, qh.h, ld);
    for (int64_t k = 0; k < qh.ce; ++k) zip_row(split + k * ld, y + 2 * k * W, qw);
    for (int64_t k = 0; k < qh.h; ++k) zip_row(split_odd + k * ld, y + (2 * k + 1) * W, qw);
  } else {
    for (int64_t k = 0; k < qh.ce; ++k) unzip_row(x + 2 * k * W, split + k * ld, qw);
    for (int64_t k = 0; k < qh.h; ++k) unzip_row(x + (2 * k + 1) * W, split_odd + k * ld, qw);
    matmul(qh.det.data(), qh.cep, split, ld, even, ld, qh.ce, qh.ce, ld);
    if (qh.h > 0) matmul(qh.dodt.data(), qh.hp, split_odd, ld, odd, ld, qh.h, qh.h, ld);
    unfold_rows(even, odd, split, ld, qh);
    matmul(split, ld, qw.de.data(), qw.cep, even, qw.cep, H, qw.ce, qw.cep);
    if (qw.h > 0) matmul(split + qw.cep, ld, qw.dodd.data(), qw.hp, odd, qw.hp, H, qw.h, qw.hp);
    for (int64_t i = 0; i < H; ++i) unfold_row(even + i * qw.cep, odd + i * qw.hp, y + i * W, qw);
  }
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
