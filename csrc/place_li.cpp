// place_li (re-windowing / residual accumulation): the op's schema, its argument check and
// offset table (nns_cuda/ops/place_li.h), shared by its CPU kernel (csrc/cpu/place_li_kernel.cpp)
// and CUDA kernel (csrc/cuda/place_li_kernel.cu), and the op called through the dispatcher for
// C++ callers (conv_li_gather).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "nns_cuda/checks.h"
#include "nns_cuda/geometry.h"
#include "nns_cuda/ops/place_li.h"
#include "nns_cuda/validate.h"

TORCH_LIBRARY_FRAGMENT(nns_cuda, m) {
  m.def(
      "place_li(Tensor patches, Tensor ay_in, Tensor ax_in, Tensor ay_out, Tensor ax_out, "
      "int rh_out, int rw_out, Tensor? accumulate=None) -> Tensor");
}

namespace nns_cuda {

#define NNS_OP "place_li"
PoolDims check_place_li(const at::Tensor& patches, const at::Tensor& ay_in, const at::Tensor& ax_in,
                        const at::Tensor& ay_out, const at::Tensor& ax_out, int64_t rh_out,
                        int64_t rw_out, const std::optional<at::Tensor>& accumulate) {
  NNS_CHECK_DIM(NNS_OP, "patches", patches, 7, "[B, C, Ho, Wo, D, Rhi, Rwi]");
  NNS_CHECK_PATCH_DTYPE(NNS_OP, "patches", patches);
  PoolDims g;
  g.B = patches.size(0); g.C = patches.size(1); g.Ho = patches.size(2); g.Wo = patches.size(3);
  g.Hi = g.Ho; g.Wi = g.Wo;
  g.D = patches.size(4); g.Rhi = patches.size(5); g.Rwi = patches.size(6);
  TORCH_CHECK_VALUE(rh_out >= 0 && rw_out >= 0,
                    NNS_MSG(NNS_OP, ": rh_out and rw_out must be >= 0, got ", rh_out, ", ", rw_out));
  g.rho = rh_out; g.rwo = rw_out;
  NNS_CHECK_ANCHOR(NNS_OP, "ay_in", ay_in, patches, g.Ho, "Ho");
  NNS_CHECK_ANCHOR(NNS_OP, "ax_in", ax_in, patches, g.Wo, "Wo");
  NNS_CHECK_ANCHOR(NNS_OP, "ay_out", ay_out, patches, g.Ho, "Ho");
  NNS_CHECK_ANCHOR(NNS_OP, "ax_out", ax_out, patches, g.Wo, "Wo");
  if (accumulate.has_value()) {
    const auto& t = *accumulate;
    NNS_CHECK_DTYPE(NNS_OP, "accumulate", t, patches.scalar_type());
    NNS_CHECK_SAME_DEVICE(NNS_OP, "accumulate", t, patches);
    const std::vector<int64_t> want{g.B, g.C, g.Ho, g.Wo, g.D, g.rho, g.rwo};
    NNS_CHECK_SHAPE(NNS_OP, "accumulate", t, want, "[B, C, Ho, Wo, D, rh_out, rw_out]");
  }
  return g;
}

at::Tensor place_offset_table(const PoolDims& g, const at::Tensor& ay_in, const at::Tensor& ax_in,
                              const at::Tensor& ay_out, const at::Tensor& ax_out) {
  auto h = host_longs({ay_in, ax_in, ay_out, ax_out});
  const int64_t* ayi = h[0].data_ptr<int64_t>();
  const int64_t* axi = h[1].data_ptr<int64_t>();
  const int64_t* ayo = h[2].data_ptr<int64_t>();
  const int64_t* axo = h[3].data_ptr<int64_t>();
  auto tab = at::empty({g.Ho + g.Wo}, at::TensorOptions().dtype(at::kLong));
  int64_t* t = tab.data_ptr<int64_t>();
  for (int64_t y = 0; y < g.Ho; ++y) {
    const int64_t off = ayi[y] - ayo[y];
    TORCH_CHECK_VALUE(window_fits(off, g.Rhi, g.rho),
                      NNS_MSG(NNS_OP, ": an input window does not fit inside its output window (offset ",
                      off, ", sizes ", g.Rhi, " -> ", g.rho,
                      "); anchors must come from the receptive-field geometry (nns_cuda.graph)"));
    t[y] = off;
  }
  for (int64_t x = 0; x < g.Wo; ++x) {
    const int64_t off = axi[x] - axo[x];
    TORCH_CHECK_VALUE(window_fits(off, g.Rwi, g.rwo),
                      NNS_MSG(NNS_OP, ": an input window does not fit inside its output window (offset ",
                      off, ", sizes ", g.Rwi, " -> ", g.rwo,
                      "); anchors must come from the receptive-field geometry (nns_cuda.graph)"));
    t[g.Ho + x] = off;
  }
  return tab;
}
#undef NNS_OP

at::Tensor place_li(const at::Tensor& patches, const at::Tensor& ay_in, const at::Tensor& ax_in,
                    const at::Tensor& ay_out, const at::Tensor& ax_out, int64_t rh_out,
                    int64_t rw_out, const std::optional<at::Tensor>& accumulate) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("nns_cuda::place_li", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, const at::Tensor&, int64_t, int64_t,
                                         const std::optional<at::Tensor>&)>();
  return op.call(patches, ay_in, ax_in, ay_out, ax_out, rh_out, rw_out, accumulate);
}

}  // namespace nns_cuda
