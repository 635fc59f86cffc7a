// Device code of csrc/cram.cu: CRAM's row kernels, the per-position softmax steps between the
// products. No ATen or torch header here, so
// tests/cuda_emulation can compile this file for the CPU; the products, the launches and the op
// registration are in csrc/cram_host.h and csrc/cram.cu, the sizes they share in cram_sizes.h.
#pragma once

#include <cstdint>

#include "common.cuh"
#include "cram_sizes.h"

namespace snl {
namespace {

// One warp per position, its K values spread over the lanes (K <= kMaxK, cram_sizes.h).
constexpr int kKPerLane = kMaxK / kWarpSize;
// Positions (warps) per block: 4 keeps 256 blocks at the benchmark shape (1,024 positions), so
// every SM of an H200 (132) has work.
constexpr int kRowWarps = 4;
constexpr int kRowThreads = kRowWarps * kWarpSize;

// Offset of position p = b * N + n in a contiguous (B, K, N) tensor (assign) at centre 0.
__device__ __forceinline__ int64_t centre_major_offset(int64_t p, int64_t N, int64_t K) {
  return (p / N) * K * N + p % N;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int mask = kWarpSize / 2; mask > 0; mask /= 2) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, mask));
  }
  return v;
}

// Forward rows. On entry dist (P, K) holds e_i.c_k; on exit d_ik = |e_i|^2 - 2 e_i.c_k + |c_k|^2.
// Also the softmax over k of -d / tau into assign (B, K, N) and the compactness sum_k a d.
__global__ void __launch_bounds__(kRowThreads) cram_fwd_rows_kernel(
    float* __restrict__ dist, const float* __restrict__ e_sq, const float* __restrict__ c_sq,
    const float* __restrict__ log_tau, int64_t P, int64_t N, int K,
    float* __restrict__ assign, float* __restrict__ compact) {
  const int64_t pos = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / kWarpSize;
  if (pos >= P) return;  // warp-uniform, and no block barrier follows
  const int lane = threadIdx.x % kWarpSize;
  const float tau = expf(log_tau[0]);
  const float ee = e_sq[pos];
  float* row = dist + pos * K;

  float dv[kKPerLane], ev[kKPerLane];
  float row_max = -INFINITY;
#pragma unroll
  for (int j = 0; j < kKPerLane; ++j) {
    const int k = lane + j * kWarpSize;
    dv[j] = k < K ? fmaf(-2.0f, row[k], ee) + c_sq[k] : 0.0f;
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
  const int64_t base = centre_major_offset(pos, N, K);
  float comp = 0.0f;
#pragma unroll
  for (int j = 0; j < kKPerLane; ++j) {
    const int k = lane + j * kWarpSize;
    if (k < K) {
      const float a = ev[j] / total;
      comp = fmaf(a, dv[j], comp);
      assign[base + static_cast<int64_t>(k) * N] = a;
      row[k] = dv[j];
    }
  }
  comp = warp_sum(comp);
  if (lane == 0) compact[pos] = comp;
}

// Backward rows. On entry work (P, K) holds G_mu,i . c_k; on exit delta_ik = dL/dd_ik. Also
// sum_k delta_ik and each position's share of dL/dlog_tau.
__global__ void __launch_bounds__(kRowThreads) cram_bwd_rows_kernel(
    float* __restrict__ work, const float* __restrict__ assign, const float* __restrict__ dist,
    const float* __restrict__ grad_assign, const float* __restrict__ grad_compact,
    const float* __restrict__ log_tau, int64_t P, int64_t N, int K,
    float* __restrict__ delta_sum, float* __restrict__ log_tau_terms) {
  const int64_t pos = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / kWarpSize;
  if (pos >= P) return;
  const int lane = threadIdx.x % kWarpSize;
  const float tau = expf(log_tau[0]);
  const float g_compact = grad_compact[pos];
  const int64_t base = centre_major_offset(pos, N, K);
  float* row = work + pos * K;

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
      gv[j] = grad_assign[off] + g_compact * dv[j] + row[k];
      a_dot_g = fmaf(av[j], gv[j], a_dot_g);
    }
  }
  a_dot_g = warp_sum(a_dot_g);
  float sum = 0.0f, tau_term = 0.0f;
#pragma unroll
  for (int j = 0; j < kKPerLane; ++j) {
    const int k = lane + j * kWarpSize;
    if (k < K) {
      const float g_logit = av[j] * (gv[j] - a_dot_g);
      const float dl = g_compact * av[j] - g_logit / tau;
      row[k] = dl;
      sum += dl;
      tau_term = fmaf(g_logit, dv[j], tau_term);
    }
  }
  sum = warp_sum(sum);
  tau_term = warp_sum(tau_term);
  if (lane == 0) {
    delta_sum[pos] = sum;
    log_tau_terms[pos] = tau_term / tau;
  }
}

}  // namespace
}  // namespace snl
