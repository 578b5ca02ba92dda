// Argument checks shared by every op (CPU and CUDA). Messages name the op, the argument,
// what was expected and what came (docs/architecture.md, house rule 3):
//   "conv_li: weight must be 4-D [Co, Ci/groups, Kh, Kw], got [3, 3]"
// Shape / value / device errors raise ValueError (like the reference twins in
// nns_cuda/ops/reference/ops.py), dtype errors raise TypeError. The fake kernels
// (nns_cuda/ops/_fakes.py, nns_cuda/ops/_checks.py) mirror these checks with torch._check_value /
// torch._check_type.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace nns_cuda {
// The dtype as Python prints it ("torch.int64"), so that C++ and fake-kernel messages agree.
inline const char* dtype_name(c10::ScalarType t) {
  switch (t) {
    case c10::ScalarType::Float: return "torch.float32";
    case c10::ScalarType::Double: return "torch.float64";
    case c10::ScalarType::Half: return "torch.float16";
    case c10::ScalarType::BFloat16: return "torch.bfloat16";
    case c10::ScalarType::Long: return "torch.int64";
    case c10::ScalarType::Int: return "torch.int32";
    case c10::ScalarType::Short: return "torch.int16";
    case c10::ScalarType::Char: return "torch.int8";
    case c10::ScalarType::Byte: return "torch.uint8";
    case c10::ScalarType::Bool: return "torch.bool";
    default: return c10::toString(t);
  }
}

// Error messages are assembled here as one std::string (std::to_string for numbers) instead of
// streaming numbers through c10::str / std::ostream: on the GPU machines' image an extension
// built with the system g++ crashed (SIGSEGV in std::ostream::_M_insert<long>, a libstdc++
// mismatch) whenever a TORCH_CHECK message held an integer or an IntArrayRef.
namespace msg {
inline std::string s(const char* c) { return std::string(c); }
inline std::string s(const std::string& c) { return c; }
inline std::string s(int64_t v) { return std::to_string(v); }
inline std::string s(c10::IntArrayRef a) {
  std::string r = "[";
  for (size_t i = 0; i < a.size(); ++i) {
    if (i) r += ", ";
    r += std::to_string(a[i]);
  }
  return r + "]";
}
inline std::string s(const c10::Device& d) { return d.str(); }
inline std::string s(c10::ScalarType t) { return dtype_name(t); }
template <typename... Ts>
std::string cat(const Ts&... xs) {
  std::string r;
  ((r += s(xs)), ...);
  return r;
}
}  // namespace msg

// The storage dtypes of patches / dense images: float32, float64, and the low-precision
// bfloat16 / float16 (stored in 16 bits, accumulated in float32: at::opmath_type).
inline bool is_patch_dtype(c10::ScalarType t) {
  return t == c10::ScalarType::Float || t == c10::ScalarType::Double ||
         t == c10::ScalarType::BFloat16 || t == c10::ScalarType::Half;
}
}  // namespace nns_cuda

// The message of a TORCH_CHECK: NNS_MSG("op: x must be ", n, ", got ", t.sizes()).
#define NNS_MSG(...) ::nns_cuda::msg::cat(__VA_ARGS__)

// t.dim() == n; `layout` is a literal such as "[B, C, Ho, Wo, D, Rh, Rw]".
#define NNS_CHECK_DIM(op, name, t, n, layout)                                              \
  TORCH_CHECK_VALUE((t).dim() == (n), NNS_MSG(op, ": " name " must be " #n "-D " layout ", got ", \
                    (t).sizes()))

// t.sizes() == expected (a std::vector<int64_t> or IntArrayRef).
#define NNS_CHECK_SHAPE(op, name, t, expected, layout)                                   \
  TORCH_CHECK_VALUE((t).sizes() == c10::IntArrayRef(expected),                           NNS_MSG(\
                    op, ": " name " must be " layout " = ", c10::IntArrayRef(expected),  \
                    ", got ", (t).sizes()))

#define NNS_CHECK_PATCH_DTYPE(op, name, t)                                               \
  TORCH_CHECK_TYPE(::nns_cuda::is_patch_dtype((t).scalar_type()),                        NNS_MSG(\
                   op, ": " name " must be float32, float64, bfloat16 or float16, got ",  \
                   ::nns_cuda::dtype_name((t).scalar_type())))

#define NNS_CHECK_FLOATING(op, name, t)                                                  \
  TORCH_CHECK_TYPE(at::isFloatingType((t).scalar_type()),                                NNS_MSG(\
                   op, ": " name " must be a floating-point tensor, got ",             \
                   ::nns_cuda::dtype_name((t).scalar_type())))

#define NNS_CHECK_FLOATING_OR_BOOL(op, name, t)                                          \
  TORCH_CHECK_TYPE(at::isFloatingType((t).scalar_type()) ||                              \
                       (t).scalar_type() == at::kBool,                                   NNS_MSG(\
                   op, ": " name " must be a floating-point or bool tensor, got ",        \
                   ::nns_cuda::dtype_name((t).scalar_type())))

#define NNS_CHECK_DTYPE(op, name, t, dtype)                                              \
  TORCH_CHECK_TYPE((t).scalar_type() == (dtype), NNS_MSG(op, ": " name " must be ",               \
                   ::nns_cuda::dtype_name(dtype), ", got ",                               \
                   ::nns_cuda::dtype_name((t).scalar_type())))

#define NNS_CHECK_SAME_DEVICE(op, name, t, ref)                                          \
  TORCH_CHECK_VALUE((t).device() == (ref).device(),                                      NNS_MSG(\
                    op, ": " name " must be on the same device as patches (",            \
                    (ref).device(), "), got ", (t).device()))

// A 1-D int64 anchor vector on the device of `ref` with `n` entries; `what` names the
// dimension it indexes ("Hi", "Wo", ...).
#define NNS_CHECK_ANCHOR(op, name, t, ref, n, what)                                      \
  do {                                                                                   \
    NNS_CHECK_DIM(op, name, t, 1, "[" what "]");                                         \
    NNS_CHECK_DTYPE(op, name, t, at::kLong);                                             \
    NNS_CHECK_SAME_DEVICE(op, name, t, ref);                                             \
    TORCH_CHECK_VALUE((t).numel() == (n), NNS_MSG(op, ": " name " must have " what "=", (n),       \
                      " entries, got ", (t).numel()));                                    \
  } while (0)

#define NNS_CHECK_PAIR(op, name, v)                                                       \
  TORCH_CHECK_VALUE((v).size() == 2, NNS_MSG(op, ": " name " must have 2 entries, got ", (v)))
