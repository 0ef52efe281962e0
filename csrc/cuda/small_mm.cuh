// Block-level dense transforms of one small map (H x W, H and W up to a few hundred) held in shared
// memory (or a block's global scratch): the DCT / DFT bases built in the kernel from fp64 tables
// and then rounded, and a matmul that stores its output transposed, so that two of them apply
// X <- L_H X L_W^T with every operand read along its contiguous dimension.
#pragma once

#include <cstdint>

#include "../dctkd_math.h"

namespace dctkd {
namespace cuda {

__host__ __device__ inline int64_t round_up4(int64_t x) { return (x + 3) & ~int64_t(3); }

// Leading dimension of a transposed intermediate (W rows of H): odd, so the lanes of mm_t, which store
// along rows with this stride, hit 32 different banks.
__host__ __device__ inline int64_t odd_ld(int64_t x) { return x | 1; }

// ---------------------------------------------------------------------------------------- bases
// cos(pi j / (2N)) for j < 4N: the DCT-II basis value s(k) cos(pi (2m+1) k / (2N)) of dct_basis is
// s(k) * tab[((2m+1) k) mod 4N]; the reduced angle is exact in fp64 before rounding.
__device__ inline void dct_table(double* tab, int N) {
  const double pi = 3.14159265358979323846;
  for (int j = threadIdx.x; j < 4 * N; j += blockDim.x) tab[j] = cos(pi * double(j) / double(2 * N));
}

// cos / sin(2 pi j / N) for j < N, exactly dft_cos / dft_sin of the reduced index.
__device__ inline void dft_tables(double* tc, double* ts, int N) {
  for (int j = threadIdx.x; j < N; j += blockDim.x) {
    tc[j] = dft_cos(j, 1, N);
    ts[j] = dft_sin(j, 1, N);
  }
}

// Which matrix fill_basis writes, as LT[k * ld + i] (k < N rows, i < ld columns, zero for i >= N):
enum BasisKind : int {
  kDctT = 0,   // LT[k][i] = D[i][k]   (L = D_N)
  kDctN = 1,   // LT[k][i] = D[k][i]   (L = D_N^T)
  kTable = 2,  // LT[k][i] = tab[(k i) mod N]  (the symmetric DFT cos / sin matrices)
};

template <typename T>
__device__ inline void fill_basis(T* LT, int N, int ld, int kind, const double* tab) {
  const double s0 = sqrt(1.0 / double(N)), s1 = sqrt(2.0 / double(N));
  const int64_t n4 = int64_t(4) * N;
  for (int e = threadIdx.x; e < N * ld; e += blockDim.x) {
    const int k = e / ld, i = e - k * ld;
    double v = 0.0;
    if (i < N) {
      if (kind == kDctT) v = (i == 0 ? s0 : s1) * tab[((2 * int64_t(k) + 1) * i) % n4];
      else if (kind == kDctN) v = (k == 0 ? s0 : s1) * tab[((2 * int64_t(i) + 1) * k) % n4];
      else v = tab[(int64_t(k) * i) % N];
    }
    LT[e] = static_cast<T>(v);
  }
}

// ---------------------------------------------------------------------------------------- matmul
__device__ __forceinline__ void load4(const float* p, float& a, float& b, float& c, float& d) {
  const float4 v = *reinterpret_cast<const float4*>(p);
  a = v.x;
  b = v.y;
  c = v.z;
  d = v.w;
}
__device__ __forceinline__ void load4(const double* p, double& a, double& b, double& c, double& d) {
  const double2 v0 = reinterpret_cast<const double2*>(p)[0];
  const double2 v1 = reinterpret_cast<const double2*>(p)[1];
  a = v0.x;
  b = v0.y;
  c = v1.x;
  d = v1.y;
}

// out[j * ldo + i] = sum_k LT[k * ldl + i] * R[k * ldr + j]       for i < M, j < N, k < K
//   kMode 1: and out2[j * ldo + i] = sum_k LT2[k * ldl + i] * R[k * ldr + j]
//   kMode 2: out[j * ldo + i] = sum_k LT[..] R[..] - sum_k LT2[k * ldl + i] * R2[k * ldr + j]
// Each thread computes 4 consecutive i for one j: the 4 LT values are one 16-byte load broadcast
// to the lanes of a row block (ldl % 4 == 0, 16-byte aligned bases, zero padding up to ldl), the R
// values are read along j across lanes. Lanes store with a stride of ldo elements: gcd(ldo, 32)-way
// bank conflicts in fp32, none for odd ldo (odd_ld). Must be called by every thread of the block; no barrier.
template <typename T, int kMode>
__device__ inline void mm_t(const T* LT, const T* LT2, int ldl, const T* R, const T* R2, int ldr, T* out, T* out2,
                            int ldo, int M, int N, int K) {
  const int mb = (M + 3) >> 2;
  const int items = mb * N;
  for (int it = threadIdx.x; it < items; it += blockDim.x) {
    const int ib = it / N, j = it - ib * N, i0 = ib * 4;
    T a0 = 0, a1 = 0, a2 = 0, a3 = 0, b0 = 0, b1 = 0, b2 = 0, b3 = 0;
    const T* l = LT + i0;
    const T* l2 = LT2 + i0;
    const T* r = R + j;
    const T* r2 = R2 + j;
#pragma unroll 4
    for (int k = 0; k < K; ++k) {
      const T rv = r[k * ldr];
      T x0, x1, x2, x3;
      load4(l + k * ldl, x0, x1, x2, x3);
      a0 += x0 * rv;
      a1 += x1 * rv;
      a2 += x2 * rv;
      a3 += x3 * rv;
      if constexpr (kMode != 0) {
        const T rv2 = (kMode == 2) ? r2[k * ldr] : rv;
        T y0, y1, y2, y3;
        load4(l2 + k * ldl, y0, y1, y2, y3);
        b0 += y0 * rv2;
        b1 += y1 * rv2;
        b2 += y2 * rv2;
        b3 += y3 * rv2;
      }
    }
    T* o = out + j * ldo + i0;
    if constexpr (kMode == 2) {
      a0 -= b0;
      a1 -= b1;
      a2 -= b2;
      a3 -= b3;
    }
    o[0] = a0;  // i0 < M always
    if (i0 + 1 < M) o[1] = a1;
    if (i0 + 2 < M) o[2] = a2;
    if (i0 + 3 < M) o[3] = a3;
    if constexpr (kMode == 1) {
      T* o2 = out2 + j * ldo + i0;
      o2[0] = b0;
      if (i0 + 1 < M) o2[1] = b1;
      if (i0 + 2 < M) o2[2] = b2;
      if (i0 + 3 < M) o2[3] = b3;
    }
  }
}

}  // namespace cuda
}  // namespace dctkd
