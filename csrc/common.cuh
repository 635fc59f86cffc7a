// Device helpers shared by the CUDA ops: constants, strides of a (B, C, H, W) tensor, the
// clamped cosine distance and a warp sum. Everything is inline (or constexpr), and no ATen
// header is included (the kernels headers include this one; see tests/cuda_emulation). Host
// helpers that need ATen are in host.h.
#pragma once

#include <cstdint>

namespace snl {

// Norm clamp of every cosine and normalisation (DESIGN §1).
constexpr float kEps = 1e-8f;
constexpr int kWarpSize = 32;

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Element strides of a (B, C, H, W) tensor: NCHW, channels_last or any view.
struct Strides4 {
  int64_t b, c, h, w;
};

// Offset of pixel n (row-major over H, W) of sample b, channel 0.
__device__ __forceinline__ int64_t pixel_offset(const Strides4& st, int64_t b, int64_t n,
                                                int64_t W) {
  return b * st.b + (n / W) * st.h + (n % W) * st.w;
}

// 1 - cos from the sums dot = <t, s>, tt = |t|^2, ss = |s|^2; each norm is clamped on its own,
// as torch.nn.functional.cosine_similarity does.
__device__ __forceinline__ float cosine_distance(float dot, float tt, float ss) {
  const float nt = fmaxf(sqrtf(tt), kEps);
  const float ns = fmaxf(sqrtf(ss), kEps);
  return 1.0f - dot / (nt * ns);
}

// Sum over the 32 lanes of a warp, in a fixed butterfly order; every lane gets the sum.
__device__ __forceinline__ float warp_sum(float v) {
  for (int mask = kWarpSize / 2; mask > 0; mask /= 2) {
    v += __shfl_xor_sync(0xffffffffu, v, mask);
  }
  return v;
}

}  // namespace snl
