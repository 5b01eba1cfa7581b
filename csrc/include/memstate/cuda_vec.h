// 16-byte register vectors of storage elements, as the CUDA optimizer and scan kernels move
// them, and the msfp1 / non-finite tests applied to them. Host+device so that the index and
// tail logic can be exercised on the host as well.
#pragma once

#include "memstate/macros.h"
#include "memstate/msfp1.h"

namespace memstate {

// Storage elements per 16-byte vector: 4 float, 2 double, 8 bfloat16/float16.
template <typename T>
constexpr int kVec16Elems = static_cast<int>(16 / sizeof(T));

// 16 bytes viewed as elements or as four little-endian 32-bit words (msfp1's x_j).
template <typename T>
union Vec16 {
  uint32_t w[4];
  T e[kVec16Elems<T>];
};

// Adds the msfp1 terms of the first `nbytes` (1..16) bytes of `v` to (s0, s1). `pair0` is the
// global pair index of v's first 8 bytes. Bytes at and past `nbytes` must be zero: they are the
// zero padding of a tensor's last pair. A pair that holds no byte of the tensor is not a pair
// of it and adds nothing.
MEMSTATE_HD void msfp1_accumulate_vec16(const uint32_t* w, int nbytes, uint64_t pair0,
                                        uint64_t& s0, uint64_t& s1) {
  msfp1::accumulate_pair(w[0], w[1], pair0, s0, s1);
  if (nbytes > msfp1::kPairBytes) msfp1::accumulate_pair(w[2], w[3], pair0 + 1, s0, s1);
}

// Whether any `width`-byte lane (2, 4 or 8 bytes) of the 64-bit little-endian word `x` has all
// of `exp_mask`'s bits set: for an IEEE format with that exponent mask, an infinity or a NaN.
MEMSTATE_HD bool has_all_ones_lane(uint64_t x, int width, uint64_t exp_mask) {
  bool any = false;
  for (int sh = 0; sh < 64; sh += 8 * width) any |= ((x >> sh) & exp_mask) == exp_mask;
  return any;
}

}  // namespace memstate
