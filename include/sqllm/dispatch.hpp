// sqllm/dispatch.hpp -- turn a run-time bit width into a compile-time one.
//
// SQLLM_DISPATCH_BITS(bits, BITS, ...) runs the trailing statements with
// `constexpr int BITS` equal to the run-time `bits`; an unsupported width
// throws sqllm::Error("unsupported bits=5 ...").  This is the only place the
// per-width switch is written.
#pragma once

#include "sqllm/error.hpp"

#define SQLLM_BITS_CASE(N, NAME, ...) \
  case N: {                           \
    constexpr int NAME = N;           \
    __VA_ARGS__                       \
    break;                            \
  }

/// Widths 1..8 (host code: quantizers, packing, CPU kernels).
#define SQLLM_DISPATCH_BITS(bits, NAME, ...)                                      \
  switch (bits) {                                                                 \
    SQLLM_BITS_CASE(1, NAME, __VA_ARGS__)                                         \
    SQLLM_BITS_CASE(2, NAME, __VA_ARGS__)                                         \
    SQLLM_BITS_CASE(3, NAME, __VA_ARGS__)                                         \
    SQLLM_BITS_CASE(4, NAME, __VA_ARGS__)                                         \
    SQLLM_BITS_CASE(5, NAME, __VA_ARGS__)                                         \
    SQLLM_BITS_CASE(6, NAME, __VA_ARGS__)                                         \
    SQLLM_BITS_CASE(7, NAME, __VA_ARGS__)                                         \
    SQLLM_BITS_CASE(8, NAME, __VA_ARGS__)                                         \
    default:                                                                      \
      throw ::sqllm::Error(::sqllm::detail::concat("unsupported bits=", (bits),   \
                                                   " (supported: 1..8)"));        \
  }
