// The small dense matmul of the CPU transforms (see small_matmul.h), compiled for the baseline
// x86-64 ISA, for x86-64-v3 (AVX2 + FMA) and for x86-64-v4 (AVX-512); the CPU's best is used.
// Register-blocked: a tile of MR rows x NV vectors of C stays in registers for the whole k loop,
// so each loaded row piece of B feeds MR fused multiply-adds (the i-k-j form reloads C every k).
#include "small_matmul.h"

#include <algorithm>
#include <cstring>

#include "simd.h"

namespace dctkd {
namespace cpu {
namespace {

// Vectors of VB bytes via the GCC/Clang vector extension: VB = 64 is one zmm (AVX-512), VB = 32 one
// ymm on AVX2 or two xmm on baseline SSE2, VB = 16 one xmm.
template <typename T, int VB>
struct Vec {
  typedef T type __attribute__((vector_size(VB)));
  static constexpr int lanes = VB / static_cast<int>(sizeof(T));
};

template <typename V, typename T>
DCTKD_INLINE V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename V, typename T>
DCTKD_INLINE void store(T* p, V v) {
  std::memcpy(p, &v, sizeof(v));
}

// C[0:MR, 0:NV*lanes] = A[0:MR, 0:K] * B[0:K, 0:NV*lanes]
template <typename T, int VB, int MR, int NV>
DCTKD_INLINE void tile(const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc, int64_t K) {
  using V = typename Vec<T, VB>::type;
  constexpr int L = Vec<T, VB>::lanes;
  V acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = V{};
  for (int64_t k = 0; k < K; ++k) {
    V b[NV];
    for (int v = 0; v < NV; ++v) b[v] = load<V>(B + k * ldb + v * L);
    for (int i = 0; i < MR; ++i) {
      const T a = A[i * lda + k];
      for (int v = 0; v < NV; ++v) acc[i][v] += a * b[v];
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) store(C + i * ldc + v * L, acc[i][v]);
}

struct Strides {
  int64_t lda, ldb, ldc;
};

// Rows [0, M) for the column block [j, j + NV*lanes): tiles of 8 rows, then 4, then single rows.
// Eight independent accumulators keep both FMA pipes busy through their latency; two vectors a row
// take 16 registers, which only AVX-512 has to spare (AVX2 then stays at 4 rows).
template <typename T, int VB, int NV>
DCTKD_INLINE void column_block(const T* A, const T* B, T* C, int64_t M, int64_t K, Strides s, int64_t j) {
  constexpr int MR = (NV == 1 || VB == 64) ? 8 : 4;
  int64_t i = 0;
  for (; i + MR <= M; i += MR) tile<T, VB, MR, NV>(A + i * s.lda, s.lda, B + j, s.ldb, C + i * s.ldc + j, s.ldc, K);
  if constexpr (MR == 8) {
    if (i + 4 <= M) {
      tile<T, VB, 4, NV>(A + i * s.lda, s.lda, B + j, s.ldb, C + i * s.ldc + j, s.ldc, K);
      i += 4;
    }
  }
  for (; i < M; ++i) tile<T, VB, 1, NV>(A + i * s.lda, s.lda, B + j, s.ldb, C + i * s.ldc + j, s.ldc, K);
}

// Column blocks of two and one VB-byte vectors, then narrower vectors down to 16 bytes, then the
// last few columns one by one (a dot product each, kept in a register).
template <typename T, int VB>
DCTKD_INLINE void matmul_blocked(const T* A, const T* B, T* C, int64_t M, int64_t K, int64_t N, Strides s) {
  constexpr int L = Vec<T, VB>::lanes;
  int64_t j = 0;
  for (; j + 2 * L <= N; j += 2 * L) column_block<T, VB, 2>(A, B, C, M, K, s, j);
  for (; j + L <= N; j += L) column_block<T, VB, 1>(A, B, C, M, K, s, j);
  if constexpr (VB == 64) {
    if (j + Vec<T, 32>::lanes <= N) {
      column_block<T, 32, 1>(A, B, C, M, K, s, j);
      j += Vec<T, 32>::lanes;
    }
  }
  if (j + Vec<T, 16>::lanes <= N) {
    column_block<T, 16, 1>(A, B, C, M, K, s, j);
    j += Vec<T, 16>::lanes;
  }
  for (int64_t i = 0; i < M; ++i)
    for (int64_t jj = j; jj < N; ++jj) {
      T acc = T(0);
      for (int64_t k = 0; k < K; ++k) acc += A[i * s.lda + k] * B[k * s.ldb + jj];
      C[i * s.ldc + jj] = acc;
    }
}

}  // namespace

namespace {
// The AVX-512 code is matmul_zmm (wider vectors), so matmul_ymm needs no x86-64-v4 clone.
DCTKD_TARGET_CLONES_V3 void matmul_ymm(const float* A, const float* B, float* C, int64_t M, int64_t K, int64_t N,
                                       Strides s) {
  matmul_blocked<float, 32>(A, B, C, M, K, N, s);
}
DCTKD_TARGET_CLONES_V3 void matmul_ymm(const double* A, const double* B, double* C, int64_t M, int64_t K, int64_t N,
                                       Strides s) {
  matmul_blocked<double, 32>(A, B, C, M, K, N, s);
}
#ifdef DCTKD_HAVE_TARGET_V4
// 16 floats per register and 32 registers: twice the columns per tile of the AVX2 code.
DCTKD_TARGET_V4 void matmul_zmm(const float* A, const float* B, float* C, int64_t M, int64_t K, int64_t N, Strides s) {
  matmul_blocked<float, 64>(A, B, C, M, K, N, s);
}
DCTKD_TARGET_V4 void matmul_zmm(const double* A, const double* B, double* C, int64_t M, int64_t K, int64_t N,
                                Strides s) {
  matmul_blocked<double, 64>(A, B, C, M, K, N, s);
}
#endif
template <typename T>
void matmul_any(const T* A, const T* B, T* C, int64_t M, int64_t K, int64_t N, Strides s) {
#ifdef DCTKD_HAVE_TARGET_V4
  if (cpu_has_v4()) return matmul_zmm(A, B, C, M, K, N, s);
#endif
  matmul_ymm(A, B, C, M, K, N, s);
}
}  // namespace

void matmul(const float* A, const float* B, float* C, int64_t M, int64_t K, int64_t N) {
  matmul_any(A, B, C, M, K, N, Strides{K, N, N});
}
void matmul(const double* A, const double* B, double* C, int64_t M, int64_t K, int64_t N) {
  matmul_any(A, B, C, M, K, N, Strides{K, N, N});
}
void matmul(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc, int64_t M, int64_t K,
            int64_t N) {
  matmul_any(A, B, C, M, K, N, Strides{lda, ldb, ldc});
}
void matmul(const double* A, int64_t lda, const double* B, int64_t ldb, double* C, int64_t ldc, int64_t M, int64_t K,
            int64_t N) {
  matmul_any(A, B, C, M, K, N, Strides{lda, ldb, ldc});
}

}  // namespace cpu
}  // namespace dctkd
