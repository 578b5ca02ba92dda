// Host-side helpers of the per-op argument checks (csrc/<op>.cpp, declared in
// nns_cuda/ops/<op>.h), shared by several ops: host copies of the anchor vectors, the
// dimensions shared by the two routing ops and by the two reduction ops, and the check that
// windows lie inside the image. Host code only. Data-dependent checks (windows that must fit,
// index ranges) run on a host copy of the (small) anchor vectors.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "nns_cuda/checks.h"

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

// Dimensions of the routing ops maxpool_li and place_li (place_li: Hi = Ho, Wi = Wo).
struct PoolDims {
  int64_t B, C, Hi, Wi, D, Rhi, Rwi, Ho, Wo, rho, rwo;
};

// Dimensions of the reductions li_stats and filter_fold (H x W: the image).
struct StatDims {
  int64_t B, C, Ho, Wo, D, Rh, Rw, H, W;
};

// Every window [ay, ay + Rh) x [ax, ax + Rw) lies inside the H x W image.
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

}  // namespace nns_cuda
