// conv_li on CUDA (schema and argument checks: csrc/conv_li.cpp).
//
// One thread block per (sample b, output position (y, x), group, tile of 32 output channels of
// the group). The block
//  1. reads the tile's gates * scales, and compacts the active channels with a warp ballot
//     (deterministic order); gated-off channels get their [D, rho, rwo] patch zeroed with
//     coalesced writes and cost nothing else;
//  2. for the active channels, TO at a time (register tile), every thread owns output
//     elements e of the output window (consecutive threads: consecutive elements, so reads of
//     the input rows and writes of the output patch are coalesced) and accumulates
//     sum_{ky, kx, i} W[o, i, ky, kx] * patch_in[b, i, yi, xi][element e shifted] for the TO
//     channels at once: every input element is loaded once and used TO times (this is the
//     [active outputs x (input, tap) pairs] x [pairs x D*R^2] GEMM, blocked over outputs in
//     registers). Taps in the padding and inactive input neurons (in_active false)
//     are skipped; the tap offsets come from a small table checked on the host.
// Each input element is read by exactly one thread per channel tile, so staging the input
// patches in shared memory would not add reuse; reuse across tiles / positions comes from L1/L2.
// bfloat16 / float16 patches: weights, scale, gate and the sums are float32 (at::opmath_type),
// only the result is rounded. The tensor-core formulations are conv_li_gemm (csrc/conv_li_gemm.cpp)
// and conv_li_gather (csrc/conv_li_gather.cpp).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "nns_cuda/cuda_launch.h"
#include "nns_cuda/dispatch.h"
#include "nns_cuda/geometry.h"
#include "nns_cuda/ops/conv_li.h"

