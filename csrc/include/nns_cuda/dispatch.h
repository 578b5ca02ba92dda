// Dispatch helpers shared by the kernels.
#pragma once

#include <ATen/Dispatch.h>
#include <torch/library.h>

// Runs the lambda `...` with `scalar_t` bound to the patch dtype `TYPE`: float32, float64,
// bfloat16 or float16, the dtypes checks.h's is_patch_dtype accepts. `NAME` names the kernel in
// ATen's "not implemented for" error.
#define NNS_DISPATCH_PATCH_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

// Registers `fn`, written with device-generic ATen ops only, as the op's CPU kernel and, in
// CUDA builds (NNS_WITH_CUDA), as its CUDA kernel too: exactly the code tested on the CPU runs
// on the GPU.
#ifdef NNS_WITH_CUDA
#define NNS_IMPL_CPU_AND_CUDA(name, fn)                              \
  TORCH_LIBRARY_IMPL(nns_cuda, CPU, m) { m.impl(name, fn); }         \
  TORCH_LIBRARY_IMPL(nns_cuda, CUDA, m) { m.impl(name, fn); }
#else
#define NNS_IMPL_CPU_AND_CUDA(name, fn) \
  TORCH_LIBRARY_IMPL(nns_cuda, CPU, m) { m.impl(name, fn); }
#endif
