// What the CPU files with GCC/Clang vector-extension code share: DCTKD_INLINE forces the vector
// helpers inline into their callers (the target_clones entry points), so no vector type crosses a
// call boundary and the ABI note GCC prints for such crossings does not apply.
#pragma once

#if defined(__GNUC__)
#define DCTKD_INLINE inline __attribute__((always_inline))
#pragma GCC diagnostic ignored "-Wpsabi"
#else
#define DCTKD_INLINE inline
#endif
