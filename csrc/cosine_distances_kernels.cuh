// Device code of csrc/cosine_distances.cu: the cosine-distance kernels and their helpers. No ATen
// or torch header here, so tests/cuda_emulation can compile this file for the CPU; the host
// launchers and the op registration are in csrc/cosine_distances.cu.
#pragma once

#include <algorithm>
#include <cstdint>

#include "common.cuh"

namespace snl {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * kWarpSize;
// Channels per backward block: enough work per thread to amortise its pixel coefficients,
// and enough blocks for the deep levels (C = 1024, N = 256).
constexpr int kBwdChannels = 32;
// Grid y and z are limited to 65535; kernels loop over what does not fit.
constexpr int64_t kMaxGridYZ = 65535;

// Blocks a launch should have: the H200's 132 SMs.
constexpr int64_t kMinBlocks = 132;

// Pixels per forward block (its tile): 128 or 64 (4 or 2 pixels per lane) while that keeps
// >= 256 blocks in flight, else 32 (one per lane) while that keeps >= kMinBlocks, else 16 (each
// warp takes 16 pixels x 2 channels per step: the deepest WRN50 level at B = 16, 16 x 16
// pixels, runs 256 blocks rather than 128). A function of the shape only, so the order of the
// channel sums (and their bits) is the same on every GPU.
inline int fwd_tile_pixels(int64_t B, int64_t N) {
  for (int tile : {4 * kWarpSize, 2 * kWarpSize}) {
    if (ceil_div(N, int64_t{tile}) * B >= 256) return tile;
  }
  return ceil_div(N, int64_t{kWarpSize}) * B >= kMinBlocks ? kWarpSize : kWarpSize / 2;
}

// Channels per block of the forward's finish (the tile partials of 32 channels, added by 8
// groups of threads) and of the backward's coefficients: >= kMinBlocks blocks at the deepest
// WRN50 level (C = 1024, B = 16: 512 and 256).
constexpr int kFinishChannels = 32;
constexpr int kFinishGroups = kThreads / kFinishChannels;
constexpr int kCoefChannels = 64;

// Gradient of g * (1 - cos) for one cosine: d/dt = cross * s + self_t * t,
// d/ds = cross * t + self_s * s.
struct CosineGradCoef {
  float cross, self_t, self_s;
};

__device__ __forceinline__ CosineGradCoef cosine_distance_grad_coef(float dot, float tt, float ss,
                                                                    float g) {
  const float norm_t = sqrtf(tt);
  const float norm_s = sqrtf(ss);
  const float nt = fmaxf(norm_t, kEps);
  const float ns = fmaxf(norm_s, kEps);
  const float cos = dot / (nt * ns);
  CosineGradCoef k;
  k.cross = -g / (nt * ns);
  // A clamped norm is constant in its input: its term has zero slope.
  k.self_t = norm_t > kEps ? g * cos / (nt * nt) : 0.0f;
  k.self_s = norm_s > kEps ? g * cos / (ns * ns) : 0.0f;
  return k;
}

// Sums each row of stats (3, C) over C in a fixed order (strided per thread, then a tree): with
// the pixel statistics (3, N) of a sample, its sample sums, derived bit-identically by the
// forward's finish and the backward's coefficients. Call with all kThreads threads of the block.
__device__ __forceinline__ void block_sum3(const float* __restrict__ stats, int64_t C,
                                           float out[3]) {
  __shared__ float partial[3][kThreads];
  float acc[3] = {0.0f, 0.0f, 0.0f};
  for (int64_t c = threadIdx.x; c < C; c += kThreads) {
#pragma unroll
    for (int k = 0; k < 3; ++k) acc[k] += stats[k * C + c];
  }
#pragma unroll
  for (int k = 0; k < 3; ++k) partial[k][threadIdx.x] = acc[k];
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
#pragma unroll
      for (int k = 0; k < 3; ++k) partial[k][threadIdx.x] += partial[k][threadIdx.x + stride];
    }
    __syncthreads();
  }
