// Dense helpers for the per-map transforms on the CPU: the maps are at most a few hundred per side,
// so a transform is two small matmuls done in cache with vectorisable i-k-j loops.
#pragma once
#include <cstdint>
#include <vector>

#include "../dctkd_math.h"

namespace dctkd {
namespace cpu {

// C (M x N) = A (M x K) * B (K x N), all row-major (small_matmul.cpp: an AVX2/FMA clone is
// picked at load time where the CPU has it, the baseline x86-64 code elsewhere).
void matmul(const float* A, const float* B, float* C, int64_t M, int64_t K, int64_t N);
void matmul(const double* A, const double* B, double* C, int64_t M, int64_t K, int64_t N);

// The bases as explicit N x N matrices (and their transposes), evaluated in double then rounded.
template <typename T>
struct Bases {
  int64_t n = 0;
  std::vector<T> d, dt;  // orthonormal DCT-II matrix D[k, m] and D^T
  std::vector<T> c, s;   // DFT cos / sin matrices (symmetric)
  explicit Bases(int64_t n_, bool dct, bool dft) : n(n_) {
    if (dct) {
      d.resize(n * n);
      dt.resize(n * n);
      for (int64_t k = 0; k < n; ++k)
        for (int64_t m = 0; m < n; ++m) {
          const T v = static_cast<T>(dct_basis(k, m, n));
          d[k * n + m] = v;
          dt[m * n + k] = v;
        }
    }
    if (dft) {
      c.resize(n * n);
      s.resize(n * n);
      for (int64_t k = 0; k < n; ++k)
        for (int64_t m = 0; m < n; ++m) {
          c[k * n + m] = static_cast<T>(dft_cos(k, m, n));
          s[k * n + m] = static_cast<T>(dft_sin(k, m, n));
        }
    }
  }
};

// The bases of size n, built once per process and shared (thread-safe; never freed).
template <typename T>
const Bases<T>& cached_bases(int64_t n, bool dct, bool dft);

}  // namespace cpu
}  // namespace dctkd
