// li_stats: the argument check shared by its CPU and CUDA kernels (defined in csrc/li_stats.cpp).
#pragma once

#include <ATen/ATen.h>

#include "nns_cuda/validate.h"

namespace nns_cuda {

// Also checks that every window lies inside the image of `x` (host copy of the anchors).
StatDims check_li_stats(const at::Tensor& patches, const at::Tensor& ay, const at::Tensor& ax,
                        const at::Tensor& x, const at::Tensor& fg);

}  // namespace nns_cuda
