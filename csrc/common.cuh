// Helpers shared by the CUDA ops: the dtype dispatch, constants, strides of a (B, C, H, W)
// tensor, the clamped cosine distance and a warp sum. Everything is inline (or constexpr), so each op's .cu file
// can include it.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <cstdint>

// The feature dtypes every op takes (accumulation is fp32 whatever the input).
#define SNL_DISPATCH_FEATURE_TYPES(TYPE, NAME, ...)            \
  AT_DISPATCH_SWITCH(TYPE, NAME,                               \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace snl {

// Norm clamp of every cosine and normalisation (SPEC §1).
constexpr float kEps = 1e-8f;
constexpr int kWarpSize = 32;

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Element strides of a (B, C, H, W) tensor: NCHW, channels_last or any view.
struct Strides4 {
  int64_t b, c, h, w;
};

inline Strides4 strides_of(const at::Tensor& x) {
  return {x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
}

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