namespace nns_cuda {
namespace {

constexpr int kChannelTile = 32;  // output channels per block (one warp ballot)

template <typename scalar_t, int TO, typename opmath_t = at::opmath_type<scalar_t>>
__global__ void __launch_bounds__(kThreads)
    conv_li_cuda_kernel(const ConvDims g, const scalar_t* __restrict__ P,
                        const bool* __restrict__ act, const opmath_t* __restrict__ W,
                        const opmath_t* __restrict__ scale, const opmath_t* __restrict__ gate,
                        const int64_t* __restrict__ rowoff, const int64_t* __restrict__ coloff,
                        scalar_t* __restrict__ out) {
  __shared__ int s_list[kChannelTile];       // active channels (index within the tile)
  __shared__ opmath_t s_mul[kChannelTile];   // their gate * scale
  __shared__ unsigned int s_mask;            // bit c: channel c of the tile is active
  const int64_t pin = g.D * g.Rhi * g.Rwi;
  const int64_t pout = g.D * g.rho * g.rwo;
  const int64_t K2 = g.Kh * g.Kw;
  const int64_t HWi = g.Hi * g.Wi;
  const int64_t ntile = (g.Cog + kChannelTile - 1) / kChannelTile;
  const int64_t nblk = g.B * g.Ho * g.Wo * g.G * ntile;
  for (int64_t blk = blockIdx.x; blk < nblk; blk += gridDim.x) {
    int64_t t = blk;
    const int64_t tile = t % ntile; t /= ntile;   // channel tiles fastest: neighbouring
    const int64_t grp = t % g.G; t /= g.G;        // blocks share their input patches in L2
    const int64_t x = t % g.Wo; t /= g.Wo;
    const int64_t y = t % g.Ho;
    const int64_t b = t / g.Ho;
    const int64_t o0 = grp * g.Cog + tile * kChannelTile;  // first output channel of the tile
    const int64_t left = g.Cog - tile * kChannelTile;
    const int nch = static_cast<int>(left < kChannelTile ? left : kChannelTile);
    __syncthreads();  // the previous iteration is done with the shared arrays
    if (threadIdx.x < 32) {
      const int lane = threadIdx.x;
      opmath_t m = opmath_t(0);
      bool on = false;
      if (lane < nch) {
        const int64_t o = o0 + lane;
        m = scale ? scale[o] : opmath_t(1);
        if (gate) m *= gate[((b * g.Co + o) * g.Ho + y) * g.Wo + x];
        on = m != opmath_t(0);
      }
      const unsigned int mask = __ballot_sync(0xffffffffu, on);
      if (on) {
        const int rank = __popc(mask & ((1u << lane) - 1u));
        s_list[rank] = lane;
        s_mul[rank] = m;
      }
      if (lane == 0) s_mask = mask;
    }
    __syncthreads();
    const unsigned int mask = s_mask;
    const int nact = __popc(mask);
    // 1. gated-off output neurons: zeros, nothing else
    for (int c = 0; c < nch; ++c) {
      if (mask & (1u << c)) continue;
      scalar_t* dst = out + (((b * g.Co + o0 + c) * g.Ho + y) * g.Wo + x) * pout;
      for (int64_t e = threadIdx.x; e < pout; e += blockDim.x) dst[e] = scalar_t(0);
    }
    // 2. active output neurons, TO per pass
    const int64_t in_b = (b * g.Ci + grp * g.Cig) * HWi;  // first input neuron of the group
    for (int a0 = 0; a0 < nact; a0 += TO) {
      const int nt = min(TO, nact - a0);
      int64_t wrow[TO];
#pragma unroll
      for (int j = 0; j < TO; ++j) wrow[j] = (o0 + s_list[a0 + min(j, nt - 1)]) * g.Cig * K2;
      for (int64_t e = threadIdx.x; e < pout; e += blockDim.x) {
        const int64_t q = e % g.rwo;
        const int64_t r = (e / g.rwo) % g.rho;
        const int64_t d = e / (g.rwo * g.rho);
        opmath_t acc[TO];
#pragma unroll
        for (int j = 0; j < TO; ++j) acc[j] = opmath_t(0);
        for (int64_t ky = 0; ky < g.Kh; ++ky) {
          const int64_t dy = rowoff[y * g.Kh + ky];
          if (dy == kNoTap) continue;
          const int64_t rr = r - dy;
          if (rr < 0 || rr >= g.Rhi) continue;
          const int64_t yi = tap_index(y, ky, g.sh, g.ph, g.dh);
          for (int64_t kx = 0; kx < g.Kw; ++kx) {
            const int64_t dx = coloff[x * g.Kw + kx];
            if (dx == kNoTap) continue;
            const int64_t qq = q - dx;
            if (qq < 0 || qq >= g.Rwi) continue;
            const int64_t xi = tap_index(x, kx, g.sw, g.pw, g.dw);
            const int64_t n0 = in_b + yi * g.Wi + xi;
            const int64_t eoff = (d * g.Rhi + rr) * g.Rwi + qq;
            const int64_t widx = ky * g.Kw + kx;
            for (int64_t ii = 0; ii < g.Cig; ++ii) {
              const int64_t n = n0 + ii * HWi;
              if (act && !act[n]) continue;  // inactive input neuron: zero patch
              const opmath_t v = static_cast<opmath_t>(P[n * pin + eoff]);
#pragma unroll
              for (int j = 0; j < TO; ++j)
                if (j < nt) acc[j] += W[wrow[j] + ii * K2 + widx] * v;
            }
          }
        }
#pragma unroll
        for (int j = 0; j < TO; ++j) {
          if (j < nt) {
            const int64_t o = o0 + s_list[a0 + j];
            out[(((b * g.Co + o) * g.Ho + y) * g.Wo + x) * pout + e] =
                static_cast<scalar_t>(acc[j] * s_mul[a0 + j]);
          }
        }
      }
    }
  }
}

template <typename scalar_t, int TO, typename opmath_t = at::opmath_type<scalar_t>>
void launch_conv(const ConvDims& g, int threads, cudaStream_t stream, const scalar_t* P,
                 const bool* act, const opmath_t* W, const opmath_t* scale, const opmath_t* gate,
                 const int64_t* rowoff, const int64_t* coloff, scalar_t* out) {
  const int64_t ntile = (g.Cog + kChannelTile - 1) / kChannelTile;
  const unsigned int blocks = blocks_for(g.B * g.Ho * g.Wo * g.G * ntile, 1);
  conv_li_cuda_kernel<scalar_t, TO><<<blocks, threads, 0, stream>>>(g, P, act, W, scale, gate,
                                                                    rowoff, coloff, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor conv_li_cuda(const at::Tensor& patches, const at::Tensor& ay_in, const at::Tensor& ax_in,
                        const std::optional<at::Tensor>& in_active, const at::Tensor& weight,
                        const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& gate,
                        const at::Tensor& ay_out, const at::Tensor& ax_out, at::IntArrayRef stride,
                        at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                        int64_t rh_out, int64_t rw_out) {
  const c10::cuda::CUDAGuard guard(patches.device());
  // host copy of the anchors (one small device->host copy), checked, then the tap table up
  ConvLiSetup setup = conv_li_setup(patches, ay_in, ax_in, in_active, weight, scale, gate, ay_out, ax_out,
                                    stride, padding, dilation, groups, rh_out, rw_out);
  const ConvDims& g = setup.g;
  const at::Tensor tab = setup.tab.to(patches.device());
  at::Tensor& out = setup.out;
  if (out.numel() == 0) return out;
  const auto dt = patches.scalar_type();
  const auto ct = at::toOpMathType(dt);  // float32 for bfloat16 / float16 patches
  const at::Tensor P = patches.contiguous();
  const at::Tensor W = weight.to(ct).contiguous();
  const at::Tensor A = in_active.has_value() ? in_active->contiguous() : at::Tensor();
  const at::Tensor S = scale.has_value() ? scale->to(ct).contiguous() : at::Tensor();
  const at::Tensor Gt = gate.has_value() ? gate->to(ct).contiguous() : at::Tensor();
  const int64_t* rowoff = tab.data_ptr<int64_t>();
  const int64_t* coloff = rowoff + g.Ho * g.Kh;
  const int threads = threads_for_patch(g.D * g.rho * g.rwo);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  NNS_DISPATCH_PATCH_TYPES(dt, "conv_li_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* p = P.data_ptr<scalar_t>();
    const bool* a = A.defined() ? A.data_ptr<bool>() : nullptr;
    const opmath_t* w = W.data_ptr<opmath_t>();
    const opmath_t* s = S.defined() ? S.data_ptr<opmath_t>() : nullptr;
    const opmath_t* gp = Gt.defined() ? Gt.data_ptr<opmath_t>() : nullptr;
    scalar_t* o = out.data_ptr<scalar_t>();
    if (g.Cog == 1) {
      launch_conv<scalar_t, 1>(g, threads, stream, p, a, w, s, gp, rowoff, coloff, o);
    } else if (g.Cog <= 4) {
      launch_conv<scalar_t, 4>(g, threads, stream, p, a, w, s, gp, rowoff, coloff, o);
    } else {
      launch_conv<scalar_t, 8>(g, threads, stream, p, a, w, s, gp, rowoff, coloff, o);
    }
  });
  return out;
}

}  // namespace
}  // namespace nns_cuda

TORCH_LIBRARY_IMPL(nns_cuda, CUDA, m) { m.impl("conv_li", &nns_cuda::conv_li_cuda); }
