// Explicit instantiation of the fast LUT GEMV for BITS=3 (fp16/bf16/fp32 x row/column
// grouping x batch tiles 1, 2, 4, 8, 16).  One file per width keeps the
// compile parallel; the implementation is lut_kernels.cuh.
#include "lut_kernels.cuh"

namespace sqllm {
namespace cuda {
namespace detail {
SQLLM_DEFINE_LAUNCH_FAST_BITS(3)
}  // namespace detail
}  // namespace cuda
}  // namespace sqllm
