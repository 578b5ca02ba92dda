// gmm_estep: the argument check of the fused E-step (defined in csrc/gmm_estep.cpp) and the
// largest number of components its kernel handles.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace nns_cuda {

constexpr int kGmmMaxComponents = 64;  // components per mixture handled by the fused kernel

struct GmmDims {
  int64_t B, k, S;  // mixtures, components per mixture, points per mixture
};

GmmDims check_gmm_estep(const at::Tensor& coef, const at::Tensor& phit);

}  // namespace nns_cuda
