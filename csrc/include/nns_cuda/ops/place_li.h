// place_li: the argument check and offset table shared by its CPU and CUDA kernels, and the
// op called through the dispatcher (CPU or CUDA kernel by the device of `patches`), for C++
// callers such as conv_li_gather. Defined in csrc/place_li.cpp.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

#include "nns_cuda/validate.h"

namespace nns_cuda {

PoolDims check_place_li(const at::Tensor& patches, const at::Tensor& ay_in, const at::Tensor& ax_in,
                        const at::Tensor& ay_out, const at::Tensor& ax_out, int64_t rh_out,
                        int64_t rw_out, const std::optional<at::Tensor>& accumulate);

// CPU int64 tensor [Ho + Wo]: the offset of each input window inside its output window.
at::Tensor place_offset_table(const PoolDims& g, const at::Tensor& ay_in, const at::Tensor& ax_in,
                              const at::Tensor& ay_out, const at::Tensor& ax_out);

// torch.ops.nns_cuda.place_li.
at::Tensor place_li(const at::Tensor& patches, const at::Tensor& ay_in, const at::Tensor& ax_in,
                    const at::Tensor& ay_out, const at::Tensor& ax_out, int64_t rh_out,
                    int64_t rw_out, const std::optional<at::Tensor>& accumulate);

}  // namespace nns_cuda
