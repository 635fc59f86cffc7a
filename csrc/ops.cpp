// Every schema of torch.ops.snl, on one screen. The math of each op (forward, backward, what is
// saved) is in the module docstring of snl_kernels/<op>.py; its CUDA kernels register in
// csrc/<op>.cu, its fake (meta) function and autograd in Python.

#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import snl_kernels._C` only has to load this library so that the registrations below run:
// the module is empty, and without pybind11 the .so needs only the stable Python ABI (abi3).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",     // m_name
      nullptr,  // m_doc
      -1,       // m_size
      nullptr,  // m_methods
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(snl, m) {
  m.def(
      "cosine_distances_fwd(Tensor teacher, Tensor student) -> (Tensor pixel, Tensor channel, "
      "Tensor sample, Tensor pixel_stats, Tensor channel_stats)");
  m.def(
      "cosine_distances_bwd(Tensor teacher, Tensor student, Tensor pixel_stats, "
      "Tensor channel_stats, Tensor grad_pixel, Tensor grad_channel, Tensor grad_sample, "
      "bool teacher_requires_grad) -> (Tensor grad_teacher, Tensor grad_student)");
}
