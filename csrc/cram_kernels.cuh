// Device code of csrc/cram.cu: the CRAM kernels and their helpers. No ATen or torch header here,
// so tests/cuda_emulation can compile this file for the CPU; the host launchers and the op
// registration are in csrc/cram.cu.
#pragma once

#include <cstdint>

#include "common.cuh"

namespace snl {
namespace {

// K-side: one warp per position in the softmax.
constexpr int kTile = 8;
constexpr int kThreads = kTile * kWarpSize;
constexpr int kChunk = 32;  // channels per shared-memory chunk
constexpr int kMaxK = 256;
constexpr int kKPerLane = kMaxK / kWarpSize;
// Row stride of the transposed centre chunk: 1 mod 32, so both the transposing store (along
// channels) and the reads (along centres) are free of bank conflicts.
constexpr int kCenterStride = kMaxK + 1;
// D-side: 32 positions per block amortise each centre row read from L2 over 32 FMAs per thread.
constexpr int kWideTile = 32;
constexpr int kWideThreads = 128;
constexpr int kKChunk = 32;  // centres per shared-memory chunk
// Slices of the centre-gradient partials (slices, K, D) at most: block x of the embedding-gradient
// kernel sums tiles x, x + slices, ... into slice x (at K = 64, D = 2048: 128 MB).
constexpr int64_t kMaxCenterSlices = 256;
// And at most this many bytes of them: with the backward's other buffers (delta, P x K floats:
// 66 MB) the backward then stays under 256 MB of extra memory at K = 256, D = 2048 and 64,000
// positions (B = 1000 at 8 x 8), where 256 slices would take 537 MB.
constexpr int64_t kMaxCenterPartialBytes = int64_t{128} << 20;

// Slices of the centre-gradient partials for P positions, K centres and D channels (host).
inline int64_t center_slices(int64_t P, int64_t K, int64_t D) {
  const int64_t by_memory = kMaxCenterPartialBytes / (int64_t{4} * K * D);
  int64_t slices = ceil_div(P, kWideTile);
  if (slices > kMaxCenterSlices) slices = kMaxCenterSlices;
  if (slices > by_memory) slices = by_memory;
  return slices > 0 ? slices : 1;
}
constexpr int64_t kMaxGridY = 65535;

// Offset of position p = b * N + n (channel 0).
__device__ __forceinline__ int64_t position_offset(const Strides4& st, int64_t p, int64_t N,
                                                   int64_t W) {
  const int64_t b = p / N, n = p % N;
  return b * st.b + (n / W) * st.h + (n % W) * st.w;
}

// Offset of position p in a contiguous (B, K, N) tensor (assign, delta) at centre 0.
__device__ __forceinline__ int64_t centre_major_offset(int64_t p, int64_t N, int64_t K) {
  return (p / N) * K * N + p % N;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int mask = kWarpSize / 2; mask > 0; mask /= 2) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, mask));
  }
  return v;
}

