// gmm_estep (fused E-step of many independent 2-D Gaussian mixtures, for
// nns_cuda/analysis/_gmm_em.py): the op's schema and its argument check
// (nns_cuda/ops/gmm_estep.h). Its kernel is CPU only: csrc/cpu/gmm_estep_kernel.cpp.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>

#include "nns_cuda/checks.h"
#include "nns_cuda/ops/gmm_estep.h"

TORCH_LIBRARY_FRAGMENT(nns_cuda, m) {
  m.def(
      "gmm_estep(Tensor coef, Tensor phit, bool want_moments, bool want_labels) -> "
      "(Tensor, Tensor, Tensor)");
}

namespace nns_cuda {

GmmDims check_gmm_estep(const at::Tensor& coef, const at::Tensor& phit) {
  constexpr const char* op = "gmm_estep";
  NNS_CHECK_DIM("gmm_estep", "coef", coef, 3, "[B, k, 6]");
  NNS_CHECK_DIM("gmm_estep", "phit", phit, 3, "[B, 6, S]");
  NNS_CHECK_DTYPE("gmm_estep", "coef", coef, at::kDouble);
  NNS_CHECK_DTYPE("gmm_estep", "phit", phit, at::kDouble);
  const int64_t B = coef.size(0), k = coef.size(1), S = phit.size(2);
  TORCH_CHECK_VALUE(coef.size(2) == 6 && phit.size(0) == B && phit.size(1) == 6,
                    NNS_MSG(op, ": coef must be [B, k, 6] and phit [B, 6, S] with the same B, got ",
                            coef.sizes(), " and ", phit.sizes()));
  TORCH_CHECK_VALUE(k >= 1 && k <= kGmmMaxComponents,
                    NNS_MSG(op, ": the number of components k must be in [1, ",
                            int64_t(kGmmMaxComponents), "], got ", k));
  TORCH_CHECK_VALUE(S >= 1, NNS_MSG(op, ": phit needs at least one point (S >= 1), got S = ", S));
  TORCH_CHECK_VALUE(phit.device() == coef.device(),
                    NNS_MSG(op, ": phit must be on the same device as coef (", coef.device(),
                            "), got ", phit.device()));
  return GmmDims{B, k, S};
}

}  // namespace nns_cuda
