// filter_fold on the CPU (schema and argument check: csrc/filter_fold.cpp): the filter images
// L^k = sum a * LI of a layer's patches. bfloat16 / float16 patches are read as they are, the
// activations and the sums are float32 (at::opmath_type), and the images are rounded to the
// patch dtype.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "nns_cuda/dispatch.h"
#include "nns_cuda/ops/filter_fold.h"

namespace nns_cuda {
namespace {

// filter_fold: one task per (b, c, d) image plane, which is owned by that task (no races);
// every patch row is scaled by its neuron's activation and added in place while hot.
// Neurons with a zero activation are skipped.
template <typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
void filter_fold_cpu_kernel(const StatDims& g, const scalar_t* P, const int64_t* ay,
                            const int64_t* ax, const opmath_t* A, scalar_t* out) {
  const int64_t pin = g.D * g.Rh * g.Rw;
  const int64_t HW = g.H * g.W;
  const int64_t nplanes = g.B * g.C * g.D;
  const int64_t cost = std::max<int64_t>(1, HW + g.Ho * g.Wo * g.Rh * g.Rw);
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / cost);
  at::parallel_for(0, nplanes, grain, [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> acc(HW);
    for (int64_t pl = begin; pl < end; ++pl) {
      const int64_t d = pl % g.D, bc = pl / g.D;
      std::fill(acc.begin(), acc.end(), opmath_t(0));
      for (int64_t y = 0; y < g.Ho; ++y) {
        for (int64_t x = 0; x < g.Wo; ++x) {
          const int64_t n = (bc * g.Ho + y) * g.Wo + x;
          const opmath_t a = A[n];
          if (a == opmath_t(0)) continue;
          const scalar_t* src = P + n * pin + d * g.Rh * g.Rw;
          for (int64_t r = 0; r < g.Rh; ++r) {
            opmath_t* arow = acc.data() + (ay[y] + r) * g.W + ax[x];
            const scalar_t* srow = src + r * g.Rw;
            for (int64_t q = 0; q < g.Rw; ++q) arow[q] += a * static_cast<opmath_t>(srow[q]);
          }
        }
      }
      scalar_t* dst = out + pl * HW;
      for (int64_t e = 0; e < HW; ++e) dst[e] = static_cast<scalar_t>(acc[e]);
    }
  });
}

at::Tensor filter_fold_cpu(const at::Tensor& patches, const at::Tensor& ay, const at::Tensor& ax,
                           const at::Tensor& act, int64_t h, int64_t w) {
  const StatDims g = check_filter_fold(patches, ay, ax, act, h, w);
  auto out = at::empty({g.B, g.C, g.D, g.H, g.W}, patches.options());
  if (out.numel() == 0) return out;
  const auto dt = patches.scalar_type();
  const at::Tensor P = patches.contiguous();
  const at::Tensor A = act.to(at::toOpMathType(dt)).contiguous();
  const at::Tensor AY = ay.contiguous(), AX = ax.contiguous();
  NNS_DISPATCH_PATCH_TYPES(dt, "filter_fold_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    filter_fold_cpu_kernel<scalar_t>(g, P.data_ptr<scalar_t>(), AY.data_ptr<int64_t>(),
                                     AX.data_ptr<int64_t>(), A.data_ptr<opmath_t>(),
                                     out.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace
}  // namespace nns_cuda

TORCH_LIBRARY_IMPL(nns_cuda, CPU, m) { m.impl("filter_fold", &nns_cuda::filter_fold_cpu); }
