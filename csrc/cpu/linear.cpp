// linear_li on the CPU: ATen GEMMs (multi-threaded BLAS) over the active rows; see
// nns_cuda/linear_impl.h.
#include <torch/library.h>

#include "nns_cuda/linear_impl.h"

namespace nns_cuda {
namespace {
at::Tensor linear_li_cpu(const at::Tensor& dense, const at::Tensor& weight,
                         const std::optional<at::Tensor>& gate) {
  return linear_li_impl(dense, weight, gate);
}
}  // namespace
}  // namespace nns_cuda

TORCH_LIBRARY_IMPL(nns_cuda, CPU, m) { m.impl("linear_li", &nns_cuda::linear_li_cpu); }