#pragma unroll
  for (int k = 0; k < 3; ++k) out[k] = partial[k][0];
  __syncthreads();  // partial is reused by the next call
}

// Block = kPix * P pixels of one sample (its tile), all channels. kPix = 32: lane l takes pixels
// l, l + 32, ... and warp w channels w, w + 8, ...; kPix = 16 (P = 1): lane l takes pixel l % 16
// and warp w channels 2 w + l / 16, + 16, ... For NCHW each load instruction reads consecutive
// pixels. Pixel sums stay in registers (then one pass over the warps' channel groups in
// order); channel sums over the tile go to channel_partials (B, n_tiles, 3, C), reduced over
// tiles by the finish: no atomics.
template <typename scalar_t, int kPix, int P>
__global__ void __launch_bounds__(kThreads) cosine_distances_fwd_pixel_kernel(
    const scalar_t* __restrict__ teacher, const scalar_t* __restrict__ student, Strides4 st_t,
    Strides4 st_s, int64_t B, int64_t C, int64_t W, int64_t N, int64_t n_tiles,
    float* __restrict__ pixel_stats, float* __restrict__ pixel,
    float* __restrict__ channel_partials) {
  constexpr int kSub = kWarpSize / kPix;  // channel groups per warp
  constexpr int kGroups = kWarps * kSub;
  constexpr int kTile = kPix * P;
  static_assert(kSub * kPix == kWarpSize && (kSub == 1 || P == 1), "tile layout");
  __shared__ float group_pixel_sums[kGroups][3][kTile];
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int px = lane % kPix;
  const int group = warp * kSub + lane / kPix;
  const int64_t tile = blockIdx.x;
  const int64_t n0 = tile * kTile;

  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    int64_t off_t[P], off_s[P];
    bool valid[P];
    float dot[P], tt[P], ss[P];
#pragma unroll
    for (int j = 0; j < P; ++j) {
      const int64_t n = n0 + px + j * kPix;
      valid[j] = n < N;
      off_t[j] = valid[j] ? pixel_offset(st_t, b, n, W) : 0;
      off_s[j] = valid[j] ? pixel_offset(st_s, b, n, W) : 0;
      dot[j] = tt[j] = ss[j] = 0.0f;
    }
    float* partials = channel_partials + (b * n_tiles + tile) * 3 * C;

    // Every lane of a warp runs the same iterations (the shuffles need the whole warp).
    for (int64_t c0 = warp * kSub; c0 < C; c0 += kGroups) {
      const int64_t c = c0 + lane / kPix;
      const bool c_ok = c < C;
      float c_dot = 0.0f, c_tt = 0.0f, c_ss = 0.0f;
#pragma unroll
      for (int j = 0; j < P; ++j) {
        if (valid[j] && c_ok) {
          // fp32 accumulation whatever the input dtype.
          const float t = static_cast<float>(teacher[off_t[j] + c * st_t.c]);
          const float s = static_cast<float>(student[off_s[j] + c * st_s.c]);
          dot[j] += t * s;
          tt[j] += t * t;
          ss[j] += s * s;
          c_dot += t * s;
          c_tt += t * t;
          c_ss += s * s;
        }
      }
      // Sums over the kPix lanes of the channel (masks below kPix stay within them).
      for (int mask = kPix / 2; mask > 0; mask /= 2) {
        c_dot += __shfl_xor_sync(0xffffffffu, c_dot, mask);
        c_tt += __shfl_xor_sync(0xffffffffu, c_tt, mask);
        c_ss += __shfl_xor_sync(0xffffffffu, c_ss, mask);
      }
      if (px == 0 && c_ok) {
        partials[c] = c_dot;
        partials[C + c] = c_tt;
        partials[2 * C + c] = c_ss;
      }
    }

#pragma unroll
    for (int j = 0; j < P; ++j) {
      group_pixel_sums[group][0][px + j * kPix] = dot[j];
      group_pixel_sums[group][1][px + j * kPix] = tt[j];
      group_pixel_sums[group][2][px + j * kPix] = ss[j];
    }
    __syncthreads();
    for (int i = threadIdx.x; i < kTile; i += kThreads) {
      const int64_t n = n0 + i;
      if (n < N) {
        float p_dot = 0.0f, p_tt = 0.0f, p_ss = 0.0f;
#pragma unroll
        for (int g = 0; g < kGroups; ++g) {
          p_dot += group_pixel_sums[g][0][i];
          p_tt += group_pixel_sums[g][1][i];
          p_ss += group_pixel_sums[g][2][i];
        }
        pixel_stats[(b * 3 + 0) * N + n] = p_dot;
        pixel_stats[(b * 3 + 1) * N + n] = p_tt;
        pixel_stats[(b * 3 + 2) * N + n] = p_ss;
        pixel[b * N + n] = cosine_distance(p_dot, p_tt, p_ss);
      }
    }
    __syncthreads();  // group_pixel_sums is rewritten for the next sample
  }
}

