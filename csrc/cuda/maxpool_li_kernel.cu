// maxpool_li on CUDA (arg-max routing; schema and argument check: csrc/maxpool_li.cpp). One warp
// per output neuron (grid-stride over neurons): the neuron's source patch and offsets are found
// once, then the lanes copy its output window with nns_cuda/window_loops.h's place_window (rows
// with lanes along the row: coalesced; 32-bit in-window maths, the host checks D*rho*rwo < 2^31).
// The earlier one-thread-per-element version did seven int64 divisions / modulos per element,
// which are emulated (tens of instructions each) and made these copies instruction-bound.
//
// The checks depend on the indices (device data): a first kernel validates every neuron and
// raises a flag, read back once (one small device->host copy) before returning; the copy kernel
// guards its reads so that invalid indices never read out of bounds.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "nns_cuda/checks.h"
#include "nns_cuda/cuda_launch.h"
#include "nns_cuda/dispatch.h"
#include "nns_cuda/geometry.h"
#include "nns_cuda/ops/maxpool_li.h"
#include "nns_cuda/window_loops.h"

namespace nns_cuda {
namespace {

constexpr int kErrRange = 1;
constexpr int kErrFit = 2;

__global__ void maxpool_li_validate_kernel(const PoolDims g, const int64_t* __restrict__ I,
                                           const int64_t* __restrict__ ayi,
                                           const int64_t* __restrict__ axi,
                                           const int64_t* __restrict__ ayo,
                                           const int64_t* __restrict__ axo, int* err) {
  const int64_t nn = g.B * g.C * g.Ho * g.Wo;
  const int64_t HW = g.Hi * g.Wi;
  for (int64_t n = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; n < nn;
       n += (int64_t)gridDim.x * blockDim.x) {
    const int64_t idx = I[n];
    if (idx < 0 || idx >= HW) {
      atomicOr(err, kErrRange);
      continue;
    }
    const int64_t x = n % g.Wo, y = (n / g.Wo) % g.Ho;
    const int64_t dy = ayi[idx / g.Wi] - ayo[y];
    const int64_t dx = axi[idx % g.Wi] - axo[x];
    if (!window_fits(dy, g.Rhi, g.rho) || !window_fits(dx, g.Rwi, g.rwo)) atomicOr(err, kErrFit);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    maxpool_li_cuda_kernel(const PoolDims g, const scalar_t* __restrict__ P,
                           const int64_t* __restrict__ I, const int64_t* __restrict__ ayi,
                           const int64_t* __restrict__ axi, const int64_t* __restrict__ ayo,
                           const int64_t* __restrict__ axo, scalar_t* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  const int64_t pin = g.D * g.Rhi * g.Rwi;
  const int64_t pout = g.D * g.rho * g.rwo;
  const int64_t HW = g.Hi * g.Wi;
  const int64_t nn = g.B * g.C * g.Ho * g.Wo;
  for (int64_t n = blockIdx.x * (int64_t)kWarpsPerBlock + (threadIdx.x >> 5); n < nn;
       n += (int64_t)gridDim.x * kWarpsPerBlock) {  // uniform per warp
    const int64_t idx = I[n];
    const scalar_t* src = nullptr;  // invalid indices (reported by the validation kernel): zeros
    int64_t dy = 0, dx = 0;
    if (idx >= 0 && idx < HW) {
      const int64_t x = n % g.Wo, y = (n / g.Wo) % g.Ho, bc = n / (g.Wo * g.Ho);
      dy = ayi[idx / g.Wi] - ayo[y];
      dx = axi[idx % g.Wi] - axo[x];
      if (window_fits(dy, g.Rhi, g.rho) && window_fits(dx, g.Rwi, g.rwo)) src = P + (bc * HW + idx) * pin;
    }
    place_window<scalar_t>(src, static_cast<int>(dy), static_cast<int>(dx), static_cast<int>(g.D),
                           static_cast<int>(g.Rhi), static_cast<int>(g.Rwi), static_cast<int>(g.rho),
                           static_cast<int>(g.rwo), nullptr, out + n * pout, lane);
  }
}

at::Tensor maxpool_li_cuda(const at::Tensor& patches, const at::Tensor& ay_in,
                           const at::Tensor& ax_in, const at::Tensor& indices,
                           const at::Tensor& ay_out, const at::Tensor& ax_out, int64_t rh_out,
                           int64_t rw_out) {
  const PoolDims g =
      check_maxpool_li(patches, ay_in, ax_in, indices, ay_out, ax_out, rh_out, rw_out);
  const c10::cuda::CUDAGuard guard(patches.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto out = at::empty({g.B, g.C, g.Ho, g.Wo, g.D, g.rho, g.rwo}, patches.options());
  const int64_t nn = g.B * g.C * g.Ho * g.Wo;
  if (nn == 0) return out;
  const at::Tensor I = indices.contiguous();
  const at::Tensor ayi = ay_in.contiguous(), axi = ax_in.contiguous();
  const at::Tensor ayo = ay_out.contiguous(), axo = ax_out.contiguous();
  at::Tensor err = at::zeros({1}, patches.options().dtype(at::kInt));
  maxpool_li_validate_kernel<<<blocks_for(nn, kThreads), kThreads, 0, stream>>>(
      g, I.data_ptr<int64_t>(), ayi.data_ptr<int64_t>(), axi.data_ptr<int64_t>(),
      ayo.data_ptr<int64_t>(), axo.data_ptr<int64_t>(), err.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  TORCH_CHECK_VALUE(g.D * g.rho * g.rwo < (int64_t(1) << 31) && g.D * g.Rhi * g.Rwi < (int64_t(1) << 31),
                    NNS_MSG("maxpool_li: on CUDA a window must have fewer than 2^31 elements, got ",
                            g.D * g.rho * g.rwo));
  if (out.numel() > 0) {
    const at::Tensor P = patches.contiguous();
    NNS_DISPATCH_PATCH_TYPES(patches.scalar_type(), "maxpool_li_cuda", [&] {
      maxpool_li_cuda_kernel<scalar_t><<<blocks_for(nn, kWarpsPerBlock), kThreads, 0, stream>>>(
          g, P.data_ptr<scalar_t>(), I.data_ptr<int64_t>(), ayi.data_ptr<int64_t>(),
          axi.data_ptr<int64_t>(), ayo.data_ptr<int64_t>(), axo.data_ptr<int64_t>(),
          out.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  const int flags = err.item<int>();  // one device->host copy
  TORCH_CHECK_VALUE(!(flags & kErrRange), NNS_MAXPOOL_RANGE_MSG(g));
  TORCH_CHECK_VALUE(!(flags & kErrFit), NNS_MAXPOOL_FIT_MSG);
  return out;
}

}  // namespace
}  // namespace nns_cuda

TORCH_LIBRARY_IMPL(nns_cuda, CUDA, m) { m.impl("maxpool_li", &nns_cuda::maxpool_li_cuda); }
