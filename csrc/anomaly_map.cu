// snl::anomaly_map_distances / _combine. Math and memory plan: snl_kernels/anomaly_map.py.

#include <ATen/Dispatch_v2.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <tuple>

#include "checks.h"
#include "host.h"
#include "anomaly_map_kernels.cuh"

namespace snl {
namespace {

// ---- Host side: checks, launches, registration ----

void check_level(const at::Tensor& teacher, const at::Tensor& student, const at::Tensor& first,
                 int64_t k, int64_t hk, int64_t wk) {
  const std::string t_name = "teachers[" + std::to_string(k) + "]";
  const std::string s_name = "students[" + std::to_string(k) + "]";
  check_cuda(teacher, t_name.c_str());
  check_cuda(student, s_name.c_str());
  check_same_device(teacher, t_name.c_str(), first, "teachers[0]");
  check_same_device(student, s_name.c_str(), teacher, t_name.c_str());
  check_dim(teacher, t_name.c_str(), 4);
  check_shape(student, s_name.c_str(), teacher.sizes());
  check_float_dtype(teacher, t_name.c_str());
  check_same_dtype(student, s_name.c_str(), teacher, t_name.c_str());
  check_nonempty(teacher, t_name.c_str());
  TORCH_CHECK(teacher.size(0) == first.size(0), t_name, " must have the batch size of teachers[0], ",
              int_text(first.size(0)), ", got shape ", shape_text(teacher.sizes()));
  TORCH_CHECK(teacher.size(2) <= hk && teacher.size(3) <= wk,
              "hk and wk must be at least the height and width of every level, got hk=",
              int_text(hk), ", wk=", int_text(wk), " and ", t_name, " of shape ",
              shape_text(teacher.sizes()));
}

at::Tensor anomaly_map_distances_cuda(at::TensorList teachers, at::TensorList students,
                                      int64_t hk, int64_t wk) {
  TORCH_CHECK(!teachers.empty(), "teachers must hold at least one level, got an empty list");
  TORCH_CHECK(teachers.size() == students.size(),
              "teachers and students must have the same number of levels, got ",
              int_text(static_cast<int64_t>(teachers.size())), " and ",
              int_text(static_cast<int64_t>(students.size())));
  const at::Tensor& first = teachers[0];
  const int64_t L = static_cast<int64_t>(teachers.size());
  for (int64_t k = 0; k < L; ++k) check_level(teachers[k], students[k], first, k, hk, wk);
  const at::cuda::CUDAGuard device_guard(first.device());
  const int64_t B = first.size(0);

  // Zero padding: the operators' padded columns are zero too, but 0 * garbage could be NaN.
  at::Tensor m = at::zeros({B, L, hk, wk}, first.options().dtype(at::kFloat));
  float* m_ptr = m.mutable_data_ptr<float>();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  for (int64_t k = 0; k < L; ++k) {
    const at::Tensor& teacher = teachers[k];
    const at::Tensor& student = students[k];
    const int64_t C = teacher.size(1), W = teacher.size(3);
    const int64_t N = teacher.size(2) * W;
    const Strides4 st_t = strides_of(teacher), st_s = strides_of(student);
    const int pixels = distance_pixels(B, N);
    const dim3 grid(static_cast<unsigned>(ceil_div(N, pixels)),
                    static_cast<unsigned>(std::min(B, kMaxGridY)));
    float* out = m_ptr + k * hk * wk;
    const int warps = distance_warps(B, N);
    AT_DISPATCH_V2(
        teacher.scalar_type(), "anomaly_map_distances", AT_WRAP([&] {
          const scalar_t* t = teacher.const_data_ptr<scalar_t>();
          const scalar_t* s = student.const_data_ptr<scalar_t>();
          // Fewer than 132 32-pixel blocks implies fewer than 1024: 32 warps.
          if (pixels < kWarpSize) {
            anomaly_map_distance_kernel<scalar_t, 32, kWarpSize / 2>
                <<<grid, 32 * kWarpSize, 0, stream>>>(t, s, st_t, st_s, B, C, W, N, out,
                                                     L * hk * wk, wk);
          } else if (warps == 32) {
            anomaly_map_distance_kernel<scalar_t, 32, kWarpSize>
                <<<grid, 32 * kWarpSize, 0, stream>>>(t, s, st_t, st_s, B, C, W, N, out,
                                                     L * hk * wk, wk);
          } else {
            anomaly_map_distance_kernel<scalar_t, 8, kWarpSize>
                <<<grid, 8 * kWarpSize, 0, stream>>>(t, s, st_t, st_s, B, C, W, N, out,
                                                    L * hk * wk, wk);
          }
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }),
        at::kFloat, at::kHalf, at::kBFloat16);
  }
  return m;
}

std::tuple<at::Tensor, at::Tensor> anomaly_map_combine_cuda(const at::Tensor& m,
                                                            const at::Tensor& mh,
                                                            const at::Tensor& mw, int64_t height,
                                                            int64_t width) {
  CHECK_CUDA(m);
  CHECK_DIM(m, 4);
  CHECK_DTYPE(m, at::kFloat);
  CHECK_NONEMPTY(m);
  TORCH_CHECK(height > 0 && width > 0, "height and width must be positive, got ",
              int_text(height), " and ", int_text(width));
  const int64_t B = m.size(0), L = m.size(1), hk = m.size(2), wk = m.size(3);
  CHECK_SAME_DEVICE(mh, m);
  CHECK_SAME_DEVICE(mw, m);
  CHECK_DTYPE(mh, at::kFloat);
  CHECK_DTYPE(mw, at::kFloat);
  CHECK_SHAPE(mh, {L, height, hk});
  CHECK_SHAPE(mw, {L, width, wk});
  const at::cuda::CUDAGuard device_guard(m.device());
  const at::Tensor m_c = m.contiguous(), mh_c = mh.contiguous(), mw_c = mw.contiguous();

  const int64_t n_tiles_w = ceil_div(width, kTileW);
  const int64_t n_tiles = ceil_div(height, kTileH) * n_tiles_w;
  TORCH_CHECK(n_tiles <= INT32_MAX, "height x width is too large for one launch, got ",
              int_text(height), " x ", int_text(width));
  const auto f32 = m.options().dtype(at::kFloat);
  at::Tensor maps = at::empty({B, 1, height, width}, f32);
  at::Tensor scores = at::empty({B}, f32);
  at::Tensor tile_max = at::empty({B, n_tiles}, f32);

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(n_tiles), static_cast<unsigned>(std::min(B, kMaxGridY)));
  anomaly_map_combine_kernel<<<grid, kThreads, 0, stream>>>(
      m_c.const_data_ptr<float>(), mh_c.const_data_ptr<float>(), mw_c.const_data_ptr<float>(), B,
      L, hk, wk, height, width, n_tiles_w, n_tiles, maps.mutable_data_ptr<float>(),
      tile_max.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  anomaly_map_score_kernel<<<static_cast<unsigned>(ceil_div(B, kThreads)), kThreads, 0,
                             stream>>>(tile_max.const_data_ptr<float>(), B, n_tiles,
                                       scores.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {maps, scores};
}

}  // namespace
}  // namespace snl

TORCH_LIBRARY_IMPL(snl, CUDA, m) {
  m.impl("anomaly_map_distances", &snl::anomaly_map_distances_cuda);
  m.impl("anomaly_map_combine", &snl::anomaly_map_combine_cuda);
}
