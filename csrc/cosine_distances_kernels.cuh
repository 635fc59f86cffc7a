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

// Pixels per lane in the forward kernel: as many as keep >= 256 blocks in flight. A function of
// the shape only, so the order of the channel sums (and their bits) is the same on every GPU.
inline int fwd_pixels_per_lane(int64_t B, int64_t N) {
  for (int p : {4, 2}) {
    if (ceil_div(N, int64_t{kWarpSize} * p) * B >= 256) return p;
  }
  return 1;
}

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

// Sums each row of stats (3, C) over C in a fixed order (strided per thread, then a tree), so
// forward and backward derive bit-identical sample sums from channel_stats. Call with all
// kThreads threads of the block.
__device__ void block_sum3(const float* __restrict__ stats, int64_t C, float out[3]) {
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

// Block = P * 32 pixels of one sample, all channels. Warp w takes channels w, w + 8, ...; lane l
// pixels l, l + 32, ...: for NCHW each load instruction reads consecutive pixels. Pixel sums stay
// in registers (then one pass over the 8 warps); channel sums over the block's pixels go to
// channel_partials (B, n_tiles, 3, C), reduced over tiles by the next kernel: no atomics.
template <typename scalar_t, int P>
__global__ void __launch_bounds__(kThreads) cosine_distances_fwd_pixel_kernel(
    const scalar_t* __restrict__ teacher, const scalar_t* __restrict__ student, Strides4 st_t,
    Strides4 st_s, int64_t B, int64_t C, int64_t W, int64_t N, int64_t n_tiles,
    float* __restrict__ pixel_stats, float* __restrict__ pixel,
    float* __restrict__ channel_partials) {
  constexpr int kTile = kWarpSize * P;
  __shared__ float warp_pixel_sums[kWarps][3][kTile];
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t tile = blockIdx.x;
  const int64_t n0 = tile * kTile;

  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    int64_t off_t[P], off_s[P];
    bool valid[P];
    float dot[P], tt[P], ss[P];
#pragma unroll
    for (int j = 0; j < P; ++j) {
      const int64_t n = n0 + lane + j * kWarpSize;
      valid[j] = n < N;
      off_t[j] = valid[j] ? pixel_offset(st_t, b, n, W) : 0;
      off_s[j] = valid[j] ? pixel_offset(st_s, b, n, W) : 0;
      dot[j] = tt[j] = ss[j] = 0.0f;
    }
    float* partials = channel_partials + (b * n_tiles + tile) * 3 * C;

    for (int64_t c = warp; c < C; c += kWarps) {
      float c_dot = 0.0f, c_tt = 0.0f, c_ss = 0.0f;
#pragma unroll
      for (int j = 0; j < P; ++j) {
        if (valid[j]) {
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
      c_dot = warp_sum(c_dot);
      c_tt = warp_sum(c_tt);
      c_ss = warp_sum(c_ss);
      if (lane == 0) {
        partials[c] = c_dot;
        partials[C + c] = c_tt;
        partials[2 * C + c] = c_ss;
      }
    }

#pragma unroll
    for (int j = 0; j < P; ++j) {
      warp_pixel_sums[warp][0][lane + j * kWarpSize] = dot[j];
      warp_pixel_sums[warp][1][lane + j * kWarpSize] = tt[j];
      warp_pixel_sums[warp][2][lane + j * kWarpSize] = ss[j];
    }
    __syncthreads();
    for (int i = threadIdx.x; i < kTile; i += kThreads) {
      const int64_t n = n0 + i;
      if (n < N) {
        float p_dot = 0.0f, p_tt = 0.0f, p_ss = 0.0f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) {
          p_dot += warp_pixel_sums[w][0][i];
          p_tt += warp_pixel_sums[w][1][i];
          p_ss += warp_pixel_sums[w][2][i];
        }
        pixel_stats[(b * 3 + 0) * N + n] = p_dot;
        pixel_stats[(b * 3 + 1) * N + n] = p_tt;
        pixel_stats[(b * 3 + 2) * N + n] = p_ss;
        pixel[b * N + n] = cosine_distance(p_dot, p_tt, p_ss);
      }
    }
    __syncthreads();  // warp_pixel_sums is rewritten for the next sample
  }
}

// Block = one sample: channel sums = tile partials summed in tile order; sample sums = channel
// sums summed by block_sum3.
__global__ void __launch_bounds__(kThreads) cosine_distances_fwd_channel_kernel(
    const float* __restrict__ channel_partials, int64_t B, int64_t C, int64_t n_tiles,
    float* __restrict__ channel_stats, float* __restrict__ channel, float* __restrict__ sample) {
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    const float* partials = channel_partials + b * n_tiles * 3 * C;
    float* stats = channel_stats + b * 3 * C;
    for (int64_t c = threadIdx.x; c < C; c += kThreads) {
      float c_dot = 0.0f, c_tt = 0.0f, c_ss = 0.0f;
      for (int64_t tile = 0; tile < n_tiles; ++tile) {
        const float* p = partials + tile * 3 * C;
        c_dot += p[c];
        c_tt += p[C + c];
        c_ss += p[2 * C + c];
      }
      stats[c] = c_dot;
      stats[C + c] = c_tt;
      stats[2 * C + c] = c_ss;
      channel[b * C + c] = cosine_distance(c_dot, c_tt, c_ss);
    }
    // block_sum3 reads back only what this same thread wrote above: no barrier needed.
    float sums[3];
    block_sum3(stats, C, sums);
    if (threadIdx.x == 0) sample[b] = cosine_distance(sums[0], sums[1], sums[2]);
  }
}

// Block = one sample: per-channel gradient coefficients with the sample's folded in,
// channel_coef (B, 3, C) = [cross, self_t, self_s].
__global__ void __launch_bounds__(kThreads) cosine_distances_bwd_coef_kernel(
    const float* __restrict__ channel_stats, const float* __restrict__ grad_channel,
    const float* __restrict__ grad_sample, int64_t B, int64_t C,
    float* __restrict__ channel_coef) {
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    const float* stats = channel_stats + b * 3 * C;
    float sums[3];
    block_sum3(stats, C, sums);
    const CosineGradCoef ks = cosine_distance_grad_coef(sums[0], sums[1], sums[2], grad_sample[b]);
    float* coef = channel_coef + b * 3 * C;
    for (int64_t c = threadIdx.x; c < C; c += kThreads) {
      const CosineGradCoef kc =
          cosine_distance_grad_coef(stats[c], stats[C + c], stats[2 * C + c], grad_channel[b * C + c]);
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
