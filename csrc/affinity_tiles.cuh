// What the affinity kernels share (no ATen here; see tests/cuda_emulation): tile sizes, strided
// feature reads, block sums, the loss and gradient of one Delta entry, the zero-vector rule,
// and the tile products: fp32 FMA register tiles and TF32 WMMA fragments over shared-memory
// operand tiles. The kernels are in intra_affinity_kernels.cuh and inter_affinity_kernels.cuh.
#pragma once

#include <mma.h>

#include <cstdint>

#include "common.cuh"

namespace snl {
namespace {

constexpr int kThreads = 256;
// Output tiles are kTile x kTile, 16 x 16 threads with 4 x 4 outputs each, and the contraction
// runs in chunks of kChunk: 4 KB of shared memory per operand tile.
constexpr int kTile = 64;
constexpr int kChunk = 16;
constexpr int kSub = kTile / 16;
// Shared tiles written with threadIdx % 16 on the row and threadIdx / 16 on the column get
// rows of width + kPad floats: a row stride of 2 mod 32 banks puts a warp's 32 stores on 32
// banks (a stride of 64 put 16 of them on one bank).
constexpr int kPad = 2;
constexpr int kTilePad = kTile + kPad;
// Tensor-core kernels: the same tiles, rows of kTile + kMmaPad floats. load_matrix_sync needs
// a row stride that is a multiple of 4 floats and 32-byte aligned fragment pointers (kPad = 2
// gives neither); a stride of 8 mod 32 banks also puts the 32 lanes of a fragment load (4
// rows x 8 columns of the tile) on 32 banks.
constexpr int kMmaPad = 8;
constexpr int kMmaRow = kTile + kMmaPad;
// Row width of the shared tiles of the FMA (kTf32 = false) and tensor-core kernels.
template <bool kTf32>
constexpr int kRowOf = kTf32 ? kMmaRow : kTilePad;
// Channels per block of the tiled intra backward: each block recomputes the whole Delta tile
// over all C, so fewer, wider channel blocks recompute less (C = 1024: 8 times).
constexpr int kBwdChannels = 128;
constexpr int kBwdSub = kBwdChannels / 16;
constexpr int64_t kMaxGridY = 65535;
// Backward scratch (Gram matrices K, fp32 gradients for fp16/bf16 inputs) is bounded by
// processing the batch in chunks.
constexpr int64_t kScratchBytes = int64_t{32} << 20;

// A (B, C, H, W) tensor read with its strides: NCHW, channels_last or any view.
template <typename scalar_t>
struct Feature {
  const scalar_t* ptr;
  int64_t sb, sc, sh, sw, W;

  __device__ __forceinline__ int64_t pixel_offset(int64_t b, int64_t n) const {
    return b * sb + (n / W) * sh + (n % W) * sw;
  }
  // fp32 from here on, whatever the input dtype.
  __device__ __forceinline__ float at(int64_t pixel_off, int64_t c) const {
    return static_cast<float>(ptr[pixel_off + c * sc]);
  }
  __device__ __forceinline__ float value(int64_t b, int64_t c, int64_t n) const {
    return at(pixel_offset(b, n), c);
  }
};

// adaptive_avg_pool2d of a (B, C, Ha, Wa) tensor to (Hb, Wb), one output pixel at a time: bin
// [floor(o * Ha / Hb), ceil((o + 1) * Ha / Hb)) per axis, so bins may be uneven and overlap.
template <typename scalar_t>
struct PooledFeature {
  Feature<scalar_t> f;
  int64_t Ha, Wa, Hb, Wb;

