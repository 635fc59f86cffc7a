// Host helpers shared by the CUDA ops' launchers: the dtype dispatch and the strides of a
// tensor. The device helpers are in common.cuh.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include "common.cuh"

// The feature dtypes every op takes (accumulation is fp32 whatever the input).
#define SNL_DISPATCH_FEATURE_TYPES(TYPE, NAME, ...)            \
  AT_DISPATCH_SWITCH(TYPE, NAME,                               \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace snl {

inline Strides4 strides_of(const at::Tensor& x) {
  return {x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
}

}  // namespace snl
