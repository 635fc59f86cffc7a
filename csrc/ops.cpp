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
  // Affinity losses: the loss is a 0-dim float32 tensor; a gradient not asked for is empty.
  // grams (intra: the C x C Gram path, l2 only) and precision ("ieee": fp32 FMA, "tf32": TF32
  // WMMA for intra l2) are decided by snl_kernels/precision.py. signs: empty here (the CUDA
  // backward recomputes Delta; the Triton ops of the same schema keep l1's signs in it).
  m.def(
      "intra_affinity_fwd(Tensor teacher, Tensor student, str distance, bool grams, "
      "str precision) -> (Tensor loss, Tensor signs)");
  m.def(
      "intra_affinity_bwd(Tensor teacher, Tensor student, Tensor grad_loss, Tensor signs, "
      "str distance, bool grams, str precision, bool teacher_requires_grad) -> "
      "(Tensor grad_teacher, Tensor grad_student)");
  m.def(
      "inter_affinity_fwd(Tensor teacher_a, Tensor teacher_b, Tensor student_a, "
      "Tensor student_b, str distance, str precision) -> Tensor");
  m.def(
      "inter_affinity_bwd(Tensor teacher_a, Tensor teacher_b, Tensor student_a, "
      "Tensor student_b, Tensor grad_loss, str distance, str precision, "
      "bool teacher_requires_grad) -> (Tensor grad_teacher_a, Tensor grad_teacher_b, "
      "Tensor grad_student_a, Tensor grad_student_b)");
  m.def(
      "cram_fwd(Tensor embedding, Tensor centers, Tensor log_tau) -> (Tensor central, "
      "Tensor assign, Tensor compact, Tensor dist)");
  m.def(
      "cram_bwd(Tensor embedding, Tensor centers, Tensor log_tau, Tensor assign, Tensor dist, "
      "Tensor grad_central, Tensor grad_assign, Tensor grad_compact) -> (Tensor grad_embedding, "
      "Tensor grad_centers, Tensor grad_log_tau)");
  // Anomaly map, add mode: per-level distances into a zero-padded (B, L, HK, WK) buffer, then
  // maps[b] = sum_k mh[k] @ m[b, k] @ mw[k]^T and each map's max.
  m.def(
      "anomaly_map_distances(Tensor[] teachers, Tensor[] students, int hk, int wk) -> Tensor");
  m.def(
      "anomaly_map_combine(Tensor m, Tensor mh, Tensor mw, int height, int width) -> "
      "(Tensor maps, Tensor scores)");
}
