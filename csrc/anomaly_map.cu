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
#include "common.cuh"

namespace snl {
namespace {

constexpr int kWarps = 8;  // combine and score blocks
constexpr int kThreads = kWarps * kWarpSize;
// Grid y is limited to 65535; kernels loop over the samples that do not fit.
constexpr int64_t kMaxGridY = 65535;

// Combine: a block owns kTileH x kTileW outputs of one map. Wide tiles because the first
// product (mh rows @ m) is shared by a row of the tile: its cost falls as 1 / kTileW. The inner
// dimensions are walked in chunks (kChunkH rows of m, kChunkW columns), so shared memory is
// fixed (31 KB) whatever the level size.
constexpr int kTileH = 16;
constexpr int kTileW = 128;
constexpr int kChunkH = 64;
constexpr int kChunkW = kWarpSize;             // stage 1: one column of t per lane
constexpr int kRowsPerThread = kTileH / kWarps;     // warp w owns tile rows 2w, 2w + 1
constexpr int kColsPerThread = kTileW / kWarpSize;  // lane l owns columns l, l + 32, ...
static_assert(kTileH % kWarps == 0 && kTileW % kWarpSize == 0, "tile must split over the warps");

// Warps per distance block: 32 when a level has few 32-pixel blocks (deep levels, small batch),
// so that enough loads are in flight; else 8. A function of the shape only, so the order of the
// channel sums (and the bits) is the same on every GPU.
inline int distance_warps(int64_t B, int64_t N) {
  return ceil_div(N, kWarpSize) * B >= 1024 ? 8 : 32;
}

// max that propagates NaN, as torch.amax does (fmaxf would drop it).
__device__ __forceinline__ float max_nan(float a, float b) { return (a > b || a != a) ? a : b; }

// Block = 32 pixels of one sample, all channels: lane l takes pixel l (consecutive addresses
// in NCHW), warp w channels w, w + kDistWarps, ... Per-warp sums are added in warp order: the
// result does not depend on the strides or the GPU.
template <typename scalar_t, int kDistWarps>
__global__ void __launch_bounds__(kDistWarps * kWarpSize) anomaly_map_distance_kernel(
    const scalar_t* __restrict__ teacher, const scalar_t* __restrict__ student, Strides4 st_t,
    Strides4 st_s, int64_t B, int64_t C, int64_t W, int64_t N, float* __restrict__ out,
    int64_t out_stride_b, int64_t out_stride_h) {
  __shared__ float partial[3][kDistWarps][kWarpSize];
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarpSize + lane;
  const bool valid = n < N;
  const int64_t h = valid ? n / W : 0;
  const int64_t w = valid ? n % W : 0;

  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    float dot = 0.0f, tt = 0.0f, ss = 0.0f;
    if (valid) {
      const scalar_t* t_px = teacher + b * st_t.b + h * st_t.h + w * st_t.w;
      const scalar_t* s_px = student + b * st_s.b + h * st_s.h + w * st_s.w;
#pragma unroll 4
      for (int64_t c = warp; c < C; c += kDistWarps) {
        // fp32 accumulation whatever the input dtype.
        const float t = static_cast<float>(t_px[c * st_t.c]);
        const float s = static_cast<float>(s_px[c * st_s.c]);
        dot = fmaf(t, s, dot);
        tt = fmaf(t, t, tt);
        ss = fmaf(s, s, ss);
      }
    }
    partial[0][warp][lane] = dot;
    partial[1][warp][lane] = tt;
    partial[2][warp][lane] = ss;
    __syncthreads();
    if (warp == 0 && valid) {
      float p_dot = 0.0f, p_tt = 0.0f, p_ss = 0.0f;
#pragma unroll
      for (int k = 0; k < kDistWarps; ++k) {
        p_dot += partial[0][k][lane];
        p_tt += partial[1][k][lane];
        p_ss += partial[2][k][lane];
      }
      out[b * out_stride_b + h * out_stride_h + w] = cosine_distance(p_dot, p_tt, p_ss);
    }
    __syncthreads();  // partial is rewritten for the next sample
  }
}

// Block = one kTileH x kTileW tile of map b. For each level and each chunk of kChunkW columns of
// m: stage 1, t = mh[rows] @ m[:, chunk] (kTileH x kChunkW, thread = 2 rows x 1 column); stage
// 2, acc += t @ mw[cols, chunk]^T (thread = 2 rows x 4 columns). Padding of m, mh and mw and
// positions past the edges are loaded as zeros, so they add nothing. The sums run in a fixed
// order with fp32 FMA; the tile's max goes to tile_max (B, n_tiles). Four blocks per SM (64
// registers, a few bytes spilled): the 512 tiles of B = 16 maps of 256 x 256 fit in one wave.
__global__ void __launch_bounds__(kThreads, 4) anomaly_map_combine_kernel(
    const float* __restrict__ m, const float* __restrict__ mh, const float* __restrict__ mw,
    int64_t B, int64_t L, int64_t hk, int64_t wk, int64_t height, int64_t width,
    int64_t n_tiles_w, int64_t n_tiles, float* __restrict__ maps,
    float* __restrict__ tile_max) {
  __shared__ float mh_s[kTileH][kChunkH];
  __shared__ float m_s[kChunkH][kChunkW];
  __shared__ float t_s[kTileH][kChunkW];
  // +1: lanes read consecutive columns at one j, so the padding spreads them over the banks.
  __shared__ float mw_s[kTileW][kChunkW + 1];
  __shared__ float warp_max[kWarps];
  const int tid = threadIdx.x;
  const int warp = tid / kWarpSize;
  const int lane = tid % kWarpSize;
  const int64_t tile = blockIdx.x;
  const int64_t row0 = (tile / n_tiles_w) * kTileH;
  const int64_t col0 = (tile % n_tiles_w) * kTileW;
  const int r0 = warp * kRowsPerThread;  // this thread's first row within the tile

  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    float acc[kRowsPerThread][kColsPerThread];
#pragma unroll
    for (int r = 0; r < kRowsPerThread; ++r) {
#pragma unroll
      for (int q = 0; q < kColsPerThread; ++q) acc[r][q] = 0.0f;
    }

    for (int64_t k = 0; k < L; ++k) {
      const float* m_k = m + (b * L + k) * hk * wk;
      const float* mh_k = mh + k * height * hk;
      const float* mw_k = mw + k * width * wk;
      for (int64_t j0 = 0; j0 < wk; j0 += kChunkW) {
        float t[kRowsPerThread];
#pragma unroll
        for (int r = 0; r < kRowsPerThread; ++r) t[r] = 0.0f;
        for (int64_t i0 = 0; i0 < hk; i0 += kChunkH) {
          __syncthreads();  // mh_s and m_s are no longer read
          for (int e = tid; e < kTileH * kChunkH; e += kThreads) {
            const int r = e / kChunkH, i = e % kChunkH;
            const int64_t row = row0 + r, src = i0 + i;
            mh_s[r][i] = (row < height && src < hk) ? mh_k[row * hk + src] : 0.0f;
          }
          for (int e = tid; e < kChunkH * kChunkW; e += kThreads) {
            const int i = e / kChunkW, j = e % kChunkW;
            const int64_t src_i = i0 + i, src_j = j0 + j;
            m_s[i][j] = (src_i < hk && src_j < wk) ? m_k[src_i * wk + src_j] : 0.0f;
          }
          __syncthreads();
#pragma unroll 8
          for (int i = 0; i < kChunkH; ++i) {
            const float v = m_s[i][lane];
#pragma unroll
            for (int r = 0; r < kRowsPerThread; ++r) t[r] = fmaf(mh_s[r0 + r][i], v, t[r]);
          }
        }

        __syncthreads();  // t_s and mw_s of the previous chunk are no longer read
#pragma unroll
        for (int r = 0; r < kRowsPerThread; ++r) t_s[r0 + r][lane] = t[r];
        for (int e = tid; e < kTileW * kChunkW; e += kThreads) {
          const int c = e / kChunkW, j = e % kChunkW;
          const int64_t col = col0 + c, src = j0 + j;
          mw_s[c][j] = (col < width && src < wk) ? mw_k[col * wk + src] : 0.0f;
        }
        __syncthreads();
#pragma unroll 8
        for (int j = 0; j < kChunkW; ++j) {
          float tv[kRowsPerThread];
#pragma unroll
          for (int r = 0; r < kRowsPerThread; ++r) tv[r] = t_s[r0 + r][j];
#pragma unroll
          for (int q = 0; q < kColsPerThread; ++q) {
            const float wv = mw_s[lane + q * kWarpSize][j];
#pragma unroll
            for (int r = 0; r < kRowsPerThread; ++r) acc[r][q] = fmaf(tv[r], wv, acc[r][q]);
          }
        }
      }
    }

    float v = -INFINITY;
#pragma unroll
    for (int r = 0; r < kRowsPerThread; ++r) {
      const int64_t row = row0 + r0 + r;
#pragma unroll
      for (int q = 0; q < kColsPerThread; ++q) {
        const int64_t col = col0 + lane + q * kWarpSize;
        if (row < height && col < width) {
          maps[(b * height + row) * width + col] = acc[r][q];
          v = max_nan(v, acc[r][q]);
        }
      }
    }
    for (int mask = kWarpSize / 2; mask > 0; mask /= 2) {
      v = max_nan(v, __shfl_xor_sync(0xffffffffu, v, mask));
    }
    if (lane == 0) warp_max[warp] = v;
    __syncthreads();
    if (tid == 0) {
      float block_max = warp_max[0];
      for (int k = 1; k < kWarps; ++k) block_max = max_nan(block_max, warp_max[k]);
      tile_max[b * n_tiles + tile] = block_max;
    }
    __syncthreads();  // warp_max is rewritten for the next sample
  }
}

