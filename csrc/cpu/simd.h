// What the CPU files with GCC/Clang vector-extension code share, and the one place that says which
// x86-64 instruction sets they are compiled for and how the one the CPU supports is picked.
//
// DCTKD_INLINE forces the vector helpers inline into their callers (the entry points below), so no
// vector type crosses a call boundary and the ABI note GCC prints for such crossings does not apply.
//
// Two ways to pick the code for the CPU at hand, both keeping the library portable:
//  - DCTKD_TARGET_CLONES compiles one entry point for x86-64-v4 (AVX-512), x86-64-v3 (AVX2 + FMA)
//    and the baseline; the loader picks the one the CPU supports. The default for entry points.
//  - DCTKD_TARGET_AVX2_FMA / DCTKD_TARGET_V4 compile a function for that one level; the caller
//    calls it only where cpu_has_avx2_fma() / cpu_has_v4() (checked once, then cached) says yes,
//    and its baseline code otherwise. For code whose source differs by level (e.g. wider vector
//    types for AVX-512) or that the caller picks inside a template. Each is defined only where
//    DCTKD_HAVE_TARGET_AVX2_FMA / DCTKD_HAVE_TARGET_V4 is.
// DCTKD_TARGET_CLONES_V3 clones for x86-64-v3 and the baseline only: for the baseline/AVX2 entry
// point of code whose AVX-512 version is a separate DCTKD_TARGET_V4 function picked by cpu_has_v4(),
// where an x86-64-v4 clone would never run.
// target_clones is used with GCC only; Clang and other targets get the baseline entry points.
#pragma once

#if defined(__GNUC__)
#define DCTKD_INLINE inline __attribute__((always_inline))
#pragma GCC diagnostic ignored "-Wpsabi"
#else
#define DCTKD_INLINE inline
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DCTKD_TARGET_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define DCTKD_TARGET_CLONES_V3 __attribute__((target_clones("arch=x86-64-v3", "default")))
#define DCTKD_HAVE_TARGET_V4 1
#define DCTKD_TARGET_V4 __attribute__((target("arch=x86-64-v4")))
#else
#define DCTKD_TARGET_CLONES
#define DCTKD_TARGET_CLONES_V3
#endif

#if defined(__x86_64__) && defined(__GNUC__)
#define DCTKD_HAVE_TARGET_AVX2_FMA 1
#define DCTKD_TARGET_AVX2_FMA __attribute__((target("avx2,fma")))
#endif

namespace dctkd {
namespace cpu {

// Whether this CPU runs DCTKD_TARGET_AVX2_FMA code (false where that is not compiled).
inline bool cpu_has_avx2_fma() {
#ifdef DCTKD_HAVE_TARGET_AVX2_FMA
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
#else
  return false;
#endif
}

// Whether this CPU runs DCTKD_TARGET_V4 code (false where that is not compiled).
inline bool cpu_has_v4() {
#ifdef DCTKD_HAVE_TARGET_V4
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
  return yes;
#else
  return false;
#endif
}

}  // namespace cpu
}  // namespace dctkd
