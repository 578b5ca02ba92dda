// conv_li and its two ATen formulations conv_li_gemm / conv_li_gather (same arguments): the
// argument check and the host tables shared by their kernels. Defined in csrc/conv_li.cpp.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

namespace nns_cuda {

struct ConvDims {
  int64_t B, Ci, Hi, Wi, D, Rhi, Rwi;
  int64_t Co, Cig, Kh, Kw, G, Cog;
  int64_t Ho, Wo, rho, rwo;
  int64_t sh, sw, ph, pw, dh, dw;
};

// Checks the arguments of conv_li; `op` names the op in the messages: "conv_li", or
// "conv_li_gemm" / "conv_li_gather" (same arguments). The order of the checks is mirrored by
// the fake kernels in nns_cuda/ops/_fakes.py.
ConvDims check_conv_li(const at::Tensor& patches, const at::Tensor& ay_in, const at::Tensor& ax_in,
                       const std::optional<at::Tensor>& in_active, const at::Tensor& weight,
                       const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& gate,
                       const at::Tensor& ay_out, const at::Tensor& ax_out, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                       int64_t rh_out, int64_t rw_out, const char* op = "conv_li");

// gate * scale of a conv's output neurons, [B, Co, Ho, Wo] in dtype `mt` (the scale broadcast over
// the batch and the positions), or an undefined tensor when neither is given (conv_li_gemm and
// conv_li_gather multiply their GEMM results / weights by it).
at::Tensor conv_gate_scale(const ConvDims& g, const std::optional<at::Tensor>& scale,
                           const std::optional<at::Tensor>& gate, at::ScalarType mt);

// Offsets of every tap's input window inside its output window, checked to fit:
// a CPU int64 tensor [Ho*Kh + Wo*Kw]: rows (y*Kh + ky) then columns (x*Kw + kx); kNoTap where
// the tap falls in the padding.
at::Tensor conv_offset_table(const ConvDims& g, const at::Tensor& ay_in, const at::Tensor& ax_in,
                             const at::Tensor& ay_out, const at::Tensor& ax_out,
                             const char* op = "conv_li");

// The common start of conv_li (CPU and CUDA kernels), conv_li_gemm and conv_li_gather: the
// argument check, the max_elems check (conv_li has none: 0), the checked offset table (on the
// host) and the (uninitialised) output [B, Co, Ho, Wo, D, rho, rwo].
struct ConvLiSetup {
  ConvDims g;
  at::Tensor tab;
  at::Tensor out;
};
ConvLiSetup conv_li_setup(const at::Tensor& patches, const at::Tensor& ay_in, const at::Tensor& ax_in,
                          const std::optional<at::Tensor>& in_active, const at::Tensor& weight,
                          const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& gate,
                          const at::Tensor& ay_out, const at::Tensor& ax_out, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                          int64_t rh_out, int64_t rw_out, int64_t max_elems = 0,
                          const char* op = "conv_li");

}  // namespace nns_cuda
