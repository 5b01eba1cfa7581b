// msfp1 CPU kernels: a scalar path (the shared inline math) and an AVX2 path, picked at run time.
// Integer arithmetic only, so every path gives the same sums bit for bit.
#include "kernels.h"

#include <cstring>
#include <stdexcept>

#include "memstate/msfp1.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define MEMSTATE_X86 1
#endif

namespace memstate {
namespace cpu {

namespace {

int g_forced_isa = -1;  // -1: auto

bool cpu_has_avx2() {
#if defined(MEMSTATE_X86)
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
#else
  return false;
#endif
}

#if defined(MEMSTATE_X86)
// Keys of 4 consecutive pairs starting at pair index P, interleaved as u0 v0 u1 v1 ... so that
// one 32-bit add to the loaded words yields u and v for 4 pairs.
__attribute__((target("avx2"))) inline __m256i lane_keys(uint32_t P, uint32_t umul, uint32_t uadd,
                                                          uint32_t vmul, uint32_t vadd) {
  return _mm256_setr_epi32(
      static_cast<int>(P * umul + uadd), static_cast<int>(P * vmul + vadd),
      static_cast<int>((P + 1) * umul + uadd), static_cast<int>((P + 1) * vmul + vadd),
      static_cast<int>((P + 2) * umul + uadd), static_cast<int>((P + 2) * vmul + vadd),
      static_cast<int>((P + 3) * umul + uadd), static_cast<int>((P + 3) * vmul + vadd));
}

__attribute__((target("avx2"))) inline __m256i lane_stride(uint32_t npairs, uint32_t umul,
                                                            uint32_t vmul) {
  const int su = static_cast<int>(npairs * umul), sv = static_cast<int>(npairs * vmul);
  return _mm256_setr_epi32(su, sv, su, sv, su, sv, su, sv);
}

// u*v for the 4 pairs in `w` (words x0 y0 x1 y1 ...) keyed by `k`, as 4 64-bit products.
__attribute__((target("avx2"))) inline __m256i nh_terms(__m256i w, __m256i k) {
  const __m256i uv = _mm256_add_epi32(w, k);
  return _mm256_mul_epu32(uv, _mm256_srli_epi64(uv, 32));
}

__attribute__((target("avx2"))) inline uint64_t hsum64(__m256i v) {
  alignas(32) uint64_t t[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(t), v);
  return t[0] + t[1] + t[2] + t[3];
}

// What the AVX2 loop does with the words it loads besides hashing them: nothing, store them to
// `dst` (a fused copy), or stream them there with non-temporal stores (dst 32-byte aligned),
// which skip the read-for-ownership of the destination lines: large copies move 2 bytes per
// byte, not 3.
enum class Store { kNone, kStore, kStream };

// 8 pairs (64 bytes) per iteration in two independent accumulator chains per lane; with a store
// policy, the bytes are also written to `dst` from the same registers: one pass over memory.
template <Store kStore>
__attribute__((target("avx2"))) void accumulate_avx2(const unsigned char* src, unsigned char* dst,
                                                     uint64_t nbytes, uint64_t first_pair, uint64_t& s0,
                                                     uint64_t& s1) {
  using namespace msfp1;
  const uint64_t groups = nbytes / 64;
  const uint32_t P = static_cast<uint32_t>(first_pair);
  __m256i k0a = lane_keys(P, kLane0UMul, kLane0UAdd, kLane0VMul, kLane0VAdd);
  __m256i k0b = lane_keys(P + 4, kLane0UMul, kLane0UAdd, kLane0VMul, kLane0VAdd);
  __m256i k1a = lane_keys(P, kLane1UMul, kLane1UAdd, kLane1VMul, kLane1VAdd);
  __m256i k1b = lane_keys(P + 4, kLane1UMul, kLane1UAdd, kLane1VMul, kLane1VAdd);
  const __m256i step0 = lane_stride(8, kLane0UMul, kLane0VMul);
  const __m256i step1 = lane_stride(8, kLane1UMul, kLane1VMul);
  __m256i a0a = _mm256_setzero_si256(), a0b = _mm256_setzero_si256();
  __m256i a1a = _mm256_setzero_si256(), a1b = _mm256_setzero_si256();
  for (uint64_t g = 0; g < groups; ++g) {
    const unsigned char* q = src + g * 64;
    const __m256i wa = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
    const __m256i wb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32));
    if constexpr (kStore == Store::kStream) {
      __m256i* to = reinterpret_cast<__m256i*>(dst + g * 64);
      _mm256_stream_si256(to, wa);
      _mm256_stream_si256(to + 1, wb);
    } else if constexpr (kStore == Store::kStore) {
      __m256i* to = reinterpret_cast<__m256i*>(dst + g * 64);
      _mm256_storeu_si256(to, wa);
      _mm256_storeu_si256(to + 1, wb);
    }
    a0a = _mm256_add_epi64(a0a, nh_terms(wa, k0a));
    a0b = _mm256_add_epi64(a0b, nh_terms(wb, k0b));
    a1a = _mm256_add_epi64(a1a, nh_terms(wa, k1a));
    a1b = _mm256_add_epi64(a1b, nh_terms(wb, k1b));
    k0a = _mm256_add_epi32(k0a, step0);
    k0b = _mm256_add_epi32(k0b, step0);
    k1a = _mm256_add_epi32(k1a, step1);
    k1b = _mm256_add_epi32(k1b, step1);
  }
  if constexpr (kStore == Store::kStream) _mm_sfence();  // streamed lines visible before dst is read
  s0 += hsum64(_mm256_add_epi64(a0a, a0b));
  s1 += hsum64(_mm256_add_epi64(a1a, a1b));
  const uint64_t done = groups * 64;
  const unsigned char* tail = src + done;
  if constexpr (kStore != Store::kNone) {
    std::memcpy(dst + done, tail, static_cast<size_t>(nbytes - done));
    tail = dst + done;
  }
  accumulate_bytes(tail, nbytes - done, first_pair + done / kPairBytes, s0, s1);
}
#endif

}  // namespace

