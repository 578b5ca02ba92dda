// filter_fold (filter images L^k = sum a * LI): the op's schema, its argument check and the CUDA
// kernel's gather tables (nns_cuda/ops/filter_fold.h), shared by its CPU kernel
// (csrc/cpu/filter_fold_kernel.cpp) and CUDA kernel (csrc/cuda/filter_fold_kernel.cu).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "nns_cuda/checks.h"
#include "nns_cuda/ops/filter_fold.h"
#include "nns_cuda/validate.h"

TORCH_LIBRARY_FRAGMENT(nns_cuda, m) {
  m.def("filter_fold(Tensor patches, Tensor ay, Tensor ax, Tensor act, int h, int w) -> Tensor");
}

namespace nns_cuda {

#define NNS_OP "filter_fold"
StatDims check_filter_fold(const at::Tensor& patches, const at::Tensor& ay, const at::Tensor& ax,
                           const at::Tensor& act, int64_t h, int64_t w) {
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

at::Tensor fold_cover_table(const StatDims& g, const at::Tensor& ay, const at::Tensor& ax) {
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
