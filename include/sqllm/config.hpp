// sqllm/config.hpp -- portability macros shared by host and device code.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define SQLLM_HD __host__ __device__ __forceinline__
#else
#define SQLLM_HD inline
#endif

// Full unrolling hint that every compiler we build with understands.
#if defined(__CUDA_ARCH__) || defined(__clang__)
#define SQLLM_UNROLL _Pragma("unroll")
#elif defined(__CUDACC__)
#define SQLLM_UNROLL /* nvcc's host pass: its front end knows neither spelling */
#elif defined(__GNUC__)
#define SQLLM_UNROLL _Pragma("GCC unroll 32")
#else
#define SQLLM_UNROLL
#endif
