// nns_cuda._C: the op schemas (TORCH_LIBRARY) and an empty Python module so that
// `import nns_cuda._C` loads the library and registers the ops. Kernels live in
// csrc/cpu/*.cpp (CPU) and csrc/cuda/*.cu (CUDA), except conv_li_gemm, one ATen-only
// implementation registered for both (csrc/conv_gemm.cpp); fake kernels in nns_cuda/ops.py.
// The pure-PyTorch twin of every op is nns_cuda/reference/ops.py (same signature).
#include <Python.h>
#include <torch/library.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      NULL,  // doc
      -1,    // size
      NULL,  // methods
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(nns_cuda, m) {
  m.def(
      "conv_li(Tensor patches, Tensor ay_in, Tensor ax_in, Tensor? in_active, Tensor weight, "
      "Tensor? scale, Tensor? gate, Tensor ay_out, Tensor ax_out, int[] stride, int[] padding, "
      "int[] dilation, int groups, int rh_out, int rw_out) -> Tensor");
  m.def(
      "conv_li_gemm(Tensor patches, Tensor ay_in, Tensor ax_in, Tensor? in_active, Tensor weight, "
      "Tensor? scale, Tensor? gate, Tensor ay_out, Tensor ax_out, int[] stride, int[] padding, "
      "int[] dilation, int groups, int rh_out, int rw_out, int max_elems=0) -> Tensor");
  m.def(
      "conv_li_gather(Tensor patches, Tensor ay_in, Tensor ax_in, Tensor? in_active, Tensor weight, "
      "Tensor? scale, Tensor? gate, Tensor ay_out, Tensor ax_out, int[] stride, int[] padding, "
      "int[] dilation, int groups, int rh_out, int rw_out, int max_elems=0) -> Tensor");
  m.def(
      "maxpool_li(Tensor patches, Tensor ay_in, Tensor ax_in, Tensor indices, Tensor ay_out, "
      "Tensor ax_out, int rh_out, int rw_out) -> Tensor");
  m.def(
      "place_li(Tensor patches, Tensor ay_in, Tensor ax_in, Tensor ay_out, Tensor ax_out, "
      "int rh_out, int rw_out, Tensor? accumulate=None) -> Tensor");
  m.def("linear_li(Tensor dense, Tensor weight, Tensor? gate) -> Tensor");
  m.def("li_stats(Tensor patches, Tensor ay, Tensor ax, Tensor x, Tensor fg) -> Tensor");
  m.def("filter_fold(Tensor patches, Tensor ay, Tensor ax, Tensor act, int h, int w) -> Tensor");
  // fused E-step of the batched GMM (nns_cuda/_gmm_em.py; CPU kernel csrc/cpu/gmm.cpp)
  m.def(
      "gmm_estep(Tensor coef, Tensor phit, bool want_moments, bool want_labels) -> "
      "(Tensor, Tensor, Tensor)");
}
