// The CPU copy of one routed window, shared by the CPU kernels of maxpool_li
// (csrc/cpu/maxpool_li_kernel.cpp) and place_li (csrc/cpu/place_li_kernel.cpp). (The CUDA
// kernels copy a window with one warp: window_loops.h's place_window.)
#pragma once

#include <cstdint>

#include "nns_cuda/validate.h"

namespace nns_cuda {

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

}  // namespace nns_cuda
