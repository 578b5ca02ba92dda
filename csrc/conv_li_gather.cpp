// conv_li_gather: conv_li as batched GEMMs over the *active* (input neuron, tap) pairs of every
// output position (the gated GEMM), written with ATen ops only and registered for the CPU and
// (in CUDA builds) CUDA, so that exactly the code tested on the CPU runs with cuBLAS on the GPU
// (tensor cores for tf32 / bf16 / fp16). The op's schema, its implementation and both
// registrations; the argument checks are conv_li's (csrc/conv_li.cpp), with this op's name in
// the messages.
//
// For output position p = (y, x) of image b and group grp, let J(b, p) be the pairs
// j = (i, ky, kx) of the group whose tap is not padding and whose input neuron is active
// (in_active), in ascending order, padded to K = max |J(b, p)| over the chunk. Then
//   out[b, grp, p] = (W_g[:, J] * (gate * scale)[b, :, p]) @ A[b, p]      [Cog, K] x [K, D*rho*rwo]
// where row j of A[b, p] is the input neuron's patch placed into the output window of p. Unlike
// conv_li_gemm (dense im2col) inactive inputs cost nothing: K is about the number of active
// pairs, not Cig*Kh*Kw.
//
// Placement without an element map: an input row yi is used by the output rows y with a tap
// ky, each at offset ay_in[yi] - ay_out[y]. Every distinct (yi, offset) becomes one "virtual"
// row (likewise columns), and
//   Q[b, i, v, u] = patch[b, i, src(v), src(u)] placed at (off(v), off(u)) in a [D, rho, rwo] window
// is built once per image chunk (place_li through the dispatcher). Then every row of A is a
// whole row of Q: A is one index_select over rows, no per-element index. Where all output
// windows are the same window (deep layers, whose receptive field covers the image) each input
// neuron has one offset, Q has the input's shape, and when additionally the input windows
// already are that window, Q is the input itself (no copy). In general (windows that move with
// the position, e.g. early layers) an input row can have up to Kh offsets, so Q grows up to
// Kh*Kw times — the engine (conv_algorithm "gather") uses this op where that copy of one image
// fits its chunk bound, the direct kernel elsewhere (nns_cuda.engine._gather_fits).
//
// Padded pairs (j >= |J(b, p)|) get a zero weight and a zero row of A, so they add exact zeros
// whatever the patches hold; inactive input neurons are never read. Gated-off outputs
// (gate * scale == 0) get all-zero weights, and their rows are set to exact zeros at the end
// (also when an active input holds inf / NaN).
//
// The GEMM writes straight into the output: for one image, [positions, Cog, D*rho*rwo] with
// batch stride D*rho*rwo and row stride Ho*Wo*D*rho*rwo is a view of the output layout that
// cuBLAS (and the CPU BLAS) take as is, so the result is never copied (except for float16 on
// the CPU, whose float32 result is converted).
//
// Precision: as conv_li_gemm. The GEMM runs in the patch dtype (float32 obeys torch's TF32
// switch on CUDA; bfloat16 / float16 use the tensor cores with float32 accumulation), except
// float16 on the CPU, which multiplies in float32. The weights times gate * scale are formed in
// float32 (at::opmath_type) and rounded to the GEMM dtype; the result is rounded to the patch
// dtype.
//
// Chunking: images x tiles of output positions, so that Q of the image chunk plus the
// temporaries of one batched GEMM (A, its result, the index tables) stay within `max_elems`
// elements of the GEMM dtype (0: 2^26; one output position at least). Every chunk synchronises
// once with the host (K, and the padded rows).
#include <ATen/ATen.h>
#include <ATen/DeviceGuard.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "nns_cuda/checks.h"
#include "nns_cuda/dispatch.h"
#include "nns_cuda/geometry.h"
#include "nns_cuda/ops/conv_li.h"
#include "nns_cuda/ops/place_li.h"

TORCH_LIBRARY_FRAGMENT(nns_cuda, m) {
  m.def(
      "conv_li_gather(Tensor patches, Tensor ay_in, Tensor ax_in, Tensor? in_active, Tensor weight, "
      "Tensor? scale, Tensor? gate, Tensor ay_out, Tensor ax_out, int[] stride, int[] padding, "
      "int[] dilation, int groups, int rh_out, int rw_out, int max_elems=0) -> Tensor");
}