// For the block's kTile positions p0.. and every centre k: sum over d of (x - c)^2 (kSquared)
// or x * c, in fp32. x (B, D, H, W, any strides) is read once, in kChunk-channel chunks staged
// in x_s beside the matching chunk of the fp32 centres in c_s. Threads form groups of group_k
// (>= K, a power of two); thread (g, k) sums channels g, g + groups, ... of each chunk, then the
// groups are added in group order. The result is left in c_s[kTile * kThreads + p * kMaxK + k].
// Call with all kThreads threads.
template <bool kSquared, typename scalar_t>
__device__ void centre_products(const scalar_t* __restrict__ x, const Strides4 st,
                                const float* __restrict__ centers, int64_t p0, int64_t P,
                                int64_t N, int64_t W, int64_t D, int K, int group_k, float* c_s,
                                float* x_s) {
  const int t = threadIdx.x;
  const int groups = kThreads / group_k;
  const int k = t % group_k, g = t / group_k;
  // The element this thread stages: position t % kTile, channel t / kTile of the chunk.
  const int64_t pos = p0 + t % kTile;
  const bool pos_ok = pos < P;
  const int64_t x_off = pos_ok ? position_offset(st, pos, N, W) : 0;

  float acc[kTile];
#pragma unroll
  for (int p = 0; p < kTile; ++p) acc[p] = 0.0f;

  for (int64_t d0 = 0; d0 < D; d0 += kChunk) {
    __syncthreads();  // the previous chunk is no longer read
    const int64_t d = d0 + t / kTile;
    // Zeros past D and past P add nothing to either sum.
    x_s[t] = (pos_ok && d < D) ? static_cast<float>(x[x_off + d * st.c]) : 0.0f;
    for (int i = t; i < K * kChunk; i += kThreads) {
      const int kk = i / kChunk, dd = i % kChunk;
      c_s[dd * kCenterStride + kk] = d0 + dd < D ? centers[kk * D + d0 + dd] : 0.0f;
    }
    __syncthreads();
    if (k < K) {
      // Per-chunk sums added to acc: two-level summation, smaller fp32 error over long D.
      float part[kTile];
#pragma unroll
      for (int p = 0; p < kTile; ++p) part[p] = 0.0f;
      for (int dd = g; dd < kChunk; dd += groups) {
        const float cv = c_s[dd * kCenterStride + k];
        const float4 lo = reinterpret_cast<const float4*>(x_s + dd * kTile)[0];
        const float4 hi = reinterpret_cast<const float4*>(x_s + dd * kTile)[1];
        const float xv[kTile] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
        for (int p = 0; p < kTile; ++p) {
          if (kSquared) {
            // (x - c)^2 directly: no cancellation between |x|^2 and 2 x.c.
            const float diff = xv[p] - cv;
            part[p] = fmaf(diff, diff, part[p]);
          } else {
            part[p] = fmaf(xv[p], cv, part[p]);
          }
        }
      }
#pragma unroll
      for (int p = 0; p < kTile; ++p) acc[p] += part[p];
    }
  }

  __syncthreads();  // c_s is reused for the group sums
  float* red = c_s;
#pragma unroll
  for (int p = 0; p < kTile; ++p) red[p * kThreads + t] = acc[p];
  __syncthreads();
  float* out = c_s + kTile * kThreads;
  for (int i = t; i < kTile * K; i += kThreads) {
    const int p = i / K, kk = i % K;
    float s = 0.0f;
    for (int gg = 0; gg < groups; ++gg) s += red[p * kThreads + gg * group_k + kk];
    out[p * kMaxK + kk] = s;
  }
  __syncthreads();
}

// dst[kk * kWideTile + p] = src[base[p] + (k0 + kk) * N] for the chunk's centres; 0 past K or
// for a position past P (base < 0). Call with all kWideThreads threads.
__device__ __forceinline__ void load_centre_chunk(const float* __restrict__ src,
                                                  const int64_t* base, int64_t N, int K, int k0,
                                                  float* dst) {
  for (int i = threadIdx.x; i < kKChunk * kWideTile; i += kWideThreads) {
    const int p = i % kWideTile, k = k0 + i / kWideTile;
    dst[i] = (base[p] >= 0 && k < K) ? src[base[p] + static_cast<int64_t>(k) * N] : 0.0f;
  }
}

// The start of a K-side block (kTile positions, one warp each): centre_products of the block's
// positions, then this thread's warp: its position pos, lane, the row of its kMaxK products in
// shared memory, tau = exp(log_tau) and the centre-major offset base of pos. false for a warp
// past P (warp-uniform: it returns, and no barrier follows).
struct KSideWarp {
  int64_t pos;
  int lane;
  const float* row;
  float tau;
  int64_t base;
};

template <bool kSquared, typename scalar_t>
__device__ __forceinline__ bool k_side_start(const scalar_t* __restrict__ x, const Strides4 st,
                                             const float* __restrict__ centers,
                                             const float* __restrict__ log_tau, int64_t P,
                                             int64_t N, int64_t W, int64_t D, int K, int group_k,
                                             KSideWarp& w) {
  __shared__ __align__(16) float c_s[kChunk * kCenterStride];
  __shared__ __align__(16) float x_s[kChunk * kTile];
  const int64_t p0 = static_cast<int64_t>(blockIdx.x) * kTile;
  centre_products<kSquared>(x, st, centers, p0, P, N, W, D, K, group_k, c_s, x_s);
  const int warp = threadIdx.x / kWarpSize;
  w.pos = p0 + warp;
  w.lane = threadIdx.x % kWarpSize;
  if (w.pos >= P) return false;
  w.row = c_s + kTile * kThreads + warp * kMaxK;
  w.tau = expf(log_tau[0]);
  w.base = centre_major_offset(w.pos, N, K);
  return true;
}

