// What the CPU files with GCC/Clang vector-extension code share: DCTKD_INLINE forces the vector
// helpers inline into their callers (the target_clones entry points), so no vector type crosses a
// call boundary and the ABI note GCC prints for such crossings does not apply. DCTKD_TARGET_CLONES
// compiles an entry point for x86-64-v4 (AVX-512), x86-64-v3 (AVX2 + FMA) and the baseline; the
// loader picks the one the CPU supports, so the library stays portable.
#pragma once

#if defined(__GNUC__)
#define DCTKD_INLINE inline __attribute__((always_inline))
#pragma GCC diagnostic ignored "-Wpsabi"
#else
#define DCTKD_INLINE inline
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DCTKD_TARGET_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DCTKD_TARGET_CLONES
#endif
