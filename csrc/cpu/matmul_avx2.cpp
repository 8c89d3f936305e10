// Placeholder: AVX2 kernels forward to the portable ones until written.
#include "cpu/matmul_kernels.h"
namespace pe::cpu {
const MatmulKernels kAvx2Kernels = kPortableKernels;
}
