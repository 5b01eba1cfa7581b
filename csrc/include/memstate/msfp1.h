// msfp1: memstate's 128-bit tensor fingerprint (spec: docs/fingerprint.md).
//
// Two independent 64-bit lanes, each an NH-style universal hash over the 8-byte pairs of the
// tensor's bytes: S_k = sum_p u_k(p) * v_k(p) (mod 2^64), where u/v are the pair's two
// little-endian 32-bit words plus keys that depend on the pair index p. Because the per-pair
// terms are combined by integer addition, any partition of the pairs over threads, blocks or
// shards, summed in any order, gives the same S_k; the 64-bit mixing runs once per tensor in
// finalize_lane().
#pragma once

#include "memstate/macros.h"

namespace memstate {
namespace msfp1 {

// u = x_2p + P*kU_MUL + kU_ADD, v = x_2p+1 + P*kV_MUL + kV_ADD (mod 2^32), P = p mod 2^32.
constexpr uint32_t kLane0UMul = 0x9E3779B1u;
constexpr uint32_t kLane0UAdd = 0x7F4A7C15u;
constexpr uint32_t kLane0VMul = 0x85EBCA77u;
constexpr uint32_t kLane0VAdd = 0x165667B1u;
constexpr uint32_t kLane1UMul = 0xC2B2AE3Du;
constexpr uint32_t kLane1UAdd = 0x27D4EB2Fu;
constexpr uint32_t kLane1VMul = 0x27D4EB2Du;
constexpr uint32_t kLane1VAdd = 0x61C88647u;
// Length keys of the finaliser, one per lane.
constexpr uint64_t kLane0LenKey = 0x9E3779B97F4A7C15ull;
constexpr uint64_t kLane1LenKey = 0xC2B2AE3D27D4EB4Full;

// Bytes per pair: two 32-bit words.
constexpr int kPairBytes = 8;

// The two lanes' partial sums S_0, S_1 (mod 2^64).
struct Sums {
  uint64_t s0;
  uint64_t s1;
};

// SplitMix64 finaliser.
MEMSTATE_HD uint64_t mix64(uint64_t z) {
  z ^= z >> 30;
  z *= 0xBF58476D1CE4E5B9ull;
  z ^= z >> 27;
  z *= 0x94D049BB133111EBull;
  z ^= z >> 31;
  return z;
}

// Adds the terms of pair p = (x0, x1) to both lanes.
MEMSTATE_HD void accumulate_pair(uint32_t x0, uint32_t x1, uint64_t pair_index, uint64_t& s0,
                                 uint64_t& s1) {
  const uint32_t P = static_cast<uint32_t>(pair_index);
  const uint32_t u0 = x0 + P * kLane0UMul + kLane0UAdd;
  const uint32_t v0 = x1 + P * kLane0VMul + kLane0VAdd;
  const uint32_t u1 = x0 + P * kLane1UMul + kLane1UAdd;
  const uint32_t v1 = x1 + P * kLane1VMul + kLane1VAdd;
  s0 += static_cast<uint64_t>(u0) * static_cast<uint64_t>(v0);
  s1 += static_cast<uint64_t>(u1) * static_cast<uint64_t>(v1);
}

// Reads `avail` (< 8) trailing bytes as one zero-padded pair, little-endian.
MEMSTATE_HD void load_tail_pair(const unsigned char* p, uint64_t avail, uint32_t& x0,
                                uint32_t& x1) {
  uint64_t w = 0;
  for (uint64_t i = 0; i < avail; ++i) w |= static_cast<uint64_t>(p[i]) << (8 * i);
  x0 = static_cast<uint32_t>(w);
  x1 = static_cast<uint32_t>(w >> 32);
}

// Reference-shaped scalar loop: adds the pairs of `nbytes` bytes at `data`, the first of which
// has global pair index `first_pair`, to (s0, s1). A trailing partial pair is zero-padded, so
// only the last shard of a tensor may have nbytes % 8 != 0. Assumes a little-endian machine
// (x86-64, AArch64 and NVIDIA GPUs all are).
MEMSTATE_HD void accumulate_bytes(const unsigned char* data, uint64_t nbytes, uint64_t first_pair,
                                  uint64_t& s0, uint64_t& s1) {
  const uint64_t full = nbytes / kPairBytes;
  for (uint64_t i = 0; i < full; ++i) {
    const unsigned char* q = data + i * kPairBytes;
    const uint32_t x0 = static_cast<uint32_t>(q[0]) | (static_cast<uint32_t>(q[1]) << 8) |
                        (static_cast<uint32_t>(q[2]) << 16) | (static_cast<uint32_t>(q[3]) << 24);
    const uint32_t x1 = static_cast<uint32_t>(q[4]) | (static_cast<uint32_t>(q[5]) << 8) |
                        (static_cast<uint32_t>(q[6]) << 16) | (static_cast<uint32_t>(q[7]) << 24);
    accumulate_pair(x0, x1, first_pair + i, s0, s1);
  }
  const uint64_t rem = nbytes - full * kPairBytes;
  if (rem != 0) {
    uint32_t x0, x1;
    load_tail_pair(data + full * kPairBytes, rem, x0, x1);
    accumulate_pair(x0, x1, first_pair + full, s0, s1);
  }
}

// F_k = mix64(S_k ^ mix64(L + K_k)), L = total byte length of the whole tensor.
MEMSTATE_HD uint64_t finalize_lane0(uint64_t s0, uint64_t total_bytes) {
  return mix64(s0 ^ mix64(total_bytes + kLane0LenKey));
}
MEMSTATE_HD uint64_t finalize_lane1(uint64_t s1, uint64_t total_bytes) {
  return mix64(s1 ^ mix64(total_bytes + kLane1LenKey));
}

}  // namespace msfp1
}  // namespace memstate