Isa active_isa() {
  if (g_forced_isa >= 0) return static_cast<Isa>(g_forced_isa);
  return cpu_has_avx2() ? Isa::kAvx2 : Isa::kScalar;
}

const char* isa_name(Isa isa) { return isa == Isa::kAvx2 ? "avx2" : "scalar"; }

std::string supported_isas() { return cpu_has_avx2() ? "scalar,avx2" : "scalar"; }

void set_isa(const std::string& name) {
  if (name == "auto") {
    g_forced_isa = -1;
  } else if (name == "scalar") {
    g_forced_isa = static_cast<int>(Isa::kScalar);
  } else if (name == "avx2") {
    if (!cpu_has_avx2()) throw std::invalid_argument("memstate: this CPU does not support avx2");
    g_forced_isa = static_cast<int>(Isa::kAvx2);
  } else {
    throw std::invalid_argument("memstate: unknown CPU ISA '" + name +
                                "'; valid: auto, scalar, avx2");
  }
}

void msfp1_accumulate(const unsigned char* data, uint64_t nbytes, uint64_t first_pair,
                      uint64_t& s0, uint64_t& s1) {
#if defined(MEMSTATE_X86)
  if (nbytes >= 64 && active_isa() == Isa::kAvx2) {  // (below 64 bytes the vector loop never runs)
    accumulate_avx2<Store::kNone>(data, nullptr, nbytes, first_pair, s0, s1);
    return;
  }
#endif
  msfp1::accumulate_bytes(data, nbytes, first_pair, s0, s1);
}

void msfp1_copy_accumulate(const unsigned char* src, unsigned char* dst, uint64_t nbytes, uint64_t first_pair,
                           uint64_t& s0, uint64_t& s1, bool stream) {
#if defined(MEMSTATE_X86)
  if (nbytes >= 64 && active_isa() == Isa::kAvx2) {
    if (stream && reinterpret_cast<uintptr_t>(dst) % 32 == 0) {
      accumulate_avx2<Store::kStream>(src, dst, nbytes, first_pair, s0, s1);
    } else {
      accumulate_avx2<Store::kStore>(src, dst, nbytes, first_pair, s0, s1);
    }
    return;
  }
#endif
  (void)stream;
  std::memcpy(dst, src, static_cast<size_t>(nbytes));
  msfp1::accumulate_bytes(dst, nbytes, first_pair, s0, s1);
}

}  // namespace cpu
}  // namespace memstate
