// snl::cram_fwd / _bwd for CUDA tensors. Math, saved tensors: snl_kernels/cram.py. The
// composition (cuBLAS products through at::bmm, chunks, dtypes) is csrc/cram_host.h; here are its
// CUDA row kernels' launches (csrc/cram_kernels.cuh) and the registration.

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "checks.h"
#include "cram_host.h"
#include "cram_kernels.cuh"

namespace snl {
namespace {

// The softmax steps between the products: one warp per position, kRowWarps per block.
struct CudaRows {
  static unsigned blocks(int64_t P) { return static_cast<unsigned>(ceil_div(P, kRowWarps)); }

  void forward(at::Tensor& dist, const at::Tensor& e_sq, const at::Tensor& c_sq,
               const at::Tensor& log_tau, int64_t N, at::Tensor& assign,
               at::Tensor& compact) const {
    const int64_t P = dist.size(0);
    cram_fwd_rows_kernel<<<blocks(P), kRowThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        dist.mutable_data_ptr<float>(), e_sq.const_data_ptr<float>(), c_sq.const_data_ptr<float>(),
        log_tau.const_data_ptr<float>(), P, N, static_cast<int>(dist.size(1)),
        assign.mutable_data_ptr<float>(), compact.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  void backward(at::Tensor& work, const at::Tensor& assign, const at::Tensor& dist,
                const at::Tensor& grad_assign, const at::Tensor& grad_compact,
                const at::Tensor& log_tau, int64_t N, at::Tensor& delta_sum,
                at::Tensor& log_tau_terms) const {
    const int64_t P = work.size(0);
    cram_bwd_rows_kernel<<<blocks(P), kRowThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        work.mutable_data_ptr<float>(), assign.const_data_ptr<float>(),
        dist.const_data_ptr<float>(), grad_assign.const_data_ptr<float>(),
        grad_compact.const_data_ptr<float>(), log_tau.const_data_ptr<float>(), P, N,
        static_cast<int>(work.size(1)), delta_sum.mutable_data_ptr<float>(),
        log_tau_terms.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cram_fwd_cuda(
    const at::Tensor& embedding, const at::Tensor& centers, const at::Tensor& log_tau) {
  CHECK_CUDA(embedding);
  cram_host::check_inputs(embedding, centers, log_tau);
  const at::cuda::CUDAGuard device_guard(embedding.device());
  return cram_host::forward(embedding, centers, log_tau, CudaRows{});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cram_bwd_cuda(
    const at::Tensor& embedding, const at::Tensor& centers, const at::Tensor& log_tau,
    const at::Tensor& assign, const at::Tensor& dist, const at::Tensor& grad_central,
    const at::Tensor& grad_assign, const at::Tensor& grad_compact) {
  CHECK_CUDA(embedding);
  cram_host::check_inputs(embedding, centers, log_tau);
  const at::cuda::CUDAGuard device_guard(embedding.device());
  return cram_host::backward(embedding, centers, log_tau, assign, dist, grad_central, grad_assign,
                             grad_compact, CudaRows{});
}

}  // namespace
}  // namespace snl

TORCH_LIBRARY_IMPL(snl, CUDA, m) {
  m.impl("cram_fwd", &snl::cram_fwd_cuda);
  m.impl("cram_bwd", &snl::cram_bwd_cuda);
}
