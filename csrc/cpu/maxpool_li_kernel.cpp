// maxpool_li on the CPU (arg-max routing; schema and argument check: csrc/maxpool_li.cpp). Copies
// each selected input window into its place in the output window and zeros the rest. The
// indices are checked first (range, window fit), as the reference does, before anything is
// computed.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "nns_cuda/dispatch.h"
#include "nns_cuda/geometry.h"
#include "nns_cuda/ops/maxpool_li.h"
#include "nns_cuda/place_block.h"

namespace nns_cuda {
namespace {

at::Tensor maxpool_li_cpu(const at::Tensor& patches, const at::Tensor& ay_in,
                          const at::Tensor& ax_in, const at::Tensor& indices,
                          const at::Tensor& ay_out, const at::Tensor& ax_out, int64_t rh_out,
                          int64_t rw_out) {
  const PoolDims g =
      check_maxpool_li(patches, ay_in, ax_in, indices, ay_out, ax_out, rh_out, rw_out);
  const at::Tensor I = indices.contiguous();
  const at::Tensor ayi = ay_in.contiguous(), axi = ax_in.contiguous();
  const at::Tensor ayo = ay_out.contiguous(), axo = ax_out.contiguous();
  const int64_t* pi = I.data_ptr<int64_t>();
  const int64_t* pyi = ayi.data_ptr<int64_t>();
  const int64_t* pxi = axi.data_ptr<int64_t>();
  const int64_t* pyo = ayo.data_ptr<int64_t>();
  const int64_t* pxo = axo.data_ptr<int64_t>();
  const int64_t nn = g.B * g.C * g.Ho * g.Wo;
  const int64_t HW = g.Hi * g.Wi;
  // Validate every index first (the reference raises before computing anything).
  for (int64_t n = 0; n < nn; ++n)
    TORCH_CHECK_VALUE(pi[n] >= 0 && pi[n] < HW, NNS_MAXPOOL_RANGE_MSG(g));
  for (int64_t n = 0; n < nn; ++n) {
    const int64_t x = n % g.Wo, y = (n / g.Wo) % g.Ho;
    const int64_t dy = pyi[pi[n] / g.Wi] - pyo[y];
    const int64_t dx = pxi[pi[n] % g.Wi] - pxo[x];
    TORCH_CHECK_VALUE(window_fits(dy, g.Rhi, g.rho) && window_fits(dx, g.Rwi, g.rwo),
                      NNS_MAXPOOL_FIT_MSG);
  }
  auto out = at::empty({g.B, g.C, g.Ho, g.Wo, g.D, g.rho, g.rwo}, patches.options());
  if (out.numel() == 0) return out;
  const at::Tensor P = patches.contiguous();
  const int64_t pin = g.D * g.Rhi * g.Rwi, pout = g.D * g.rho * g.rwo;
  NNS_DISPATCH_PATCH_TYPES(patches.scalar_type(), "maxpool_li_cpu", [&] {
    const scalar_t* p = P.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, pout));
    at::parallel_for(0, nn, grain, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const int64_t x = n % g.Wo, y = (n / g.Wo) % g.Ho, bc = n / (g.Wo * g.Ho);
        const int64_t yi = pi[n] / g.Wi, xi = pi[n] % g.Wi;
        const scalar_t* src = p + (bc * HW + pi[n]) * pin;
        place_block<scalar_t>(g, src, pyi[yi] - pyo[y], pxi[xi] - pxo[x], nullptr, o + n * pout);
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace nns_cuda

TORCH_LIBRARY_IMPL(nns_cuda, CPU, m) { m.impl("maxpool_li", &nns_cuda::maxpool_li_cpu); }
