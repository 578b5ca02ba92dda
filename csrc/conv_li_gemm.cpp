// conv_li_gemm: conv_li as one dense GEMM per image ("im2col of the output windows"), written
// with ATen ops only and registered for the CPU and (in CUDA builds) CUDA, so that exactly the
// code tested on the CPU runs with cuBLAS (tensor cores for tf32 / bf16 / fp16) on the GPU. The
// op's schema, its implementation and both registrations; the argument checks are conv_li's
// (csrc/conv_li.cpp), with this op's name in the messages.
//
// For image b build
//   A_b[(i, ky, kx), (y, x, d, r, q)] = patches[b, i, yi, xi, d, r - dy, q - dx]
// (yi = y*s + ky*d - p, dy = ay_in[yi] - ay_out[y], likewise for columns): the patch of the input
// neuron of tap (ky, kx) placed into the window of output position (y, x); zero where the tap is
// padding, where the element falls outside the placed input window, or where in_active is
// false. Then
//   out_b = W.view(Co, Ci*Kh*Kw) @ A_b            ([Co, Ho*Wo*D*rho*rwo] = the output layout)
// (block-diagonal per group when groups > 1), times gate * scale per (o, y, x).
//
// The gather is one index_select per chunk from the patches with an appended zero column (the
// target of every invalid element); its index tables are sums of small per-row / per-column
// tables built on the host from the checked tap offsets (conv_offset_table). Work is chunked
// over images and tiles of output positions so that the temporaries of one GEMM — A, its
// result and the int64 index table (counted as 8 / itemsize elements per entry) — stay within
// `max_elems` elements of the GEMM dtype (0: 2^26; one output position at least). The zero-
// padded copy of the input patches (the gather source) comes on top.
//
// Unlike the direct conv_li kernels this does no sparsity skipping: gated-off outputs and
// inactive inputs are multiplied like the rest (their results are then zeroed / their patches
// are zero), which is the price of one large regular GEMM.
//
// Precision: the GEMM runs in the patch dtype. float32 on CUDA obeys torch's TF32 switch
// (torch.backends.cuda.matmul.allow_tf32); bfloat16 / float16 run on the tensor cores with
// float32 accumulation (cuBLAS default), with the weights rounded to the patch dtype. Exception:
// float16 on the CPU multiplies in float32 (ATen's CPU float16 GEMM was 25-135x slower than float32
// on the development machine). The GEMM result (in the GEMM dtype) is multiplied by gate * scale
// in float32 (at::opmath_type) and rounded to the patch dtype: two roundings for 16-bit patches.
// Where gate * scale is exactly zero the output is exactly zero.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/DeviceGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "nns_cuda/checks.h"
#include "nns_cuda/dispatch.h"
#include "nns_cuda/geometry.h"
#include "nns_cuda/ops/conv_li.h"

TORCH_LIBRARY_FRAGMENT(nns_cuda, m) {
  m.def(
      "conv_li_gemm(Tensor patches, Tensor ay_in, Tensor ax_in, Tensor? in_active, Tensor weight, "
      "Tensor? scale, Tensor? gate, Tensor ay_out, Tensor ax_out, int[] stride, int[] padding, "
      "int[] dilation, int groups, int rh_out, int rw_out, int max_elems=0) -> Tensor");
}

namespace nns_cuda {
namespace {

constexpr int64_t kDefaultMaxElems = int64_t(1) << 26;

// Host tables of one axis: for every tap k and output position y, the contribution of the
// (input position, in-window row) to the flat source index, or -1 where invalid.
//   t[(k * n_out + y) * r_out + r] = yi * step + (r - dy) * unit   (0 <= r - dy < r_in)
at::Tensor axis_table(const int64_t* off, int64_t K, int64_t n_out, int64_t r_out, int64_t r_in,
                      int64_t stride, int64_t pad, int64_t dil, int64_t step, int64_t unit) {
  auto t = at::empty({K, n_out, r_out}, at::TensorOptions().dtype(at::kLong));
  int64_t* p = t.data_ptr<int64_t>();
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t y = 0; y < n_out; ++y) {
      const int64_t dy = off[y * K + k];
      const int64_t yi = tap_index(y, k, stride, pad, dil);
      for (int64_t r = 0; r < r_out; ++r) {
        const int64_t rr = r - dy;
        const bool ok = dy != kNoTap && rr >= 0 && rr < r_in;
        p[(k * n_out + y) * r_out + r] = ok ? yi * step + rr * unit : int64_t(-1);
      }
    }
  }
  return t;
}

