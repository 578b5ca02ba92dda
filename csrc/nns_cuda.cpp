// nns_cuda._C: an empty Python module, so that `import nns_cuda._C` loads the library and
// registers the ops, and the op namespace (TORCH_LIBRARY, once for `nns_cuda`).
//
// One op per file: csrc/<op>.cpp holds the op's schema (a TORCH_LIBRARY_FRAGMENT) and its
// argument checks, csrc/cpu/<op>_kernel.cpp its CPU kernel and csrc/cuda/<op>_kernel.cu its
// CUDA kernel, each with its TORCH_LIBRARY_IMPL. Ops written with ATen ops only are one file
// registered for both devices (conv_li_gemm, conv_li_gather, linear_li); gmm_estep has a CPU
// kernel only. Shared headers: csrc/include/nns_cuda/. The fake kernels are in
// nns_cuda/ops/_fakes.py, the pure-PyTorch twin of every op in nns_cuda/ops/reference/ops.py
// (same signature).
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

// The ops' schemas are fragments in their own files; this claims the namespace.
TORCH_LIBRARY(nns_cuda, m) {}