  __device__ __forceinline__ float value(int64_t b, int64_t c, int64_t n) const {
    const int64_t oh = n / Wb, ow = n % Wb;
    const int64_t h0 = oh * Ha / Hb, h1 = ((oh + 1) * Ha + Hb - 1) / Hb;
    const int64_t w0 = ow * Wa / Wb, w1 = ((ow + 1) * Wa + Wb - 1) / Wb;
    const scalar_t* base = f.ptr + b * f.sb + c * f.sc;
    float sum = 0.0f;
    for (int64_t h = h0; h < h1; ++h) {
      for (int64_t w = w0; w < w1; ++w) sum += static_cast<float>(base[h * f.sh + w * f.sw]);
    }
    return sum / static_cast<float>((h1 - h0) * (w1 - w0));
  }
};

// Sum of one value per thread, in a fixed tree order; the result is valid in thread 0.
__device__ float block_sum(float v) {
  __shared__ float partial[kThreads];
  partial[threadIdx.x] = v;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (static_cast<int>(threadIdx.x) < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  const float total = partial[0];
  __syncthreads();  // partial is reused by the next call
  return total;
}

// One block: out = scale * sum(partials), accumulated in float64 in a fixed order.
__global__ void __launch_bounds__(kThreads) sum_partials_kernel(
    const float* __restrict__ partials, int64_t count, double scale, float* __restrict__ out) {
  __shared__ double partial[kThreads];
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < count; i += kThreads) acc += partials[i];
  partial[threadIdx.x] = acc;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (static_cast<int>(threadIdx.x) < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[0] = static_cast<float>(partial[0] * scale);
}

// dL/dDelta for one entry: 2 g Delta / M (l2) or g sign(Delta) / M (l1), sign(0) = 0;
// scale is 2 / M (l2) or 1 / M (l1).
template <bool kL1>
__device__ __forceinline__ float delta_grad(float delta, float g_scale) {
  if (kL1) return delta > 0.0f ? g_scale : (delta < 0.0f ? -g_scale : 0.0f);
  return g_scale * delta;
}

template <bool kL1>
__device__ __forceinline__ float delta_loss(float delta) {
  return kL1 ? fabsf(delta) : delta * delta;
}

// ---- Tensor cores (TF32 WMMA, sm_80 and newer) ----
//
// An output tile of kTile x kTile is 4 x 4 fragments of 16 x 16; warp w holds two of them,
// rows 16 (w % 4) .. + 15, columns 32 (w / 4) .. + 31 (warp_row, warp_col). Shared tiles keep
// the FMA kernels' [k][column] layout: an A operand (rows i, contraction k) stored as
// tile[k][i] is a col_major fragment, a B operand (k, columns j) stored as tile[k][j] a
// row_major one, both with ldm = the tile's row width.
//
// Operands are rounded to tf32 to nearest as they are stored in shared memory, once per value
// (tf32_operand): the tensor cores would otherwise drop their low 13 bits, a biased
// truncation; rounded, the errors are unbiased (both measured: BENCHMARKS.md, Accuracy).
// Accumulation is fp32, in a fixed order. Which fragment element a lane holds is
// unspecified: elementwise work between accumulators is fine, anything that needs an element's
// (row, column) goes through shared memory (for_each_element).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define SNL_TF32_MMA 1
#else
#define SNL_TF32_MMA 0
#endif

// x as stored in a shared operand tile: rounded to nearest tf32 for the tensor-core kernels.
template <bool kTf32>
__device__ __forceinline__ float tf32_operand(float x) {
#if SNL_TF32_MMA
  if (kTf32) return nvcuda::wmma::__float_to_tf32(x);
#endif
  return x;
}

constexpr int kWarps = kThreads / 32;
// Whether this compilation pass has the tensor-core kernels (device code for sm_80 and newer).
constexpr bool kHasTf32Mma = SNL_TF32_MMA;

#if SNL_TF32_MMA
// Contraction depth of one m16n16k8 tf32 product.
constexpr int kMmaK = 8;
namespace wmma = nvcuda::wmma;
using Tf32 = wmma::precision::tf32;
using FragA = wmma::fragment<wmma::matrix_a, 16, 16, kMmaK, Tf32, wmma::col_major>;
using FragB = wmma::fragment<wmma::matrix_b, 16, 16, kMmaK, Tf32, wmma::row_major>;
using FragC = wmma::fragment<wmma::accumulator, 16, 16, kMmaK, float>;

__device__ __forceinline__ int warp_row() { return 16 * (threadIdx.x / 32 % 4); }
__device__ __forceinline__ int warp_col() { return 32 * (threadIdx.x / 32 / 4); }

template <int kFrags>
__device__ __forceinline__ void zero_fragments(FragC (&acc)[kFrags]) {
#pragma unroll
  for (int f = 0; f < kFrags; ++f) wmma::fill_fragment(acc[f], 0.0f);
}

// Calls out(row0 + r, col0 + c, value) for each element (r, c) of a 16 x 16 accumulator,
// lanes on consecutive columns, through stage (this warp's 16 x 16 floats of shared memory,
// 32-byte aligned).
template <typename Out>
__device__ __forceinline__ void for_each_element(const FragC& frag, float* stage, int64_t row0,
                                                 int64_t col0, Out out) {
  wmma::store_matrix_sync(stage, frag, 16, wmma::mem_row_major);
  __syncwarp();
  for (int e = threadIdx.x % 32; e < 16 * 16; e += 32) {
    out(row0 + e / 16, col0 + e % 16, stage[e]);
  }
  __syncwarp();  // stage is rewritten by the next call
}
#endif  // SNL_TF32_MMA

// Whether Delta[i][j] is exactly 0 because zero vectors meet (marked by negative inverse norms):
// A_T[i][j] = 0 when teacher vector i or j is zero, A_S[i][j] likewise, and the reference's
// sign(0) = 0 there. The difference form sums +-x . y terms that cancel only up to the order
// of the sums (and FMA contraction), and a stray sign would move an l1 gradient by the 1 / eps
// of a clamped norm. r*_i: inverse norms of row i, r*_j: of column j.
__device__ __forceinline__ bool zero_pair(float rt_i, float rs_i, float rt_j, float rs_j) {
  return (rt_i < 0.0f || rt_j < 0.0f) && (rs_i < 0.0f || rs_j < 0.0f);
}

// One kChunk step of acc[i][j] += A_S[k][i] B_D[k][j] + A_D[k][i] B_T[k][j] for the outputs
// (ty + 16 i, tx + 16 j), tile = [A_S, A_D, B_D, B_T][k][column].
__device__ __forceinline__ void delta_chunk_fma(const float (*tile)[kChunk][kTilePad],
                                                float (&acc)[kSub][kSub]) {
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll 4
  for (int k = 0; k < kChunk; ++k) {
    float as[kSub], ad[kSub], bd[kSub], bt[kSub];
#pragma unroll
    for (int i = 0; i < kSub; ++i) {
      as[i] = tile[0][k][ty + 16 * i];
      ad[i] = tile[1][k][ty + 16 * i];
      bd[i] = tile[2][k][tx + 16 * i];
      bt[i] = tile[3][k][tx + 16 * i];
    }
#pragma unroll
    for (int i = 0; i < kSub; ++i) {
#pragma unroll
      for (int j = 0; j < kSub; ++j) acc[i][j] += as[i] * bd[j] + ad[i] * bt[j];
    }
  }
}

// Stores entry (k, col) of the operands of delta_chunk_fma (delta_chunk_mma with kTf32) from
// the student / teacher values of a row (xs_r, xt_r) and of a column (xs_c, xt_c): A_S = xs_r,
// A_D = xs_r - xt_r, B_D = xs_c - xt_c, B_T = xt_c.
template <bool kTf32 = false>
__device__ __forceinline__ void store_delta_operands(float (*tile)[kChunk][kRowOf<kTf32>], int k,
                                                     int col, float xs_r, float xt_r, float xs_c,
                                                     float xt_c) {
  tile[0][k][col] = tf32_operand<kTf32>(xs_r);
  tile[1][k][col] = tf32_operand<kTf32>(xs_r - xt_r);
  tile[2][k][col] = tf32_operand<kTf32>(xs_c - xt_c);
  tile[3][k][col] = tf32_operand<kTf32>(xt_c);
}

#if SNL_TF32_MMA
// delta_chunk_fma on tensor cores: acc[f] += A_S^T B_D + A_D^T B_T for the warp's fragments.
__device__ __forceinline__ void delta_chunk_mma(const float (*tile)[kChunk][kMmaRow],
                                                FragC (&acc)[2]) {
#pragma unroll
  for (int k = 0; k < kChunk; k += kMmaK) {
    FragA as, ad;
    wmma::load_matrix_sync(as, &tile[0][k][warp_row()], kMmaRow);
    wmma::load_matrix_sync(ad, &tile[1][k][warp_row()], kMmaRow);
#pragma unroll
    for (int f = 0; f < 2; ++f) {
      FragB bd, bt;
      wmma::load_matrix_sync(bd, &tile[2][k][warp_col() + 16 * f], kMmaRow);
      wmma::load_matrix_sync(bt, &tile[3][k][warp_col() + 16 * f], kMmaRow);
      wmma::mma_sync(acc[f], as, bd, acc[f]);
      wmma::mma_sync(acc[f], ad, bt, acc[f]);
    }
  }
}
#endif  // SNL_TF32_MMA

// The block's tile of a (rows x pixels) product out[bb, row, n] on the grid (row tiles x
// n_pixel_tiles, samples): sample bb = blockIdx.y (b = b0 + bb), rows row0 .. + kTile - 1,
// pixels n0 .. + kTile - 1; each thread loads the pixel operands of one pixel, n = n0 + p.
struct RowPixelBlock {
  int64_t bb, b, row0, n0;
  int p;
  int64_t n;
  bool valid_n;

  __device__ __forceinline__ RowPixelBlock(int64_t b0, int64_t n_pixel_tiles, int64_t N)
      : bb(blockIdx.y),
        b(b0 + bb),
        row0((blockIdx.x / n_pixel_tiles) * kTile),
        n0((blockIdx.x % n_pixel_tiles) * kTile),
        p(threadIdx.x % kTile),
        n(n0 + p),
        valid_n(n < N) {}
};

// ---- One output tile, in either kind of product ----

// acc[i][j] += a[i] b[j]: one rank-1 update of an fp32 register tile.
template <int kI>
__device__ __forceinline__ void outer_fma(float (&acc)[kI][kSub], const float (&a)[kI],
                                          const float (&b)[kSub]) {
#pragma unroll
  for (int i = 0; i < kI; ++i) {
#pragma unroll
    for (int j = 0; j < kSub; ++j) acc[i][j] += a[i] * b[j];
  }
}

// acc[i][j] += a[k][ty + 16 i] b[k][tx + 16 j] over the kChunk rows k of shared tiles a and b:
// the fp32 FMA register tile (ty = t / 16, tx = t % 16 for thread t).
template <int kI, int kRowA, int kRowB>
__device__ __forceinline__ void chunk_fma(const float (*a)[kRowA], const float (*b)[kRowB],
                                          float (&acc)[kI][kSub]) {
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll 4
  for (int k = 0; k < kChunk; ++k) {
    float av[kI], bv[kSub];
#pragma unroll
    for (int i = 0; i < kI; ++i) av[i] = a[k][ty + 16 * i];
#pragma unroll
    for (int j = 0; j < kSub; ++j) bv[j] = b[k][tx + 16 * j];
    outer_fma(acc, av, bv);
  }
}

// out(row0 + ty + 16 i, col0 + tx + 16 j, acc[i][j]) for each value of an fp32 register tile
// laid out as chunk_fma's.
template <int kI, typename Out>
__device__ __forceinline__ void for_each_register(const float (&acc)[kI][kSub], int64_t row0,
                                                  int64_t col0, Out out) {
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
  for (int i = 0; i < kI; ++i) {
#pragma unroll
    for (int j = 0; j < kSub; ++j) out(row0 + ty + 16 * i, col0 + tx + 16 * j, acc[i][j]);
  }
}

// A kTile x kTile output tile accumulated from shared operand tiles, a[k][row] and b[k][column]
// (add_chunk: A^T B over one kChunk) or the four Delta operands (add_delta_chunk), in fp32 FMA
// registers (kMma = false: thread t holds rows t / 16 + 16 i, columns t % 16 + 16 j) or in
// TF32 WMMA fragments (kMma = true: warp w holds rows warp_row() .. + 15, columns warp_col()
// .. + 31; operands stored rounded by tf32_operand<true>, rows kRowOf<true> wide). Either kind
// holds kElems values per thread: elementwise work between tiles of one kind (elem) needs no
// indices; for_each(stage, row0, col0, out) calls out(row0 + r, col0 + c, value) for each
// output it holds (fragments go through stage: the warp's 16 x 16 floats of shared memory);
// fragments also store() to shared memory directly.
template <bool kMma>
struct TileAcc;

template <>
struct TileAcc<false> {
  static constexpr int kElems = kSub * kSub;
  float v[kSub][kSub] = {};

  __device__ __forceinline__ float& elem(int e) { return v[e / kSub][e % kSub]; }

  template <int kRowA, int kRowB>
  __device__ __forceinline__ void add_chunk(const float (*a)[kRowA], const float (*b)[kRowB]) {
    chunk_fma(a, b, v);
  }
  __device__ __forceinline__ void add_delta_chunk(const float (*tile)[kChunk][kTilePad]) {
    delta_chunk_fma(tile, v);
  }
  template <typename Out>
  __device__ __forceinline__ void for_each(float* /*stage*/, int64_t row0, int64_t col0,
                                           Out out) const {
    for_each_register(v, row0, col0, out);
  }
};

#if SNL_TF32_MMA
template <>
struct TileAcc<true> {
  static constexpr int kElems = 2 * FragC::num_elements;
  FragC f[2];

  __device__ __forceinline__ TileAcc() { zero_fragments(f); }

  __device__ __forceinline__ float& elem(int e) {
    return f[e / FragC::num_elements].x[e % FragC::num_elements];
  }

  template <int kRowA, int kRowB>
  __device__ __forceinline__ void add_chunk(const float (*a)[kRowA], const float (*b)[kRowB]) {
#pragma unroll
    for (int k = 0; k < kChunk; k += kMmaK) {
      FragA fa;
      wmma::load_matrix_sync(fa, &a[k][warp_row()], kRowA);
#pragma unroll
      for (int g = 0; g < 2; ++g) {
        FragB fb;
        wmma::load_matrix_sync(fb, &b[k][warp_col() + 16 * g], kRowB);
        wmma::mma_sync(f[g], fa, fb, f[g]);
      }
    }
  }
  __device__ __forceinline__ void add_delta_chunk(const float (*tile)[kChunk][kMmaRow]) {
    delta_chunk_mma(tile, f);
  }
  // Stores the tile at dst (row width ldm, 32-byte aligned rows of 16-float multiples).
  __device__ __forceinline__ void store(float* dst, int ldm) const {
#pragma unroll
    for (int g = 0; g < 2; ++g) {
      wmma::store_matrix_sync(dst + warp_row() * ldm + warp_col() + 16 * g, f[g], ldm,
                              wmma::mem_row_major);
    }
  }
  template <typename Out>
  __device__ __forceinline__ void for_each(float* stage, int64_t row0, int64_t col0,
                                           Out out) const {
#pragma unroll
    for (int g = 0; g < 2; ++g) {
      for_each_element(f[g], stage, row0 + warp_row(), col0 + warp_col() + 16 * g, out);
    }
  }
};
#endif  // SNL_TF32_MMA

}  // namespace
}  // namespace snl
