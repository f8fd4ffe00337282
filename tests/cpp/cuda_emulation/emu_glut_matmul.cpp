// glut_matmul.cu compiled as C++ against the host emulator (cuda/emulation/sqllm_emu.hpp).
#include "glut_matmul.cu"
