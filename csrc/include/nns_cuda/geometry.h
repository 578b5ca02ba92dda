// Receptive-field window index maths, shared by host and device code.
//
// Patch layout (nns_cuda/ops/reference/ops.py): a neuron (c, y, x) of a spatial node stores its
// learned image restricted to the window rows [ay[y], ay[y] + Rh) and columns
// [ax[x], ax[x] + Rw) of the D x H x W input, as a contiguous [D, Rh, Rw] block.
// Placing an input window (anchor a_in, size r_in) into an output window (anchor a_out,
// size r_out) shifts it by off = a_in - a_out, which must satisfy 0 <= off, off + r_in <= r_out.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace nns_cuda {

// Input grid index of output position `y` for kernel tap `k` (may fall in the padding).
C10_HOST_DEVICE inline int64_t tap_index(int64_t y, int64_t k, int64_t stride, int64_t padding,
                                         int64_t dilation) {
  return y * stride + k * dilation - padding;
}

// Does a window of size r_src at offset `off` fit inside a window of size r_dst?
C10_HOST_DEVICE inline bool window_fits(int64_t off, int64_t r_src, int64_t r_dst) {
  return off >= 0 && off + r_src <= r_dst;
}

// Offset of an element of a [D, R_dst_h, R_dst_w] window relative to a placed source window.
// Returns the flat index into the [D, r_src_h, r_src_w] source block, or -1 when the element
// lies outside the source window.
C10_HOST_DEVICE inline int64_t placed_source_index(int64_t d, int64_t r, int64_t q, int64_t dy,
                                                   int64_t dx, int64_t r_src_h,
                                                   int64_t r_src_w) {
  const int64_t rr = r - dy;
  const int64_t qq = q - dx;
  if (rr < 0 || rr >= r_src_h || qq < 0 || qq >= r_src_w) return -1;
  return (d * r_src_h + rr) * r_src_w + qq;
}

// Sentinel offset of a tap that falls in the padding (no input neuron).
constexpr int64_t kNoTap = -1;

}  // namespace nns_cuda
