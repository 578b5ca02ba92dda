// linear_li on CUDA: cuBLAS GEMMs through ATen over the active rows (nns_cuda/linear_impl.h).
#include <torch/library.h>

#include "nns_cuda/cuda_launch.h"
#include "nns_cuda/linear_impl.h"

namespace nns_cuda {
namespace {
at::Tensor linear_li_cuda(const at::Tensor& dense, const at::Tensor& weight,
                          const std::optional<at::Tensor>& gate) {
  const c10::cuda::CUDAGuard guard(dense.device());
  return linear_li_impl(dense, weight, gate);
}
}  // namespace
}  // namespace nns_cuda

TORCH_LIBRARY_IMPL(nns_cuda, CUDA, m) { m.impl("linear_li", &nns_cuda::linear_li_cuda); }
