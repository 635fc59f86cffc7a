// Device code of csrc/anomaly_map.cu: the anomaly-map kernels and their helpers. No ATen or torch
// header here, so tests/cuda_emulation can compile this file for the CPU; the host launchers and
// the op registration are in csrc/anomaly_map.cu.
#pragma once

#include <cstdint>

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

// Pixels per distance block: 32 (one per lane) while that gives at least 132 blocks (the
// H200's SMs), else 16, each warp then taking 16 pixels x 2 channels per step (the deepest
// WRN50 level, 16 x 16 pixels at B = 16: 256 blocks rather than 128). Shape only, as above.
inline int distance_pixels(int64_t B, int64_t N) {
  return ceil_div(N, kWarpSize) * B >= 132 ? kWarpSize : kWarpSize / 2;
}

// max that propagates NaN, as torch.amax does (fmaxf would drop it).
__device__ __forceinline__ float max_nan(float a, float b) { return (a > b || a != a) ? a : b; }

// Block = kPix pixels of one sample, all channels. kPix = 32: lane l takes pixel l (consecutive
// addresses in NCHW), warp w channels w, w + kDistWarps, ...; kPix = 16: lane l takes pixel
// l % 16 and warp w channels 2 w + l / 16, + 2 kDistWarps, ... Per-group sums are added in
// group order: the result does not depend on the strides or the GPU.
template <typename scalar_t, int kDistWarps, int kPix>
__global__ void __launch_bounds__(kDistWarps * kWarpSize) anomaly_map_distance_kernel(
    const scalar_t* __restrict__ teacher, const scalar_t* __restrict__ student, Strides4 st_t,
    Strides4 st_s, int64_t B, int64_t C, int64_t W, int64_t N, float* __restrict__ out,
    int64_t out_stride_b, int64_t out_stride_h) {
  constexpr int kSub = kWarpSize / kPix;  // channel groups per warp
  constexpr int kGroups = kDistWarps * kSub;
  static_assert(kSub * kPix == kWarpSize, "pixels per block must divide a warp");
  __shared__ float partial[3][kGroups][kPix];
  const int lane = threadIdx.x % kWarpSize;
  const int px = lane % kPix;
  const int group = (threadIdx.x / kWarpSize) * kSub + lane / kPix;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kPix + px;
  const bool valid = n < N;
  const int64_t h = valid ? n / W : 0;
  const int64_t w = valid ? n % W : 0;

  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    float dot = 0.0f, tt = 0.0f, ss = 0.0f;
    if (valid) {
      const scalar_t* t_px = teacher + b * st_t.b + h * st_t.h + w * st_t.w;
      const scalar_t* s_px = student + b * st_s.b + h * st_s.h + w * st_s.w;
#pragma unroll 4
      for (int64_t c = group; c < C; c += kGroups) {
        // fp32 accumulation whatever the input dtype.
        const float t = static_cast<float>(t_px[c * st_t.c]);
        const float s = static_cast<float>(s_px[c * st_s.c]);
        dot = fmaf(t, s, dot);
        tt = fmaf(t, t, tt);
        ss = fmaf(s, s, ss);
      }
    }
    partial[0][group][px] = dot;
    partial[1][group][px] = tt;
    partial[2][group][px] = ss;
    __syncthreads();
    if (threadIdx.x < kPix && valid) {
      float p_dot = 0.0f, p_tt = 0.0f, p_ss = 0.0f;
#pragma unroll
      for (int g = 0; g < kGroups; ++g) {
        p_dot += partial[0][g][px];
        p_tt += partial[1][g][px];
        p_ss += partial[2][g][px];
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

}  // namespace
}  // namespace snl
