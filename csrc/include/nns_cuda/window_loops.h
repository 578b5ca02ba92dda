// Per-lane loops over one neuron's window, shared by the CUDA kernels (one warp per neuron:
// lane = threadIdx.x % 32) and compiled for the host too, so that tests/test_window_loops.py can
// run exactly this code on the CPU (every lane in turn) against a plain loop.
//
// In-window index maths is 32-bit (callers check that windows have < 2^31 elements) and the row
// loops do no division per element: int64 divisions / modulos are emulated on the GPU (tens of
// instructions each) and made the one-thread-per-element versions instruction-bound.
#pragma once

#include <c10/macros/Macros.h>

namespace nns_cuda {

constexpr int kLanes = 32;

// Copy one neuron's patch `src` ([D, Rhi, Rwi]; nullptr: zeros) placed at offset (dy, dx) into its
// output window `dst` ([D, rho, rwo]), adding `acc` (dst's layout) when given. Lane `lane` of 32
// writes the elements (t, q) with q = lane (mod 32) along each row t of the window (windows at
// least 16 wide: coalesced rows), else the flattened elements e = lane (mod 32).
template <typename scalar_t>
C10_HOST_DEVICE inline void place_window(const scalar_t* __restrict__ src, int dy, int dx, int D,
                                         int Rhi, int Rwi, int rho, int rwo,
                                         const scalar_t* __restrict__ acc,
                                         scalar_t* __restrict__ dst, int lane) {
  if (rwo >= 16) {
    const int rows = D * rho;
    for (int t = 0; t < rows; ++t) {  // uniform across the warp
      const int d = t / rho;
      const int rr = t - d * rho - dy;  // row in the source window
      const bool row_ok = src != nullptr && rr >= 0 && rr < Rhi;
      const scalar_t* srow = row_ok ? src + (d * Rhi + rr) * Rwi : nullptr;
      for (int q = lane; q < rwo; q += kLanes) {
        const int qq = q - dx;
        scalar_t v = (row_ok && qq >= 0 && qq < Rwi) ? srow[qq] : scalar_t(0);
        if (acc) v += acc[t * rwo + q];
        dst[t * rwo + q] = v;
      }
    }
  } else {
    const int pout = D * rho * rwo;
    for (int e = lane; e < pout; e += kLanes) {
      const int t = e / rwo;  // d * rho + r
      const int q = e - t * rwo;
      const int d = t / rho;
      const int rr = t - d * rho - dy;
      const int qq = q - dx;
      scalar_t v = (src != nullptr && rr >= 0 && rr < Rhi && qq >= 0 && qq < Rwi)
                       ? src[(d * Rhi + rr) * Rwi + qq]
                       : scalar_t(0);
      if (acc) v += acc[e];
      dst[e] = v;
    }
  }
}

constexpr int kNumStats = 11;  // nns_cuda/ops/reference/stats.py STAT_NAMES order

// One learned-image entry `li` (input value `xv`, foreground `f`) into the 11 sums.
template <typename opmath_t>
C10_HOST_DEVICE inline void stats_accumulate(opmath_t (&s)[kNumStats], const opmath_t li,
                                             const opmath_t xv, const opmath_t f) {
  const opmath_t nz = li != opmath_t(0) ? opmath_t(1) : opmath_t(0);
  const opmath_t xnz = xv * nz;
  s[0] += nz * f;
  s[1] += nz * (opmath_t(1) - f);
  s[2] += li < opmath_t(0) ? -li : li;
  s[3] += li;
  s[4] += li * li;
  s[5] += xv * li;
  s[6] += li * f;
  s[7] += li * li * f;
  s[8] += xnz * f;
  s[9] += xnz * xnz * f;
  s[10] += xv * li * f;
}

// Lane `lane`'s share of the statistics of one neuron: its patch `src` ([D, Rh, Rw]) against the
// input `Xw` and foreground `Fw`, both pointing at the window's first element of channel 0
// (element (d, r, q) of the window is Xw[d * HW + r * W + q], Fw[r * W + q]). Rows of the window
// with lanes along the row (windows at least 16 wide), else the flattened window.
template <typename scalar_t, typename opmath_t>
C10_HOST_DEVICE inline void stats_window_lane(opmath_t (&s)[kNumStats], const scalar_t* __restrict__ src,
                                              const opmath_t* __restrict__ Xw,
                                              const opmath_t* __restrict__ Fw, int D, int Rh,
                                              int Rw, int W, int HW, int lane) {
  if (Rw >= 16) {
    const int rows = D * Rh;
    for (int t = 0; t < rows; ++t) {  // uniform across the warp
      const int d = t / Rh;
      const int r = t - d * Rh;
      const scalar_t* srow = src + t * Rw;
      const opmath_t* xrow = Xw + d * HW + r * W;
      const opmath_t* frow = Fw + r * W;
      for (int q = lane; q < Rw; q += kLanes)
        stats_accumulate(s, static_cast<opmath_t>(srow[q]), xrow[q], frow[q]);
    }
  } else {
    const int pin = D * Rh * Rw;
    for (int e = lane; e < pin; e += kLanes) {
      const int t = e / Rw;  // d * Rh + r
      const int q = e - t * Rw;
      const int d = t / Rh;
      const int r = t - d * Rh;
      stats_accumulate(s, static_cast<opmath_t>(src[e]), Xw[d * HW + r * W + q], Fw[r * W + q]);
    }
  }
}

}  // namespace nns_cuda
