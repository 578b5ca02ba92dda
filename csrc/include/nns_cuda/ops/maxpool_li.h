// maxpool_li: the argument check shared by its CPU and CUDA kernels (defined in
// csrc/maxpool_li.cpp) and the messages of the checks that depend on the indices, which the
// kernels run themselves (the CUDA kernel on the device).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "nns_cuda/checks.h"
#include "nns_cuda/validate.h"

namespace nns_cuda {

PoolDims check_maxpool_li(const at::Tensor& patches, const at::Tensor& ay_in,
                          const at::Tensor& ax_in, const at::Tensor& indices,
                          const at::Tensor& ay_out, const at::Tensor& ax_out, int64_t rh_out,
                          int64_t rw_out);

}  // namespace nns_cuda

#define NNS_MAXPOOL_RANGE_MSG(g) NNS_MSG("maxpool_li: indices out of range [0, ", (g).Hi * (g).Wi, ")")
#define NNS_MAXPOOL_FIT_MSG NNS_MSG("maxpool_li: an input window does not fit inside its output window")
