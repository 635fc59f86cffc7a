// snl::cosine_distances_fwd / _bwd. Math, saved tensors and access plan: snl_kernels/cosine_distances.py.

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
#include "cosine_distances_kernels.cuh"

namespace snl {
namespace {

// ---- Host side: checks, launches, registration ----

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cosine_distances_fwd_cuda(
    const at::Tensor& teacher, const at::Tensor& student) {
  check_features(teacher, student);
  const at::cuda::CUDAGuard device_guard(teacher.device());
  const int64_t B = teacher.size(0), C = teacher.size(1), H = teacher.size(2), W = teacher.size(3);
  const int64_t N = H * W;

  const auto f32 = teacher.options().dtype(at::kFloat);
  at::Tensor pixel = at::empty({B, H, W}, f32);
  at::Tensor channel = at::empty({B, C}, f32);
  at::Tensor sample = at::empty({B}, f32);
  at::Tensor pixel_stats = at::empty({B, 3, N}, f32);
  at::Tensor channel_stats = at::empty({B, 3, C}, f32);

  const int tile = fwd_tile_pixels(B, N);
  const int64_t n_tiles = ceil_div(N, int64_t{tile});
  at::Tensor channel_partials = at::empty({B, n_tiles, 3, C}, f32);

  const Strides4 st_t = strides_of(teacher), st_s = strides_of(student);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const dim3 pixel_grid(static_cast<unsigned>(n_tiles),
                        static_cast<unsigned>(std::min(B, kMaxGridYZ)));

  SNL_DISPATCH_FEATURE_TYPES(teacher.scalar_type(), "cosine_distances_fwd", [&] {
    const auto* t = teacher.const_data_ptr<scalar_t>();
    const auto* s = student.const_data_ptr<scalar_t>();
    float* pixel_stats_ptr = pixel_stats.mutable_data_ptr<float>();
    float* pixel_ptr = pixel.mutable_data_ptr<float>();
    float* partials_ptr = channel_partials.mutable_data_ptr<float>();
    // Template arguments: pixels per warp row, pixels per lane.
    if (tile == 4 * kWarpSize) {
      cosine_distances_fwd_pixel_kernel<scalar_t, kWarpSize, 4><<<pixel_grid, kThreads, 0, stream>>>(
          t, s, st_t, st_s, B, C, W, N, n_tiles, pixel_stats_ptr, pixel_ptr, partials_ptr);
    } else if (tile == 2 * kWarpSize) {
      cosine_distances_fwd_pixel_kernel<scalar_t, kWarpSize, 2><<<pixel_grid, kThreads, 0, stream>>>(
          t, s, st_t, st_s, B, C, W, N, n_tiles, pixel_stats_ptr, pixel_ptr, partials_ptr);
    } else if (tile == kWarpSize) {
      cosine_distances_fwd_pixel_kernel<scalar_t, kWarpSize, 1><<<pixel_grid, kThreads, 0, stream>>>(
          t, s, st_t, st_s, B, C, W, N, n_tiles, pixel_stats_ptr, pixel_ptr, partials_ptr);
    } else {
      cosine_distances_fwd_pixel_kernel<scalar_t, kWarpSize / 2, 1>
          <<<pixel_grid, kThreads, 0, stream>>>(t, s, st_t, st_s, B, C, W, N, n_tiles,
                                                pixel_stats_ptr, pixel_ptr, partials_ptr);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  const dim3 finish_grid(static_cast<unsigned>(ceil_div(C, kFinishChannels)),
                         static_cast<unsigned>(std::min(B, kMaxGridYZ)));
  cosine_distances_fwd_channel_kernel<<<finish_grid, kThreads, 0, stream>>>(
      channel_partials.const_data_ptr<float>(), pixel_stats.const_data_ptr<float>(), B, C, N,
      n_tiles, channel_stats.mutable_data_ptr<float>(), channel.mutable_data_ptr<float>(),
      sample.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  return {pixel, channel, sample, pixel_stats, channel_stats};
}

std::tuple<at::Tensor, at::Tensor> cosine_distances_bwd_cuda(
    const at::Tensor& teacher, const at::Tensor& student, const at::Tensor& pixel_stats,
    const at::Tensor& channel_stats, const at::Tensor& grad_pixel, const at::Tensor& grad_channel,
    const at::Tensor& grad_sample, bool teacher_requires_grad) {
  check_features(teacher, student);
  const at::cuda::CUDAGuard device_guard(teacher.device());
  const int64_t B = teacher.size(0), C = teacher.size(1), H = teacher.size(2), W = teacher.size(3);
  const int64_t N = H * W;
  const at::Tensor pixel_stats_c =
      checked_fp32(pixel_stats, "pixel_stats", {B, 3, N}, teacher, "teacher");
  const at::Tensor channel_stats_c =
      checked_fp32(channel_stats, "channel_stats", {B, 3, C}, teacher, "teacher");
  const at::Tensor grad_pixel_c =
      checked_fp32(grad_pixel, "grad_pixel", {B, H, W}, teacher, "teacher");
  const at::Tensor grad_channel_c =
      checked_fp32(grad_channel, "grad_channel", {B, C}, teacher, "teacher");
  const at::Tensor grad_sample_c =
      checked_fp32(grad_sample, "grad_sample", {B}, teacher, "teacher");

  // Same strides as the inputs (empty_like preserves a dense layout such as channels_last).
  at::Tensor grad_student = at::empty_like(student);
  at::Tensor grad_teacher =
      teacher_requires_grad ? at::empty_like(teacher) : at::empty({0}, teacher.options());
  at::Tensor channel_coef = at::empty({B, 3, C}, teacher.options().dtype(at::kFloat));

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const dim3 coef_grid(static_cast<unsigned>(ceil_div(C, kCoefChannels)),
                       static_cast<unsigned>(std::min(B, kMaxGridYZ)));
  cosine_distances_bwd_coef_kernel<<<coef_grid, kThreads, 0, stream>>>(
      channel_stats_c.const_data_ptr<float>(), pixel_stats_c.const_data_ptr<float>(),
      grad_channel_c.const_data_ptr<float>(), grad_sample_c.const_data_ptr<float>(), B, C, N,
      channel_coef.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const Strides4 st_t = strides_of(teacher), st_s = strides_of(student);
  const Strides4 st_gs = strides_of(grad_student);
  const Strides4 st_gt = teacher_requires_grad ? strides_of(grad_teacher) : Strides4{0, 0, 0, 0};
  const dim3 grid(static_cast<unsigned>(ceil_div(N, kThreads)),
                  static_cast<unsigned>(std::min(ceil_div(C, kBwdChannels), kMaxGridYZ)),
                  static_cast<unsigned>(std::min(B, kMaxGridYZ)));
  SNL_DISPATCH_FEATURE_TYPES(teacher.scalar_type(), "cosine_distances_bwd", [&] {
    cosine_distances_bwd_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        teacher.const_data_ptr<scalar_t>(), student.const_data_ptr<scalar_t>(), st_t, st_s,
        pixel_stats_c.const_data_ptr<float>(), grad_pixel_c.const_data_ptr<float>(),
        channel_coef.const_data_ptr<float>(), B, C, W, N,
        teacher_requires_grad ? grad_teacher.mutable_data_ptr<scalar_t>() : nullptr,
        grad_student.mutable_data_ptr<scalar_t>(), st_gt, st_gs);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  return {grad_teacher, grad_student};
}

}  // namespace
}  // namespace snl

TORCH_LIBRARY_IMPL(snl, CUDA, m) {
  m.impl("cosine_distances_fwd", &snl::cosine_distances_fwd_cuda);
  m.impl("cosine_distances_bwd", &snl::cosine_distances_bwd_cuda);
}
