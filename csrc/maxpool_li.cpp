// maxpool_li (arg-max routing): the op's schema and its argument check (nns_cuda/ops/maxpool_li.h),
// shared by its CPU kernel (csrc/cpu/maxpool_li_kernel.cpp) and CUDA kernel
// (csrc/cuda/maxpool_li_kernel.cu). The checks that depend on the indices run in the kernels.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "nns_cuda/checks.h"
#include "nns_cuda/ops/maxpool_li.h"
#include "nns_cuda/validate.h"

TORCH_LIBRARY_FRAGMENT(nns_cuda, m) {
  m.def(
      "maxpool_li(Tensor patches, Tensor ay_in, Tensor ax_in, Tensor indices, Tensor ay_out, "
      "Tensor ax_out, int rh_out, int rw_out) -> Tensor");
}

namespace nns_cuda {

#define NNS_OP "maxpool_li"
PoolDims check_maxpool_li(const at::Tensor& patches, const at::Tensor& ay_in,
                          const at::Tensor& ax_in, const at::Tensor& indices,
                          const at::Tensor& ay_out, const at::Tensor& ax_out, int64_t rh_out,
                          int64_t rw_out) {
  NNS_CHECK_DIM(NNS_OP, "patches", patches, 7, "[B, C, Hi, Wi, D, Rhi, Rwi]");
  NNS_CHECK_PATCH_DTYPE(NNS_OP, "patches", patches);
  PoolDims g;
  g.B = patches.size(0); g.C = patches.size(1); g.Hi = patches.size(2); g.Wi = patches.size(3);
  g.D = patches.size(4); g.Rhi = patches.size(5); g.Rwi = patches.size(6);
  TORCH_CHECK_VALUE(rh_out >= 0 && rw_out >= 0,
                    NNS_MSG(NNS_OP, ": rh_out and rw_out must be >= 0, got ", rh_out, ", ", rw_out));
  g.rho = rh_out; g.rwo = rw_out;
  NNS_CHECK_ANCHOR(NNS_OP, "ay_in", ay_in, patches, g.Hi, "Hi");
  NNS_CHECK_ANCHOR(NNS_OP, "ax_in", ax_in, patches, g.Wi, "Wi");
  NNS_CHECK_ANCHOR(NNS_OP, "ay_out", ay_out, patches, ay_out.numel(), "Ho");
  NNS_CHECK_ANCHOR(NNS_OP, "ax_out", ax_out, patches, ax_out.numel(), "Wo");
  g.Ho = ay_out.numel(); g.Wo = ax_out.numel();
  NNS_CHECK_DTYPE(NNS_OP, "indices", indices, at::kLong);
  NNS_CHECK_SAME_DEVICE(NNS_OP, "indices", indices, patches);
  const std::vector<int64_t> want{g.B, g.C, g.Ho, g.Wo};
  NNS_CHECK_SHAPE(NNS_OP, "indices", indices, want, "[B, C, Ho, Wo]");
  return g;
}
#undef NNS_OP

}  // namespace nns_cuda
