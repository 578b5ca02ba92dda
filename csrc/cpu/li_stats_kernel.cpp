// li_stats on the CPU (schema and argument check: csrc/li_stats.cpp): the fused per-neuron
// statistics of a layer's patches; each patch is read once and never written. bfloat16 / float16
// patches are read as they are and everything else (x, fg, the sums) is float32
// (at::opmath_type); the statistics are returned in that type (float32 for 16-bit patches, the
// patch dtype otherwise).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>

#include "nns_cuda/dispatch.h"
#include "nns_cuda/ops/li_stats.h"
#include "nns_cuda/window_loops.h"  // kNumStats, stats_accumulate (shared with the CUDA kernel)

namespace nns_cuda {
namespace {

template <typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
void li_stats_cpu_kernel(const StatDims& g, const scalar_t* P, const int64_t* ay,
                         const int64_t* ax, const opmath_t* X, const opmath_t* F, opmath_t* out) {
  const int64_t pin = g.D * g.Rh * g.Rw;
  const int64_t nn = g.B * g.C * g.Ho * g.Wo;
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, pin));
  at::parallel_for(0, nn, grain, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int64_t x = n % g.Wo, y = (n / g.Wo) % g.Ho, b = n / (g.Wo * g.Ho * g.C);
      const scalar_t* src = P + n * pin;
      std::array<opmath_t, kNumStats> tot{};
      for (int64_t d = 0; d < g.D; ++d) {
        for (int64_t r = 0; r < g.Rh; ++r) {
          const scalar_t* lrow = src + (d * g.Rh + r) * g.Rw;
          const opmath_t* xrow = X + ((b * g.D + d) * g.H + ay[y] + r) * g.W + ax[x];
          const opmath_t* frow = F + (b * g.H + ay[y] + r) * g.W + ax[x];
          // Row partial sums, then the totals: keeps float32 rounding error O(Rw + D*Rh).
          opmath_t s[kNumStats] = {};
          for (int64_t q = 0; q < g.Rw; ++q)
            stats_accumulate(s, static_cast<opmath_t>(lrow[q]), xrow[q], frow[q]);
          for (int k = 0; k < kNumStats; ++k) tot[k] += s[k];
        }
      }
      for (int k = 0; k < kNumStats; ++k) out[n * kNumStats + k] = tot[k];
    }
  });
}

at::Tensor li_stats_cpu(const at::Tensor& patches, const at::Tensor& ay, const at::Tensor& ax,
                        const at::Tensor& x, const at::Tensor& fg) {
  const StatDims g = check_li_stats(patches, ay, ax, x, fg);
  const auto dt = patches.scalar_type();
  const auto ct = at::toOpMathType(dt);
  auto out = at::empty({g.B, g.C, g.Ho, g.Wo, kNumStats}, patches.options().dtype(ct));
  if (out.numel() == 0) return out;
  const at::Tensor P = patches.contiguous();
  const at::Tensor X = x.to(ct).contiguous();
  const at::Tensor F = fg.to(ct).contiguous();
  const at::Tensor AY = ay.contiguous(), AX = ax.contiguous();
  NNS_DISPATCH_PATCH_TYPES(dt, "li_stats_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    li_stats_cpu_kernel<scalar_t>(g, P.data_ptr<scalar_t>(), AY.data_ptr<int64_t>(),
                                  AX.data_ptr<int64_t>(), X.data_ptr<opmath_t>(),
                                  F.data_ptr<opmath_t>(), out.data_ptr<opmath_t>());
  });
  return out;
}

}  // namespace
}  // namespace nns_cuda

TORCH_LIBRARY_IMPL(nns_cuda, CPU, m) { m.impl("li_stats", &nns_cuda::li_stats_cpu); }
