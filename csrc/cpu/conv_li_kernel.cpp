// conv_li on the CPU: learned-image patches of a conv layer's output neurons (schema and argument
// checks: csrc/conv_li.cpp).
//
// out[b, o, y, x] = gate[b,o,y,x] * scale[o] * sum_{i in group(o), ky, kx} W[o,i,ky,kx] *
//                   place(patches[b, i, y*s + ky*d - p, x*s + kx*d - p])
//
// Work is split over output neurons with the output channel fastest, so that consecutive
// neurons of one thread share their input patches (hot in cache). A neuron whose
// gate * scale is zero is written as zeros without any work; an input neuron with
// in_active == false, or a zero weight, is skipped.
//
// Precision: patches may be float32, float64, bfloat16 or float16. Weights, scale and gate are
// used in at::opmath_type (float32 for the 16-bit types) and every sum is accumulated in it; only
// the result is rounded to the patch dtype. The GEMM path converts the gathered bfloat16 /
// float16 operands to float32 and multiplies in float32. Measured on this project's 2-core AMD
// EPYC development machine (GEMMs of 32..256 x 288..2304 x 300..3072): at::mm in bfloat16 was
// ~2x faster than float32 but, with the weights rounded to bfloat16, 1.4x less accurate per
// layer; float16 at::mm was 25-135x slower than float32.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "nns_cuda/dispatch.h"
#include "nns_cuda/geometry.h"
#include "nns_cuda/ops/conv_li.h"

