// gmm_estep on the CPU: the fused E-step (+ M-step moments) of many independent 2-D Gaussian
// mixtures, for nns_cuda/analysis/_gmm_em.py (schema and argument check: csrc/gmm_estep.cpp).
//
// Row b holds one data set of S points (phit[b] = [1, x, y, x², xy, y²] × S, float64) and the
// coefficients coef[b] [k, 6] of its k components, so that
//   lp[j, s] = coef[b, j, :] · phit[b, :, s] = log w_j + log N(p_s | m_j, Σ_j).
// One pass over the points gives
//   loglik[b]   = mean_s log Σ_j exp(lp[j, s])            (the EM lower bound / score)
//   mom[b, j, f] = Σ_s resp[j, s] · phit[b, f, s],  resp = softmax_j(lp[:, s])  (want_moments)
//   labels[b, s] = argmax_j lp[j, s], first maximum                             (want_labels)
// which in torch are ~10 passes over a [B, k, S] tensor (bmm, amax, sub, exp, sum, log, div,
// bmm). Here every point is touched once, in tiles of kTile points that stay in L1; the
// exponential is a branch-free polynomial the compiler vectorises (target_clones: AVX-512 /
// AVX2 / SSE2 picked at load time). Measured against the torch pipeline in
// benchmarks/NOTES.md ("batched GMM"); equality with it and with scikit-learn in
// tests/test_gmm_estep.py and tests/test_gmm.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>

#include "nns_cuda/ops/gmm_estep.h"