// Block = kFinishChannels channels of one sample: channel sums = tile partials, each of
// kFinishGroups thread groups adding every kFinishGroups-th tile, then the groups in order.
// The first channel block of each sample also forms its sample sums from the pixel sums.
__global__ void __launch_bounds__(kThreads) cosine_distances_fwd_channel_kernel(
    const float* __restrict__ channel_partials, const float* __restrict__ pixel_stats, int64_t B,
    int64_t C, int64_t N, int64_t n_tiles, float* __restrict__ channel_stats,
    float* __restrict__ channel, float* __restrict__ sample) {
  __shared__ float group_sums[3][kFinishGroups][kFinishChannels];
  const int ci = threadIdx.x % kFinishChannels, g = threadIdx.x / kFinishChannels;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kFinishChannels + ci;
  const bool c_ok = c < C;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    float c_dot = 0.0f, c_tt = 0.0f, c_ss = 0.0f;
    if (c_ok) {
      for (int64_t tile = g; tile < n_tiles; tile += kFinishGroups) {
        const float* p = channel_partials + (b * n_tiles + tile) * 3 * C;
        c_dot += p[c];
        c_tt += p[C + c];
        c_ss += p[2 * C + c];
      }
    }
    group_sums[0][g][ci] = c_dot;
    group_sums[1][g][ci] = c_tt;
    group_sums[2][g][ci] = c_ss;
    __syncthreads();
    if (g == 0 && c_ok) {
      float sums[3] = {0.0f, 0.0f, 0.0f};
#pragma unroll
      for (int k = 0; k < 3; ++k) {
        for (int gg = 0; gg < kFinishGroups; ++gg) sums[k] += group_sums[k][gg][ci];
        channel_stats[(b * 3 + k) * C + c] = sums[k];
      }
      channel[b * C + c] = cosine_distance(sums[0], sums[1], sums[2]);
    }
    if (blockIdx.x == 0) {  // block-uniform: block_sum3's barriers see every thread
      float sums[3];
      block_sum3(pixel_stats + b * 3 * N, N, sums);
      if (threadIdx.x == 0) sample[b] = cosine_distance(sums[0], sums[1], sums[2]);
    }
    __syncthreads();  // group_sums is rewritten for the next sample
  }
}

