// Sizes shared by CRAM's host composition (csrc/cram_host.h), its CUDA row kernels
// (csrc/cram_kernels.cuh) and the CPU emulation's checks: plain C++, no CUDA or ATen header.
#pragma once

#include <cstdint>

namespace snl {

// The row kernels spread a position's K values over one warp's lanes: at most 256 centres.
constexpr int kMaxK = 256;

// The composition works through the images in chunks whose temporaries take at most this.
constexpr int64_t kChunkBytes = int64_t{64} << 20;

// Bytes of temporaries per image of a backward chunk (D channels, N positions, K centres;
// convert: the embedding is not float32): the (K, D) centre-gradient partial, 2 e sum_k delta,
// and for a half-precision embedding its fp32 copy and the fp32 gradient before the cast.
inline int64_t cram_backward_bytes_per_image(int64_t D, int64_t N, int64_t K, bool convert) {
  return int64_t{4} * (K * D + D * N + (convert ? 2 * D * N : 0));
}

// Images per chunk: as many as fit in kChunkBytes at bytes_per_image each, at least 1, at most B.
inline int64_t cram_chunk_images(int64_t B, int64_t bytes_per_image) {
  int64_t images = bytes_per_image > 0 ? kChunkBytes / bytes_per_image : B;
  if (images > B) images = B;
  return images > 0 ? images : 1;
}

}  // namespace snl
