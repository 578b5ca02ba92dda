// Per-op argument validation and host-side geometry tables, shared by the CPU and CUDA
// kernels (host code only). The order of the checks is mirrored by the fake kernels in
// nns_cuda/ops.py; data-dependent checks (windows that must fit, index ranges) are run
// here on a host copy of the (small) anchor vectors.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "nns_cuda/checks.h"
#include "nns_cuda/geometry.h"

namespace nns_cuda {

// Host (CPU, contiguous) copies of int64 vectors, with a single device->host copy when
// they live on a GPU.
inline std::vector<at::Tensor> host_longs(const std::vector<at::Tensor>& ts) {
  std::vector<at::Tensor> out;
  bool all_cpu = true;
  for (const auto& t : ts) all_cpu = all_cpu && t.device().is_cpu();
  if (all_cpu) {
    for (const auto& t : ts) out.push_back(t.contiguous());
    return out;
  }
  std::vector<int64_t> sizes;
  for (const auto& t : ts) sizes.push_back(t.numel());
  auto flat = at::cat(at::TensorList(ts), 0).to(at::kCPU).contiguous();
  int64_t off = 0;
  for (auto n : sizes) {
    out.push_back(flat.narrow(0, off, n));
    off += n;
  }
  return out;
}

// ---------------------------------------------------------------------------------- conv_li
struct ConvDims {
  int64_t B, Ci, Hi, Wi, D, Rhi, Rwi;
  int64_t Co, Cig, Kh, Kw, G, Cog;
  int64_t Ho, Wo, rho, rwo;
  int64_t sh, sw, ph, pw, dh, dw;
};

// `op` names the op in the messages: "conv_li", or "conv_li_gemm" (same arguments).
#define NNS_OP op
inline ConvDims check_conv_li(const at::Tensor& patches, const at::Tensor& ay_in,
                              const at::Tensor& ax_in, const std::optional<at::Tensor>& in_active,
                              const at::Tensor& weight, const std::optional<at::Tensor>& scale,
                              const std::optional<at::Tensor>& gate, const at::Tensor& ay_out,
                              const at::Tensor& ax_out, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                              int64_t rh_out, int64_t rw_out, const char* op = "conv_li") {
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

// gate * scale of a conv's output neurons, [B, Co, Ho, Wo] in dtype `mt` (the scale broadcast over
// the batch and the positions), or an undefined tensor when neither is given (conv_li_gemm and
// conv_li_gather multiply their GEMM results / weights by it).
inline at::Tensor conv_gate_scale(const ConvDims& g, const std::optional<at::Tensor>& scale,
                                  const std::optional<at::Tensor>& gate, at::ScalarType mt) {
  at::Tensor mul;
  if (scale.has_value()) mul = scale->to(mt).view({1, g.Co, 1, 1}).expand({g.B, g.Co, g.Ho, g.Wo});
  if (gate.has_value()) mul = mul.defined() ? mul * gate->to(mt) : gate->to(mt);
  return mul;
}

// Offsets of every tap's input window inside its output window, checked to fit:
// a CPU int64 tensor [Ho*Kh + Wo*Kw]: rows (y*Kh + ky) then columns (x*Kw + kx); kNoTap where
// the tap falls in the padding.
inline at::Tensor conv_offset_table(const ConvDims& g, const at::Tensor& ay_in,
                                    const at::Tensor& ax_in, const at::Tensor& ay_out,
                                    const at::Tensor& ax_out, const char* op = "conv_li") {
  auto h = host_longs({ay_in, ax_in, ay_out, ax_out});
  const int64_t* ayi = h[0].data_ptr<int64_t>();
  const int64_t* axi = h[1].data_ptr<int64_t>();
  const int64_t* ayo = h[2].data_ptr<int64_t>();
  const int64_t* axo = h[3].data_ptr<int64_t>();
  auto tab = at::empty({g.Ho * g.Kh + g.Wo * g.Kw}, at::TensorOptions().dtype(at::kLong));
  int64_t* t = tab.data_ptr<int64_t>();
  for (int64_t y = 0; y < g.Ho; ++y) {
    for (int64_t k = 0; k < g.Kh; ++k) {
      const int64_t yi = tap_index(y, k, g.sh, g.ph, g.dh);
      int64_t off = kNoTap;
      if (yi >= 0 && yi < g.Hi) {
        off = ayi[yi] - ayo[y];
        TORCH_CHECK_VALUE(window_fits(off, g.Rhi, g.rho),
                          NNS_MSG(NNS_OP, ": an input window does not fit inside its output window (offset ",
                          off, ", sizes ", g.Rhi, " -> ", g.rho,
                          "); anchors must come from the receptive-field geometry (nns_cuda.graph)"));
      }
      t[y * g.Kh + k] = off;
    }
  }
  int64_t* tc = t + g.Ho * g.Kh;
  for (int64_t x = 0; x < g.Wo; ++x) {
    for (int64_t k = 0; k < g.Kw; ++k) {
      const int64_t xi = tap_index(x, k, g.sw, g.pw, g.dw);
      int64_t off = kNoTap;
      if (xi >= 0 && xi < g.Wi) {
        off = axi[xi] - axo[x];
        TORCH_CHECK_VALUE(window_fits(off, g.Rwi, g.rwo),
                          NNS_MSG(NNS_OP, ": an input window does not fit inside its output window (offset ",
                          off, ", sizes ", g.Rwi, " -> ", g.rwo,
                          "); anchors must come from the receptive-field geometry (nns_cuda.graph)"));
      }
      tc[x * g.Kw + k] = off;
    }
  }
  return tab;
}
#undef NNS_OP

// ------------------------------------------------------------------------------- maxpool_li
struct PoolDims {
  int64_t B, C, Hi, Wi, D, Rhi, Rwi, Ho, Wo, rho, rwo;
};

#define NNS_OP "maxpool_li"
inline PoolDims check_maxpool_li(const at::Tensor& patches, const at::Tensor& ay_in,
                                 const at::Tensor& ax_in, const at::Tensor& indices,
                                 const at::Tensor& ay_out, const at::Tensor& ax_out,
                                 int64_t rh_out, int64_t rw_out) {
  NNS_CHECK_DIM(NNS_OP, "patches", patches, 7, "[B, C, Hi, Wi, D, Rhi, Rwi]");
  NNS_CHECK_PATCH_DTYPE(NNS_OP, "patches", patches);
  PoolDims g;
  g.B = patches.size(0); g.C = patches.size(1); g.Hi = patches.size(2); g.Wi = patches.size(3);
  g.D = patches.size(4); g.Rhi = patches.size(5); g.Rwi = patches.size(6);
  TORCH_CHECK_VALUE(rh_out >= 0 && rw_out >= 0,
                    NNS_MSG(NNS_OP, ": rh_out and rw_out must be >= 0, got ", rh_out, ", ", rw_out));
  g.rho = rh_out; g.rwo = rw_out;
  NNS_CHECK_ANCHOR(NNS_OP, "ay_in", ay_in, patches, g.Hi, "Hi");
  NNS_CHECK_ANCHOR(NNS_OP, "ax_in", ax_in, patches, g.Wi, "Wi");
  NNS_CHECK_ANCHOR(NNS_OP, "ay_out", ay_out, patches, ay_out.numel(), "Ho");
  NNS_CHECK_ANCHOR(NNS_OP, "ax_out", ax_out, patches, ax_out.numel(), "Wo");
  g.Ho = ay_out.numel(); g.Wo = ax_out.numel();
  NNS_CHECK_DTYPE(NNS_OP, "indices", indices, at::kLong);
  NNS_CHECK_SAME_DEVICE(NNS_OP, "indices", indices, patches);
  const std::vector<int64_t> want{g.B, g.C, g.Ho, g.Wo};
  NNS_CHECK_SHAPE(NNS_OP, "indices", indices, want, "[B, C, Ho, Wo]");
  return g;
}
#define NNS_MAXPOOL_RANGE_MSG(g) NNS_MSG("maxpool_li: indices out of range [0, ", (g).Hi * (g).Wi, ")")
#define NNS_MAXPOOL_FIT_MSG NNS_MSG("maxpool_li: an input window does not fit inside its output window")
#undef NNS_OP

// --------------------------------------------------------------------------------- place_li
#define NNS_OP "place_li"
inline PoolDims check_place_li(const at::Tensor& patches, const at::Tensor& ay_in,
                               const at::Tensor& ax_in, const at::Tensor& ay_out,
                               const at::Tensor& ax_out, int64_t rh_out, int64_t rw_out,
                               const std::optional<at::Tensor>& accumulate) {
  NNS_CHECK_DIM(NNS_OP, "patches", patches, 7, "[B, C, Ho, Wo, D, Rhi, Rwi]");
  NNS_CHECK_PATCH_DTYPE(NNS_OP, "patches", patches);
  PoolDims g;
  g.B = patches.size(0); g.C = patches.size(1); g.Ho = patches.size(2); g.Wo = patches.size(3);
  g.Hi = g.Ho; g.Wi = g.Wo;
  g.D = patches.size(4); g.Rhi = patches.size(5); g.Rwi = patches.size(6);
  TORCH_CHECK_VALUE(rh_out >= 0 && rw_out >= 0,
                    NNS_MSG(NNS_OP, ": rh_out and rw_out must be >= 0, got ", rh_out, ", ", rw_out));
  g.rho = rh_out; g.rwo = rw_out;
  NNS_CHECK_ANCHOR(NNS_OP, "ay_in", ay_in, patches, g.Ho, "Ho");
  NNS_CHECK_ANCHOR(NNS_OP, "ax_in", ax_in, patches, g.Wo, "Wo");
  NNS_CHECK_ANCHOR(NNS_OP, "ay_out", ay_out, patches, g.Ho, "Ho");
  NNS_CHECK_ANCHOR(NNS_OP, "ax_out", ax_out, patches, g.Wo, "Wo");
  if (accumulate.has_value()) {
    const auto& t = *accumulate;
    NNS_CHECK_DTYPE(NNS_OP, "accumulate", t, patches.scalar_type());
    NNS_CHECK_SAME_DEVICE(NNS_OP, "accumulate", t, patches);
    const std::vector<int64_t> want{g.B, g.C, g.Ho, g.Wo, g.D, g.rho, g.rwo};
    NNS_CHECK_SHAPE(NNS_OP, "accumulate", t, want, "[B, C, Ho, Wo, D, rh_out, rw_out]");
  }
  return g;
}

// CPU int64 tensor [Ho + Wo]: the offset of each input window inside its output window.
inline at::Tensor place_offset_table(const PoolDims& g, const at::Tensor& ay_in,
                                     const at::Tensor& ax_in, const at::Tensor& ay_out,
                                     const at::Tensor& ax_out) {
  auto h = host_longs({ay_in, ax_in, ay_out, ax_out});
  const int64_t* ayi = h[0].data_ptr<int64_t>();
  const int64_t* axi = h[1].data_ptr<int64_t>();
  const int64_t* ayo = h[2].data_ptr<int64_t>();
  const int64_t* axo = h[3].data_ptr<int64_t>();
  auto tab = at::empty({g.Ho + g.Wo}, at::TensorOptions().dtype(at::kLong));
  int64_t* t = tab.data_ptr<int64_t>();
  for (int64_t y = 0; y < g.Ho; ++y) {
    const int64_t off = ayi[y] - ayo[y];
    TORCH_CHECK_VALUE(window_fits(off, g.Rhi, g.rho),
                      NNS_MSG(NNS_OP, ": an input window does not fit inside its output window (offset ",
                      off, ", sizes ", g.Rhi, " -> ", g.rho,
                      "); anchors must come from the receptive-field geometry (nns_cuda.graph)"));
    t[y] = off;
  }
  for (int64_t x = 0; x < g.Wo; ++x) {
    const int64_t off = axi[x] - axo[x];
    TORCH_CHECK_VALUE(window_fits(off, g.Rwi, g.rwo),
                      NNS_MSG(NNS_OP, ": an input window does not fit inside its output window (offset ",
                      off, ", sizes ", g.Rwi, " -> ", g.rwo,
                      "); anchors must come from the receptive-field geometry (nns_cuda.graph)"));
    t[g.Ho + x] = off;
  }
  return tab;
}
#undef NNS_OP

// -------------------------------------------------------------------------------- linear_li
struct LinearDims {
  int64_t B, Nin, P, Nout;
};

#define NNS_OP "linear_li"
inline LinearDims check_linear_li(const at::Tensor& dense, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& gate) {
  NNS_CHECK_DIM(NNS_OP, "dense", dense, 3, "[B, Nin, P]");
  NNS_CHECK_PATCH_DTYPE(NNS_OP, "dense", dense);
  LinearDims g;
  g.B = dense.size(0); g.Nin = dense.size(1); g.P = dense.size(2);
  NNS_CHECK_DIM(NNS_OP, "weight", weight, 2, "[Nout, Nin]");
  TORCH_CHECK_VALUE(weight.size(1) == g.Nin, NNS_MSG(NNS_OP, ": weight must be [Nout, Nin=", g.Nin,
                    "], got ", weight.sizes()));
  NNS_CHECK_FLOATING(NNS_OP, "weight", weight);
  // "patches" in the device message means the op's main tensor, here `dense`.
  TORCH_CHECK_VALUE(weight.device() == dense.device(),
                    NNS_MSG(NNS_OP, ": weight must be on the same device as dense (", dense.device(),
                    "), got ", weight.device()));
  g.Nout = weight.size(0);
  if (gate.has_value()) {
    const auto& t = *gate;
    NNS_CHECK_FLOATING_OR_BOOL(NNS_OP, "gate", t);
    TORCH_CHECK_VALUE(t.device() == dense.device(),
                      NNS_MSG(NNS_OP, ": gate must be on the same device as dense (", dense.device(),
                      "), got ", t.device()));
    const std::vector<int64_t> want{g.B, g.Nout};
    NNS_CHECK_SHAPE(NNS_OP, "gate", t, want, "[B, Nout]");
  }
  return g;
}
#undef NNS_OP

// ------------------------------------------------------------------ li_stats / filter_fold
struct StatDims {
  int64_t B, C, Ho, Wo, D, Rh, Rw, H, W;
};

inline void check_windows_in_image(const char* op, const at::Tensor& ay, const at::Tensor& ax,
                                   int64_t Rh, int64_t Rw, int64_t H, int64_t W) {
  auto h = host_longs({ay, ax});
  const int64_t* py = h[0].data_ptr<int64_t>();
  const int64_t* px = h[1].data_ptr<int64_t>();
  bool ok = true;
  for (int64_t i = 0; i < h[0].numel(); ++i) ok = ok && py[i] >= 0 && py[i] + Rh <= H;
  for (int64_t i = 0; i < h[1].numel(); ++i) ok = ok && px[i] >= 0 && px[i] + Rw <= W;
  TORCH_CHECK_VALUE(ok, NNS_MSG(op, ": windows exceed the image (", H, "\u00d7", W, ")"));
}

#define NNS_OP "li_stats"
inline StatDims check_li_stats(const at::Tensor& patches, const at::Tensor& ay,
                               const at::Tensor& ax, const at::Tensor& x, const at::Tensor& fg) {
  NNS_CHECK_DIM(NNS_OP, "patches", patches, 7, "[B, C, Ho, Wo, D, Rh, Rw]");
  NNS_CHECK_PATCH_DTYPE(NNS_OP, "patches", patches);
  StatDims g;
  g.B = patches.size(0); g.C = patches.size(1); g.Ho = patches.size(2); g.Wo = patches.size(3);
  g.D = patches.size(4); g.Rh = patches.size(5); g.Rw = patches.size(6);
  NNS_CHECK_ANCHOR(NNS_OP, "ay", ay, patches, g.Ho, "Ho");
  NNS_CHECK_ANCHOR(NNS_OP, "ax", ax, patches, g.Wo, "Wo");
  TORCH_CHECK_VALUE(x.dim() == 4 && x.size(0) == g.B && x.size(1) == g.D,
                    NNS_MSG(NNS_OP, ": x must be [B=", g.B, ", D=", g.D, ", H, W], got ", x.sizes()));
  NNS_CHECK_FLOATING(NNS_OP, "x", x);
  NNS_CHECK_SAME_DEVICE(NNS_OP, "x", x, patches);
  g.H = x.size(2); g.W = x.size(3);
  const std::vector<int64_t> want{g.B, g.H, g.W};
  NNS_CHECK_SHAPE(NNS_OP, "fg", fg, want, "[B, H, W]");
  NNS_CHECK_FLOATING_OR_BOOL(NNS_OP, "fg", fg);
  NNS_CHECK_SAME_DEVICE(NNS_OP, "fg", fg, patches);
  check_windows_in_image(NNS_OP, ay, ax, g.Rh, g.Rw, g.H, g.W);
  return g;
}
#undef NNS_OP

#define NNS_OP "filter_fold"
inline StatDims check_filter_fold(const at::Tensor& patches, const at::Tensor& ay,
                                  const at::Tensor& ax, const at::Tensor& act, int64_t h,
                                  int64_t w) {
  NNS_CHECK_DIM(NNS_OP, "patches", patches, 7, "[B, C, Ho, Wo, D, Rh, Rw]");
  NNS_CHECK_PATCH_DTYPE(NNS_OP, "patches", patches);
  StatDims g;
  g.B = patches.size(0); g.C = patches.size(1); g.Ho = patches.size(2); g.Wo = patches.size(3);
  g.D = patches.size(4); g.Rh = patches.size(5); g.Rw = patches.size(6);
  NNS_CHECK_ANCHOR(NNS_OP, "ay", ay, patches, g.Ho, "Ho");
  NNS_CHECK_ANCHOR(NNS_OP, "ax", ax, patches, g.Wo, "Wo");
  const std::vector<int64_t> want{g.B, g.C, g.Ho, g.Wo};
  NNS_CHECK_SHAPE(NNS_OP, "act", act, want, "[B, C, Ho, Wo]");
  NNS_CHECK_FLOATING_OR_BOOL(NNS_OP, "act", act);
  NNS_CHECK_SAME_DEVICE(NNS_OP, "act", act, patches);
  TORCH_CHECK_VALUE(h >= 0 && w >= 0, NNS_MSG(NNS_OP, ": h and w must be >= 0, got ", h, ", ", w));
  g.H = h; g.W = w;
  check_windows_in_image(NNS_OP, ay, ax, g.Rh, g.Rw, h, w);
  return g;
}
#undef NNS_OP

// Gather tables of filter_fold: for every image row Y the list of grid rows y whose window
// covers it (CSR), same for columns. CPU int64 tensor laid out as
// [row_ptr (H+1) | col_ptr (W+1) | row_idx | col_idx], pointers relative to their index array.
inline at::Tensor fold_cover_table(const StatDims& g, const at::Tensor& ay, const at::Tensor& ax) {
  auto h = host_longs({ay, ax});
  auto build = [](const int64_t* a, int64_t n, int64_t R, int64_t size,
                  std::vector<int64_t>& ptr, std::vector<int64_t>& idx) {
    std::vector<int64_t> cnt(size + 1, 0);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t r = 0; r < R; ++r) cnt[a[i] + r + 1] += 1;
    ptr.assign(size + 1, 0);
    for (int64_t Y = 0; Y < size; ++Y) ptr[Y + 1] = ptr[Y] + cnt[Y + 1];
    idx.assign(ptr[size], 0);
    std::vector<int64_t> fill(ptr.begin(), ptr.end() - 1);
    for (int64_t i = 0; i < n; ++i)  // ascending i within each row: deterministic order
      for (int64_t r = 0; r < R; ++r) idx[fill[a[i] + r]++] = i;
  };
  std::vector<int64_t> rp, ri, cp, ci;
  build(h[0].data_ptr<int64_t>(), g.Ho, g.Rh, g.H, rp, ri);
  build(h[1].data_ptr<int64_t>(), g.Wo, g.Rw, g.W, cp, ci);
  const int64_t n = (int64_t)(rp.size() + cp.size() + ri.size() + ci.size());
  auto tab = at::empty({n}, at::TensorOptions().dtype(at::kLong));
  int64_t* t = tab.data_ptr<int64_t>();
  for (auto v : rp) *t++ = v;
  for (auto v : cp) *t++ = v;
  for (auto v : ri) *t++ = v;
  for (auto v : ci) *t++ = v;
  return tab;
}

}  // namespace nns_cuda