namespace nns_cuda {
namespace {

// Calls f(ky, kx, yi, xi, dy, dx) for every tap of output position (y, x) that falls inside the
// input (padding taps are skipped); (dy, dx) is the input window's offset in the output window.
template <typename F>
inline void for_each_tap(const ConvDims& g, int64_t y, int64_t x, const int64_t* rowoff,
                         const int64_t* coloff, F&& f) {
  for (int64_t ky = 0; ky < g.Kh; ++ky) {
    const int64_t dy = rowoff[y * g.Kh + ky];
    if (dy == kNoTap) continue;
    const int64_t yi = tap_index(y, ky, g.sh, g.ph, g.dh);
    for (int64_t kx = 0; kx < g.Kw; ++kx) {
      const int64_t dx = coloff[x * g.Kw + kx];
      if (dx == kNoTap) continue;
      f(ky, kx, yi, tap_index(x, kx, g.sw, g.pw, g.dw), dy, dx);
    }
  }
}

template <typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
void conv_li_cpu_kernel(const ConvDims& g, const scalar_t* P, const bool* act,
                        const opmath_t* W, const opmath_t* scale, const opmath_t* gate,
                        const int64_t* rowoff, const int64_t* coloff, scalar_t* out) {
  const int64_t pin = g.D * g.Rhi * g.Rwi;
  const int64_t pout = g.D * g.rho * g.rwo;
  const int64_t K2 = g.Kh * g.Kw;
  const int64_t n_total = g.B * g.Ho * g.Wo * g.Co;
  const int64_t cost = std::max<int64_t>(1, pout + g.Cig * K2 * pin);
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / cost);
  at::parallel_for(0, n_total, grain, [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> acc(pout);
    for (int64_t n = begin; n < end; ++n) {
      int64_t t = n;
      const int64_t o = t % g.Co; t /= g.Co;
      const int64_t x = t % g.Wo; t /= g.Wo;
      const int64_t y = t % g.Ho;
      const int64_t b = t / g.Ho;
      const int64_t nidx = ((b * g.Co + o) * g.Ho + y) * g.Wo + x;
      scalar_t* dst = out + nidx * pout;
      opmath_t mul = scale ? scale[o] : opmath_t(1);
      if (gate) mul *= gate[nidx];
      if (mul == opmath_t(0)) {  // gated-off output neuron: no work
        std::fill(dst, dst + pout, scalar_t(0));
        continue;
      }
      std::fill(acc.begin(), acc.end(), opmath_t(0));
      const int64_t grp = o / g.Cog;
      const opmath_t* Wo_ = W + o * g.Cig * K2;
      for_each_tap(g, y, x, rowoff, coloff, [&](int64_t ky, int64_t kx, int64_t yi, int64_t xi,
                                                int64_t dy, int64_t dx) {
        for (int64_t ii = 0; ii < g.Cig; ++ii) {
          const int64_t i = grp * g.Cig + ii;
          const int64_t src_n = ((b * g.Ci + i) * g.Hi + yi) * g.Wi + xi;
          if (act && !act[src_n]) continue;  // inactive input neuron: zero patch
          const opmath_t w = Wo_[ii * K2 + ky * g.Kw + kx];
          if (w == opmath_t(0)) continue;
          const scalar_t* src = P + src_n * pin;
          for (int64_t d = 0; d < g.D; ++d) {
            for (int64_t r = 0; r < g.Rhi; ++r) {
              opmath_t* arow = acc.data() + (d * g.rho + r + dy) * g.rwo + dx;
              const scalar_t* srow = src + (d * g.Rhi + r) * g.Rwi;
              for (int64_t q = 0; q < g.Rwi; ++q) arow[q] += w * static_cast<opmath_t>(srow[q]);
            }
          }
        }
      });
      for (int64_t e = 0; e < pout; ++e) dst[e] = static_cast<scalar_t>(acc[e] * mul);
    }
  });
}

// GEMM formulation (groups == 1): per output position (b, y, x)
//   out[o_act, :] = mul[o_act] * W_p[o_act, pairs] @ A[pairs, D*rho*rwo]
// where `pairs` are the active (input channel, tap) pairs of that position and row k of A is the
// input patch of pair k placed into the output window. Inactive outputs and inputs cost nothing;
// the product runs in the BLAS that ATen links (MKL / OpenBLAS), one position per thread.
// A and W_p are built in opmath_t (float32 for bfloat16 / float16 patches, see the top).
template <typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
void conv_li_cpu_gemm(const ConvDims& g, const scalar_t* P, const bool* act, const opmath_t* W,
                      const opmath_t* scale, const opmath_t* gate, const int64_t* rowoff,
                      const int64_t* coloff, scalar_t* out, c10::ScalarType ct) {
  const int64_t pin = g.D * g.Rhi * g.Rwi;
  const int64_t pout = g.D * g.rho * g.rwo;
  const int64_t K2 = g.Kh * g.Kw;
  const int64_t npos = g.B * g.Ho * g.Wo;
  at::parallel_for(0, npos, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> outs, pin_src, pin_w, pin_dy, pin_dx;
    std::vector<opmath_t> mul(g.Co);
    for (int64_t pos = begin; pos < end; ++pos) {
      const int64_t x = pos % g.Wo;
      const int64_t y = (pos / g.Wo) % g.Ho;
      const int64_t b = pos / (g.Wo * g.Ho);
      outs.clear();
      for (int64_t o = 0; o < g.Co; ++o) {
        const int64_t nidx = ((b * g.Co + o) * g.Ho + y) * g.Wo + x;
        opmath_t m = scale ? scale[o] : opmath_t(1);
        if (gate) m *= gate[nidx];
        mul[o] = m;
        if (m != opmath_t(0)) {
          outs.push_back(o);
        } else {
          std::fill(out + nidx * pout, out + (nidx + 1) * pout, scalar_t(0));
        }
      }
      if (outs.empty()) continue;
      pin_src.clear(); pin_w.clear(); pin_dy.clear(); pin_dx.clear();
      for_each_tap(g, y, x, rowoff, coloff, [&](int64_t ky, int64_t kx, int64_t yi, int64_t xi,
                                                int64_t dy, int64_t dx) {
        for (int64_t i = 0; i < g.Ci; ++i) {
          const int64_t src_n = ((b * g.Ci + i) * g.Hi + yi) * g.Wi + xi;
          if (act && !act[src_n]) continue;
          pin_src.push_back(src_n);
          pin_w.push_back(i * K2 + ky * g.Kw + kx);
          pin_dy.push_back(dy);
          pin_dx.push_back(dx);
        }
      });
      const int64_t M = static_cast<int64_t>(outs.size());
      const int64_t K = static_cast<int64_t>(pin_src.size());
      if (K == 0) {
        for (int64_t o : outs) {
          const int64_t nidx = ((b * g.Co + o) * g.Ho + y) * g.Wo + x;
          std::fill(out + nidx * pout, out + (nidx + 1) * pout, scalar_t(0));
        }
        continue;
      }
      at::Tensor A = at::zeros({K, pout}, at::TensorOptions().dtype(ct));
      at::Tensor Wm = at::empty({M, K}, at::TensorOptions().dtype(ct));
      opmath_t* a = A.data_ptr<opmath_t>();
      opmath_t* wm = Wm.data_ptr<opmath_t>();
      const bool same = (g.Rhi == g.rho && g.Rwi == g.rwo);
      for (int64_t k = 0; k < K; ++k) {
        const scalar_t* src = P + pin_src[k] * pin;
        opmath_t* row = a + k * pout;
        if (same) {
          std::copy(src, src + pin, row);  // converts 16-bit patches to float32
          continue;
        }
        for (int64_t d = 0; d < g.D; ++d)
          for (int64_t r = 0; r < g.Rhi; ++r)
            std::copy(src + (d * g.Rhi + r) * g.Rwi, src + (d * g.Rhi + r + 1) * g.Rwi,
                      row + (d * g.rho + r + pin_dy[k]) * g.rwo + pin_dx[k]);
      }
      for (int64_t mi = 0; mi < M; ++mi) {
        const opmath_t* wrow = W + outs[mi] * g.Ci * K2;
        for (int64_t k = 0; k < K; ++k) wm[mi * K + k] = wrow[pin_w[k]];
      }
      at::Tensor C = at::mm(Wm, A);
      const opmath_t* c = C.data_ptr<opmath_t>();
      for (int64_t mi = 0; mi < M; ++mi) {
        const int64_t o = outs[mi];
        const int64_t nidx = ((b * g.Co + o) * g.Ho + y) * g.Wo + x;
        scalar_t* dst = out + nidx * pout;
        const opmath_t m = mul[o];
        const opmath_t* crow = c + mi * pout;
        for (int64_t e = 0; e < pout; ++e) dst[e] = static_cast<scalar_t>(crow[e] * m);
      }
    }
  });
}

