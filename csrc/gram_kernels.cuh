// The Gram path's own kernel (composition: csrc/gram_host.h): its operands [E; D] from the two
// feature maps, per pixel normalised by pixel_inv_norm_kernel's inverse norms, rounded as the
// precision asks. The products are cuBLAS's; the normalisation backward is
// pixel_normalize_bwd_kernel (intra_affinity_kernels.cuh).
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
// b0 .. b0 + gridDim.y (X = F / max(|F|, eps) per pixel, from inv_norm (B, 2, N)). parts 0: hi
// = the value; 1: hi = tf32(value); 2: also lo = tf32(value - hi). Block = 32 pixels x 8
// channel groups, as pixel_inv_norm_kernel; lanes take consecutive pixels, so the stores (and
// the loads of NCHW inputs) are coalesced.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) gram_operands_kernel(
    Feature<scalar_t> teacher, Feature<scalar_t> student, const float* __restrict__ inv_norm,
    int64_t b0, int64_t C, int64_t N, int parts, float* __restrict__ hi,
    float* __restrict__ lo) {
  const int lane = threadIdx.x % 32, group = threadIdx.x / 32;
  const int64_t bb = blockIdx.y, b = b0 + bb;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * 32 + lane;
  if (n >= N) return;
  const int64_t off_t = teacher.pixel_offset(b, n), off_s = student.pixel_offset(b, n);
  const float rt = fabsf(inv_norm[(b * 2 + 0) * N + n]);  // negative marks a zero vector
  const float rs = fabsf(inv_norm[(b * 2 + 1) * N + n]);
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

// The operands of images b0 .. b0 + nb into hi (and lo when parts == 2), (nb, 2C, N) each.
// inv_norm: (b0 + nb) * 2 * N floats at least (rows b0 .. b0 + nb are written).
template <typename scalar_t, typename Launch>
void launch_gram_operands(const Launch& launch, const Feature<scalar_t>& t,
                          const Feature<scalar_t>& s, int64_t b0, int64_t nb, int64_t C,
                          int64_t N, int parts, float* inv_norm, float* hi, float* lo) {
  for (int64_t i = 0; i < nb; i += kMaxGridY) {
    const int64_t gy = std::min(nb - i, kMaxGridY);
    launch(pixel_inv_norm_kernel<scalar_t>, ceil_div(N, 32), gy, t, s, b0 + i, C, N, inv_norm);
    launch(gram_operands_kernel<scalar_t>, ceil_div(N, 32), gy, t, s, inv_norm, b0 + i, C, N,
           parts, hi + i * 2 * C * N, parts == 2 ? lo + i * 2 * C * N : nullptr);
  }
}

}  // namespace
}  // namespace snl