namespace nns_cuda {
namespace {

constexpr int kTile = 128;  // points per tile
constexpr int kLanes = 8;   // independent partial sums (vectorisable without reassociation)
constexpr int kMaxK = kGmmMaxComponents;  // components per mixture (checked in csrc/gmm_estep.cpp)

// exp(v) for v <= 0 (v = lp - max lp), relative error <= 2 ulp for v >= -708; exactly 0 below
// (such a component's responsibility is < 1e-307 of the largest one's). Cody–Waite reduction
// v = n ln2 + r, |r| <= ln2/2, degree-13 Taylor polynomial of exp(r) (truncation < 2e-17), and
// 2^n built in the exponent bits. Branch-free so that loops over it vectorise.
inline double exp_nonpos(double v) {
  constexpr double kLog2e = 1.4426950408889634;
  constexpr double kLn2Hi = 6.93147180369123816490e-01;
  constexpr double kLn2Lo = 1.90821492927058770002e-10;
  const bool under = v < -708.0;
  v = under ? 0.0 : v;
  // n = round(v / ln2) with the 1.5·2^52 shifter: the low mantissa bits of d hold n
  constexpr double kShifter = 6755399441055744.0;  // 0x1.8p52
  const double d = v * kLog2e + kShifter;
  const double n = d - kShifter;
  const double r = (v - n * kLn2Hi) - n * kLn2Lo;
  double p = 1.0 / 6227020800.0;          // 1/13!
  p = p * r + 1.0 / 479001600.0;          // 1/12!
  p = p * r + 1.0 / 39916800.0;           // 1/11!
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  // 2^n for n in [-1022, 0]: exponent field n + 1023
  int64_t di, si;
  std::memcpy(&di, &d, sizeof(double));
  std::memcpy(&si, &kShifter, sizeof(double));
  const int64_t bits = ((di - si) + 1023) << 52;
  double scale;
  std::memcpy(&scale, &bits, sizeof(double));
  return under ? 0.0 : p * scale;
}

struct RowOut {
  double* mom;      // [k, 6] or nullptr
  int64_t* labels;  // [S] or nullptr
};

// One mixture (one row). Returns Σ_s log Σ_j exp(lp[j, s]).
__attribute__((target_clones("avx512f", "avx2", "default")))
double estep_row(const double* __restrict__ coef, const double* __restrict__ phit, int64_t k,
                 int64_t S, RowOut out) {
  const double* xs = phit + S;
  const double* ys = phit + 2 * S;
  alignas(64) double lp[kMaxK][kTile];
  alignas(64) double mx[kTile];
  alignas(64) double tot[kTile];
  alignas(64) double ll_acc[kLanes] = {0};
  alignas(64) double mom_acc[kMaxK][6][kLanes];
  if (out.mom) std::memset(mom_acc, 0, sizeof(double) * k * 6 * kLanes);
  for (int64_t t0 = 0; t0 < S; t0 += kTile) {
    const int n = static_cast<int>(std::min<int64_t>(kTile, S - t0));
    const double* x = xs + t0;
    const double* y = ys + t0;
    for (int64_t j = 0; j < k; ++j) {
      const double* w = coef + j * 6;
      const double w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3], w4 = w[4], w5 = w[5];
      double* l = lp[j];
      for (int t = 0; t < n; ++t) {
        const double a = x[t], b = y[t];
        l[t] = w0 + w1 * a + w2 * b + w3 * (a * a) + w4 * (a * b) + w5 * (b * b);
      }
    }
    for (int t = 0; t < n; ++t) mx[t] = lp[0][t];
    for (int64_t j = 1; j < k; ++j)
      for (int t = 0; t < n; ++t) mx[t] = lp[j][t] > mx[t] ? lp[j][t] : mx[t];
    if (out.labels) {
      int64_t* lab = out.labels + t0;
      for (int t = 0; t < n; ++t) lab[t] = 0;
      for (int64_t j = k - 1; j >= 1; --j)  // first maximum: the smallest j with lp == mx
        for (int t = 0; t < n; ++t)
          if (lp[j][t] == mx[t]) lab[t] = j;
      for (int t = 0; t < n; ++t)
        if (lp[0][t] == mx[t]) lab[t] = 0;
    }
    for (int t = 0; t < n; ++t) tot[t] = 0.0;
    for (int64_t j = 0; j < k; ++j) {
      double* l = lp[j];
      for (int t = 0; t < n; ++t) {
        const double e = exp_nonpos(l[t] - mx[t]);
        l[t] = e;  // lp now holds the un-normalised responsibilities
        tot[t] += e;
      }
    }
    // Σ_t log(tot) + mx: tot in [1, k]; log of products of 16 (≤ k^16, no overflow) is exact
    // enough and needs 16× fewer logarithms
    int t = 0;
    for (; t + 16 <= n; t += 16) {
      double pr = 1.0;
      for (int q = 0; q < 16; ++q) pr *= tot[t + q];
      ll_acc[0] += std::log(pr);
    }
    for (; t < n; ++t) ll_acc[1] += std::log(tot[t]);
    {
      int u = 0;
      for (; u + kLanes <= n; u += kLanes)
        for (int l = 0; l < kLanes; ++l) ll_acc[l] += mx[u + l];
      for (; u < n; ++u) ll_acc[0] += mx[u];
    }
    if (out.mom) {
      for (int q = 0; q < n; ++q) tot[q] = 1.0 / tot[q];
      for (int64_t j = 0; j < k; ++j) {
        double* r = lp[j];
        for (int q = 0; q < n; ++q) r[q] *= tot[q];
        double (*acc)[kLanes] = mom_acc[j];
        int u = 0;
        for (; u + kLanes <= n; u += kLanes) {
          for (int l = 0; l < kLanes; ++l) {
            const double rv = r[u + l], a = x[u + l], b = y[u + l];
            acc[0][l] += rv;
            acc[1][l] += rv * a;
            acc[2][l] += rv * b;
            acc[3][l] += rv * (a * a);
            acc[4][l] += rv * (a * b);
            acc[5][l] += rv * (b * b);
          }
        }
        for (; u < n; ++u) {
          const double rv = r[u], a = x[u], b = y[u];
          acc[0][0] += rv;
          acc[1][0] += rv * a;
          acc[2][0] += rv * b;
          acc[3][0] += rv * (a * a);
          acc[4][0] += rv * (a * b);
          acc[5][0] += rv * (b * b);
        }
      }
    }
  }
  if (out.mom) {
    for (int64_t j = 0; j < k; ++j)
      for (int f = 0; f < 6; ++f) {
        double s = 0.0;
        for (int l = 0; l < kLanes; ++l) s += mom_acc[j][f][l];
        out.mom[j * 6 + f] = s;
      }
  }
  double ll = 0.0;
  for (int l = 0; l < kLanes; ++l) ll += ll_acc[l];
  return ll;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gmm_estep_cpu(const at::Tensor& coef,
                                                             const at::Tensor& phit,
                                                             bool want_moments, bool want_labels) {
  const GmmDims d = check_gmm_estep(coef, phit);
  const int64_t B = d.B, k = d.k, S = d.S;
  const at::Tensor C = coef.contiguous();
  const at::Tensor P = phit.contiguous();
  const auto opts = coef.options();
  at::Tensor mom = want_moments ? at::empty({B, k, 6}, opts) : at::empty({0}, opts);
  at::Tensor ll = at::empty({B}, opts);
  at::Tensor lab = want_labels ? at::empty({B, S}, opts.dtype(at::kLong))
                               : at::empty({0}, opts.dtype(at::kLong));
  const double* c = C.data_ptr<double>();
  const double* p = P.data_ptr<double>();
  double* m = want_moments ? mom.data_ptr<double>() : nullptr;
  double* l = ll.data_ptr<double>();
  int64_t* lb = want_labels ? lab.data_ptr<int64_t>() : nullptr;
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      RowOut o{m ? m + b * k * 6 : nullptr, lb ? lb + b * S : nullptr};
      l[b] = estep_row(c + b * k * 6, p + b * 6 * S, k, S, o) / static_cast<double>(S);
    }
  });
  return {mom, ll, lab};
}

}  // namespace
}  // namespace nns_cuda

TORCH_LIBRARY_IMPL(nns_cuda, CPU, m) { m.impl("gmm_estep", &nns_cuda::gmm_estep_cpu); }
