// The 2D transforms of one small map on the CPU, written as small matmuls that stay in cache and
// folded by the symmetries of their bases, so each does a fraction of the dense form's work:
//   dct2_map      orthonormal DCT-II C = D_H A D_W^T and its inverse A = D_H^T C D_W; D is even/odd
//                 symmetric, D[k, n-1-m] = (-1)^k D[k, m], so each product splits into two
//                 half-size ones (the first butterfly of a fast DCT): 1/2 of the dense work.
//   real_dft2_map Re(FFT2(v)) = C_H v C_W - S_H v S_W of a real map (symmetric bases, so it is its
//                 own adjoint); C and S are even / odd in both indices and the result has
//                 c[k1, k2] = c[-k1, -k2], so only a quarter of the inputs' pairs and half of the
//                 outputs are formed: about 3/16 of the dense form's multiply-adds.
// Used by dct2d / idct2d (dct.cpp) and by phi of the DCT-KD loss (dct_at_loss.cpp).
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

namespace dctkd {
namespace cpu {

// The even / odd halves of the DCT-II matrix of size n. With ce = ceil(n/2), h = floor(n/2) and
// cep, hp those rounded up to 8 (row lengths of whole vectors; the padding columns are 0):
// de (ce x cep) = D[even k, m < ce], dodd (h x hp) = D[odd k, m < h], det and dodt their transposes.
template <typename T>
struct DctHalves {
  int64_t n, ce, h, cep, hp;
  std::vector<T> de, det, dodd, dodt;
  explicit DctHalves(int64_t n_);
};

// The folded DFT bases of size n. With nh = n/2 + 1 frequencies, nhp = nh rounded up to 8 (the row
// length of the frequency-major blocks, so their products run on whole vectors) and no = (n-1)/2
// input pairs: cos (nh x nh) = cos(2 pi k m / n) (symmetric), cos_b (nh x nhp) the same with zero
// columns appended, sin_t (no x nhp) = sin(2 pi k m / n) at row m-1 (zero padded), sin_a (nh x no)
// its transpose.
template <typename T>
struct DftHalves {
  int64_t n, nh, nhp, no;
  std::vector<T> cos, cos_b, sin_t, sin_a;
  explicit DftHalves(int64_t n_);
};

// The tables of size n, built once per process and shared (thread-safe; never freed).
template <typename T>
const DctHalves<T>& dct_halves(int64_t n);
template <typename T>
const DftHalves<T>& dft_halves(int64_t n);

// Per-thread scratch of the transforms of maps up to max_side x max_side.
template <typename T>
struct MapScratch {
  std::unique_ptr<T[]> store;
  T *full, *a, *b, *c, *d, *e, *f;
  explicit MapScratch(int64_t max_side);
};

// y = D_H x D_W^T (inverse: D_H^T x D_W) of the H x W map x (H = qh.n, W = qw.n); y may not alias x.
template <typename T>
void dct2_map(const T* x, T* y, const DctHalves<T>& qh, const DctHalves<T>& qw, bool inverse, MapScratch<T>& s);

// c = Re(FFT2(v)) of the H x W map v (H = qh.n, W = qw.n); c may not alias v.
template <typename T>
void real_dft2_map(const T* v, T* c, const DftHalves<T>& qh, const DftHalves<T>& qw, MapScratch<T>& s);

}  // namespace cpu
}  // namespace dctkd
