// place_li on the CPU (re-windowing / residual accumulation; schema and argument check:
// csrc/place_li.cpp). Copies each input window into its place in the output window, zeros the
// rest and adds the optional `accumulate` patches (for bfloat16 / float16 patches the sum is
// rounded once, like torch's own `a + b`).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "nns_cuda/dispatch.h"
#include "nns_cuda/ops/place_li.h"
#include "nns_cuda/place_block.h"

namespace nns_cuda {
namespace {

at::Tensor place_li_cpu(const at::Tensor& patches, const at::Tensor& ay_in, const at::Tensor& ax_in,
                        const at::Tensor& ay_out, const at::Tensor& ax_out, int64_t rh_out,
                        int64_t rw_out, const std::optional<at::Tensor>& accumulate) {
  const PoolDims g =
      check_place_li(patches, ay_in, ax_in, ay_out, ax_out, rh_out, rw_out, accumulate);
  const at::Tensor tab = place_offset_table(g, ay_in, ax_in, ay_out, ax_out);
  auto out = at::empty({g.B, g.C, g.Ho, g.Wo, g.D, g.rho, g.rwo}, patches.options());
  if (out.numel() == 0) return out;
  const at::Tensor P = patches.contiguous();
  const at::Tensor Acc = accumulate.has_value() ? accumulate->contiguous() : at::Tensor();
  const int64_t* rowoff = tab.data_ptr<int64_t>();
  const int64_t* coloff = rowoff + g.Ho;
  const int64_t nn = g.B * g.C * g.Ho * g.Wo;
  const int64_t pin = g.D * g.Rhi * g.Rwi, pout = g.D * g.rho * g.rwo;
  NNS_DISPATCH_PATCH_TYPES(patches.scalar_type(), "place_li_cpu", [&] {
    const scalar_t* p = P.data_ptr<scalar_t>();
    const scalar_t* a = Acc.defined() ? Acc.data_ptr<scalar_t>() : nullptr;
    scalar_t* o = out.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, pout));
    at::parallel_for(0, nn, grain, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const int64_t x = n % g.Wo, y = (n / g.Wo) % g.Ho;
        place_block<scalar_t>(g, p + n * pin, rowoff[y], coloff[x], a ? a + n * pout : nullptr,
                              o + n * pout);
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace nns_cuda

TORCH_LIBRARY_IMPL(nns_cuda, CPU, m) { m.impl("place_li", &nns_cuda::place_li_cpu); }
