// The small dense matmul of the CPU transforms (see small_matmul.h), compiled twice on x86-64:
// for the baseline ISA and for x86-64-v3 (AVX2 + FMA), chosen once at load time by the loader.
#include "small_matmul.h"

namespace dctkd {
namespace cpu {
namespace {

// i-k-j order: the inner loop is a contiguous axpy the compiler vectorises.
template <typename T>
inline void matmul_ikj(const T* A, const T* B, T* C, int64_t M, int64_t K, int64_t N) {
  for (int64_t i = 0; i < M; ++i) {
    T* c = C + i * N;
    for (int64_t j = 0; j < N; ++j) c[j] = T(0);
    for (int64_t k = 0; k < K; ++k) {
      const T a = A[i * K + k];
      const T* b = B + k * N;
      for (int64_t j = 0; j < N; ++j) c[j] += a * b[j];
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
  matmul_ikj(A, B, C, M, K, N);
}
DCTKD_CPU_CLONES void matmul(const double* A, const double* B, double* C, int64_t M, int64_t K, int64_t N) {
  matmul_ikj(A, B, C, M, K, N);
}

}  // namespace cpu
}  // namespace dctkd
