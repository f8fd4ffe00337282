// sqllm/float_emu.hpp -- emulated low-precision floats and the arithmetic
// policies of the LUT matmul's precision modes (host and device code).
//
// ---------------------------------------------------------------------------
// Formats
// ---------------------------------------------------------------------------
// A format EeMm (exp_bits = e in 2..8, man_bits = m in 0..23) is IEEE-754-like:
//   * exponent bias  B = 2^(e-1) - 1; normal exponents emin = 1 - B .. emax = B
//     (the all-ones exponent field is reserved for inf/NaN);
//   * normal values (1.f) * 2^E with m fraction bits; subnormals (0.f) * 2^emin,
//     so the smallest positive value is 2^(emin - m);
//   * largest finite value (2 - 2^-m) * 2^emax.
// E5M10 is IEEE binary16, E8M7 is bfloat16, E8M23 is binary32.  Every EeMm
// value (e <= 8, m <= 23) is exactly representable as a float, so emulated
// values are carried in ordinary floats.
//
// round_to_format(v, e, m) rounds v to the nearest EeMm value:
//   * round-to-nearest, ties to the value with an even last fraction bit,
//     with gradual underflow (subnormals), rounding at the subnormal spacing;
//   * a value whose rounding (with unbounded exponent) exceeds the largest
//     finite value becomes +-inf (IEEE overflow under round-to-nearest);
//   * +-inf stay +-inf, NaN stays NaN (the float overload returns the input
//     bits unchanged), the sign of zero is kept.
// round_to_format(double v, ...) rounds a double *once* (no double rounding)
// and returns the result as a float.
//
// ---------------------------------------------------------------------------
// Arithmetic policies (Precision), chosen at run time
// ---------------------------------------------------------------------------
// One multiply-accumulate step of a dot product is
//     acc = add(acc, mul(operand(w), operand(x)))
// with acc starting at +0.0f and the three operations defined by the mode:
//   FP32     operand(v) = v;  mul = float multiply;  add = float add
//            (each correctly rounded, never fused into an FMA).
//   FP16     operand(v) = round_to_format(v, 5, 10);
//            mul(a, b) = round_to_format(a * b, 5, 10)   (= an fp16 multiply);
//            add = float add                              (fp32 accumulate).
//   Emulated operand(v) = round_to_format(v, mul_exp, mul_man);
//            mul(a, b) = round_to_format(a * b exactly, mul_exp, mul_man);
//            add(a, b) = round_to_format(a + b exactly, acc_exp, acc_man).
// "exactly" means the real result rounded once.  It is computed in double:
// a product of two floats is exact in double, and a double sum of two floats
// rounded again to <= 24 significant bits equals the once-rounded sum because
// 53 >= 2*24 + 2 (Figueroa, "When is double rounding innocuous?", 1995).
// Hence Emulated(8,23,8,23) == FP32 and Emulated(5,10,8,23) == FP16, bit for bit.
//
// The CPU reference (sqllm/reference/lut_matmul_precision.hpp) and the CUDA
// "exact" kernel both use these policies, so their results agree bit for bit.
#pragma once

#include <cstdint>
#include <cstring>

#include "sqllm/config.hpp"
#include "sqllm/error.hpp"

