// snl::cram_fwd / _bwd. Math, saved tensors and access plan: snl_kernels/cram.py.
//
// Two kinds of kernels. K-side (distances, softmax, softmax backward): a block owns kTile
// positions and all K centres, streams D through shared memory and keeps the (kTile, K) tile on
// chip. D-side (central, embedding gradient, centre partials): a block owns kWideTile positions
// (the embedding gradient: several such tiles in turn) and kWideThreads channels, one channel per
// thread with its positions in registers, and walks K. The embedding is read once per direction
// (forward: K-side; backward: D-side). Every sum runs in a fixed order and there are no atomics:
// the same bits on every run.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "checks.h"
#include "host.h"
#include "cram_kernels.cuh"

namespace snl {
namespace {

// ---- Host side: checks, launches, registration ----

void check_inputs(const at::Tensor& embedding, const at::Tensor& centers,
                  const at::Tensor& log_tau) {
  CHECK_CUDA(embedding);
  CHECK_DIM(embedding, 4);
  CHECK_FLOAT_DTYPE(embedding);
  CHECK_NONEMPTY(embedding);
  CHECK_CUDA(centers);
  CHECK_SAME_DEVICE(centers, embedding);
  CHECK_DIM(centers, 2);
  CHECK_FLOAT_DTYPE(centers);
  const int64_t K = centers.size(0), D = embedding.size(1);
  TORCH_CHECK(K >= 1 && K <= kMaxK, "centers must hold 1 to ", int_text(kMaxK),
              " centres for the CUDA kernels, got K=", int_text(K));
  TORCH_CHECK(centers.size(1) == D, "centers must have width D=", int_text(D),
              " (the channels of embedding), got shape ", shape_text(centers.sizes()));
  TORCH_CHECK(ceil_div(D, kWideThreads) <= kMaxGridY, "embedding has D=", int_text(D),
              " channels, more than the CUDA kernels take (", int_text(kMaxGridY * kWideThreads),
              ")");
  CHECK_CUDA(log_tau);
  CHECK_SAME_DEVICE(log_tau, embedding);
  TORCH_CHECK(log_tau.numel() == 1, "log_tau must hold one element, got shape ",
              shape_text(log_tau.sizes()));
  TORCH_CHECK(log_tau.is_floating_point(), "log_tau must be a floating tensor, got ",
              log_tau.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cram_fwd_cuda(
    const at::Tensor& embedding, const at::Tensor& centers, const at::Tensor& log_tau) {
  check_inputs(embedding, centers, log_tau);
  const at::cuda::CUDAGuard device_guard(embedding.device());
  const int64_t B = embedding.size(0), D = embedding.size(1), H = embedding.size(2),
                W = embedding.size(3);
  const int64_t N = H * W, P = B * N, K = centers.size(0);
  // Centres are small (K x D): one fp32 contiguous copy serves every block.
  const at::Tensor centers_f32 = centers.to(at::kFloat).contiguous();
  const at::Tensor log_tau_f32 = log_tau.to(at::kFloat).reshape({1}).contiguous();

  const auto f32 = embedding.options().dtype(at::kFloat);
  at::Tensor central = at::empty({B, D, H, W}, f32);
  at::Tensor assign = at::empty({B, K, H, W}, f32);
  at::Tensor compact = at::empty({B, H, W}, f32);
  at::Tensor dist = at::empty({P, K}, f32);

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const Strides4 st_e = strides_of(embedding);
  const int group_k = centre_group_size(K);
  SNL_DISPATCH_FEATURE_TYPES(embedding.scalar_type(), "cram_fwd", [&] {
    cram_fwd_assign_kernel<scalar_t>
        <<<static_cast<unsigned>(ceil_div(P, kTile)), kThreads, 0, stream>>>(
            embedding.const_data_ptr<scalar_t>(), st_e, centers_f32.const_data_ptr<float>(),
            log_tau_f32.const_data_ptr<float>(), P, N, W, D, static_cast<int>(K), group_k,
            assign.mutable_data_ptr<float>(), compact.mutable_data_ptr<float>(),
            dist.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  const dim3 wide_grid(static_cast<unsigned>(ceil_div(P, kWideTile)),
                       static_cast<unsigned>(ceil_div(D, kWideThreads)));
  cram_fwd_central_kernel<<<wide_grid, kWideThreads, 0, stream>>>(
      assign.const_data_ptr<float>(), centers_f32.const_data_ptr<float>(), P, N, D,
      static_cast<int>(K), central.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  return {central, assign, compact, dist};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cram_bwd_cuda(
    const at::Tensor& embedding, const at::Tensor& centers, const at::Tensor& log_tau,
    const at::Tensor& assign, const at::Tensor& dist, const at::Tensor& grad_central,
    const at::Tensor& grad_assign, const at::Tensor& grad_compact) {
  check_inputs(embedding, centers, log_tau);
  const at::cuda::CUDAGuard device_guard(embedding.device());
  const int64_t B = embedding.size(0), D = embedding.size(1), H = embedding.size(2),
                W = embedding.size(3);
  const int64_t N = H * W, P = B * N, K = centers.size(0);
  const at::Tensor assign_c = checked_fp32(assign, "assign", {B, K, H, W}, embedding, "embedding");
  const at::Tensor dist_c = checked_fp32(dist, "dist", {P, K}, embedding, "embedding");
  // grad_central is read through its strides (expanded or channels_last as it comes).
  CHECK_SAME_DEVICE(grad_central, embedding);
  CHECK_DTYPE(grad_central, at::kFloat);
  CHECK_SHAPE(grad_central, embedding.sizes());
  const at::Tensor grad_assign_c =
      checked_fp32(grad_assign, "grad_assign", {B, K, H, W}, embedding, "embedding");
  const at::Tensor grad_compact_c =
      checked_fp32(grad_compact, "grad_compact", {B, H, W}, embedding, "embedding");
  const at::Tensor centers_f32 = centers.to(at::kFloat).contiguous();
  const at::Tensor log_tau_f32 = log_tau.to(at::kFloat).reshape({1}).contiguous();

  const auto f32 = embedding.options().dtype(at::kFloat);
  at::Tensor delta = at::empty({B, K, N}, f32);
  at::Tensor delta_sum = at::empty({P}, f32);
  at::Tensor log_tau_terms = at::empty({P}, f32);
  const int64_t slices = center_slices(P, K, D);
  at::Tensor center_partials = at::empty({slices, K, D}, f32);
  at::Tensor grad_log_tau_f32 = at::empty({1}, f32);
  // Same strides as the inputs (empty_like preserves a dense layout such as channels_last).
  at::Tensor grad_embedding = at::empty_like(embedding);
  at::Tensor grad_centers = at::empty_like(centers);

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const Strides4 st_e = strides_of(embedding), st_g = strides_of(grad_central),
                 st_ge = strides_of(grad_embedding);
  cram_bwd_delta_kernel<<<static_cast<unsigned>(ceil_div(P, kTile)), kThreads, 0, stream>>>(
      grad_central.const_data_ptr<float>(), st_g, centers_f32.const_data_ptr<float>(),
      log_tau_f32.const_data_ptr<float>(), assign_c.const_data_ptr<float>(),
      dist_c.const_data_ptr<float>(), grad_assign_c.const_data_ptr<float>(),
      grad_compact_c.const_data_ptr<float>(), P, N, W, D, static_cast<int>(K),
      centre_group_size(K), delta.mutable_data_ptr<float>(), delta_sum.mutable_data_ptr<float>(),
      log_tau_terms.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const dim3 wide_grid(static_cast<unsigned>(slices),
                       static_cast<unsigned>(ceil_div(D, kWideThreads)));
  SNL_DISPATCH_FEATURE_TYPES(embedding.scalar_type(), "cram_bwd", [&] {
    cram_bwd_embedding_kernel<scalar_t><<<wide_grid, kWideThreads, 0, stream>>>(
        embedding.const_data_ptr<scalar_t>(), st_e, grad_central.const_data_ptr<float>(), st_g,
        centers_f32.const_data_ptr<float>(), assign_c.const_data_ptr<float>(),
        delta.const_data_ptr<float>(), delta_sum.const_data_ptr<float>(), P, N, W, D,
        static_cast<int>(K), grad_embedding.mutable_data_ptr<scalar_t>(), st_ge,
        center_partials.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  SNL_DISPATCH_FEATURE_TYPES(centers.scalar_type(), "cram_bwd_centers", [&] {
    cram_bwd_centers_kernel<scalar_t>
        <<<static_cast<unsigned>(ceil_div(K * D, kThreads)), kThreads, 0, stream>>>(
            center_partials.const_data_ptr<float>(), slices, K, D,
            grad_centers.mutable_data_ptr<scalar_t>(), grad_centers.stride(0),
            grad_centers.stride(1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  cram_bwd_log_tau_kernel<<<1, kThreads, 0, stream>>>(
      log_tau_terms.const_data_ptr<float>(), P, grad_log_tau_f32.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor grad_log_tau =
      grad_log_tau_f32.reshape(log_tau.sizes()).to(log_tau.scalar_type());

  return {grad_embedding, grad_centers, grad_log_tau};
}

}  // namespace
}  // namespace snl

TORCH_LIBRARY_IMPL(snl, CUDA, m) {
  m.impl("cram_fwd", &snl::cram_fwd_cuda);
  m.impl("cram_bwd", &snl::cram_bwd_cuda);
}