// Forward, K-side: distances, softmax over K, compactness. Block = kTile positions.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) cram_fwd_assign_kernel(
    const scalar_t* __restrict__ embedding, Strides4 st_e, const float* __restrict__ centers,
    const float* __restrict__ log_tau, int64_t P, int64_t N, int64_t W, int64_t D, int K,
    int group_k, float* __restrict__ assign, float* __restrict__ compact,
    float* __restrict__ dist) {
  KSideWarp w;
  if (!k_side_start<true>(embedding, st_e, centers, log_tau, P, N, W, D, K, group_k, w)) return;
  const auto [pos, lane, dist_s, tau, base] = w;

  float dv[kKPerLane], ev[kKPerLane];
  float row_max = -INFINITY;
#pragma unroll
  for (int j = 0; j < kKPerLane; ++j) {
    const int k = lane + j * kWarpSize;
    dv[j] = k < K ? dist_s[k] : 0.0f;
    ev[j] = k < K ? -dv[j] / tau : -INFINITY;
    row_max = fmaxf(row_max, ev[j]);
  }
  // Row max subtracted first: large distances and tiny temperatures stay finite.
  row_max = warp_max(row_max);
  float total = 0.0f;
#pragma unroll
  for (int j = 0; j < kKPerLane; ++j) {
    const int k = lane + j * kWarpSize;
    ev[j] = k < K ? expf(ev[j] - row_max) : 0.0f;
    total += ev[j];
  }
  total = warp_sum(total);
  float comp = 0.0f;
#pragma unroll
  for (int j = 0; j < kKPerLane; ++j) {
    const int k = lane + j * kWarpSize;
    if (k < K) {
      const float a = ev[j] / total;
      comp = fmaf(a, dv[j], comp);
      assign[base + static_cast<int64_t>(k) * N] = a;
      dist[pos * K + k] = dv[j];
    }
  }
  comp = warp_sum(comp);
  if (lane == 0) compact[pos] = comp;
}

// Forward, D-side: central = assign @ C. Block = kWideTile positions x kWideThreads channels.
__global__ void __launch_bounds__(kWideThreads) cram_fwd_central_kernel(
    const float* __restrict__ assign, const float* __restrict__ centers, int64_t P, int64_t N,
    int64_t D, int K, float* __restrict__ central) {
  __shared__ __align__(16) float a_s[kKChunk * kWideTile];
  __shared__ int64_t base[kWideTile];
  const int t = threadIdx.x;
  const int64_t p0 = static_cast<int64_t>(blockIdx.x) * kWideTile;
  const int64_t d = static_cast<int64_t>(blockIdx.y) * kWideThreads + t;
  const bool d_ok = d < D;
  if (t < kWideTile) base[t] = p0 + t < P ? centre_major_offset(p0 + t, N, K) : -1;

  float acc[kWideTile];
#pragma unroll
  for (int p = 0; p < kWideTile; ++p) acc[p] = 0.0f;
  for (int k0 = 0; k0 < K; k0 += kKChunk) {
    __syncthreads();  // base is written / the previous chunk is no longer read
    load_centre_chunk(assign, base, N, K, k0, a_s);
    __syncthreads();
    if (!d_ok) continue;
    const int count = min(kKChunk, K - k0);
    for (int kk = 0; kk < count; ++kk) {
      const float cv = centers[(k0 + kk) * D + d];
      const float4* a4 = reinterpret_cast<const float4*>(a_s + kk * kWideTile);
#pragma unroll
      for (int q = 0; q < kWideTile / 4; ++q) {
        const float4 a = a4[q];
        acc[4 * q + 0] = fmaf(a.x, cv, acc[4 * q + 0]);
        acc[4 * q + 1] = fmaf(a.y, cv, acc[4 * q + 1]);
        acc[4 * q + 2] = fmaf(a.z, cv, acc[4 * q + 2]);
        acc[4 * q + 3] = fmaf(a.w, cv, acc[4 * q + 3]);
      }
    }
  }
  if (!d_ok) return;
#pragma unroll
  for (int p = 0; p < kWideTile; ++p) {
    const int64_t pos = p0 + p;
    if (pos < P) central[((pos / N) * D + d) * N + pos % N] = acc[p];
  }
}