namespace nns_cuda {
namespace {

constexpr int64_t kDefaultMaxElems = int64_t(1) << 26;

// One axis of the virtual input grid.
struct VirtualAxis {
  std::vector<int64_t> src;   // [n_virtual] input position of each virtual position
  std::vector<int64_t> off;   // [n_virtual] offset of its window in the output windows using it
  std::vector<int64_t> vpos;  // [n_out * K] virtual position of (output y, tap k); -1: padding
  std::vector<int64_t> ipos;  // [n_out * K] input position of (output y, tap k); -1: padding
  bool identity = true;       // the virtual axis is the input axis (src[v] == v for all v)
  bool zero_off = true;       // every offset is 0
};

// `off` holds conv_offset_table's entries for this axis: off[y * K + k] (kNoTap: padding).
VirtualAxis virtual_axis(const int64_t* off, int64_t n_out, int64_t K, int64_t n_in,
                         int64_t stride, int64_t pad, int64_t dil) {
  std::vector<std::vector<int64_t>> offs(n_in);  // distinct offsets of each input position
  for (int64_t y = 0; y < n_out; ++y) {
    for (int64_t k = 0; k < K; ++k) {
      const int64_t o = off[y * K + k];
      if (o == kNoTap) continue;
      auto& v = offs[tap_index(y, k, stride, pad, dil)];
      if (std::find(v.begin(), v.end(), o) == v.end()) v.push_back(o);
    }
  }
  VirtualAxis a;
  std::vector<int64_t> first(n_in + 1, 0);
  for (int64_t i = 0; i < n_in; ++i) {
    std::sort(offs[i].begin(), offs[i].end());
    first[i + 1] = first[i] + static_cast<int64_t>(offs[i].size());
    for (const int64_t o : offs[i]) {
      a.src.push_back(i);
      a.off.push_back(o);
      a.zero_off = a.zero_off && o == 0;
    }
  }
  a.identity = static_cast<int64_t>(a.src.size()) == n_in;
  for (size_t v = 0; a.identity && v < a.src.size(); ++v) a.identity = a.src[v] == static_cast<int64_t>(v);
  a.vpos.assign(n_out * K, -1);
  a.ipos.assign(n_out * K, -1);
  for (int64_t y = 0; y < n_out; ++y) {
    for (int64_t k = 0; k < K; ++k) {
      const int64_t o = off[y * K + k];
      if (o == kNoTap) continue;
      const int64_t i = tap_index(y, k, stride, pad, dil);
      const auto& v = offs[i];
      a.ipos[y * K + k] = i;
      a.vpos[y * K + k] = first[i] + (std::find(v.begin(), v.end(), o) - v.begin());
    }
  }
  return a;
}

at::Tensor long_tensor(const std::vector<int64_t>& v, const at::Device& dev) {
  auto t = at::empty({static_cast<int64_t>(v.size())}, at::TensorOptions().dtype(at::kLong));
  std::copy(v.begin(), v.end(), t.data_ptr<int64_t>());
  return t.to(dev);
}

at::Tensor conv_li_gather(const at::Tensor& patches, const at::Tensor& ay_in, const at::Tensor& ax_in,
                          const std::optional<at::Tensor>& in_active, const at::Tensor& weight,
                          const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& gate,
                          const at::Tensor& ay_out, const at::Tensor& ax_out, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                          int64_t rh_out, int64_t rw_out, int64_t max_elems) {
  constexpr const char* op = "conv_li_gather";
  const at::OptionalDeviceGuard guard(at::device_of(patches));
  ConvLiSetup setup = conv_li_setup(patches, ay_in, ax_in, in_active, weight, scale, gate, ay_out, ax_out,
                                    stride, padding, dilation, groups, rh_out, rw_out, max_elems, op);
  const ConvDims& g = setup.g;
  const at::Tensor& tab = setup.tab;
  at::Tensor& out = setup.out;
  if (out.numel() == 0) return out;
  const int64_t K2 = g.Kh * g.Kw;
  const int64_t CK = g.Cig * K2;  // candidate pairs of one output position and group
  if (CK == 0) return out.zero_();  // empty sum

  const auto dev = patches.device();
  const auto dt = patches.scalar_type();
  const auto mt = at::toOpMathType(dt);  // weights * gate * scale
  const auto ct = (dt == at::kHalf && dev.is_cpu()) ? at::kFloat : dt;  // GEMM dtype
  const auto lopt = at::TensorOptions().dtype(at::kLong).device(dev);
  const int64_t pe = g.D * g.rho * g.rwo;  // elements of one output window
  const int64_t P = g.Ho * g.Wo;

  const int64_t* t = tab.data_ptr<int64_t>();
  const VirtualAxis vy = virtual_axis(t, g.Ho, g.Kh, g.Hi, g.sh, g.ph, g.dh);
  const VirtualAxis vx = virtual_axis(t + g.Ho * g.Kh, g.Wo, g.Kw, g.Wi, g.sw, g.pw, g.dw);
  const int64_t Hq = static_cast<int64_t>(vy.src.size());
  const int64_t Wq = static_cast<int64_t>(vx.src.size());
  const bool copy_free = vy.identity && vx.identity && vy.zero_off && vx.zero_off &&
                         g.Rhi == g.rho && g.Rwi == g.rwo;
  const at::Tensor src_y = vy.identity ? at::Tensor() : long_tensor(vy.src, dev);
  const at::Tensor src_x = vx.identity ? at::Tensor() : long_tensor(vx.src, dev);
  const at::Tensor off_y = long_tensor(vy.off, dev);
  const at::Tensor off_x = long_tensor(vx.off, dev);
  const at::Tensor zero_y = at::zeros({Hq}, lopt), zero_x = at::zeros({Wq}, lopt);  // output anchors

  // per-axis tables [n_out, K] on the device (-1: padding)
  const at::Tensor VY = long_tensor(vy.vpos, dev).view({g.Ho, 1, 1, g.Kh, 1});
  const at::Tensor VX = long_tensor(vx.vpos, dev).view({1, g.Wo, 1, 1, g.Kw});
  const at::Tensor IY = long_tensor(vy.ipos, dev).view({g.Ho, 1, 1, g.Kh, 1});
  const at::Tensor IX = long_tensor(vx.ipos, dev).view({1, g.Wo, 1, 1, g.Kw});
  const at::Tensor CH = at::arange(g.Cig, lopt).view({1, 1, g.Cig, 1, 1});

  const at::Tensor act = in_active.has_value() ? in_active->reshape({g.B, g.Ci * g.Hi * g.Wi})
                                               : at::Tensor();
  const at::Tensor Wg = weight.to(mt).reshape({g.G, g.Cog, CK});
  const at::Tensor mul = conv_gate_scale(g, scale, gate, mt);  // [B, Co, Ho, Wo], or undefined

  // chunking (elements of the GEMM dtype): Q of an image, and per image and output position
  // the GEMM temporaries of one group — A and W (<= CK rows each), the result — and ~5 int64
  // tables of CK entries (pairs, sort keys / order, rows)
  const int64_t budget = max_elems > 0 ? max_elems : kDefaultMaxElems;
  const int64_t idx_elems = std::max<int64_t>(1, 8 / static_cast<int64_t>(c10::elementSize(ct)));
  const int64_t q_img = copy_free && ct == dt ? 0 : g.Ci * Hq * Wq * pe;
  const int64_t per_pos = (CK + g.Cog) * pe + g.Cog * CK + 5 * CK * idx_elems;
  int64_t nbc = 1, ny = g.Ho, nx = g.Wo;
  if (q_img + per_pos * P <= budget) {
    nbc = std::max<int64_t>(1, std::min<int64_t>(g.B, budget / std::max<int64_t>(1, q_img + per_pos * P)));
  } else {
    const int64_t avail = std::max(budget - q_img, per_pos);
    if (per_pos * g.Wo <= avail) {
      ny = std::max<int64_t>(1, avail / (per_pos * g.Wo));
    } else {
      ny = 1;
      nx = std::max<int64_t>(1, avail / per_pos);
    }
  }

  const at::Tensor out5 = out.view({g.B, g.Co, g.Ho, g.Wo, pe});
  for (int64_t b0 = 0; b0 < g.B; b0 += nbc) {
    const int64_t nb = std::min(nbc, g.B - b0);
    // Q of the image chunk: [nb * Ci * Hq * Wq, pe] in the GEMM dtype
    at::Tensor Q = patches.narrow(0, b0, nb);
    if (src_y.defined()) Q = Q.index_select(2, src_y);
    if (src_x.defined()) Q = Q.index_select(3, src_x);
    if (!copy_free && Hq > 0 && Wq > 0) {
      // place_li through the dispatcher (its CPU or CUDA kernel, whichever the device is)
      Q = place_li(Q.contiguous(), off_y, off_x, zero_y, zero_x, g.rho, g.rwo, std::nullopt);
    }
    Q = Q.to(ct).contiguous().view({nb * g.Ci * Hq * Wq, pe});
    const at::Tensor qbase = (at::arange(nb, lopt) * (g.Ci * Hq * Wq)).view({nb, 1, 1});

    for (int64_t y0 = 0; y0 < g.Ho; y0 += ny) {
      const int64_t h = std::min(ny, g.Ho - y0);
      for (int64_t x0 = 0; x0 < g.Wo; x0 += nx) {
        const int64_t w = std::min(nx, g.Wo - x0);
        const int64_t np = h * w;
        const at::Tensor vyc = VY.narrow(0, y0, h), vxc = VX.narrow(1, x0, w);
        // [h, w, 1, Kh, Kw]: the tap is not padding
        const at::Tensor tap_ok = vyc.ge(0).logical_and(vxc.ge(0));
        const at::Tensor qrow = vyc.clamp_min(0) * Wq + vxc.clamp_min(0);   // in-channel offset in Q
        const at::Tensor arow = IY.narrow(0, y0, h).clamp_min(0) * g.Wi +
                                IX.narrow(1, x0, w).clamp_min(0);             // in-channel offset in act
        for (int64_t grp = 0; grp < g.G; ++grp) {
          const at::Tensor ch = CH + grp * g.Cig;  // input channels of the group
          at::Tensor valid = tap_ok.expand({h, w, g.Cig, g.Kh, g.Kw}).reshape({1, np, CK});
          if (act.defined()) {
            const at::Tensor aidx = (ch * (g.Hi * g.Wi) + arow).reshape({-1});
            valid = valid.logical_and(act.narrow(0, b0, nb).index_select(1, aidx).view({nb, np, CK}));
          } else {
            valid = valid.expand({nb, np, CK});
          }
          at::Tensor dst = out5.narrow(0, b0, nb).narrow(1, grp * g.Cog, g.Cog)
                               .narrow(2, y0, h).narrow(3, x0, w);  // [nb, Cog, h, w, pe]
          const int64_t K = valid.sum(-1).max().item<int64_t>();
          if (K == 0) {
            dst.zero_();
            continue;
          }
          // the K first pairs of every position, active ones first, each part in pair order
          const at::Tensor sel =
              at::argsort(valid.logical_not().to(at::kByte), /*stable=*/true, /*dim=*/-1).narrow(-1, 0, K)
                  .contiguous();                                                   // [nb, np, K]
          const at::Tensor keep = valid.gather(-1, sel);                           // [nb, np, K]
          const at::Tensor qidx = (ch * (Hq * Wq) + qrow).reshape({1, np, CK}).expand({nb, np, CK});
          const at::Tensor rows = qidx.gather(-1, sel) + qbase;                    // rows of Q
          at::Tensor A = Q.index_select(0, rows.reshape({-1}));                    // [nb*np*K, pe]
          const at::Tensor pad = keep.logical_not().reshape({-1}).nonzero().squeeze(1);
          if (pad.numel() > 0) A.index_fill_(0, pad, 0);
          at::Tensor Wsub = Wg.select(0, grp).index_select(1, sel.reshape({-1}))
                                .view({g.Cog, nb * np, K}).permute({1, 0, 2});      // [nb*np, Cog, K]
          Wsub = Wsub * keep.view({nb * np, 1, K}).to(mt);
          if (mul.defined()) {
            const at::Tensor m = mul.narrow(0, b0, nb).narrow(1, grp * g.Cog, g.Cog)
                                     .narrow(2, y0, h).narrow(3, x0, w)
                                     .permute({0, 2, 3, 1}).reshape({nb * np, g.Cog, 1});
            Wsub = Wsub * m;
          }
          Wsub = Wsub.to(ct).view({nb, np, g.Cog, K});
          A = A.view({nb, np, K, pe});
          for (int64_t b = 0; b < nb; ++b) {
            at::Tensor db = dst.select(0, b);  // [Cog, h, w, pe]
            if (ct == dt && (h == 1 || w == g.Wo)) {
              // [np, Cog, pe] view of the output: batch stride pe, rows Ho*Wo*pe apart
              at::Tensor d = db.view({g.Cog, np, pe}).permute({1, 0, 2});
              at::bmm_out(d, Wsub.select(0, b), A.select(0, b));
            } else {
              db.copy_(at::bmm(Wsub.select(0, b), A.select(0, b)).view({h, w, g.Cog, pe}).permute({2, 0, 1, 3}));
            }
          }
        }
      }
    }
  }
  if (mul.defined()) {
    // gated-off outputs exactly zero, also where an active input holds inf / NaN (their
    // all-zero weights give 0 * inf = NaN there)
    const at::Tensor rows = mul.eq(0).reshape({-1}).nonzero().squeeze(1);
    if (rows.numel() > 0) out5.view({-1, pe}).index_fill_(0, rows, 0);
  }
  return out;
}

}  // namespace
}  // namespace nns_cuda

NNS_IMPL_CPU_AND_CUDA("conv_li_gather", &nns_cuda::conv_li_gather)
