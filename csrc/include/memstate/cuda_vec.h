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

// 16 bytes at `p` as four little-endian 32-bit words, for a `p` with no alignment guarantee
// beyond `align` (4: word loads; anything else: byte loads). The path for sources that are not
// 16-byte aligned, e.g. a float view at a 4-byte offset into a flat buffer: read in place,
// never cloned.
MEMSTATE_HD void load_words16(const unsigned char* p, int align, uint32_t* w) {
  if (align == 4) {
    const uint32_t* q = reinterpret_cast<const uint32_t*>(p);
    for (int k = 0; k < 4; ++k) w[k] = q[k];
    return;
  }
  for (int k = 0; k < 4; ++k) {
    w[k] = static_cast<uint32_t>(p[4 * k]) | (static_cast<uint32_t>(p[4 * k + 1]) << 8) |
           (static_cast<uint32_t>(p[4 * k + 2]) << 16) | (static_cast<uint32_t>(p[4 * k + 3]) << 24);
  }
}

// The inverse: stores four little-endian words to 16 bytes at `p` (alignment as above).
MEMSTATE_HD void store_words16(unsigned char* p, int align, const uint32_t* w) {
  if (align == 4) {
    uint32_t* q = reinterpret_cast<uint32_t*>(p);
    for (int k = 0; k < 4; ++k) q[k] = w[k];
    return;
  }
  for (int k = 0; k < 16; ++k) p[k] = static_cast<unsigned char>(w[k / 4] >> (8 * (k % 4)));
}

// 16, 4 or 1: the largest of these that divides the address.
MEMSTATE_HD int address_align(const void* p) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  return (a & 15u) == 0 ? 16 : (a & 3u) == 0 ? 4 : 1;
}

// Whether any `width`-byte lane (2, 4 or 8 bytes) of the 64-bit little-endian word `x` has all
// of `exp_mask`'s bits set: for an IEEE format with that exponent mask, an infinity or a NaN.
MEMSTATE_HD bool has_all_ones_lane(uint64_t x, int width, uint64_t exp_mask) {
  bool any = false;
  for (int sh = 0; sh < 64; sh += 8 * width) any |= ((x >> sh) & exp_mask) == exp_mask;
  return any;
}

}  // namespace memstate
