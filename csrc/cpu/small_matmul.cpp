// The small dense matmul of the CPU transforms (see small_matmul.h), compiled for the baseline
// x86-64 ISA and for x86-64-v3 (AVX2 + FMA), chosen once at load time.
// Register-blocked: a tile of MR rows x NV vectors of C stays in registers for the whole k loop,
// so each loaded row piece of B feeds MR fused multiply-adds (the i-k-j form reloads C every k).
#include "small_matmul.h"

#include <algorithm>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>

#include "simd.h"

namespace dctkd {
namespace cpu {
namespace {

// 32-byte vectors via the GCC/Clang vector extension: one ymm on AVX2, two xmm on baseline SSE2.
template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(32)));
  static constexpr int lanes = 8;
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(32)));
  static constexpr int lanes = 4;
};

// Half-width vectors (16 bytes) for a column tail of 4..7 floats / 2..3 doubles.
template <typename T>
struct Half;
template <>
struct Half<float> {
  typedef float type __attribute__((vector_size(16)));
  static constexpr int lanes = 4;
};
template <>
struct Half<double> {
  typedef double type __attribute__((vector_size(16)));
  static constexpr int lanes = 2;
};

// C[0:M, 0:lanes] = A[0:M, 0:K] * B[0:K, 0:lanes] with 16-byte vectors, 4 rows at a time.
template <typename T>
DCTKD_INLINE void half_column(const T* A, const T* B, T* C, int64_t M, int64_t K, int64_t N) {
  using V = typename Half<T>::type;
  int64_t i = 0;
  for (; i < M; i += 4) {
    const int rows = static_cast<int>(std::min<int64_t>(4, M - i));
    V acc[4] = {V{}, V{}, V{}, V{}};
    for (int64_t k = 0; k < K; ++k) {
      V b;
      std::memcpy(&b, B + k * N, sizeof(V));
      for (int r = 0; r < 4; ++r)
        if (r < rows) acc[r] += A[(i + r) * K + k] * b;
    }
    for (int r = 0; r < rows; ++r) std::memcpy(C + (i + r) * N, &acc[r], sizeof(V));
  }
}

template <typename T>
DCTKD_INLINE typename Vec<T>::type load(const T* p) {
  typename Vec<T>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
DCTKD_INLINE void store(T* p, typename Vec<T>::type v) {
  std::memcpy(p, &v, sizeof(v));
}

// C[0:MR, 0:NV*lanes] = A[0:MR, 0:K] * B[0:K, 0:NV*lanes]
template <typename T, int MR, int NV>
DCTKD_INLINE void tile(const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc, int64_t K) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::lanes;
  V acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = V{};
  for (int64_t k = 0; k < K; ++k) {
    V b[NV];
    for (int v = 0; v < NV; ++v) b[v] = load(B + k * ldb + v * L);
    for (int i = 0; i < MR; ++i) {
      const T a = A[i * lda + k];
      for (int v = 0; v < NV; ++v) acc[i][v] += a * b[v];
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) store(C + i * ldc + v * L, acc[i][v]);
}

// Rows [0, M) for the column block [j, j + NV*lanes).
template <typename T, int NV>
DCTKD_INLINE void column_block(const T* A, const T* B, T* C, int64_t M, int64_t K, int64_t N, int64_t j) {
  constexpr int MR = 4;
  int64_t i = 0;
  for (; i + MR <= M; i += MR) tile<T, MR, NV>(A + i * K, K, B + j, N, C + i * N + j, N, K);
  for (; i < M; ++i) tile<T, 1, NV>(A + i * K, K, B + j, N, C + i * N + j, N, K);
}

template <typename T>
DCTKD_INLINE void matmul_blocked(const T* A, const T* B, T* C, int64_t M, int64_t K, int64_t N) {
  constexpr int L = Vec<T>::lanes;
  int64_t j = 0;
  for (; j + 2 * L <= N; j += 2 * L) column_block<T, 2>(A, B, C, M, K, N, j);
  for (; j + L <= N; j += L) column_block<T, 1>(A, B, C, M, K, N, j);
  if (j + Half<T>::lanes <= N) {
    half_column(A, B + j, C + j, M, K, N);
    j += Half<T>::lanes;
  }
  if (j < N) {  // the last N % lanes columns
    for (int64_t i = 0; i < M; ++i) {
      T* c = C + i * N;
      for (int64_t jj = j; jj < N; ++jj) c[jj] = T(0);
      for (int64_t k = 0; k < K; ++k) {
        const T a = A[i * K + k];
        const T* b = B + k * N;
        for (int64_t jj = j; jj < N; ++jj) c[jj] += a * b[jj];
      }
    }
  }
}

}  // namespace

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DCTKD_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define DCTKD_CPU_CLONES
#endif

DCTKD_CPU_CLONES void matmul(const float* A, const float* B, float* C, int64_t M, int64_t K, int64_t N) {
  matmul_blocked(A, B, C, M, K, N);
}
DCTKD_CPU_CLONES void matmul(const double* A, const double* B, double* C, int64_t M, int64_t K, int64_t N) {
  matmul_blocked(A, B, C, M, K, N);
}

// One set of bases per (type, n, kinds) for the life of the process: evaluating them costs
// 2 n^2 cos/sin in double, more than the transforms themselves for a few maps.
template <typename T>
const Bases<T>& cached_bases(int64_t n, bool dct, bool dft) {
  static std::mutex mu;
  static std::map<std::tuple<int64_t, bool, bool>, std::unique_ptr<Bases<T>>> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto& slot = cache[std::make_tuple(n, dct, dft)];
  if (!slot) slot = std::make_unique<Bases<T>>(n, dct, dft);
  return *slot;
}
template const Bases<float>& cached_bases<float>(int64_t, bool, bool);
template const Bases<double>& cached_bases<double>(int64_t, bool, bool);

}  // namespace cpu
}  // namespace dctkd
