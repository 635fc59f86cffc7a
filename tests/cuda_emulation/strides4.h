// The drivers' (B, C, H, W) tensors: their strides as four int64 values of a record, and the
// number of elements their storage spans. Include after driver.h and a csrc kernels header
// (snl::Strides4 is in common.cuh).
#pragma once

#include <cstdint>

namespace emu {

inline snl::Strides4 read_strides4(IntReader& in) {
  snl::Strides4 st;
  st.b = in.next();
  st.c = in.next();
  st.h = in.next();
  st.w = in.next();
  return st;
}

inline int64_t storage_size4(int64_t B, int64_t C, int64_t H, int64_t W,
                             const snl::Strides4& st) {
  return (B - 1) * st.b + (C - 1) * st.c + (H - 1) * st.h + (W - 1) * st.w + 1;
}

}  // namespace emu
