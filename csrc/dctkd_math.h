// Small math shared by the CPU and CUDA kernels: the DCT / DFT bases, the option codes of the
// DCT-KD pipeline phi (docs/DESIGN.md §3.3) and the string -> code parsers used by the op entry points.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DCTKD_HD __host__ __device__ __forceinline__
#else
#define DCTKD_HD inline
#endif

namespace dctkd {

// Orthonormal DCT-II basis D_N[k, m] = s(k) cos(pi (2m+1) k / (2N)), s(0)=sqrt(1/N), s(k>0)=sqrt(2/N).
// Always evaluated in double: the angle must be exact before rounding to the kernel's type.
DCTKD_HD double dct_basis(int64_t k, int64_t m, int64_t n) {
  const double pi = 3.14159265358979323846;
  const double s = (k == 0) ? sqrt(1.0 / double(n)) : sqrt(2.0 / double(n));
  return s * cos(pi * double((2 * m + 1) * k) / double(2 * n));
}

// Unnormalised DFT bases cos(2 pi k m / N), sin(2 pi k m / N). k*m is reduced mod N first so the
// angle stays small and exact for any N.
DCTKD_HD double dft_cos(int64_t k, int64_t m, int64_t n) {
  const double pi = 3.14159265358979323846;
  return cos(2.0 * pi * double((k * m) % n) / double(n));
}
DCTKD_HD double dft_sin(int64_t k, int64_t m, int64_t n) {
  const double pi = 3.14159265358979323846;
  return sin(2.0 * pi * double((k * m) % n) / double(n));
}

// Options of phi. The integer values are part of the kernels' ABI (CUDA/Triton take them as ints).
enum class Norm : int { None = 0, MinMax = 1, Max = 2, L2 = 3 };
enum class Transform : int { Identity = 0, Dct = 1, FftReal = 2 };
enum class Distance : int { L2 = 0, Mse = 1, Sse = 2 };
enum class Reduce : int { Mean = 0, Sum = 1 };

// Parsers: return false on an unknown name so the caller can raise an error that names the argument.
inline bool parse_norm(const std::string& s, Norm* out) {
  if (s == "none") {
    *out = Norm::None;
    return true;
  }
  if (s == "minmax") {
    *out = Norm::MinMax;
    return true;
  }
  if (s == "max") {
    *out = Norm::Max;
    return true;
  }
  if (s == "l2") {
    *out = Norm::L2;
    return true;
  }
  return false;
}
inline bool parse_transform(const std::string& s, Transform* out) {
  if (s == "identity") {
    *out = Transform::Identity;
    return true;
  }
  if (s == "dct") {
    *out = Transform::Dct;
    return true;
  }
  if (s == "fft_real") {
    *out = Transform::FftReal;
    return true;
  }
  return false;
}
inline bool parse_distance(const std::string& s, Distance* out) {
  if (s == "l2") {
    *out = Distance::L2;
    return true;
  }
  if (s == "mse") {
    *out = Distance::Mse;
    return true;
  }
  if (s == "sse") {
    *out = Distance::Sse;
    return true;
  }
  return false;
}
inline bool parse_reduce(const std::string& s, Reduce* out) {
  if (s == "mean") {
    *out = Reduce::Mean;
    return true;
  }
  if (s == "sum") {
    *out = Reduce::Sum;
    return true;
  }
  return false;
}

// |x|^p and its derivative p |x|^(p-1) sign(x); p == 2 and p == 1 are exact fast paths.
// The derivative at x == 0 is taken as 0 for every p (for p < 1 it is unbounded there).
template <typename T>
DCTKD_HD T abs_pow(T x, T p) {
  if (p == T(2)) return x * x;
  if (p == T(1)) return x < T(0) ? -x : x;
  return pow(x < T(0) ? -x : x, p);
}
template <typename T>
DCTKD_HD T abs_pow_grad(T x, T p) {
  if (p == T(2)) return T(2) * x;
  if (x == T(0)) return T(0);
  const T sgn = x < T(0) ? T(-1) : T(1);
  if (p == T(1)) return sgn;
  return p * pow(x < T(0) ? -x : x, p - T(1)) * sgn;
}

}  // namespace dctkd