// Backward, K-side: dL/da (with G_mu . c_k from one read of G_mu), softmax backward, then
// delta = dL/dd (B, K, N), its sum over K per position, and each position's log_tau term.
__global__ void __launch_bounds__(kThreads) cram_bwd_delta_kernel(
    const float* __restrict__ grad_central, Strides4 st_g, const float* __restrict__ centers,
    const float* __restrict__ log_tau, const float* __restrict__ assign,
    const float* __restrict__ dist, const float* __restrict__ grad_assign,
    const float* __restrict__ grad_compact, int64_t P, int64_t N, int64_t W, int64_t D, int K,
    int group_k, float* __restrict__ delta, float* __restrict__ delta_sum,
    float* __restrict__ log_tau_terms) {
  KSideWarp w;
  if (!k_side_start<false>(grad_central, st_g, centers, log_tau, P, N, W, D, K, group_k, w)) {
    return;
  }
  const auto [pos, lane, gmc_s, tau, base] = w;
  const float g_compact = grad_compact[pos];

  // Softmax backward is blind to a per-position shift of dL/da, and the log_tau term to a
  // shift of d (both weights sum to zero over K): d is taken relative to its row minimum, so
  // large distances do not cancel in fp32.
  float av[kKPerLane], dv[kKPerLane], gv[kKPerLane];
  float row_min = INFINITY;
#pragma unroll
  for (int j = 0; j < kKPerLane; ++j) {
    const int k = lane + j * kWarpSize;
    dv[j] = k < K ? dist[pos * K + k] : INFINITY;
    row_min = fminf(row_min, dv[j]);
  }
  row_min = -warp_max(-row_min);
  float a_dot_g = 0.0f;
#pragma unroll
  for (int j = 0; j < kKPerLane; ++j) {
    const int k = lane + j * kWarpSize;
    av[j] = gv[j] = 0.0f;
    dv[j] = k < K ? dv[j] - row_min : 0.0f;
    if (k < K) {
      const int64_t off = base + static_cast<int64_t>(k) * N;
      av[j] = assign[off];
      gv[j] = grad_assign[off] + g_compact * dv[j] + gmc_s[k];
      a_dot_g = fmaf(av[j], gv[j], a_dot_g);
    }
  }
  a_dot_g = warp_sum(a_dot_g);
  float row = 0.0f, tau_term = 0.0f;
#pragma unroll
  for (int j = 0; j < kKPerLane; ++j) {
    const int k = lane + j * kWarpSize;
    if (k < K) {
      const float g_logit = av[j] * (gv[j] - a_dot_g);
      const float dl = g_compact * av[j] - g_logit / tau;
      delta[base + static_cast<int64_t>(k) * N] = dl;
      row += dl;
      tau_term = fmaf(g_logit, dv[j], tau_term);
    }
  }
  row = warp_sum(row);
  tau_term = warp_sum(tau_term);
  if (lane == 0) {
    delta_sum[pos] = row;
    log_tau_terms[pos] = tau_term / tau;
  }
}