at::Tensor conv_li_cpu(const at::Tensor& patches, const at::Tensor& ay_in, const at::Tensor& ax_in,
                       const std::optional<at::Tensor>& in_active, const at::Tensor& weight,
                       const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& gate,
                       const at::Tensor& ay_out, const at::Tensor& ax_out, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                       int64_t rh_out, int64_t rw_out) {
  ConvLiSetup setup = conv_li_setup(patches, ay_in, ax_in, in_active, weight, scale, gate, ay_out, ax_out,
                                    stride, padding, dilation, groups, rh_out, rw_out);
  const ConvDims& g = setup.g;
  const at::Tensor& tab = setup.tab;
  at::Tensor& out = setup.out;
  if (out.numel() == 0) return out;
  const auto dt = patches.scalar_type();
  const auto ct = at::toOpMathType(dt);  // weights, scale, gate, sums: float32 for 16-bit patches
  const at::Tensor P = patches.contiguous();
  const at::Tensor W = weight.to(ct).contiguous();
  const at::Tensor A = in_active.has_value() ? in_active->contiguous() : at::Tensor();
  const at::Tensor S = scale.has_value() ? scale->to(ct).contiguous() : at::Tensor();
  const at::Tensor Gt = gate.has_value() ? gate->to(ct).contiguous() : at::Tensor();
  const int64_t* t = tab.data_ptr<int64_t>();
  // groups == 1 with real work per position: the GEMM path; depthwise / grouped: direct loops
  const bool use_gemm = g.G == 1 && g.Ci * g.Kh * g.Kw >= 16;
  NNS_DISPATCH_PATCH_TYPES(dt, "conv_li_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const opmath_t* w = W.data_ptr<opmath_t>();
    const opmath_t* s = S.defined() ? S.data_ptr<opmath_t>() : nullptr;
    const opmath_t* gp = Gt.defined() ? Gt.data_ptr<opmath_t>() : nullptr;
    const bool* a = A.defined() ? A.data_ptr<bool>() : nullptr;
    if (use_gemm) {
      conv_li_cpu_gemm<scalar_t>(g, P.data_ptr<scalar_t>(), a, w, s, gp, t, t + g.Ho * g.Kh,
                                 out.data_ptr<scalar_t>(), ct);
      return;
    }
    conv_li_cpu_kernel<scalar_t>(g, P.data_ptr<scalar_t>(), a, w, s, gp, t, t + g.Ho * g.Kh,
                                 out.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace
}  // namespace nns_cuda

TORCH_LIBRARY_IMPL(nns_cuda, CPU, m) { m.impl("conv_li", &nns_cuda::conv_li_cpu); }
