// place_li on CUDA (re-windowing / residual accumulation; schema and argument check:
// csrc/place_li.cpp). One warp per output neuron (grid-stride over neurons): the lanes copy the
// neuron's patch into its output window, adding `accumulate`, with nns_cuda/window_loops.h's
// place_window (rows with lanes along the row: coalesced; 32-bit in-window maths, the host checks
// D*rho*rwo < 2^31).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "nns_cuda/checks.h"
#include "nns_cuda/cuda_launch.h"
#include "nns_cuda/dispatch.h"
#include "nns_cuda/ops/place_li.h"
#include "nns_cuda/window_loops.h"

namespace nns_cuda {
namespace {

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    place_li_cuda_kernel(const PoolDims g, const scalar_t* __restrict__ P,
                         const int64_t* __restrict__ rowoff, const int64_t* __restrict__ coloff,
                         const scalar_t* __restrict__ acc, scalar_t* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  const int64_t pin = g.D * g.Rhi * g.Rwi;
  const int64_t pout = g.D * g.rho * g.rwo;
  const int64_t nn = g.B * g.C * g.Ho * g.Wo;
  for (int64_t n = blockIdx.x * (int64_t)kWarpsPerBlock + (threadIdx.x >> 5); n < nn;
       n += (int64_t)gridDim.x * kWarpsPerBlock) {  // uniform per warp
    const int64_t x = n % g.Wo, y = (n / g.Wo) % g.Ho;
    place_window<scalar_t>(P + n * pin, static_cast<int>(rowoff[y]), static_cast<int>(coloff[x]),
                           static_cast<int>(g.D), static_cast<int>(g.Rhi), static_cast<int>(g.Rwi),
                           static_cast<int>(g.rho), static_cast<int>(g.rwo),
                           acc ? acc + n * pout : nullptr, out + n * pout, lane);
  }
}

at::Tensor place_li_cuda(const at::Tensor& patches, const at::Tensor& ay_in,
                         const at::Tensor& ax_in, const at::Tensor& ay_out,
                         const at::Tensor& ax_out, int64_t rh_out, int64_t rw_out,
                         const std::optional<at::Tensor>& accumulate) {
  const PoolDims g =
      check_place_li(patches, ay_in, ax_in, ay_out, ax_out, rh_out, rw_out, accumulate);
  const c10::cuda::CUDAGuard guard(patches.device());
  const at::Tensor tab = place_offset_table(g, ay_in, ax_in, ay_out, ax_out).to(patches.device());
  auto out = at::empty({g.B, g.C, g.Ho, g.Wo, g.D, g.rho, g.rwo}, patches.options());
  if (out.numel() == 0) return out;
  TORCH_CHECK_VALUE(g.D * g.rho * g.rwo < (int64_t(1) << 31),
                    NNS_MSG("place_li: on CUDA a window must have fewer than 2^31 elements, got ",
                            g.D * g.rho * g.rwo));
  const int64_t nn = g.B * g.C * g.Ho * g.Wo;
  const at::Tensor P = patches.contiguous();
  const at::Tensor A = accumulate.has_value() ? accumulate->contiguous() : at::Tensor();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t* rowoff = tab.data_ptr<int64_t>();
  NNS_DISPATCH_PATCH_TYPES(patches.scalar_type(), "place_li_cuda", [&] {
    place_li_cuda_kernel<scalar_t><<<blocks_for(nn, kWarpsPerBlock), kThreads, 0, stream>>>(
        g, P.data_ptr<scalar_t>(), rowoff, rowoff + g.Ho,
        A.defined() ? A.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace nns_cuda

TORCH_LIBRARY_IMPL(nns_cuda, CUDA, m) { m.impl("place_li", &nns_cuda::place_li_cuda); }