// Thread = one map: the max of its tiles' maxima (max is exact: any order gives the same bits).
__global__ void __launch_bounds__(kThreads) anomaly_map_score_kernel(
    const float* __restrict__ tile_max, int64_t B, int64_t n_tiles, float* __restrict__ scores) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (b >= B) return;
  float v = -INFINITY;
  for (int64_t i = 0; i < n_tiles; ++i) v = max_nan(v, tile_max[b * n_tiles + i]);
  scores[b] = v;
}

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
              first.size(0), ", got shape ", teacher.sizes());
  TORCH_CHECK(teacher.size(2) <= hk && teacher.size(3) <= wk,
              "hk and wk must be at least the height and width of every level, got hk=", hk,
              ", wk=", wk, " and ", t_name, " of shape ", teacher.sizes());
}

at::Tensor anomaly_map_distances_cuda(at::TensorList teachers, at::TensorList students,
                                      int64_t hk, int64_t wk) {
  TORCH_CHECK(!teachers.empty(), "teachers must hold at least one level, got an empty list");
  TORCH_CHECK(teachers.size() == students.size(),
              "teachers and students must have the same number of levels, got ", teachers.size(),
              " and ", students.size());
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
    const dim3 grid(static_cast<unsigned>(ceil_div(N, kWarpSize)),
                    static_cast<unsigned>(std::min(B, kMaxGridY)));
    float* out = m_ptr + k * hk * wk;
    const int warps = distance_warps(B, N);
    AT_DISPATCH_V2(
        teacher.scalar_type(), "anomaly_map_distances", AT_WRAP([&] {
          const scalar_t* t = teacher.const_data_ptr<scalar_t>();
          const scalar_t* s = student.const_data_ptr<scalar_t>();
          if (warps == 32) {
            anomaly_map_distance_kernel<scalar_t, 32><<<grid, 32 * kWarpSize, 0, stream>>>(
                t, s, st_t, st_s, B, C, W, N, out, L * hk * wk, wk);
          } else {
            anomaly_map_distance_kernel<scalar_t, 8><<<grid, 8 * kWarpSize, 0, stream>>>(
                t, s, st_t, st_s, B, C, W, N, out, L * hk * wk, wk);
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
  TORCH_CHECK(height > 0 && width > 0, "height and width must be positive, got ", height, " and ",
              width);
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
  TORCH_CHECK(n_tiles <= INT32_MAX, "height x width is too large for one launch, got ", height,
              " x ", width);
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
