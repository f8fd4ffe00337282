// lut_fast_b2.cu compiled as C++ against the host emulator (cuda/emulation/sqllm_emu.hpp).
#include "lut_fast_b2.cu"
