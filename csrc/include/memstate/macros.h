// Host/device qualifiers shared by every header in this directory.
//
// Everything in csrc/include/memstate/ is the ONE source of truth for memstate's math: the
// CPU kernels (g++) and the CUDA kernels (nvcc) include the same inline functions, so the
// two devices cannot drift apart. Under nvcc the functions are __host__ __device__; under
// the host compiler they are plain inline functions.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MEMSTATE_HD __host__ __device__ __forceinline__
#else
#define MEMSTATE_HD inline __attribute__((always_inline))
#endif

// The math is IEEE round-to-nearest with subnormals and no contraction on both devices. Fast
// math breaks every bit-for-bit guarantee, so a build that asks for it fails here.
#if defined(__FAST_MATH__)
#error "memstate must not be compiled with -ffast-math (host): it breaks CPU == CUDA bit equality"
#endif
#if defined(__USE_FAST_MATH__) && __USE_FAST_MATH__
#error "memstate must not be compiled with nvcc --use_fast_math: it breaks CPU == CUDA bit equality"
#endif
#if defined(__CUDA_FTZ) && __CUDA_FTZ
#error "memstate must not be compiled with nvcc -ftz=true: subnormals must not flush to zero"
#endif
#if defined(__CUDA_PREC_DIV) && !__CUDA_PREC_DIV
#error "memstate must not be compiled with nvcc -prec-div=false: division must be correctly rounded"
#endif
#if defined(__CUDA_PREC_SQRT) && !__CUDA_PREC_SQRT
#error "memstate must not be compiled with nvcc -prec-sqrt=false: sqrt must be correctly rounded"
#endif

// nvcc 13 defines none of the macros above for --use_fast_math / -ftz=true / -prec-div=false /
// -prec-sqrt=false: it hands those settings to the device compiler as NVVM reflect values.
// Every memstate kernel calls MEMSTATE_NUMERICS_GUARD() first: when any of those settings is
// on, the guard calls a device function that is declared but never defined, and ptxas stops
// the build with "Unresolved extern function '...memstate_error_built_with_fast_math_ftz_or_
// approximate_div_sqrt...'". With IEEE settings the condition folds to false at compile time
// and the guard costs nothing.
#if defined(__CUDACC__)
extern "C" __device__ int __nvvm_reflect(const char*);
extern __device__ void memstate_error_built_with_fast_math_ftz_or_approximate_div_sqrt();
#define MEMSTATE_NUMERICS_GUARD()                                                                  \
  do {                                                                                             \
    if (__nvvm_reflect("__CUDA_FTZ") || __nvvm_reflect("__CUDA_USE_FAST_MATH") ||                  \
        !__nvvm_reflect("__CUDA_PREC_DIV") || !__nvvm_reflect("__CUDA_PREC_SQRT"))                 \
      memstate_error_built_with_fast_math_ftz_or_approximate_div_sqrt();                           \
  } while (0)
#endif
