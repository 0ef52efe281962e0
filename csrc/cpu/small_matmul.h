// The small dense matmul of the per-map transforms on the CPU (map_transforms.h): the maps are at
// most a few hundred per side, so each product is done in cache.
#pragma once
#include <cstdint>

namespace dctkd {
namespace cpu {

// C (M x N) = A (M x K) * B (K x N), all row-major (small_matmul.cpp: the AVX-512 or AVX2/FMA code
// where the CPU has it, the baseline x86-64 code elsewhere).
void matmul(const float* A, const float* B, float* C, int64_t M, int64_t K, int64_t N);
void matmul(const double* A, const double* B, double* C, int64_t M, int64_t K, int64_t N);
// The same with row strides lda >= K, ldb >= N, ldc >= N (e.g. rows padded to whole vectors).
void matmul(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc, int64_t M, int64_t K,
            int64_t N);
void matmul(const double* A, int64_t lda, const double* B, int64_t ldb, double* C, int64_t ldc, int64_t M, int64_t K,
            int64_t N);

}  // namespace cpu
}  // namespace dctkd
