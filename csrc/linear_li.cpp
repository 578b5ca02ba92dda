// linear_li: the op's schema, its argument check and its one device-generic implementation (ATen
// GEMMs: multi-threaded BLAS on the CPU, cuBLAS on CUDA), registered for the CPU and (in CUDA
// builds) CUDA.
//
// out[b, o] = gate[b, o] * sum_i W[o, i] * dense[b, i]   (dense: [B, Nin, P], P = D*H*W)
//
// Gate sparsity: when at most half of the (b, o) gates are non-zero, only the active rows are
// computed, per sample b, as a GEMM of the gathered weight rows ([n_active_b, Nin] x
// [Nin, P]); the rest of the output is zero. Otherwise one batched GEMM and a row scaling.
// The active counts cost one small device->host copy on a GPU.
//
// bfloat16 / float16 `dense`: the products run in float32 (at::opmath_type; the weights are
// not rounded) and only the result is rounded to the input dtype, on the CPU and on CUDA alike
// (float16 at::mm on the CPU was 25-135x slower than float32 on the development machine, and the
// linear layers are a small part of a scan).
#include <ATen/ATen.h>
#include <ATen/DeviceGuard.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "nns_cuda/checks.h"
#include "nns_cuda/dispatch.h"

TORCH_LIBRARY_FRAGMENT(nns_cuda, m) {
  m.def("linear_li(Tensor dense, Tensor weight, Tensor? gate) -> Tensor");
}

namespace nns_cuda {
namespace {

struct LinearDims {
  int64_t B, Nin, P, Nout;
};

#define NNS_OP "linear_li"
LinearDims check_linear_li(const at::Tensor& dense, const at::Tensor& weight,
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

at::Tensor linear_li_impl(const at::Tensor& dense, const at::Tensor& weight,
                          const std::optional<at::Tensor>& gate) {
  const LinearDims g = check_linear_li(dense, weight, gate);
  const auto in_dt = dense.scalar_type();
  if (g.B * g.Nout * g.P == 0 || g.Nin == 0) {
    // Empty product (or empty sum over Nin): the result is all zeros.
    return at::zeros({g.B, g.Nout, g.P}, dense.options());
  }
  const auto dt = at::toOpMathType(in_dt);
  if (dt != in_dt) return linear_li_impl(dense.to(dt), weight, gate).to(in_dt);
  const at::Tensor D = dense.contiguous();
  const at::Tensor W = weight.to(dt).contiguous();
  if (!gate.has_value()) return at::matmul(W, D).contiguous();
  const at::Tensor G = gate->to(dt).contiguous();
  const at::Tensor nz = G.ne(0);
  const at::Tensor counts = nz.sum(1).to(at::kCPU).contiguous();  // [B] active outputs per sample
  const int64_t* cnt = counts.data_ptr<int64_t>();
  int64_t nnz = 0;
  for (int64_t b = 0; b < g.B; ++b) nnz += cnt[b];
  if (2 * nnz >= g.B * g.Nout) {
    at::Tensor out = at::matmul(W, D).contiguous();
    out.mul_(G.unsqueeze(-1));
    return out;
  }
  at::Tensor out = at::zeros({g.B, g.Nout, g.P}, dense.options());
  if (nnz == 0) return out;
  const at::Tensor idx = nz.nonzero();  // [nnz, 2], row-major: grouped by b, ascending o
  int64_t off = 0;
  for (int64_t b = 0; b < g.B; ++b) {
    const int64_t c = cnt[b];
    if (c == 0) continue;
    const at::Tensor rows = idx.narrow(0, off, c).select(1, 1);
    off += c;
    at::Tensor res = at::mm(W.index_select(0, rows), D.select(0, b));
    res.mul_(G.select(0, b).index_select(0, rows).unsqueeze(1));
    out.select(0, b).index_put_({rows}, res);  // unique rows: deterministic
  }
  return out;
}

at::Tensor linear_li(const at::Tensor& dense, const at::Tensor& weight,
                     const std::optional<at::Tensor>& gate) {
  const at::OptionalDeviceGuard guard(at::device_of(dense));
  return linear_li_impl(dense, weight, gate);
}

}  // namespace
}  // namespace nns_cuda

NNS_IMPL_CPU_AND_CUDA("linear_li", &nns_cuda::linear_li)
