// Launch helpers for the CUDA kernels (included by csrc/cuda/*.cu only).
// Deliberately avoids ATen/cuda/CUDAContext.h, which needs the cuBLAS / cuSPARSE headers (README,
// "Backends and building for CUDA").
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>

namespace nns_cuda {

constexpr int kThreads = 256;
// Kernels with one warp per neuron (maxpool_li, place_li, li_stats): warps per block.
constexpr int kWarpsPerBlock = kThreads / 32;
// Grid-stride loops cover any size; capping the grid keeps the block count a valid int.
constexpr int64_t kMaxBlocks = int64_t(1) << 22;

inline unsigned int blocks_for(int64_t work_items, int64_t per_block) {
  const int64_t b = (work_items + per_block - 1) / per_block;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(b, kMaxBlocks)));
}

// Threads for a block that works on one patch of `n` elements: a multiple of 32 in [32, 256].
inline int threads_for_patch(int64_t n) {
  const int64_t t = ((n + 31) / 32) * 32;
  return static_cast<int>(std::max<int64_t>(32, std::min<int64_t>(t, kThreads)));
}

}  // namespace nns_cuda
