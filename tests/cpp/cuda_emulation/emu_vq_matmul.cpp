// vq_matmul.cu compiled as C++ against the host emulator (cuda/emulation/sqllm_emu.hpp).
#include "vq_matmul.cu"
