// The Gram path's own kernels (composition: csrc/gram_host.h): its operands [E; D] from the two
// feature maps, normalised per pixel and rounded as the precision asks; the loss's sum over the Gram; the backward's coefficients K from the Gram.
// The products are cuBLAS's; the normalisation backward is pixel_normalize_bwd_kernel
// (intra_affinity_kernels.cuh). G below is the (nb, 2C, 2C) Gram of [E; D], row-major:
// G_EE = G[:C, :C], G_ED = G[:C, C:], G_DE = G[C:, :C] = G_ED^T, G_DD = G[C:, C:].
#pragma once

#include <algorithm>
#include <cstdint>

#include "affinity_launch.cuh"

namespace snl {
namespace {

// x rounded to the nearest tf32 value, ties away from zero (cvt.rna.tf32.f32; the same bits as
// gram_host::round_tf32_): add half of the 13 dropped bits to the magnitude, clear them.
__device__ __forceinline__ float round_tf32(float x) {
  return __uint_as_float((__float_as_uint(x) + 0x1000u) & 0xffffe000u);
}

// Rows [0, C) of hi / lo (nb, 2C, N) hold E = X_S + X_T, rows [C, 2C) D = X_S - X_T, for images
// b0 .. b0 + gridDim.y (X = F / max(|F|, eps) per pixel, r = 1 / max(|F|, eps) as
// pixel_inv_norm_kernel forms it). parts 0: hi = the value; 1: hi = tf32(value); 2: also lo =
// tf32(value - hi). Block = 32 pixels x 8 channel groups: the block's pixels are read twice
// (their norms, then the values; the second read is the block's own recent footprint, 32
// pixels x C x 2 inputs), lanes take consecutive pixels, so the stores (and the loads of NCHW
// inputs) are coalesced.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) gram_operands_kernel(
    Feature<scalar_t> teacher, Feature<scalar_t> student, int64_t b0, int64_t C, int64_t N,
    int parts, float* __restrict__ hi, float* __restrict__ lo) {
  __shared__ float sums[2][8][32];
  const int lane = threadIdx.x % 32, group = threadIdx.x / 32;
  const int64_t bb = blockIdx.y, b = b0 + bb;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * 32 + lane;
  const bool valid = n < N;
  const int64_t off_t = valid ? teacher.pixel_offset(b, n) : 0;
  const int64_t off_s = valid ? student.pixel_offset(b, n) : 0;
  float tt = 0.0f, ss = 0.0f;
  if (valid) {
    for (int64_t c = group; c < C; c += 8) {
      const float t = teacher.at(off_t, c), s = student.at(off_s, c);
      tt += t * t;
      ss += s * s;
    }
  }
  sums[0][group][lane] = tt;
  sums[1][group][lane] = ss;
  __syncthreads();
  if (!valid) return;
  tt = 0.0f;
  ss = 0.0f;
  for (int k = 0; k < 8; ++k) {
    tt += sums[0][k][lane];
    ss += sums[1][k][lane];
  }
  const float rt = 1.0f / fmaxf(sqrtf(tt), kEps), rs = 1.0f / fmaxf(sqrtf(ss), kEps);
  const int64_t base = bb * 2 * C * N + n;
  for (int64_t c = group; c < C; c += 8) {
    const float xs = student.at(off_s, c) * rs, xt = teacher.at(off_t, c) * rt;
    const float values[2] = {xs + xt, xs - xt};
    for (int k = 0; k < 2; ++k) {
      const int64_t i = base + (k * C + c) * N;
      const float v = values[k];
      const float h = parts == 0 ? v : round_tf32(v);
      hi[i] = h;
      if (parts == 2) lo[i] = round_tf32(v - h);
    }
  }
}

// Rows of the loss's sum per block: kLossRows rows i of the C x C blocks of one sample.
constexpr int64_t kLossRows = 8;

// partials[bb * gridDim.x + blockIdx.x] = sum over the block's rows i < C and every j < C of
// G_EE[i, j] G_DD[i, j] + G_ED[i, j] G_DE[i, j] (so that the loss is half the sum of all
// partials over B N^2), products and sums in float64, in a fixed order. Grid (ceil(C /
// kLossRows), nb); threads take consecutive j, so each row is read coalesced.
__global__ void __launch_bounds__(kThreads) gram_loss_kernel(const float* __restrict__ g,
                                                             int64_t C,
                                                             double* __restrict__ partials) {
  __shared__ double sums[kThreads];
  const int64_t bb = blockIdx.y, two_c = 2 * C;
  const float* gs = g + bb * two_c * two_c;
  double acc = 0.0;
  const int64_t i_end = std::min<int64_t>(C, (blockIdx.x + 1) * kLossRows);
  for (int64_t i = blockIdx.x * kLossRows; i < i_end; ++i) {
    const float* e_row = gs + i * two_c;  // [G_EE[i, :], G_ED[i, :]]
    const float* d_row = gs + (C + i) * two_c;  // [G_DE[i, :], G_DD[i, :]]
    for (int64_t j = threadIdx.x; j < C; j += kThreads) {
      acc += static_cast<double>(e_row[j]) * d_row[C + j] +
             static_cast<double>(e_row[C + j]) * d_row[j];
    }
  }
  sums[threadIdx.x] = acc;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (static_cast<int>(threadIdx.x) < stride) sums[threadIdx.x] += sums[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) partials[bb * gridDim.x + blockIdx.x] = sums[0];
}

// total[0] += the sum of count partials, in a fixed order (one block).
__global__ void __launch_bounds__(kThreads) add_partials_kernel(
    const double* __restrict__ partials, int64_t count, double* __restrict__ total) {
  __shared__ double sums[kThreads];
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < count; i += kThreads) acc += partials[i];
  sums[threadIdx.x] = acc;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (static_cast<int>(threadIdx.x) < stride) sums[threadIdx.x] += sums[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) total[0] += sums[0];
}

