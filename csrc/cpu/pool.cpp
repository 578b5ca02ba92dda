// Routing ops on the CPU: maxpool_li (arg-max routing) and place_li (re-windowing /
// residual accumulation). Both copy each source window into its place in the output window
// and zero the rest; place_li adds the optional `accumulate` patches (for bfloat16 / float16
// patches the sum is rounded once, like torch's own `a + b`).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "nns_cuda/checks.h"
#include "nns_cuda/geometry.h"
#include "nns_cuda/validate.h"

namespace nns_cuda {
namespace {

// Copy one [D, Rhi, Rwi] source block into a [D, rho, rwo] window at offset (dy, dx), zeros
// elsewhere, plus `add` (same layout as dst) when given. `src` may be null (zero source).
template <typename scalar_t>
inline void place_block(const PoolDims& g, const scalar_t* src, int64_t dy, int64_t dx,
                        const scalar_t* add, scalar_t* dst) {
  for (int64_t d = 0; d < g.D; ++d) {
    for (int64_t r = 0; r < g.rho; ++r) {
      scalar_t* drow = dst + (d * g.rho + r) * g.rwo;
      const scalar_t* arow = add ? add + (d * g.rho + r) * g.rwo : nullptr;
      const int64_t rr = r - dy;
      const bool row_in = src != nullptr && rr >= 0 && rr < g.Rhi;
      const scalar_t* srow = row_in ? src + (d * g.Rhi + rr) * g.Rwi : nullptr;
      for (int64_t q = 0; q < g.rwo; ++q) {
        const int64_t qq = q - dx;
        scalar_t v = (row_in && qq >= 0 && qq < g.Rwi) ? srow[qq] : scalar_t(0);
        if (arow) v += arow[q];
        drow[q] = v;
      }
    }
  }
}

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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, patches.scalar_type(), "maxpool_li_cpu", [&] {
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, patches.scalar_type(), "place_li_cpu", [&] {
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

TORCH_LIBRARY_IMPL(nns_cuda, CPU, m) {
  m.impl("maxpool_li", &nns_cuda::maxpool_li_cpu);
  m.impl("place_li", &nns_cuda::place_li_cpu);
}