namespace sqllm {

/// The arithmetic of the reproducible LUT matmul (see the header comment).
enum class Precision : int { FP32 = 0, FP16 = 1, Emulated = 2 };

constexpr int kMinEmuExpBits = 2;
constexpr int kMaxEmuExpBits = 8;
constexpr int kMinEmuManBits = 0;
constexpr int kMaxEmuManBits = 23;

/// Mode plus the two formats of Precision::Emulated (ignored by FP32/FP16).
/// Defaults: E5M10 multiply (fp16), E8M23 accumulate (fp32).
struct PrecisionConfig {
  Precision mode = Precision::FP32;
  int mul_exp = 5;
  int mul_man = 10;
  int acc_exp = 8;
  int acc_man = 23;
};

inline const char* precision_name(Precision p) {
  switch (p) {
    case Precision::FP32:
      return "fp32";
    case Precision::FP16:
      return "fp16";
    case Precision::Emulated:
      return "emulated";
  }
  return "invalid";
}

/// Throws sqllm::Error unless EeMm is a supported format (e in 2..8, m in 0..23).
inline void check_float_format(int exp_bits, int man_bits, const char* what = "format") {
  SQLLM_CHECK(exp_bits >= kMinEmuExpBits && exp_bits <= kMaxEmuExpBits, what,
              ": exponent bits must be in 2..8, got ", exp_bits);
  SQLLM_CHECK(man_bits >= kMinEmuManBits && man_bits <= kMaxEmuManBits, what,
              ": mantissa bits must be in 0..23, got ", man_bits);
}

/// Throws sqllm::Error on an unknown mode or (for Emulated) a bad format.
inline void check_precision(const PrecisionConfig& p) {
  const int m = static_cast<int>(p.mode);
  SQLLM_CHECK(m >= 0 && m <= 2, "precision mode must be FP32 (0), FP16 (1) or Emulated (2), got ",
              m);
  if (p.mode == Precision::Emulated) {
    check_float_format(p.mul_exp, p.mul_man, "multiply format");
    check_float_format(p.acc_exp, p.acc_man, "accumulate format");
  }
}

namespace detail {

SQLLM_HD std::uint64_t double_to_bits(double v) {
#if defined(__CUDA_ARCH__)
  return static_cast<std::uint64_t>(__double_as_longlong(v));
#else
  std::uint64_t u;
  std::memcpy(&u, &v, sizeof u);
  return u;
#endif
}

SQLLM_HD double bits_to_double(std::uint64_t u) {
#if defined(__CUDA_ARCH__)
  return __longlong_as_double(static_cast<long long>(u));
#else
  double v;
  std::memcpy(&v, &u, sizeof v);
  return v;
#endif
}

/// NaN test on the bits (immune to -ffinite-math-only).
SQLLM_HD bool is_nan(float v) {
#if defined(__CUDA_ARCH__)
  const std::uint32_t u = static_cast<std::uint32_t>(__float_as_int(v));
#else
  std::uint32_t u;
  std::memcpy(&u, &v, sizeof u);
#endif
  return (u & 0x7fffffffu) > 0x7f800000u;
}

SQLLM_HD float float_inf() {
#if defined(__CUDA_ARCH__)
  return __int_as_float(0x7f800000);
#else
  const std::uint32_t u = 0x7f800000u;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

/// Correctly rounded float multiply that the compiler may not fuse into an FMA.
SQLLM_HD float fmul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  volatile float p = a * b;  // the volatile store blocks FP contraction (-ffp-contract=fast)
  return p;
#endif
}

/// Correctly rounded float add that the compiler may not fuse into an FMA.
SQLLM_HD float fadd_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  volatile float s = a + b;
  return s;
#endif
}

}  // namespace detail

