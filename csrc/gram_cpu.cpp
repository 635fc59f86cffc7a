// snl::intra_affinity_fwd / _bwd for CPU tensors, Gram path only: csrc/gram_host.h's composition
// with its products and normalisation backward as ATen ops. The kernel backends run on GPUs;
// this registration exists so that the composition the CUDA backend runs (operands, precisions,
// chunks, dtypes, layouts) is tested against the reference on machines without one
// (tests/test_gram_cuda_path.py). The tiled path has no CPU registration.

#include <torch/library.h>

#include <tuple>
#include <vector>

#include "gram_host.h"

namespace snl {
namespace {

struct AtenGram {
  std::vector<at::Tensor> operands(const at::Tensor& teacher, const at::Tensor& student,
                                   int64_t b0, int64_t nb, int parts) const {
    return gram_host::split(gram_host::operands(teacher, student, b0, nb), parts);
  }

  void add_loss(const at::Tensor& g, at::Tensor& total) const { gram_host::add_loss_aten(g, total); }

  std::vector<at::Tensor> coefficients(const at::Tensor& g, const at::Tensor& grad_loss, double M,
                                       bool teacher_side, int parts) const {
    return gram_host::coefficients_aten(g, grad_loss, M, teacher_side, parts);
  }

  void gemm(const at::Tensor& a, const at::Tensor& b, at::Tensor& out, bool accumulate,
            bool /*tensor_cores: the operands are tf32 values; fp32 products are exact*/) const {
    if (accumulate) {
      out.baddbmm_(a, b);
    } else {
      at::bmm_out(out, a, b);
    }
  }

  void normalize_bwd(const at::Tensor& f, const at::Tensor& dx, int64_t b0,
                     at::Tensor& grad) const {
    const int64_t nb = dx.size(0), C = dx.size(1), N = dx.size(2);
    const at::Tensor x = f.narrow(0, b0, nb).reshape({nb, C, N}).to(at::kFloat);
    const at::Tensor norm = at::linalg_vector_norm(x, 2, at::IntArrayRef{1}, true, at::kFloat);
    const at::Tensor r = norm.clamp_min(gram_host::kEps).reciprocal();
    // r dx - r^3 (f . dx) f, as the CUDA kernel (pixel_normalize_bwd_kernel)
    const at::Tensor k = at::where(norm > gram_host::kEps, r * r * r * (x * dx).sum(1, true),
                                   at::zeros_like(norm));
    grad.narrow(0, b0, nb).view({nb, C, N}).copy_(r * dx - k * x);
  }
};

void check_cpu(const at::Tensor& teacher, const at::Tensor& student) {
  TORCH_CHECK(teacher.is_cpu(), "teacher must be a CPU tensor here, got device ",
              teacher.device());
  check_feature_pair(teacher, student);
}

std::tuple<at::Tensor, at::Tensor> intra_affinity_fwd_cpu(const at::Tensor& teacher,
                                                          const at::Tensor& student,
                                                          c10::string_view distance, bool grams,
                                                          c10::string_view precision) {
  check_cpu(teacher, student);
  gram_host::check_request(distance, grams);
  return {gram_host::forward(teacher, student, precision, AtenGram{}),
          at::empty({0}, teacher.options().dtype(at::kInt))};
}

std::tuple<at::Tensor, at::Tensor> intra_affinity_bwd_cpu(
    const at::Tensor& teacher, const at::Tensor& student, const at::Tensor& grad_loss,
    const at::Tensor& signs, c10::string_view distance, bool grams, c10::string_view precision,
    bool teacher_requires_grad) {
  check_cpu(teacher, student);
  gram_host::check_request(distance, grams);
  TORCH_CHECK_VALUE(signs.numel() == 0, "signs must be the forward's empty tensor, got shape ",
                    shape_text(signs.sizes()));
  return gram_host::backward(teacher, student, checked_grad_loss(grad_loss, teacher), precision,
                             teacher_requires_grad, AtenGram{});
}

}  // namespace
}  // namespace snl

TORCH_LIBRARY_IMPL(snl, CPU, m) {
  m.impl("intra_affinity_fwd", &snl::intra_affinity_fwd_cpu);
  m.impl("intra_affinity_bwd", &snl::intra_affinity_bwd_cpu);
}
