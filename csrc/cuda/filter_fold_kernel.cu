// filter_fold on CUDA (schema, argument check and gather tables: csrc/filter_fold.cpp): gather by
// output pixel, no atomics. One thread per (b, c, d, Y, X) output element sums act * patch over
// the neurons whose windows cover (Y, X) (tables of covering rows / columns built on the host from
// the anchors), in a fixed order, so the result is deterministic. Neurons with a zero activation
// are skipped.
//
// bfloat16 / float16 patches: act and the sums are float32 (at::opmath_type); the images are
// rounded to the patch dtype.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "nns_cuda/cuda_launch.h"
#include "nns_cuda/dispatch.h"
#include "nns_cuda/ops/filter_fold.h"

namespace nns_cuda {
namespace {

template <typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
__global__ void filter_fold_cuda_kernel(const StatDims g, const scalar_t* __restrict__ P,
                                        const int64_t* __restrict__ ay,
                                        const int64_t* __restrict__ ax,
                                        const opmath_t* __restrict__ A,
                                        const int64_t* __restrict__ row_ptr,
                                        const int64_t* __restrict__ col_ptr,
                                        const int64_t* __restrict__ row_idx,
                                        const int64_t* __restrict__ col_idx,
                                        scalar_t* __restrict__ out) {
  const int64_t pin = g.D * g.Rh * g.Rw;
  const int64_t total = g.B * g.C * g.D * g.H * g.W;
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total;
       e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t X = e % g.W, Y = (e / g.W) % g.H, d = (e / (g.W * g.H)) % g.D;
    const int64_t bc = e / (g.W * g.H * g.D);
    opmath_t acc = opmath_t(0);
    for (int64_t i = row_ptr[Y]; i < row_ptr[Y + 1]; ++i) {
      const int64_t y = row_idx[i];
      const int64_t r = Y - ay[y];
      for (int64_t j = col_ptr[X]; j < col_ptr[X + 1]; ++j) {
        const int64_t x = col_idx[j];
        const int64_t n = (bc * g.Ho + y) * g.Wo + x;
        const opmath_t a = A[n];
        if (a == opmath_t(0)) continue;
        acc += a * static_cast<opmath_t>(P[n * pin + (d * g.Rh + r) * g.Rw + (X - ax[x])]);
      }
    }
    out[e] = static_cast<scalar_t>(acc);
  }
}

at::Tensor filter_fold_cuda(const at::Tensor& patches, const at::Tensor& ay, const at::Tensor& ax,
                            const at::Tensor& act, int64_t h, int64_t w) {
  const StatDims g = check_filter_fold(patches, ay, ax, act, h, w);
  const c10::cuda::CUDAGuard guard(patches.device());
  auto out = at::empty({g.B, g.C, g.D, g.H, g.W}, patches.options());
  if (out.numel() == 0) return out;
  const at::Tensor tab = fold_cover_table(g, ay, ax).to(patches.device());
  const auto dt = patches.scalar_type();
  const at::Tensor P = patches.contiguous();
  const at::Tensor A = act.to(at::toOpMathType(dt)).contiguous();
  const at::Tensor AY = ay.contiguous(), AX = ax.contiguous();
  const int64_t* row_ptr = tab.data_ptr<int64_t>();
  const int64_t* col_ptr = row_ptr + (g.H + 1);
  const int64_t* row_idx = col_ptr + (g.W + 1);
  const int64_t* col_idx = row_idx + g.Ho * g.Rh;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  NNS_DISPATCH_PATCH_TYPES(dt, "filter_fold_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    filter_fold_cuda_kernel<scalar_t><<<blocks_for(out.numel(), kThreads), kThreads, 0, stream>>>(
        g, P.data_ptr<scalar_t>(), AY.data_ptr<int64_t>(), AX.data_ptr<int64_t>(),
        A.data_ptr<opmath_t>(), row_ptr, col_ptr, row_idx, col_idx, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace nns_cuda

TORCH_LIBRARY_IMPL(nns_cuda, CUDA, m) { m.impl("filter_fold", &nns_cuda::filter_fold_cuda); }
