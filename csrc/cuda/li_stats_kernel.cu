// li_stats on CUDA (schema and argument check: csrc/li_stats.cpp): one warp per neuron. Lanes
// stride along the rows of the neuron's [D, Rh, Rw] patch (over the flattened patch for windows
// narrower than 16), with coalesced reads of the patch and of the matching rows of x and fg,
// accumulate the 11 statistics in registers and reduce them with warp shuffles; the patch is read
// once and nothing but the 11 numbers is written.
//
// bfloat16 / float16 patches: x, fg and the sums are float32 (at::opmath_type), and so are the
// statistics returned for them (the patch dtype otherwise).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "nns_cuda/checks.h"
#include "nns_cuda/cuda_launch.h"
#include "nns_cuda/dispatch.h"
#include "nns_cuda/ops/li_stats.h"
#include "nns_cuda/window_loops.h"

namespace nns_cuda {
namespace {

template <typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
__global__ void __launch_bounds__(kThreads)
    li_stats_cuda_kernel(const StatDims g, const scalar_t* __restrict__ P,
                         const int64_t* __restrict__ ay, const int64_t* __restrict__ ax,
                         const opmath_t* __restrict__ X, const opmath_t* __restrict__ F,
                         opmath_t* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t pin = g.D * g.Rh * g.Rw;
  const int64_t nn = g.B * g.C * g.Ho * g.Wo;
  for (int64_t n = blockIdx.x * (int64_t)kWarpsPerBlock + warp; n < nn;
       n += (int64_t)gridDim.x * kWarpsPerBlock) {  // uniform per warp
    const int64_t x = n % g.Wo, y = (n / g.Wo) % g.Ho, b = n / (g.Wo * g.Ho * g.C);
    const int64_t y0 = ay[y], x0 = ax[x];
    const scalar_t* src = P + n * pin;
    // the window's first row in x and fg: X[((b*D + d)*H + y0 + r)*W + x0 + q] = Xw[d*HW + r*W + q]
    const opmath_t* Xw = X + (b * g.D * g.H + y0) * g.W + x0;
    const opmath_t* Fw = F + (b * g.H + y0) * g.W + x0;
    opmath_t s[kNumStats];
#pragma unroll
    for (int k = 0; k < kNumStats; ++k) s[k] = opmath_t(0);
    // nns_cuda/window_loops.h: 32-bit in-window maths (the host checks D*H*W < 2^31), rows with
    // lanes along the row, no division per element in the row loop
    stats_window_lane<scalar_t, opmath_t>(s, src, Xw, Fw, static_cast<int>(g.D), static_cast<int>(g.Rh),
                                          static_cast<int>(g.Rw), static_cast<int>(g.W),
                                          static_cast<int>(g.H * g.W), lane);
#pragma unroll
    for (int k = 0; k < kNumStats; ++k) {
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) s[k] += __shfl_xor_sync(0xffffffffu, s[k], off);
    }
    if (lane == 0) {
#pragma unroll
      for (int k = 0; k < kNumStats; ++k) out[n * kNumStats + k] = s[k];
    }
  }
}

at::Tensor li_stats_cuda(const at::Tensor& patches, const at::Tensor& ay, const at::Tensor& ax,
                         const at::Tensor& x, const at::Tensor& fg) {
  const StatDims g = check_li_stats(patches, ay, ax, x, fg);  // copies the anchors to the host
  TORCH_CHECK_VALUE(g.D * g.H * g.W < (int64_t(1) << 31),
                    NNS_MSG("li_stats: on CUDA the image must have fewer than 2^31 elements (D*H*W), got ",
                            g.D * g.H * g.W));
  const c10::cuda::CUDAGuard guard(patches.device());
  const auto dt = patches.scalar_type();
  const auto ct = at::toOpMathType(dt);
  auto out = at::empty({g.B, g.C, g.Ho, g.Wo, kNumStats}, patches.options().dtype(ct));
  if (out.numel() == 0) return out;
  const at::Tensor P = patches.contiguous();
  const at::Tensor X = x.to(ct).contiguous();
  const at::Tensor F = fg.to(ct).contiguous();
  const at::Tensor AY = ay.contiguous(), AX = ax.contiguous();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t nn = g.B * g.C * g.Ho * g.Wo;
  NNS_DISPATCH_PATCH_TYPES(dt, "li_stats_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    li_stats_cuda_kernel<scalar_t><<<blocks_for(nn, kWarpsPerBlock), kThreads, 0, stream>>>(
        g, P.data_ptr<scalar_t>(), AY.data_ptr<int64_t>(), AX.data_ptr<int64_t>(),
        X.data_ptr<opmath_t>(), F.data_ptr<opmath_t>(), out.data_ptr<opmath_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace nns_cuda

TORCH_LIBRARY_IMPL(nns_cuda, CUDA, m) { m.impl("li_stats", &nns_cuda::li_stats_cuda); }
