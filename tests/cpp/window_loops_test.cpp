// Host run of csrc/include/nns_cuda/window_loops.h (the per-lane loops of the CUDA routing and
// statistics kernels): every lane 0..31 in turn, as the 32 lanes of a warp would, against plain
// triple loops written from the definitions (reference/ops.py place_li, reference/stats.py
// STAT_NAMES). Built and run by tests/test_window_loops.py. Prints "ok <cases>" or the first
// mismatches; exit status 0 / 1.
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

#include "nns_cuda/window_loops.h"

namespace {

std::mt19937_64 rng(12345);
int uni(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); }
double val(double zero_frac) {
  if (std::uniform_real_distribution<double>(0, 1)(rng) < zero_frac) return 0.0;
  return std::normal_distribution<double>(0, 1)(rng);
}

int place_case(int id) {
  // widths on both sides of the 16-wide switch between the row loop and the flattened loop
  const int D = uni(1, 3), Rhi = uni(1, 12), Rwi = uni(1, 40);
  const int rho = Rhi + uni(0, 6), rwo = Rwi + uni(0, 9);
  const int dy = uni(0, rho - Rhi), dx = uni(0, rwo - Rwi);
  std::vector<double> src(D * Rhi * Rwi), acc(D * rho * rwo);
  for (auto& v : src) v = val(0.2);
  for (auto& v : acc) v = val(0.2);
  const bool null_src = uni(0, 9) == 0, with_acc = uni(0, 1) == 1;
  std::vector<double> got(D * rho * rwo, std::numeric_limits<double>::quiet_NaN());
  for (int lane = 0; lane < nns_cuda::kLanes; ++lane)
    nns_cuda::place_window<double>(null_src ? nullptr : src.data(), dy, dx, D, Rhi, Rwi, rho, rwo,
                                   with_acc ? acc.data() : nullptr, got.data(), lane);
  int bad = 0;
  for (int d = 0; d < D; ++d)
    for (int r = 0; r < rho; ++r)
      for (int q = 0; q < rwo; ++q) {
        const int i = (d * rho + r) * rwo + q;
        double want = 0.0;
        const int rr = r - dy, qq = q - dx;
        if (!null_src && rr >= 0 && rr < Rhi && qq >= 0 && qq < Rwi) want = src[(d * Rhi + rr) * Rwi + qq];
        if (with_acc) want += acc[i];
        if (!(got[i] == want)) {
          if (bad < 3)
            std::printf("place case %d (D %d, %dx%d -> %dx%d at %d,%d): element (%d,%d,%d) got %g want %g\n", id,
                        D, Rhi, Rwi, rho, rwo, dy, dx, d, r, q, got[i], want);
          ++bad;
        }
      }
  return bad;
}

int stats_case(int id) {
  const int D = uni(1, 3), Rh = uni(1, 12), Rw = uni(1, 40);
  const int H = Rh + uni(0, 7), W = Rw + uni(0, 7);
  const int y0 = uni(0, H - Rh), x0 = uni(0, W - Rw);
  std::vector<double> src(D * Rh * Rw), X(D * H * W), F(H * W);
  for (auto& v : src) v = val(0.3);
  for (auto& v : X) v = val(0.1);
  for (auto& v : F) v = uni(0, 1);
  double got[nns_cuda::kNumStats] = {0};
  for (int lane = 0; lane < nns_cuda::kLanes; ++lane) {
    double s[nns_cuda::kNumStats] = {0};
    nns_cuda::stats_window_lane<double, double>(s, src.data(), X.data() + y0 * W + x0, F.data() + y0 * W + x0, D, Rh,
                                                Rw, W, H * W, lane);
    for (int k = 0; k < nns_cuda::kNumStats; ++k) got[k] += s[k];
  }
  // STAT_NAMES: nz_fg nz_bg abs_sum sum sq_sum x_dot fg_sum fg_sq_sum fg_xnz_sum fg_xnz_sq_sum fg_x_dot
  double want[nns_cuda::kNumStats] = {0};
  for (int d = 0; d < D; ++d)
    for (int r = 0; r < Rh; ++r)
      for (int q = 0; q < Rw; ++q) {
        const double li = src[(d * Rh + r) * Rw + q];
        const double x = X[(d * H + y0 + r) * W + x0 + q];
        const bool fg = F[(y0 + r) * W + x0 + q] != 0.0;
        const bool nz = li != 0.0;
        want[0] += (nz && fg);
        want[1] += (nz && !fg);
        want[2] += std::fabs(li);
        want[3] += li;
        want[4] += li * li;
        want[5] += x * li;
        if (fg) {
          want[6] += li;
          want[7] += li * li;
          want[8] += nz ? x : 0.0;
          want[9] += nz ? x * x : 0.0;
          want[10] += x * li;
        }
      }
  int bad = 0;
  for (int k = 0; k < nns_cuda::kNumStats; ++k) {
    const double tol = 1e-12 * (1.0 + std::fabs(want[k])) * (D * Rh * Rw);
    if (!(std::fabs(got[k] - want[k]) <= tol)) {
      if (bad < 3)
        std::printf("stats case %d (D %d, %dx%d in %dx%d at %d,%d): stat %d got %.17g want %.17g\n", id, D, Rh, Rw, H,
                    W, y0, x0, k, got[k], want[k]);
      ++bad;
    }
  }
  return bad;
}

}  // namespace

int main() {
  const int cases = 400;
  int bad = 0;
  for (int i = 0; i < cases; ++i) bad += place_case(i) + stats_case(i);
  if (bad) {
    std::printf("FAILED: %d mismatches\n", bad);
    return 1;
  }
  std::printf("ok %d\n", 2 * cases);
  return 0;
}
