// Host + device math of the FAM filter (docs/DESIGN.md §3.4): the high-pass box of `cuton` and the index of
// the mirrored frequency, shared by the CPU and CUDA kernels of fam_half_weight.
#pragma once
#include <cstdint>

#include "dctkd_math.h"

namespace dctkd {
namespace spectral {

// r = int(cuton * int(n / 2)) exactly as the released Python code computes it (one double product,
// truncated toward zero).
inline int64_t fam_radius(int64_t n, double cuton) { return static_cast<int64_t>(cuton * static_cast<double>(n / 2)); }

// Whether frequency p of a dim of size n lies in the zeroed band {-r, ..., r-1} (p taken mod n,
// signed as after fftshift).
DCTKD_HD bool fam_in_band(int64_t p, int64_t n, int64_t r) {
  const int64_t s = p >= n - n / 2 ? p - n : p;
  return s >= -r && s <= r - 1;
}

// The mask value M[p, q] on the full plane: 0 inside the box around DC (both dims in band), else 1.
DCTKD_HD bool fam_keep(int64_t p, int64_t q, int64_t nh, int64_t nw, int64_t rh, int64_t rw) {
  return !(fam_in_band(p, nh, rh) && fam_in_band(q, nw, rw));
}

DCTKD_HD int64_t mirror(int64_t p, int64_t n) { return p == 0 ? 0 : n - p; }

}  // namespace spectral
}  // namespace dctkd