// Backward, D-side: grad_embedding = 2 e sum_k delta - 2 delta @ C, and the centre gradient
// parts sum_p (a G_mu - 2 delta e) + 2 c sum_p delta of tiles blockIdx.x, + gridDim.x, ...,
// summed in that order into slice blockIdx.x of center_partials (slices, K, D). Reads the
// embedding once and G_mu a second time.
template <typename scalar_t>
__global__ void __launch_bounds__(kWideThreads) cram_bwd_embedding_kernel(
    const scalar_t* __restrict__ embedding, Strides4 st_e, const float* __restrict__ grad_central,
    Strides4 st_g, const float* __restrict__ centers, const float* __restrict__ assign,
    const float* __restrict__ delta, const float* __restrict__ delta_sum, int64_t P, int64_t N,
    int64_t W, int64_t D, int K, scalar_t* __restrict__ grad_embedding, Strides4 st_ge,
    float* __restrict__ center_partials) {
  __shared__ __align__(16) float a_s[kKChunk * kWideTile];
  __shared__ __align__(16) float delta_s[kKChunk * kWideTile];
  __shared__ int64_t base[kWideTile];
  __shared__ int64_t off_e[kWideTile], off_g[kWideTile], off_ge[kWideTile];
  __shared__ float row_s[kWideTile];
  const int t = threadIdx.x;
  const int64_t tiles = (P + kWideTile - 1) / kWideTile;
  const int64_t d = static_cast<int64_t>(blockIdx.y) * kWideThreads + t;
  const bool d_ok = d < D;
  float* part = center_partials + static_cast<int64_t>(blockIdx.x) * K * D;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const bool first = tile == blockIdx.x;
    const int64_t p0 = tile * kWideTile;
    __syncthreads();  // the previous tile's positions are no longer read
    if (t < kWideTile) {
      const int64_t pos = p0 + t;
      const bool ok = pos < P;
      base[t] = ok ? centre_major_offset(pos, N, K) : -1;
      off_e[t] = ok ? position_offset(st_e, pos, N, W) : 0;
      off_g[t] = ok ? position_offset(st_g, pos, N, W) : 0;
      off_ge[t] = ok ? position_offset(st_ge, pos, N, W) : 0;
      row_s[t] = ok ? delta_sum[pos] : 0.0f;
    }
    __syncthreads();

    float e[kWideTile], gm[kWideTile], acc[kWideTile];
#pragma unroll
    for (int p = 0; p < kWideTile; ++p) {
      const bool ok = d_ok && base[p] >= 0;
      e[p] = ok ? static_cast<float>(embedding[off_e[p] + d * st_e.c]) : 0.0f;
      gm[p] = ok ? grad_central[off_g[p] + d * st_g.c] : 0.0f;
      acc[p] = 0.0f;
    }
    for (int k0 = 0; k0 < K; k0 += kKChunk) {
      __syncthreads();  // the previous chunk is no longer read
      load_centre_chunk(assign, base, N, K, k0, a_s);
      load_centre_chunk(delta, base, N, K, k0, delta_s);
      __syncthreads();
      if (!d_ok) continue;
      const int count = min(kKChunk, K - k0);
      for (int kk = 0; kk < count; ++kk) {
        const int64_t k = k0 + kk;
        const float cv = centers[k * D + d];
        const float4* a4 = reinterpret_cast<const float4*>(a_s + kk * kWideTile);
        const float4* l4 = reinterpret_cast<const float4*>(delta_s + kk * kWideTile);
        float gc = 0.0f, col = 0.0f;
#pragma unroll
        for (int q = 0; q < kWideTile / 4; ++q) {
          const float4 a = a4[q], l = l4[q];
          const float av[4] = {a.x, a.y, a.z, a.w};
          const float lv[4] = {l.x, l.y, l.z, l.w};
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            const int p = 4 * q + r;
            acc[p] = fmaf(lv[r], cv, acc[p]);
            gc = fmaf(av[r], gm[p], gc);
            gc = fmaf(-2.0f * lv[r], e[p], gc);
            col += lv[r];
          }
        }
        const float v = fmaf(2.0f * cv, col, gc);
        part[k * D + d] = first ? v : part[k * D + d] + v;
      }
    }
    if (!d_ok) continue;
#pragma unroll
    for (int p = 0; p < kWideTile; ++p) {
      if (base[p] >= 0) {
        grad_embedding[off_ge[p] + d * st_ge.c] =
            static_cast<scalar_t>(2.0f * (e[p] * row_s[p] - acc[p]));
      }
    }
  }
}

// grad_centers = center_partials summed over slices in slice order, cast to the centres' dtype.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) cram_bwd_centers_kernel(
    const float* __restrict__ center_partials, int64_t slices, int64_t K, int64_t D,
    scalar_t* __restrict__ grad_centers, int64_t stride_k, int64_t stride_d) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= K * D) return;
  float s = 0.0f;
  for (int64_t slice = 0; slice < slices; ++slice) s += center_partials[slice * K * D + i];
  grad_centers[(i / D) * stride_k + (i % D) * stride_d] = static_cast<scalar_t>(s);
}

// grad_log_tau = sum of the per-position terms: strided per thread, then a tree. One block.
__global__ void __launch_bounds__(kThreads) cram_bwd_log_tau_kernel(
    const float* __restrict__ log_tau_terms, int64_t P, float* __restrict__ grad_log_tau) {
  __shared__ float partial[kThreads];
  const int t = threadIdx.x;
  float s = 0.0f;
  for (int64_t i = t; i < P; i += kThreads) s += log_tau_terms[i];
  partial[t] = s;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (t < stride) partial[t] += partial[t + stride];
    __syncthreads();
  }
  if (t == 0) grad_log_tau[0] = partial[0];
}

// Threads per centre group in centre_products (host side): K rounded up to a power of two, at
// least a warp.
inline int centre_group_size(int64_t K) {
  int group = kWarpSize;
  while (group < K) group *= 2;
  return group;
}

}  // namespace
}  // namespace snl
