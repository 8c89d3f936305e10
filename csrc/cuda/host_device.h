// Functions marked PE_HD are compiled for the GPU by nvcc and for the host by every compiler, so the
// per-block arithmetic of the CUDA kernels (dequantisation, dot products, softmax merges, RoPE
// angles) is unit-tested on a machine without a GPU (tests/test_cuda_host.py).
#pragma once
#ifdef __CUDACC__
#define PE_HD __host__ __device__ __forceinline__
#else
#define PE_HD inline
#endif
