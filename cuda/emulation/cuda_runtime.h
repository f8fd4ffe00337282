// Emulation shim for <cuda_runtime.h> (see sqllm_emu.hpp).
#pragma once
#if !defined(SQLLM_CUDA_EMULATION)
#error "cuda/emulation is on the include path but SQLLM_CUDA_EMULATION is not defined"
#endif
#include "sqllm_emu.hpp"