// The backward's coefficients of one side, (nb, C, 2C): K[i, j] = (G_DD[i, j] + sign G_ED[i, j])
// for j < C and (G_DE[i, j - C] + sign G_EE[i, j - C]) for j >= C, times scale = float(g / M),
// rounded into hi (and lo) as gram_operands_kernel's parts. sign: +1 for the student, -1 for
// the teacher. One block per (row i, sample).
__global__ void __launch_bounds__(kThreads) gram_coefficients_kernel(
    const float* __restrict__ g, int64_t C, float sign, const float* __restrict__ grad_loss,
    double M, int parts, float* __restrict__ hi, float* __restrict__ lo) {
  const int64_t i = blockIdx.x, bb = blockIdx.y, two_c = 2 * C;
  const float* e_row = g + (bb * two_c + i) * two_c;  // [G_EE[i, :], G_ED[i, :]]
  const float* d_row = g + (bb * two_c + C + i) * two_c;  // [G_DE[i, :], G_DD[i, :]]
  const float scale = static_cast<float>(static_cast<double>(grad_loss[0]) / M);
  const int64_t out = (bb * C + i) * two_c;
  for (int64_t j = threadIdx.x; j < two_c; j += kThreads) {
    const int64_t from = j < C ? C + j : j - C;  // K's column j reads Gram column `from`
    const float v = (d_row[from] + sign * e_row[from]) * scale;
    const float h = parts == 0 ? v : round_tf32(v);
    hi[out + j] = h;
    if (parts == 2) lo[out + j] = round_tf32(v - h);
  }
}

// The operands of images b0 .. b0 + nb into hi (and lo when parts == 2), (nb, 2C, N) each.
template <typename scalar_t, typename Launch>
void launch_gram_operands(const Launch& launch, const Feature<scalar_t>& t,
                          const Feature<scalar_t>& s, int64_t b0, int64_t nb, int64_t C,
                          int64_t N, int parts, float* hi, float* lo) {
  for (int64_t i = 0; i < nb; i += kMaxGridY) {
    const int64_t gy = std::min(nb - i, kMaxGridY);
    launch(gram_operands_kernel<scalar_t>, ceil_div(N, 32), gy, t, s, b0 + i, C, N, parts,
           hi + i * 2 * C * N, parts == 2 ? lo + i * 2 * C * N : nullptr);
  }
}

// total[0] += the loss's sum over the Gram g (nb, 2C, 2C) (see gram_loss_kernel); partials:
// ceil(C / kLossRows) * nb doubles.
template <typename Launch>
void launch_gram_loss(const Launch& launch, const float* g, int64_t nb, int64_t C,
                      double* partials, double* total) {
  const int64_t gx = ceil_div(C, kLossRows);
  for (int64_t i = 0; i < nb; i += kMaxGridY) {
    const int64_t gy = std::min(nb - i, kMaxGridY);
    launch(gram_loss_kernel, gx, gy, g + i * 4 * C * C, C, partials + i * gx);
  }
  launch(add_partials_kernel, 1, 1, partials, gx * nb, total);
}

// K of one side into hi (and lo), (nb, C, 2C) each, from the Gram g (nb, 2C, 2C).
template <typename Launch>
void launch_gram_coefficients(const Launch& launch, const float* g, int64_t nb, int64_t C,
                              bool teacher_side, const float* grad_loss, double M, int parts,
                              float* hi, float* lo) {
  for (int64_t i = 0; i < nb; i += kMaxGridY) {
    const int64_t gy = std::min(nb - i, kMaxGridY);
    launch(gram_coefficients_kernel, C, gy, g + i * 4 * C * C, C, teacher_side ? -1.0f : 1.0f,
           grad_loss, M, parts, hi + i * 2 * C * C, parts == 2 ? lo + i * 2 * C * C : nullptr);
  }
}

}  // namespace
}  // namespace snl