at::Tensor conv_li_gemm(const at::Tensor& patches, const at::Tensor& ay_in, const at::Tensor& ax_in,
                        const std::optional<at::Tensor>& in_active, const at::Tensor& weight,
                        const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& gate,
                        const at::Tensor& ay_out, const at::Tensor& ax_out, at::IntArrayRef stride,
                        at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                        int64_t rh_out, int64_t rw_out, int64_t max_elems) {
  constexpr const char* op = "conv_li_gemm";
  const at::OptionalDeviceGuard guard(at::device_of(patches));
  ConvLiSetup setup = conv_li_setup(patches, ay_in, ax_in, in_active, weight, scale, gate, ay_out, ax_out,
                                    stride, padding, dilation, groups, rh_out, rw_out, max_elems, op);
  const ConvDims& g = setup.g;
  const at::Tensor& tab = setup.tab;
  at::Tensor& out = setup.out;
  if (out.numel() == 0) return out;
  const int64_t K2 = g.Kh * g.Kw;
  if (g.Cig * K2 == 0) return out.zero_();  // empty sum

  const auto dev = patches.device();
  const auto dt = patches.scalar_type();
  const auto mt = at::toOpMathType(dt);  // gate * scale (float32 for 16-bit patches)
  const auto ct = (dt == at::kHalf && dev.is_cpu()) ? at::kFloat : dt;  // GEMM dtype
  const int64_t pin = g.D * g.Rhi * g.Rwi;
  const int64_t pe = g.D * g.rho * g.rwo;      // elements of one output window
  const int64_t M = g.Hi * g.Wi * pin;         // elements of one input channel's patches
  const int64_t KA = g.Cig * K2;               // rows of A per group

  // index tables: idx[ky, kx, y, x, d, r, q] = Ty[ky, y, r] + Tx[kx, x, q] + d*Rhi*Rwi, or M
  const int64_t* t = tab.data_ptr<int64_t>();
  const at::Tensor Ty = axis_table(t, g.Kh, g.Ho, g.rho, g.Rhi, g.sh, g.ph, g.dh,
                                   g.Wi * pin, g.Rwi).to(dev);
  const at::Tensor Tx = axis_table(t + g.Ho * g.Kh, g.Kw, g.Wo, g.rwo, g.Rwi, g.sw, g.pw, g.dw,
                                   pin, 1).to(dev);
  const at::Tensor Td = (at::arange(g.D, at::TensorOptions().dtype(at::kLong).device(dev)) *
                         (g.Rhi * g.Rwi)).view({1, 1, 1, 1, g.D, 1, 1});

  // source: [B*Ci, M + 1] in the GEMM dtype, inactive input neurons zeroed, zero last column
  at::Tensor src = at::zeros({g.B * g.Ci, M + 1}, patches.options().dtype(ct));
  at::Tensor body = src.narrow(1, 0, M);
  body.copy_(patches.reshape({g.B * g.Ci, M}));
  if (in_active.has_value())
    body.view({g.B, g.Ci, g.Hi * g.Wi, pin})
        .masked_fill_(in_active->logical_not().view({g.B, g.Ci, g.Hi * g.Wi, 1}), 0);

  const at::Tensor Wm = weight.to(ct).reshape({g.G, g.Cog, KA});
  const at::Tensor mul = conv_gate_scale(g, scale, gate, mt);  // [B, Co, Ho, Wo], or undefined
  const at::Tensor off = mul.defined() ? mul.eq(0).unsqueeze(-1) : at::Tensor();

  // chunking: bc images x (ny x nx) output positions per GEMM, temporaries <= budget elements
  const int64_t budget = max_elems > 0 ? max_elems : kDefaultMaxElems;
  const int64_t idx_elems = std::max<int64_t>(1, 8 / static_cast<int64_t>(c10::elementSize(ct)));
  // per image and output position: A (Ci*K2*pe), the result (Co*pe), the index (K2*pe int64)
  const int64_t per_pos = (g.Ci * K2 + g.Co + K2 * idx_elems) * pe;
  int64_t bc = 1, ny = g.Ho, nx = g.Wo;
  if (per_pos * g.Ho * g.Wo <= budget) {
    bc = std::max<int64_t>(1, std::min<int64_t>(g.B, budget / std::max<int64_t>(1, per_pos * g.Ho * g.Wo)));
  } else if (per_pos * g.Wo <= budget) {
    ny = std::max<int64_t>(1, budget / (per_pos * g.Wo));
  } else {
    ny = 1;
    nx = std::max<int64_t>(1, budget / std::max<int64_t>(1, per_pos));
  }
  const at::Tensor out6 = out.view({g.B, g.Co, g.Ho, g.Wo, pe});
  for (int64_t y0 = 0; y0 < g.Ho; y0 += ny) {
    const int64_t h = std::min(ny, g.Ho - y0);
    for (int64_t x0 = 0; x0 < g.Wo; x0 += nx) {
      const int64_t w = std::min(nx, g.Wo - x0);
      const at::Tensor ty = Ty.narrow(1, y0, h).view({g.Kh, 1, h, 1, 1, g.rho, 1});
      const at::Tensor tx = Tx.narrow(1, x0, w).view({1, g.Kw, 1, w, 1, 1, g.rwo});
      const at::Tensor idx =
          at::where(ty.ge(0).logical_and(tx.ge(0)), ty + tx + Td, M).reshape({-1});
      const int64_t T = h * w * pe;  // columns of A
      for (int64_t b0 = 0; b0 < g.B; b0 += bc) {
        const int64_t nb = std::min(bc, g.B - b0);
        // [nb*Ci, K2*T] -> [nb, G, Cig*K2, T]   (rows (i, ky, kx) like W's columns)
        const at::Tensor A =
            src.narrow(0, b0 * g.Ci, nb * g.Ci).index_select(1, idx).view({nb, g.G, KA, T});
        at::Tensor res;
        if (g.G == 1 && nb == 1) {
          res = at::mm(Wm.select(0, 0), A.view({KA, T}));
        } else {
          res = at::matmul(Wm, A);  // [nb, G, Cog, T]
        }
        res = res.view({nb, g.Co, h, w, pe});
        at::Tensor dst = out6.narrow(0, b0, nb).narrow(2, y0, h).narrow(3, x0, w);
        if (mul.defined()) {
          const at::Tensor m = mul.narrow(0, b0, nb).narrow(2, y0, h).narrow(3, x0, w).unsqueeze(-1);
          at::mul_out(dst, res, m);  // multiplied in opmath (float32 for 16-bit patches)
          dst.masked_fill_(off.narrow(0, b0, nb).narrow(2, y0, h).narrow(3, x0, w), 0);
        } else {
          dst.copy_(res);
        }
      }
    }
  }
  return out;
}

}  // namespace
}  // namespace nns_cuda

NNS_IMPL_CPU_AND_CUDA("conv_li_gemm", &nns_cuda::conv_li_gemm)
