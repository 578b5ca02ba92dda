// conv_li: the op's schema, and its argument checks and host tables (nns_cuda/ops/conv_li.h), which
// its CPU kernel (csrc/cpu/conv_li_kernel.cpp), its CUDA kernel (csrc/cuda/conv_li_kernel.cu) and
// the two ATen formulations with the same arguments, conv_li_gemm and conv_li_gather, share.
//
// out[b, o, y, x] = gate[b,o,y,x] * scale[o] * sum_{i in group(o), ky, kx} W[o,i,ky,kx] *
//                   place(patches[b, i, y*s + ky*d - p, x*s + kx*d - p])
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "nns_cuda/checks.h"
#include "nns_cuda/geometry.h"
#include "nns_cuda/ops/conv_li.h"
#include "nns_cuda/validate.h"

TORCH_LIBRARY_FRAGMENT(nns_cuda, m) {
  m.def(
      "conv_li(Tensor patches, Tensor ay_in, Tensor ax_in, Tensor? in_active, Tensor weight, "
      "Tensor? scale, Tensor? gate, Tensor ay_out, Tensor ax_out, int[] stride, int[] padding, "
      "int[] dilation, int groups, int rh_out, int rw_out) -> Tensor");
}

namespace nns_cuda {

#define NNS_OP op
ConvDims check_conv_li(const at::Tensor& patches, const at::Tensor& ay_in, const at::Tensor& ax_in,
                       const std::optional<at::Tensor>& in_active, const at::Tensor& weight,
                       const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& gate,
                       const at::Tensor& ay_out, const at::Tensor& ax_out, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                       int64_t rh_out, int64_t rw_out, const char* op) {
  NNS_CHECK_DIM(NNS_OP, "patches", patches, 7, "[B, Ci, Hi, Wi, D, Rhi, Rwi]");
  NNS_CHECK_PATCH_DTYPE(NNS_OP, "patches", patches);
  NNS_CHECK_DIM(NNS_OP, "weight", weight, 4, "[Co, Ci/groups, Kh, Kw]");
  NNS_CHECK_FLOATING(NNS_OP, "weight", weight);
  NNS_CHECK_SAME_DEVICE(NNS_OP, "weight", weight, patches);
  NNS_CHECK_PAIR(NNS_OP, "stride", stride);
  NNS_CHECK_PAIR(NNS_OP, "padding", padding);
  NNS_CHECK_PAIR(NNS_OP, "dilation", dilation);
  TORCH_CHECK_VALUE(stride[0] >= 1 && stride[1] >= 1, NNS_MSG(NNS_OP, ": stride must be >= 1, got ", stride));
  TORCH_CHECK_VALUE(padding[0] >= 0 && padding[1] >= 0, NNS_MSG(NNS_OP, ": padding must be >= 0, got ",
                    padding));
  TORCH_CHECK_VALUE(dilation[0] >= 1 && dilation[1] >= 1,
                    NNS_MSG(NNS_OP, ": dilation must be >= 1, got ", dilation));
  TORCH_CHECK_VALUE(groups >= 1, NNS_MSG(NNS_OP, ": groups must be >= 1, got ", groups));
  ConvDims g;
  g.B = patches.size(0); g.Ci = patches.size(1); g.Hi = patches.size(2); g.Wi = patches.size(3);
  g.D = patches.size(4); g.Rhi = patches.size(5); g.Rwi = patches.size(6);
  g.Co = weight.size(0); g.Cig = weight.size(1); g.Kh = weight.size(2); g.Kw = weight.size(3);
  g.G = groups;
  TORCH_CHECK_VALUE(g.Ci % groups == 0 && g.Co % groups == 0 && g.Cig == g.Ci / groups,
                    NNS_MSG(NNS_OP, ": weight ", weight.sizes(), " does not match ", g.Ci,
                    " input channels with groups=", groups));
  g.Cog = g.Co / groups;
  TORCH_CHECK_VALUE(rh_out >= 0 && rw_out >= 0,
                    NNS_MSG(NNS_OP, ": rh_out and rw_out must be >= 0, got ", rh_out, ", ", rw_out));
  g.rho = rh_out; g.rwo = rw_out;
  NNS_CHECK_ANCHOR(NNS_OP, "ay_in", ay_in, patches, g.Hi, "Hi");
  NNS_CHECK_ANCHOR(NNS_OP, "ax_in", ax_in, patches, g.Wi, "Wi");
  NNS_CHECK_ANCHOR(NNS_OP, "ay_out", ay_out, patches, ay_out.numel(), "Ho");
  NNS_CHECK_ANCHOR(NNS_OP, "ax_out", ax_out, patches, ax_out.numel(), "Wo");
  g.Ho = ay_out.numel(); g.Wo = ax_out.numel();
  if (in_active.has_value()) {
    const auto& t = *in_active;
    NNS_CHECK_DTYPE(NNS_OP, "in_active", t, at::kBool);
    NNS_CHECK_SAME_DEVICE(NNS_OP, "in_active", t, patches);
    const std::vector<int64_t> want{g.B, g.Ci, g.Hi, g.Wi};
    NNS_CHECK_SHAPE(NNS_OP, "in_active", t, want, "[B, Ci, Hi, Wi]");
  }
  if (scale.has_value()) {
    const auto& t = *scale;
    NNS_CHECK_FLOATING(NNS_OP, "scale", t);
    NNS_CHECK_SAME_DEVICE(NNS_OP, "scale", t, patches);
    const std::vector<int64_t> want{g.Co};
    NNS_CHECK_SHAPE(NNS_OP, "scale", t, want, "[Co]");
  }
  if (gate.has_value()) {
    const auto& t = *gate;
    NNS_CHECK_FLOATING_OR_BOOL(NNS_OP, "gate", t);
    NNS_CHECK_SAME_DEVICE(NNS_OP, "gate", t, patches);
    const std::vector<int64_t> want{g.B, g.Co, g.Ho, g.Wo};
    NNS_CHECK_SHAPE(NNS_OP, "gate", t, want, "[B, Co, Ho, Wo]");
  }
  g.sh = stride[0]; g.sw = stride[1];
  g.ph = padding[0]; g.pw = padding[1];
  g.dh = dilation[0]; g.dw = dilation[1];
  return g;
}

at::Tensor conv_gate_scale(const ConvDims& g, const std::optional<at::Tensor>& scale,
                           const std::optional<at::Tensor>& gate, at::ScalarType mt) {
  at::Tensor mul;
  if (scale.has_value()) mul = scale->to(mt).view({1, g.Co, 1, 1}).expand({g.B, g.Co, g.Ho, g.Wo});
  if (gate.has_value()) mul = mul.defined() ? mul * gate->to(mt) : gate->to(mt);
  return mul;
}

// One axis of conv_offset_table: t[o * K + k] for the n_out output positions, checked to fit.
static void axis_offsets(int64_t* t, int64_t n_out, int64_t K, int64_t s, int64_t p, int64_t d, int64_t n_in,
                         const int64_t* a_in, const int64_t* a_out, int64_t R_in, int64_t r_out, const char* op) {
  for (int64_t o = 0; o < n_out; ++o) {
    for (int64_t k = 0; k < K; ++k) {
      const int64_t i = tap_index(o, k, s, p, d);
      int64_t off = kNoTap;
      if (i >= 0 && i < n_in) {
        off = a_in[i] - a_out[o];
        TORCH_CHECK_VALUE(window_fits(off, R_in, r_out),
                          NNS_MSG(NNS_OP, ": an input window does not fit inside its output window (offset ",
                          off, ", sizes ", R_in, " -> ", r_out,
                          "); anchors must come from the receptive-field geometry (nns_cuda.graph)"));
      }
      t[o * K + k] = off;
    }
  }
}

at::Tensor conv_offset_table(const ConvDims& g, const at::Tensor& ay_in, const at::Tensor& ax_in,
                             const at::Tensor& ay_out, const at::Tensor& ax_out, const char* op) {
  auto h = host_longs({ay_in, ax_in, ay_out, ax_out});
  auto tab = at::empty({g.Ho * g.Kh + g.Wo * g.Kw}, at::TensorOptions().dtype(at::kLong));
  int64_t* t = tab.data_ptr<int64_t>();
  axis_offsets(t, g.Ho, g.Kh, g.sh, g.ph, g.dh, g.Hi, h[0].data_ptr<int64_t>(), h[2].data_ptr<int64_t>(),
               g.Rhi, g.rho, op);
  axis_offsets(t + g.Ho * g.Kh, g.Wo, g.Kw, g.sw, g.pw, g.dw, g.Wi, h[1].data_ptr<int64_t>(),
               h[3].data_ptr<int64_t>(), g.Rwi, g.rwo, op);
  return tab;
}
#undef NNS_OP

ConvLiSetup conv_li_setup(const at::Tensor& patches, const at::Tensor& ay_in, const at::Tensor& ax_in,
                          const std::optional<at::Tensor>& in_active, const at::Tensor& weight,
                          const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& gate,
                          const at::Tensor& ay_out, const at::Tensor& ax_out, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                          int64_t rh_out, int64_t rw_out, int64_t max_elems, const char* op) {
  const ConvDims g = check_conv_li(patches, ay_in, ax_in, in_active, weight, scale, gate, ay_out,
                                   ax_out, stride, padding, dilation, groups, rh_out, rw_out, op);
  TORCH_CHECK_VALUE(max_elems >= 0, NNS_MSG(op, ": max_elems must be >= 0 (0: default), got ",
                                            max_elems));
  // validates that every tap's input window fits its output window (host copy of the anchors)
  at::Tensor tab = conv_offset_table(g, ay_in, ax_in, ay_out, ax_out, op);
  at::Tensor out = at::empty({g.B, g.Co, g.Ho, g.Wo, g.D, g.rho, g.rwo}, patches.options());
  return ConvLiSetup{g, std::move(tab), std::move(out)};
}

}  // namespace nns_cuda
