// Small helpers shared by the CUDA kernels of csrc/cuda/: packed 16/8-byte loads and stores,
// conversions to the accumulation type, IEEE-exact division/sqrt (setup.py compiles with
// --use_fast_math, which would otherwise make fp32 `/` and sqrt approximate, unlike the CPU
// kernels), an accurate |x|^p, and the host-side device checks.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <utility>

#include "../dctkd_math.h"

namespace dctkd {
namespace cuda {

// Input dtype codes carried in the kernels' work lists.
enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

inline int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kF32;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    case at::kDouble: return kF64;
    default: TORCH_CHECK(false, "dctkd_ext CUDA: unsupported dtype ", t);
  }
}

// ------------------------------------------------------------------------------ packed accesses
template <int kBytes>
struct RawVec;
template <>
struct RawVec<16> {
  using type = uint4;
};
template <>
struct RawVec<8> {
  using type = uint2;
};
template <>
struct RawVec<4> {
  using type = unsigned int;
};
template <>
struct RawVec<2> {
  using type = unsigned short;
};

// V consecutive elements moved as one 16/8/4/2-byte access (the caller checks the alignment).
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load_pack(const T* p) {
  using R = typename RawVec<sizeof(T) * V>::type;
  const R r = __ldg(reinterpret_cast<const R*>(p));
  Pack<T, V> out;
  memcpy(&out, &r, sizeof(R));
  return out;
}

template <typename T, int V>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, V>& v) {
  using R = typename RawVec<sizeof(T) * V>::type;
  R r;
  memcpy(&r, &v, sizeof(R));
  *reinterpret_cast<R*>(p) = r;
}

// ------------------------------------------------------------------------------ exact arithmetic
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return a / b; }
__device__ __forceinline__ float sqrt_rn(float a) { return __fsqrt_rn(a); }
__device__ __forceinline__ double sqrt_rn(double a) { return sqrt(a); }

// pow evaluated in double: fast-math would turn powf into the approximate __powf. Not inlined:
// one copy of the long fp64 pow per kernel, called only for p other than 1 and 2.
__device__ __noinline__ inline double pow_fp64(double x, double p) { return pow(x, p); }
template <typename T>
__device__ __forceinline__ T pow_acc(T x, T p) {
  return static_cast<T>(pow_fp64(static_cast<double>(x), static_cast<double>(p)));
}

// |x|^p and p |x|^(p-1) sign(x): the same cases as dctkd::abs_pow / abs_pow_grad.
template <typename T>
__device__ __forceinline__ T abs_pow_dev(T x, T p) {
  if (p == T(2)) return x * x;
  if (p == T(1)) return fabs(x);
  return pow_acc(fabs(x), p);
}
template <typename T>
__device__ __forceinline__ T abs_pow_grad_dev(T x, T p) {
  if (p == T(2)) return T(2) * x;
  if (x == T(0)) return T(0);
  const T sgn = x < T(0) ? T(-1) : T(1);
  if (p == T(1)) return sgn;
  return p * pow_acc(fabs(x), p - T(1)) * sgn;
}

// ------------------------------------------------------------------------------ host helpers
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// An attribute of the current device (cheap; no sync). Avoids ATen/cuda/CUDAContext.h, which
// needs the cuSPARSE/cuBLAS headers that a bare CUDA toolkit may lack.
inline int device_attribute(cudaDeviceAttr attr) {
  int dev = 0, value = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, dev));
  return value;
}

// Multiprocessors of the current device (at least 1).
inline int64_t sm_count() { return std::max(1, device_attribute(cudaDevAttrMultiProcessorCount)); }

// `blocks`, capped at per_sm blocks a multiprocessor: the grid of a kernel whose blocks walk the work
// that a full grid would take (grid-stride loops), once the GPU is full.
inline int64_t capped_grid(int64_t blocks, int64_t per_sm) { return std::min<int64_t>(blocks, per_sm * sm_count()); }

// A batch of B > 0 samples split over gridDim.y (at most 65535) so that, with `jblocks` blocks a split,
// there are about per_sm blocks a multiprocessor in all: `splits` splits of `per` samples each (the
// last one may have fewer), every split non-empty.
struct BatchSplit {
  int64_t splits, per;
};
inline BatchSplit batch_split(int64_t B, int64_t jblocks, int64_t per_sm) {
  int64_t splits = std::max<int64_t>(1, std::min<int64_t>(B, ceil_div(per_sm * sm_count(), jblocks)));
  splits = std::min<int64_t>(splits, 65535);
  const int64_t per = ceil_div(B, splits);
  return {ceil_div(B, per), per};
}

// Raises the dynamic shared-memory limit of `kernel` on the current device when a launch needs more
// than the default 48 KB. The limit only ever grows (to the largest size asked for so far), under a
// lock: setting it on every call let one host thread lower it between another thread's call and its
// launch. One lookup per launch after the first.
template <typename K>
inline void allow_dynamic_smem(K kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return;
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, size_t> raised;  // (kernel, device) -> limit set
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  const std::lock_guard<std::mutex> lock(mu);
  size_t& limit = raised[{reinterpret_cast<const void*>(kernel), dev}];
  if (bytes > limit) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
    limit = bytes;
  }
}

}  // namespace cuda
}  // namespace dctkd