// Block = kCoefChannels channels of one sample: per-channel gradient coefficients with the
// sample's folded in, channel_coef (B, 3, C) = [cross, self_t, self_s]. Each block forms the
// sample sums from the pixel sums (as the forward's finish did: the same bits).
__global__ void __launch_bounds__(kThreads) cosine_distances_bwd_coef_kernel(
    const float* __restrict__ channel_stats, const float* __restrict__ pixel_stats,
    const float* __restrict__ grad_channel, const float* __restrict__ grad_sample, int64_t B,
    int64_t C, int64_t N, float* __restrict__ channel_coef) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kCoefChannels + threadIdx.x;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    float sums[3];
    block_sum3(pixel_stats + b * 3 * N, N, sums);
    if (threadIdx.x < kCoefChannels && c < C) {
      const CosineGradCoef ks =
          cosine_distance_grad_coef(sums[0], sums[1], sums[2], grad_sample[b]);
      const float* stats = channel_stats + b * 3 * C;
      const CosineGradCoef kc = cosine_distance_grad_coef(stats[c], stats[C + c], stats[2 * C + c],
                                                          grad_channel[b * C + c]);
      float* coef = channel_coef + b * 3 * C;
      coef[c] = kc.cross + ks.cross;
      coef[C + c] = kc.self_t + ks.self_t;
      coef[2 * C + c] = kc.self_s + ks.self_s;
    }
  }
}

// Block = 256 pixels x kBwdChannels channels of one sample; a thread owns one pixel, computes its
// pixel coefficients once and walks the channels. grad_teacher == nullptr: student only.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) cosine_distances_bwd_kernel(
    const scalar_t* __restrict__ teacher, const scalar_t* __restrict__ student, Strides4 st_t,
    Strides4 st_s, const float* __restrict__ pixel_stats, const float* __restrict__ grad_pixel,
    const float* __restrict__ channel_coef, int64_t B, int64_t C, int64_t W, int64_t N,
    scalar_t* __restrict__ grad_teacher, scalar_t* __restrict__ grad_student, Strides4 st_gt,
    Strides4 st_gs) {
  __shared__ float coef[3][kBwdChannels];
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const bool valid = n < N;

  for (int64_t b = blockIdx.z; b < B; b += gridDim.z) {
    CosineGradCoef kp = {0.0f, 0.0f, 0.0f};
    int64_t off_t = 0, off_s = 0, off_gt = 0, off_gs = 0;
    if (valid) {
      const float* stats = pixel_stats + b * 3 * N;
      kp = cosine_distance_grad_coef(stats[n], stats[N + n], stats[2 * N + n], grad_pixel[b * N + n]);
      off_t = pixel_offset(st_t, b, n, W);
      off_s = pixel_offset(st_s, b, n, W);
      off_gt = pixel_offset(st_gt, b, n, W);
      off_gs = pixel_offset(st_gs, b, n, W);
    }
    for (int64_t c0 = static_cast<int64_t>(blockIdx.y) * kBwdChannels; c0 < C;
         c0 += static_cast<int64_t>(gridDim.y) * kBwdChannels) {
      const int count = static_cast<int>(std::min<int64_t>(kBwdChannels, C - c0));
      __syncthreads();  // the previous chunk's coef is no longer read
      for (int i = threadIdx.x; i < 3 * kBwdChannels; i += kThreads) {
        const int k = i / kBwdChannels, ci = i % kBwdChannels;
        if (ci < count) coef[k][ci] = channel_coef[(b * 3 + k) * C + c0 + ci];
      }
      __syncthreads();
      if (!valid) continue;
#pragma unroll 4
      for (int ci = 0; ci < count; ++ci) {
        const int64_t c = c0 + ci;
        const float t = static_cast<float>(teacher[off_t + c * st_t.c]);
        const float s = static_cast<float>(student[off_s + c * st_s.c]);
        const float cross = kp.cross + coef[0][ci];
        grad_student[off_gs + c * st_gs.c] =
            static_cast<scalar_t>(cross * t + (kp.self_s + coef[2][ci]) * s);
        if (grad_teacher != nullptr) {
          grad_teacher[off_gt + c * st_gt.c] =
              static_cast<scalar_t>(cross * s + (kp.self_t + coef[1][ci]) * t);
        }
      }
    }
  }
}

}  // namespace
}  // namespace snl
