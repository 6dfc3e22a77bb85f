#ifndef SWITCHYARD_COMMON_CPU_CLONES_H_
#define SWITCHYARD_COMMON_CPU_CLONES_H_

#include <cstdint>

// Hand-written CPU loops (permutation, fused activations, conversions) are compiled three
// times: for AVX-512 (x86-64-v4: 16 floats a vector, byte and word ops included), for AVX2,
// and for plain x86-64; the loader picks the best one this CPU runs (GCC's target_clones,
// through an ifunc). A default build thus runs on any x86-64 and still uses the wide units
// where they exist.
//
//   SY_CPU_CLONES void Axpy(float* __restrict__ y, const float* __restrict__ x, float a, int64_t n);
#if defined(__SANITIZE_THREAD__)
// ThreadSanitizer builds (--config=tsan) get the default version only: target_clones picks
// through ifunc resolvers, which the loader runs while relocating, before ThreadSanitizer is
// initialised, and their instrumented code crashes there (every test with a cloned loop
// segfaulted at start-up under tsan).
#define SY_CPU_CLONES
#else
#define SY_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#endif

// Around kernels written with AVX-512 intrinsics: GCC 12.0-12.2 (Debian 12's) warns
// "'__Y' is used uninitialized" inside its own headers, once per inlined intrinsic, about the
// placeholder operand of _mm512_undefined_* (GCC bug 105593, fixed in 12.3): 48 such warnings
// in a build of //moe/.... These silence -Wuninitialized and -Wmaybe-uninitialized between them.
#define SY_INTRINSICS_BEGIN                                      \
  _Pragma("GCC diagnostic push")                                 \
  _Pragma("GCC diagnostic ignored \"-Wuninitialized\"")          \
  _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"")
#define SY_INTRINSICS_END _Pragma("GCC diagnostic pop")

namespace switchyard::common {

// Whether this CPU has AVX-512 (F, BW, VL) with the bf16 instructions (AVX512-BF16): the CPUs
// on which LibTorch's bf16 GEMMs run natively, and the hand-written bf16 kernels with them.
inline bool HasAvx512Bf16() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
  return has;
}

// Asks for the `bytes` bytes from p into the cache, one request per 64-byte line: for rows a
// loop will read soon from places the hardware prefetcher cannot predict.
inline void PrefetchBytes(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t byte = 0; byte < bytes; byte += 64) __builtin_prefetch(c + byte);
}

}  // namespace switchyard::common

#endif  // SWITCHYARD_COMMON_CPU_CLONES_H_
