// lut_fast_b3.cu compiled as C++ against the host emulator (cuda/emulation/sqllm_emu.hpp).
#include "lut_fast_b3.cu"
