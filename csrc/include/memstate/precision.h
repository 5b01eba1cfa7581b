// Loads and stores of parameter/state elements in their storage dtype, with the math done in
// a wider type (float for float32, bfloat16 and float16; double for float64).
//
// The narrowing conversions are written out bit by bit here instead of using c10::BFloat16 on
// the host and __nv_bfloat16 on the device, so that CPU and CUDA round the same way by
// construction: round to nearest, ties to even; overflow goes to infinity.
//
// Every NaN is stored as ONE canonical quiet NaN per dtype (sign 0, payload 0):
//   float32 0x7FC00000, float64 0x7FF8000000000000, bfloat16 0x7FC0, float16 0x7E00.
// IEEE leaves the sign and payload of a NaN result to the hardware (x86 makes 0xFFC00000 for
// 0/0 and keeps an input NaN's payload; NVIDIA GPUs return 0x7FFFFFFF), so without this the
// stored bytes, and their fingerprints, would depend on the device. The select is branch-free
// (x != x), so the vectorised CPU loops stay vectorised.
#pragma once

#include <cstring>

#include "memstate/macros.h"

namespace memstate {

// Storage types: 16-bit patterns wrapped so that overloads can tell them apart.
struct bf16_bits {
  uint16_t x;
};
struct f16_bits {
  uint16_t x;
};

MEMSTATE_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

MEMSTATE_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

constexpr uint32_t kCanonicalNanF32 = 0x7FC00000u;
constexpr uint64_t kCanonicalNanF64 = 0x7FF8000000000000ull;
constexpr uint16_t kCanonicalNanBF16 = 0x7FC0u;
constexpr uint16_t kCanonicalNanF16 = 0x7E00u;

MEMSTATE_HD double bits_double(uint64_t u) {
#if defined(__CUDA_ARCH__)
  return __longlong_as_double(static_cast<long long>(u));
#else
  double d;
  std::memcpy(&d, &u, 8);
  return d;
#endif
}

// v, or the canonical NaN if v is any NaN.
MEMSTATE_HD float canonical_nan(float v) { return v != v ? bits_float(kCanonicalNanF32) : v; }
MEMSTATE_HD double canonical_nan(double v) { return v != v ? bits_double(kCanonicalNanF64) : v; }

// ---- bfloat16: the top 16 bits of a float32.
MEMSTATE_HD float to_math(bf16_bits v) { return bits_float(static_cast<uint32_t>(v.x) << 16); }

MEMSTATE_HD bf16_bits round_bf16(float f) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return {kCanonicalNanBF16};
  const uint32_t lsb = (u >> 16) & 1u;
  return {static_cast<uint16_t>((u + 0x7FFFu + lsb) >> 16)};
}

// ---- float16 (IEEE binary16).
MEMSTATE_HD float to_math(f16_bits v) {
  const uint32_t h = v.x;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  const uint32_t man = h & 0x3FFu;
  if (exp == 0x1Fu) return bits_float(sign | 0x7F800000u | (man << 13));  // inf / NaN
  if (exp != 0) return bits_float(sign | ((exp + 112u) << 23) | (man << 13));
  // zero or subnormal: man * 2^-24, exact in float
  const float mag = static_cast<float>(man) * 5.9604644775390625e-08f;
  return sign ? -mag : mag;
}

MEMSTATE_HD f16_bits round_f16(float f) {
  const uint32_t u = float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return {kCanonicalNanF16};
  if (a >= 0x477FF000u) return {static_cast<uint16_t>(sign | 0x7C00u)};  // rounds to >= 65520: inf
  if (a < 0x38800000u) {
    // result is subnormal (or zero): value / 2^-24, rounded to nearest even integer
    if (a < 0x33000000u) return {sign};  // < 2^-25: rounds to zero
    const uint32_t e = a >> 23;            // biased exponent, 102..112
    const uint32_t m = (a & 0x7FFFFFu) | 0x800000u;
    const uint32_t shift = 126u - e;       // 14..24
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return {static_cast<uint16_t>(sign | r)};
  }
  // normal: rebias exponent (127 -> 15) and round the 13 dropped mantissa bits
  const uint32_t lsb = (a >> 13) & 1u;
  const uint32_t r = (a - (112u << 23) + 0xFFFu + lsb) >> 13;
  return {static_cast<uint16_t>(sign | r)};
}

// ---- float32 / float64: identity.
MEMSTATE_HD float to_math(float v) { return v; }
MEMSTATE_HD double to_math(double v) { return v; }

// Math type of a storage type.
template <typename T>
struct MathOf {
  using type = float;
};
template <>
struct MathOf<double> {
  using type = double;
};
template <typename T>
using math_t = typename MathOf<T>::type;

// Rounds a math value to storage type T (one rounding, to nearest even; NaN -> canonical NaN).
template <typename T>
MEMSTATE_HD T to_storage(math_t<T> v);
template <>
MEMSTATE_HD float to_storage<float>(float v) {
  return canonical_nan(v);
}
template <>
MEMSTATE_HD double to_storage<double>(double v) {
  return canonical_nan(v);
}
template <>
MEMSTATE_HD bf16_bits to_storage<bf16_bits>(float v) {
  return round_bf16(v);
}
template <>
MEMSTATE_HD f16_bits to_storage<f16_bits>(float v) {
  return round_f16(v);
}

}  // namespace memstate