/// Round a double once to EeMm (2 <= e <= 8, 0 <= m <= 23; not checked here,
/// see check_float_format) and return it as a float.  See the header comment.
SQLLM_HD float round_to_format(double v, int exp_bits, int man_bits) {
  const std::uint64_t u = detail::double_to_bits(v);
  const bool neg = (u >> 63) != 0;
  const int dexp = static_cast<int>((u >> 52) & 0x7FFu);
  const std::uint64_t frac = u & ((std::uint64_t{1} << 52) - 1);
  if (dexp == 0x7FF) return static_cast<float>(v);  // inf stays inf, NaN stays NaN
  if (dexp == 0 && frac == 0) return neg ? -0.0f : 0.0f;

  // |v| = m * 2^(e - 52).  For a subnormal double the true exponent is below
  // e = -1022, but any such value lies far below every format's subnormal
  // range, where only max(e, emin) matters.
  const int e = dexp == 0 ? -1022 : dexp - 1023;
  const std::uint64_t m = dexp == 0 ? frac : (frac | (std::uint64_t{1} << 52));
  const int bias = (1 << (exp_bits - 1)) - 1;
  const int emin = 1 - bias;
  const int emax = bias;
  const float inf = detail::float_inf();
  if (e > emax) return neg ? -inf : inf;  // |v| >= 2^(emax+1) > largest finite

  // Quantum (spacing) of the format at |v|: 2^q.
  const int q = (e > emin ? e : emin) - man_bits;
  const int shift = q - (e - 52);  // >= 29 because man_bits <= 23
  std::uint64_t r = 0;
  if (shift < 64) {
    r = m >> shift;
    const std::uint64_t rem = m & ((std::uint64_t{1} << shift) - 1);
    const std::uint64_t half = std::uint64_t{1} << (shift - 1);
    if (rem > half || (rem == half && (r & 1u) != 0)) ++r;
  }  // else |v| < 2^(q-11): rounds to zero
  if (r == 0) return neg ? -0.0f : 0.0f;
  // A carry to 2^(man_bits+1) at the top exponent is an overflow.
  if (q == emax - man_bits && r > (std::uint64_t{2} << man_bits) - 1) return neg ? -inf : inf;
  // r * 2^q: r < 2^25 and -149 <= q <= 127, exact in double and in float.
  const double scale = detail::bits_to_double(static_cast<std::uint64_t>(q + 1023) << 52);
  const float mag = static_cast<float>(static_cast<double>(r) * scale);
  return neg ? -mag : mag;
}

/// Round a float to EeMm; NaN inputs are returned bit for bit.
SQLLM_HD float round_to_format(float v, int exp_bits, int man_bits) {
  if (detail::is_nan(v)) return v;
  return round_to_format(static_cast<double>(v), exp_bits, man_bits);
}

// ---------------------------------------------------------------------------
// Arithmetic policies: acc = add(acc, mul(operand(w), operand(x))).
// ---------------------------------------------------------------------------

/// Precision::FP32: float multiply and float accumulate, never fused.
struct ArithFP32 {
  SQLLM_HD float operand(float v) const { return v; }
  SQLLM_HD float mul(float a, float b) const { return detail::fmul_rn(a, b); }
  SQLLM_HD float add(float a, float b) const { return detail::fadd_rn(a, b); }
};

/// Precision::FP16: fp16 operands and fp16 product, fp32 accumulate.
struct ArithFP16 {
  SQLLM_HD float operand(float v) const { return round_to_format(v, 5, 10); }
  SQLLM_HD float mul(float a, float b) const {
    return round_to_format(static_cast<double>(a) * static_cast<double>(b), 5, 10);
  }
  SQLLM_HD float add(float a, float b) const { return detail::fadd_rn(a, b); }
};

/// Precision::Emulated: operands and product in EmulM, each accumulation in EaMa.
struct ArithEmulated {
  int mul_exp, mul_man, acc_exp, acc_man;
  SQLLM_HD float operand(float v) const { return round_to_format(v, mul_exp, mul_man); }
  SQLLM_HD float mul(float a, float b) const {
    return round_to_format(static_cast<double>(a) * static_cast<double>(b), mul_exp, mul_man);
  }
  SQLLM_HD float add(float a, float b) const {
    return round_to_format(static_cast<double>(a) + static_cast<double>(b), acc_exp, acc_man);
  }
};

/// Run f(arith) with the policy object of `p` (validated first).  This is the
/// single run-time -> compile-time switch for the precision modes.
template <class F>
decltype(auto) visit_precision(const PrecisionConfig& p, F&& f) {
  check_precision(p);
  switch (p.mode) {
    case Precision::FP16:
      return f(ArithFP16{});
    case Precision::Emulated:
      return f(ArithEmulated{p.mul_exp, p.mul_man, p.acc_exp, p.acc_man});
    case Precision::FP32:
    default:
      return f(ArithFP32{});
  }
}

}  // namespace sqllm
