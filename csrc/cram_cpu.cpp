// snl::cram_fwd / _bwd for CPU tensors: csrc/cram_host.h's composition with its row steps as
// ATen ops. The kernel backends run on GPUs; this registration exists so that the composition
// the CUDA backend runs (its products, layouts, chunks and dtypes) is tested against the
// reference on machines without one (tests/test_cram.py). The CUDA row kernels themselves are
// tested by the CPU emulation (tests/cuda_emulation).

#include <torch/library.h>

#include <tuple>

#include "cram_host.h"

namespace snl {
namespace {

struct AtenRows {
  // (P, K) view of a (B, K, H, W) tensor, position-major.
  static at::Tensor rows_of(const at::Tensor& x, int64_t N) {
    return x.reshape({x.size(0), x.size(1), N}).transpose(1, 2).reshape({-1, x.size(1)});
  }

  void forward(at::Tensor& dist, const at::Tensor& e_sq, const at::Tensor& c_sq,
               const at::Tensor& log_tau, int64_t N, at::Tensor& assign,
               at::Tensor& compact) const {
    const at::Tensor d = e_sq.unsqueeze(1) - 2.0 * dist + c_sq.unsqueeze(0);
    const at::Tensor a = at::softmax(d.neg() / log_tau.exp(), 1);
    dist.copy_(d);
    compact.view({-1}).copy_((a * d).sum(1));
    const int64_t B = assign.size(0), K = assign.size(1);
    assign.view({B, K, N}).copy_(a.view({B, N, K}).transpose(1, 2));
  }

  void backward(at::Tensor& work, const at::Tensor& assign, const at::Tensor& dist,
                const at::Tensor& grad_assign, const at::Tensor& grad_compact,
                const at::Tensor& log_tau, int64_t N, at::Tensor& delta_sum,
                at::Tensor& log_tau_terms) const {
    const at::Tensor tau = log_tau.exp();
    const at::Tensor a = rows_of(assign, N);
    const at::Tensor d = dist - std::get<0>(dist.min(1, true));  // as the CUDA kernel
    const at::Tensor g_c = grad_compact.reshape({-1, 1});
    const at::Tensor g = rows_of(grad_assign, N) + g_c * d + work;
    const at::Tensor g_logit = a * (g - (a * g).sum(1, true));
    const at::Tensor delta = g_c * a - g_logit / tau;
    work.copy_(delta);
    delta_sum.copy_(delta.sum(1));
    log_tau_terms.copy_((g_logit * d).sum(1) / tau);
  }
};

void check_cpu(const at::Tensor& embedding) {
  TORCH_CHECK(embedding.is_cpu(), "embedding must be a CPU tensor here, got device ",
              embedding.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cram_fwd_cpu(
    const at::Tensor& embedding, const at::Tensor& centers, const at::Tensor& log_tau) {
  check_cpu(embedding);
  cram_host::check_inputs(embedding, centers, log_tau);
  return cram_host::forward(embedding, centers, log_tau, AtenRows{});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cram_bwd_cpu(
    const at::Tensor& embedding, const at::Tensor& centers, const at::Tensor& log_tau,
    const at::Tensor& assign, const at::Tensor& dist, const at::Tensor& grad_central,
    const at::Tensor& grad_assign, const at::Tensor& grad_compact) {
  check_cpu(embedding);
  cram_host::check_inputs(embedding, centers, log_tau);
  return cram_host::backward(embedding, centers, log_tau, assign, dist, grad_central, grad_assign,
                             grad_compact, AtenRows{});
}

}  // namespace
}  // namespace snl

TORCH_LIBRARY_IMPL(snl, CPU, m) {
  m.impl("cram_fwd", &snl::cram_fwd_cpu);
  m.impl("cram_bwd", &snl::cram_bwd_cpu);
}
