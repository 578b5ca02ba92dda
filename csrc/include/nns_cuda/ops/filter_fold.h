// filter_fold: the argument check shared by its CPU and CUDA kernels and the CUDA kernel's gather
// tables (defined in csrc/filter_fold.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "nns_cuda/validate.h"

namespace nns_cuda {

// Also checks that every window lies inside the h x w image (host copy of the anchors).
StatDims check_filter_fold(const at::Tensor& patches, const at::Tensor& ay, const at::Tensor& ax,
                           const at::Tensor& act, int64_t h, int64_t w);

// Gather tables of filter_fold: for every image row Y the list of grid rows y whose window
// covers it (CSR), same for columns. CPU int64 tensor laid out as
// [row_ptr (H+1) | col_ptr (W+1) | row_idx | col_idx], pointers relative to their index array.
at::Tensor fold_cover_table(const StatDims& g, const at::Tensor& ay, const at::Tensor& ax);

}  // namespace nns_cuda
