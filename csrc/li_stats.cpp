// li_stats (fused per-neuron statistics of a layer's patches): the op's schema and its argument
// check (nns_cuda/ops/li_stats.h), shared by its CPU kernel (csrc/cpu/li_stats_kernel.cpp) and
// CUDA kernel (csrc/cuda/li_stats_kernel.cu).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "nns_cuda/checks.h"
#include "nns_cuda/ops/li_stats.h"
#include "nns_cuda/validate.h"

TORCH_LIBRARY_FRAGMENT(nns_cuda, m) {
  m.def("li_stats(Tensor patches, Tensor ay, Tensor ax, Tensor x, Tensor fg) -> Tensor");
}

namespace nns_cuda {

#define NNS_OP "li_stats"
StatDims check_li_stats(const at::Tensor& patches, const at::Tensor& ay, const at::Tensor& ax,
                        const at::Tensor& x, const at::Tensor& fg) {
  NNS_CHECK_DIM(NNS_OP, "patches", patches, 7, "[B, C, Ho, Wo, D, Rh, Rw]");
  NNS_CHECK_PATCH_DTYPE(NNS_OP, "patches", patches);
  StatDims g;
  g.B = patches.size(0); g.C = patches.size(1); g.Ho = patches.size(2); g.Wo = patches.size(3);
  g.D = patches.size(4); g.Rh = patches.size(5); g.Rw = patches.size(6);
  NNS_CHECK_ANCHOR(NNS_OP, "ay", ay, patches, g.Ho, "Ho");
  NNS_CHECK_ANCHOR(NNS_OP, "ax", ax, patches, g.Wo, "Wo");
  TORCH_CHECK_VALUE(x.dim() == 4 && x.size(0) == g.B && x.size(1) == g.D,
                    NNS_MSG(NNS_OP, ": x must be [B=", g.B, ", D=", g.D, ", H, W], got ", x.sizes()));
  NNS_CHECK_FLOATING(NNS_OP, "x", x);
  NNS_CHECK_SAME_DEVICE(NNS_OP, "x", x, patches);
  g.H = x.size(2); g.W = x.size(3);
  const std::vector<int64_t> want{g.B, g.H, g.W};
  NNS_CHECK_SHAPE(NNS_OP, "fg", fg, want, "[B, H, W]");
  NNS_CHECK_FLOATING_OR_BOOL(NNS_OP, "fg", fg);
  NNS_CHECK_SAME_DEVICE(NNS_OP, "fg", fg, patches);
  check_windows_in_image(NNS_OP, ay, ax, g.Rh, g.Rw, g.H, g.W);
  return g;
}
#undef NNS_OP

}  // namespace nns_cuda
