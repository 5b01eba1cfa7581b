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
