// Device code of csrc/affinity.cu: the intra- and inter-affinity kernels and their helpers. No
// ATen or torch header here, so tests/cuda_emulation can compile this file for the CPU; the host
// launchers and the op registration are in csrc/affinity.cu.
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
// (tf32_operand): the tensor cores would otherwise drop their low 13 bits, a truncation whose
// bias moves the l2 loss by ~1e-3; rounded, the errors are unbiased (loss ~1e-5, gradients
// ~5e-4). Accumulation is fp32, in a fixed order. Which fragment element a lane holds is
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

#if SNL_TF32_MMA
// Contraction depth of one m16n16k8 tf32 product.
constexpr int kMmaK = 8;
constexpr int kWarps = kThreads / 32;
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

// acc[f] += A B over one kChunk for the warp's fragments, A = a[k][row], B = b[k][column]
// (shared, row width kRow, rows k of the chunk).
template <int kRow>
__device__ __forceinline__ void warp_chunk_mma(const float* a, const float* b, FragC (&acc)[2]) {
#pragma unroll
  for (int k = 0; k < kChunk; k += kMmaK) {
    FragA fa;
    wmma::load_matrix_sync(fa, a + k * kRow + warp_row(), kRow);
#pragma unroll
    for (int f = 0; f < 2; ++f) {
      FragB fb;
      wmma::load_matrix_sync(fb, b + k * kRow + warp_col() + 16 * f, kRow);
      wmma::mma_sync(acc[f], fa, fb, acc[f]);
    }
  }
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

// ---- Intra-affinity: per-pixel normalisation ----

// inv_norm (B, 2, N): 1 / max(|F[b, :, n]|, eps) of teacher (0) and student (1), negated for a
// vector that is exactly zero (x = f r is 0 all the same; the sign marks it for zero_pair).
// Block = 32 pixels x 8 channel groups; lanes take consecutive pixels.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) pixel_inv_norm_kernel(
    Feature<scalar_t> teacher, Feature<scalar_t> student, int64_t b0, int64_t C, int64_t N,
    float* __restrict__ inv_norm) {
  __shared__ float sums[2][8][32];
  __shared__ float biggest[2][8][32];
  const int lane = threadIdx.x % 32, group = threadIdx.x / 32;
  const int64_t b = b0 + blockIdx.y;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * 32 + lane;
  float tt = 0.0f, ss = 0.0f, t_max = 0.0f, s_max = 0.0f;
  if (n < N) {
    const int64_t off_t = teacher.pixel_offset(b, n), off_s = student.pixel_offset(b, n);
    for (int64_t c = group; c < C; c += 8) {
      const float t = teacher.at(off_t, c), s = student.at(off_s, c);
      tt += t * t;
      ss += s * s;
      t_max = fmaxf(t_max, fabsf(t));
      s_max = fmaxf(s_max, fabsf(s));
    }
  }
  sums[0][group][lane] = tt;
  sums[1][group][lane] = ss;
  biggest[0][group][lane] = t_max;
  biggest[1][group][lane] = s_max;
  __syncthreads();
  if (threadIdx.x < 64 && n < N) {
    const int which = threadIdx.x / 32;
    float total = 0.0f, largest = 0.0f;
    for (int g = 0; g < 8; ++g) {
      total += sums[which][g][lane];
      largest = fmaxf(largest, biggest[which][g][lane]);
    }
    const float r = 1.0f / fmaxf(sqrtf(total), kEps);
    inv_norm[(b * 2 + which) * N + n] = largest == 0.0f ? -r : r;
  }
}

// Whether Delta[i][j] is exactly 0 because zero vectors meet (marked by negative inverse norms):
// A_T[i][j] = 0 when teacher vector i or j is zero, A_S[i][j] likewise, and the reference's
// sign(0) = 0 there. The difference form sums +-x . y terms that cancel only up to the order
// of the sums (and FMA contraction), and a stray sign would move an l1 gradient by the 1 / eps
// of a clamped norm. r*_i: inverse norms of row i, r*_j: of column j.
__device__ __forceinline__ bool zero_pair(float rt_i, float rs_i, float rt_j, float rs_j) {
  return (rt_i < 0.0f || rt_j < 0.0f) && (rs_i < 0.0f || rs_j < 0.0f);
}

// zero_pair for pixels i and j (< N) of sample b, from inv_norm (B, 2, N).
__device__ __forceinline__ bool zero_pixel_pair(const float* __restrict__ inv_norm, int64_t b,
                                                int64_t N, int64_t i, int64_t j) {
  const float* rt = inv_norm + b * 2 * N;
  return zero_pair(rt[i], rt[N + i], rt[j], rt[N + j]);
}

// Rows of the stacked operands: X_S, X_T, or D = X_S - X_T (formed in fp32 from the normalised
// values, so its rounding error scales with the difference).
enum Stack : int { kS = 0, kT = 1, kD = 2 };

template <typename scalar_t>
__device__ __forceinline__ float stacked_value(int kind, const Feature<scalar_t>& teacher,
                                               const Feature<scalar_t>& student, int64_t off_t,
                                               int64_t off_s, int64_t c, float rt, float rs) {
  if (kind == kS) return student.at(off_s, c) * rs;
  if (kind == kT) return teacher.at(off_t, c) * rt;
  return student.at(off_s, c) * rs - teacher.at(off_t, c) * rt;
}

// Gram path: stores pixels n0 .. n0 + kChunk of the operands of channel blocks I (side 0) and
// J (side 1), tile[S, T, D][side][pixel][channel]; rounded to tf32 for the tensor-core kernel.
// Thread t loads pixel n0 + t % kChunk.
template <bool kTf32, typename scalar_t>
__device__ __forceinline__ void store_gram_operands(
    const Feature<scalar_t>& teacher, const Feature<scalar_t>& student, const float* rt_row,
    const float* rs_row, int64_t b, int64_t n0, int64_t tI, int64_t tJ, int64_t C, int64_t N,
    float (*tile)[2][kChunk][kRowOf<kTf32>]) {
  const int kk = threadIdx.x % kChunk;
  const int64_t n = n0 + kk;
  const bool valid_n = n < N;
  const int64_t off_t = valid_n ? teacher.pixel_offset(b, n) : 0;
  const int64_t off_s = valid_n ? student.pixel_offset(b, n) : 0;
  const float rt = valid_n ? rt_row[n] : 0.0f, rs = valid_n ? rs_row[n] : 0.0f;
#pragma unroll
  for (int e = 0; e < kTile * kChunk / kThreads; ++e) {
    const int ci = threadIdx.x / kChunk + e * (kThreads / kChunk);
#pragma unroll
    for (int side = 0; side < 2; ++side) {
      const int64_t c = (side == 0 ? tI : tJ) * kTile + ci;
      float xs = 0.0f, xt = 0.0f;
      if (valid_n && c < C) {
        xs = student.at(off_s, c) * rs;
        xt = teacher.at(off_t, c) * rt;
      }
      tile[kS][side][kk][ci] = tf32_operand<kTf32>(xs);
      tile[kT][side][kk][ci] = tf32_operand<kTf32>(xt);
      tile[kD][side][kk][ci] = tf32_operand<kTf32>(xs - xt);
    }
  }
}

// Gram path, forward (l2, C < N). Tile (I, J) of the C x C Grams of one sample, accumulated over
// pixels: ||Delta||^2 = <G_SS + G_TT, G_DD> + 2 <G_SD, G_DT>. Only tiles I <= J run: G_SS, G_TT
// and G_DD are symmetric, so an off-diagonal tile counts twice in the first sum; the second is
// not symmetric tile by tile, so the tile also forms the mirror's G_SD[J, I] = G_DS[I, J] and
// G_DT[J, I] = G_TD[I, J].
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) intra_gram_fwd_kernel(
    Feature<scalar_t> teacher, Feature<scalar_t> student, const float* __restrict__ inv_norm,
    int64_t b0, int64_t C, int64_t N, int64_t n_tiles, float* __restrict__ partials) {
  // [operand: S, T, D][side: rows I, cols J][pixel][channel]
  __shared__ float tile[3][2][kChunk][kTilePad];
  const int64_t b = b0 + blockIdx.y;
  const int64_t tI = blockIdx.x / n_tiles, tJ = blockIdx.x % n_tiles;
  float* partial = partials + b * n_tiles * n_tiles + blockIdx.x;
  if (tI > tJ) {
    if (threadIdx.x == 0) *partial = 0.0f;
    return;
  }
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const float* rt_row = inv_norm + b * 2 * N;
  const float* rs_row = rt_row + N;

  const bool mirror = tI < tJ;
  float ss[kSub][kSub] = {}, tt[kSub][kSub] = {}, dd[kSub][kSub] = {};
  float sd[kSub][kSub] = {}, dt[kSub][kSub] = {}, ds[kSub][kSub] = {}, td[kSub][kSub] = {};
  for (int64_t n0 = 0; n0 < N; n0 += kChunk) {
    store_gram_operands<false>(teacher, student, rt_row, rs_row, b, n0, tI, tJ, C, N, tile);
    __syncthreads();
#pragma unroll 4
    for (int k = 0; k < kChunk; ++k) {
      float as[kSub], at_[kSub], ad[kSub], bs[kSub], bt[kSub], bd[kSub];
#pragma unroll
      for (int i = 0; i < kSub; ++i) {
        as[i] = tile[kS][0][k][ty + 16 * i];
        at_[i] = tile[kT][0][k][ty + 16 * i];
        ad[i] = tile[kD][0][k][ty + 16 * i];
        bs[i] = tile[kS][1][k][tx + 16 * i];
        bt[i] = tile[kT][1][k][tx + 16 * i];
        bd[i] = tile[kD][1][k][tx + 16 * i];
      }
#pragma unroll
      for (int i = 0; i < kSub; ++i) {
#pragma unroll
        for (int j = 0; j < kSub; ++j) {
          ss[i][j] += as[i] * bs[j];
          tt[i][j] += at_[i] * bt[j];
          dd[i][j] += ad[i] * bd[j];
          sd[i][j] += as[i] * bd[j];
          dt[i][j] += ad[i] * bt[j];
        }
      }
      if (mirror) {
#pragma unroll
        for (int i = 0; i < kSub; ++i) {
#pragma unroll
          for (int j = 0; j < kSub; ++j) {
            ds[i][j] += ad[i] * bs[j];
            td[i][j] += at_[i] * bd[j];
          }
        }
      }
    }
    __syncthreads();
  }
  // Entries outside C x C are sums of zeros: no mask needed.
  const float weight = mirror ? 2.0f : 1.0f;
  float v = 0.0f;
#pragma unroll
  for (int i = 0; i < kSub; ++i) {
#pragma unroll
    for (int j = 0; j < kSub; ++j) {
      v += weight * (ss[i][j] + tt[i][j]) * dd[i][j] +
           2.0f * (sd[i][j] * dt[i][j] + ds[i][j] * td[i][j]);
    }
  }
  const float total = block_sum(v);
  if (threadIdx.x == 0) *partial = total;
}

// Gram path, backward step 1: stores pixels n0 .. n0 + kChunk of U = [X_S; X_T] rows u0 .. and
// V = [X_S; D] rows v0 .. (u_tile / v_tile [pixel][row]); rounded to tf32 for the tensor-core
// kernel. Thread t loads pixel n0 + t % kChunk.
template <bool kTf32, typename scalar_t>
__device__ __forceinline__ void store_k_operands(
    const Feature<scalar_t>& teacher, const Feature<scalar_t>& student, const float* rt_row,
    const float* rs_row, int64_t b, int64_t n0, int64_t u0, int64_t v0, int64_t C, int64_t N,
    int64_t R, float (*u_tile)[kRowOf<kTf32>], float (*v_tile)[kRowOf<kTf32>]) {
  const int kk = threadIdx.x % kChunk;
  const int64_t n = n0 + kk;
  const bool valid_n = n < N;
  const int64_t off_t = valid_n ? teacher.pixel_offset(b, n) : 0;
  const int64_t off_s = valid_n ? student.pixel_offset(b, n) : 0;
  const float rt = valid_n ? rt_row[n] : 0.0f, rs = valid_n ? rs_row[n] : 0.0f;
#pragma unroll
  for (int e = 0; e < kTile * kChunk / kThreads; ++e) {
    const int ci = threadIdx.x / kChunk + e * (kThreads / kChunk);
    const int64_t u = u0 + ci, v = v0 + ci;
    u_tile[kk][ci] = tf32_operand<kTf32>(
        valid_n && u < R
            ? stacked_value(u < C ? kS : kT, teacher, student, off_t, off_s, u % C, rt, rs)
            : 0.0f);
    v_tile[kk][ci] = tf32_operand<kTf32>(
        valid_n && v < 2 * C
            ? stacked_value(v < C ? kS : kD, teacher, student, off_t, off_s, v % C, rt, rs)
            : 0.0f);
  }
}

// Gram path, backward step 1: K = U V^T over pixels, U = [X_S; X_T] (R = C or 2C rows: X_T only
// when the teacher gradient is asked for), V = [X_S; D] (2C rows). K (chunk, R, 2C).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) intra_gram_k_kernel(
    Feature<scalar_t> teacher, Feature<scalar_t> student, const float* __restrict__ inv_norm,
    int64_t b0, int64_t C, int64_t N, int64_t R, int64_t n_col_tiles, float* __restrict__ K) {
  __shared__ float u_tile[kChunk][kTilePad];
  __shared__ float v_tile[kChunk][kTilePad];
  const int64_t bb = blockIdx.y, b = b0 + bb;
  const int64_t u0 = (blockIdx.x / n_col_tiles) * kTile, v0 = (blockIdx.x % n_col_tiles) * kTile;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const float* rt_row = inv_norm + b * 2 * N;
  const float* rs_row = rt_row + N;

  float acc[kSub][kSub] = {};
  for (int64_t n0 = 0; n0 < N; n0 += kChunk) {
    store_k_operands<false>(teacher, student, rt_row, rs_row, b, n0, u0, v0, C, N, R, u_tile, v_tile);
    __syncthreads();
#pragma unroll 4
    for (int k = 0; k < kChunk; ++k) {
      float a[kSub], bv[kSub];
#pragma unroll
      for (int i = 0; i < kSub; ++i) {
        a[i] = u_tile[k][ty + 16 * i];
        bv[i] = v_tile[k][tx + 16 * i];
      }
#pragma unroll
      for (int i = 0; i < kSub; ++i) {
#pragma unroll
        for (int j = 0; j < kSub; ++j) acc[i][j] += a[i] * bv[j];
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < kSub; ++i) {
    const int64_t u = u0 + ty + 16 * i;
#pragma unroll
    for (int j = 0; j < kSub; ++j) {
      const int64_t v = v0 + tx + 16 * j;
      if (u < R && v < 2 * C) K[(bb * R + u) * 2 * C + v] = acc[i][j];
    }
  }
}

// Gram path, backward step 2: dX = K W over 2C, W = [D; X_T]. Rows u < C give
// dL/dX_S = g (4/M) (G_SS D + G_SD X_T); rows u >= C give dL/dX_T = -g (4/M) (G_TS D + G_TD X_T).
// dx_s / dx_t: (chunk, C, N) fp32, before the normalisation backward.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) intra_gram_dx_kernel(
    Feature<scalar_t> teacher, Feature<scalar_t> student, const float* __restrict__ inv_norm,
    const float* __restrict__ K, const float* __restrict__ grad_loss, float scale, int64_t b0,
    int64_t C, int64_t N, int64_t R, int64_t n_pixel_tiles, float* dx_s, float* dx_t) {
  __shared__ float k_tile[kChunk][kTilePad];
  __shared__ float w_tile[kChunk][kTile];
  const int64_t bb = blockIdx.y, b = b0 + bb;
  const int64_t u0 = (blockIdx.x / n_pixel_tiles) * kTile;
  const int64_t n0 = (blockIdx.x % n_pixel_tiles) * kTile;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  // W loads: a fixed pixel per thread, so its offsets and inverse norms are read once.
  const int p = threadIdx.x % kTile;
  const int64_t n = n0 + p;
  const bool valid_n = n < N;
  const int64_t off_t = valid_n ? teacher.pixel_offset(b, n) : 0;
  const int64_t off_s = valid_n ? student.pixel_offset(b, n) : 0;
  const float rt = valid_n ? inv_norm[b * 2 * N + n] : 0.0f;
  const float rs = valid_n ? inv_norm[(b * 2 + 1) * N + n] : 0.0f;
  const float* k_rows = K + bb * R * 2 * C;

  float acc[kSub][kSub] = {};
  for (int64_t v0 = 0; v0 < 2 * C; v0 += kChunk) {
#pragma unroll
    for (int e = 0; e < kTile * kChunk / kThreads; ++e) {
      // K tile: consecutive threads read consecutive v.
      const int kv = threadIdx.x % kChunk;
      const int ui = threadIdx.x / kChunk + e * (kThreads / kChunk);
      const int64_t u = u0 + ui, v = v0 + kv;
      k_tile[kv][ui] = u < R && v < 2 * C ? k_rows[u * 2 * C + v] : 0.0f;
      // W tile: consecutive threads read consecutive pixels.
      const int wv = threadIdx.x / kTile + e * (kThreads / kTile);
      const int64_t vw = v0 + wv;
      w_tile[wv][p] = valid_n && vw < 2 * C ? stacked_value(vw < C ? kD : kT, teacher, student,
                                                            off_t, off_s, vw % C, rt, rs)
                                            : 0.0f;
    }
    __syncthreads();
#pragma unroll 4
    for (int k = 0; k < kChunk; ++k) {
      float a[kSub], bw[kSub];
#pragma unroll
      for (int i = 0; i < kSub; ++i) {
        a[i] = k_tile[k][ty + 16 * i];
        bw[i] = w_tile[k][tx + 16 * i];
      }
#pragma unroll
      for (int i = 0; i < kSub; ++i) {
#pragma unroll
        for (int j = 0; j < kSub; ++j) acc[i][j] += a[i] * bw[j];
      }
    }
    __syncthreads();
  }
  const float coef = grad_loss[0] * scale;
#pragma unroll
  for (int i = 0; i < kSub; ++i) {
    const int64_t u = u0 + ty + 16 * i;
    if (u >= R) continue;
#pragma unroll
    for (int j = 0; j < kSub; ++j) {
      const int64_t nj = n0 + tx + 16 * j;
      if (nj >= N) continue;
      if (u < C) {
        dx_s[(bb * C + u) * N + nj] = coef * acc[i][j];
      } else {
        dx_t[(bb * C + u - C) * N + nj] = -coef * acc[i][j];
      }
    }
  }
}

// ---- Gram path on tensor cores: the kernels above, products in TF32 WMMA ----

// intra_gram_fwd_kernel's tile (I, J) on tensor cores: the same seven Gram blocks (the last two
// only off the diagonal), each warp two fragments of each.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) intra_gram_fwd_mma_kernel(
    Feature<scalar_t> teacher, Feature<scalar_t> student, const float* __restrict__ inv_norm,
    int64_t b0, int64_t C, int64_t N, int64_t n_tiles, float* __restrict__ partials) {
#if SNL_TF32_MMA
  // [operand: S, T, D][side: rows I, cols J][pixel][channel], tf32
  __shared__ __align__(32) float tile[3][2][kChunk][kMmaRow];
  const int64_t b = b0 + blockIdx.y;
  const int64_t tI = blockIdx.x / n_tiles, tJ = blockIdx.x % n_tiles;
  float* partial = partials + b * n_tiles * n_tiles + blockIdx.x;
  if (tI > tJ) {
    if (threadIdx.x == 0) *partial = 0.0f;
    return;
  }
  const float* rt_row = inv_norm + b * 2 * N;
  const float* rs_row = rt_row + N;
  const int row = warp_row(), col = warp_col();

  const bool mirror = tI < tJ;
  FragC ss[2], tt[2], dd[2], sd[2], dt[2], ds[2], td[2];
  zero_fragments(ss);
  zero_fragments(tt);
  zero_fragments(dd);
  zero_fragments(sd);
  zero_fragments(dt);
  zero_fragments(ds);
  zero_fragments(td);
  for (int64_t n0 = 0; n0 < N; n0 += kChunk) {
    store_gram_operands<true>(teacher, student, rt_row, rs_row, b, n0, tI, tJ, C, N, tile);
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kChunk; k += kMmaK) {
      FragA as, at_, ad;
      wmma::load_matrix_sync(as, &tile[kS][0][k][row], kMmaRow);
      wmma::load_matrix_sync(at_, &tile[kT][0][k][row], kMmaRow);
      wmma::load_matrix_sync(ad, &tile[kD][0][k][row], kMmaRow);
#pragma unroll
      for (int f = 0; f < 2; ++f) {
        FragB bs, bt, bd;
        wmma::load_matrix_sync(bs, &tile[kS][1][k][col + 16 * f], kMmaRow);
        wmma::load_matrix_sync(bt, &tile[kT][1][k][col + 16 * f], kMmaRow);
        wmma::load_matrix_sync(bd, &tile[kD][1][k][col + 16 * f], kMmaRow);
        wmma::mma_sync(ss[f], as, bs, ss[f]);
        wmma::mma_sync(tt[f], at_, bt, tt[f]);
        wmma::mma_sync(dd[f], ad, bd, dd[f]);
        wmma::mma_sync(sd[f], as, bd, sd[f]);
        wmma::mma_sync(dt[f], ad, bt, dt[f]);
        if (mirror) {
          wmma::mma_sync(ds[f], ad, bs, ds[f]);
          wmma::mma_sync(td[f], at_, bd, td[f]);
        }
      }
    }
    __syncthreads();
  }
  // Elementwise over fragments of one type (the same element order); entries outside C x C
  // are sums of zeros.
  const float weight = mirror ? 2.0f : 1.0f;
  float v = 0.0f;
#pragma unroll
  for (int f = 0; f < 2; ++f) {
#pragma unroll
    for (int e = 0; e < FragC::num_elements; ++e) {
      v += weight * (ss[f].x[e] + tt[f].x[e]) * dd[f].x[e] +
           2.0f * (sd[f].x[e] * dt[f].x[e] + ds[f].x[e] * td[f].x[e]);
    }
  }
  const float total = block_sum(v);
  if (threadIdx.x == 0) *partial = total;
#else
  __trap();  // launched only on sm_80 and newer (use_tensor_cores)
#endif
}

// intra_gram_k_kernel on tensor cores: K = U V^T over pixels.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) intra_gram_k_mma_kernel(
    Feature<scalar_t> teacher, Feature<scalar_t> student, const float* __restrict__ inv_norm,
    int64_t b0, int64_t C, int64_t N, int64_t R, int64_t n_col_tiles, float* __restrict__ K) {
#if SNL_TF32_MMA
  __shared__ __align__(32) float u_tile[kChunk][kMmaRow];
  __shared__ __align__(32) float v_tile[kChunk][kMmaRow];
  __shared__ __align__(32) float stage[kWarps][16 * 16];
  const int64_t bb = blockIdx.y, b = b0 + bb;
  const int64_t u0 = (blockIdx.x / n_col_tiles) * kTile, v0 = (blockIdx.x % n_col_tiles) * kTile;
  const float* rt_row = inv_norm + b * 2 * N;
  const float* rs_row = rt_row + N;

  FragC acc[2];
  zero_fragments(acc);
  for (int64_t n0 = 0; n0 < N; n0 += kChunk) {
    store_k_operands<true>(teacher, student, rt_row, rs_row, b, n0, u0, v0, C, N, R, u_tile, v_tile);
    __syncthreads();
    warp_chunk_mma<kMmaRow>(&u_tile[0][0], &v_tile[0][0], acc);
    __syncthreads();
  }
  float* k_rows = K + bb * R * 2 * C;
#pragma unroll
  for (int f = 0; f < 2; ++f) {
    for_each_element(acc[f], stage[threadIdx.x / 32], u0 + warp_row(), v0 + warp_col() + 16 * f,
                     [&](int64_t u, int64_t v, float value) {
                       if (u < R && v < 2 * C) k_rows[u * 2 * C + v] = value;
                     });
  }
#else
  __trap();  // launched only on sm_80 and newer (use_tensor_cores)
#endif
}

// intra_gram_dx_kernel on tensor cores: dX = K W over 2C, K rounded to tf32 as it is loaded.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) intra_gram_dx_mma_kernel(
    Feature<scalar_t> teacher, Feature<scalar_t> student, const float* __restrict__ inv_norm,
    const float* __restrict__ K, const float* __restrict__ grad_loss, float scale, int64_t b0,
    int64_t C, int64_t N, int64_t R, int64_t n_pixel_tiles, float* dx_s, float* dx_t) {
#if SNL_TF32_MMA
  __shared__ __align__(32) float k_tile[kChunk][kMmaRow];
  __shared__ __align__(32) float w_tile[kChunk][kMmaRow];
  __shared__ __align__(32) float stage[kWarps][16 * 16];
  const int64_t bb = blockIdx.y, b = b0 + bb;
  const int64_t u0 = (blockIdx.x / n_pixel_tiles) * kTile;
  const int64_t n0 = (blockIdx.x % n_pixel_tiles) * kTile;
  // W loads: a fixed pixel per thread, so its offsets and inverse norms are read once.
  const int p = threadIdx.x % kTile;
  const int64_t n = n0 + p;
  const bool valid_n = n < N;
  const int64_t off_t = valid_n ? teacher.pixel_offset(b, n) : 0;
  const int64_t off_s = valid_n ? student.pixel_offset(b, n) : 0;
  const float rt = valid_n ? inv_norm[b * 2 * N + n] : 0.0f;
  const float rs = valid_n ? inv_norm[(b * 2 + 1) * N + n] : 0.0f;
  const float* k_rows = K + bb * R * 2 * C;

  FragC acc[2];
  zero_fragments(acc);
  for (int64_t v0 = 0; v0 < 2 * C; v0 += kChunk) {
#pragma unroll
    for (int e = 0; e < kTile * kChunk / kThreads; ++e) {
      // K tile: consecutive threads read consecutive v.
      const int kv = threadIdx.x % kChunk;
      const int ui = threadIdx.x / kChunk + e * (kThreads / kChunk);
      const int64_t u = u0 + ui, v = v0 + kv;
      k_tile[kv][ui] = tf32_operand<true>(u < R && v < 2 * C ? k_rows[u * 2 * C + v] : 0.0f);
      // W tile: consecutive threads read consecutive pixels.
      const int wv = threadIdx.x / kTile + e * (kThreads / kTile);
      const int64_t vw = v0 + wv;
      w_tile[wv][p] = tf32_operand<true>(
          valid_n && vw < 2 * C
              ? stacked_value(vw < C ? kD : kT, teacher, student, off_t, off_s, vw % C, rt, rs)
              : 0.0f);
    }
    __syncthreads();
    warp_chunk_mma<kMmaRow>(&k_tile[0][0], &w_tile[0][0], acc);
    __syncthreads();
  }
  const float coef = grad_loss[0] * scale;
#pragma unroll
  for (int f = 0; f < 2; ++f) {
    for_each_element(acc[f], stage[threadIdx.x / 32], u0 + warp_row(), n0 + warp_col() + 16 * f,
                     [&](int64_t u, int64_t nj, float value) {
                       if (u >= R || nj >= N) return;
                       if (u < C) {
                         dx_s[(bb * C + u) * N + nj] = coef * value;
                       } else {
                         dx_t[(bb * C + u - C) * N + nj] = -coef * value;
                       }
                     });
  }
#else
  __trap();  // launched only on sm_80 and newer (use_tensor_cores)
#endif
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

// Pixel n of sample b: where teacher and student read it, and its inverse norms; all zero when
// n >= N.
struct PixelRef {
  bool valid;
  int64_t off_t, off_s;
  float rt, rs;
};

template <typename scalar_t>
__device__ __forceinline__ PixelRef pixel_ref(const Feature<scalar_t>& teacher,
                                              const Feature<scalar_t>& student,
                                              const float* __restrict__ inv_norm, int64_t b,
                                              int64_t n, int64_t N) {
  if (n >= N) return {false, 0, 0, 0.0f, 0.0f};
  const float* rt_row = inv_norm + b * 2 * N;
  return {true, teacher.pixel_offset(b, n), student.pixel_offset(b, n), rt_row[n], rt_row[N + n]};
}

// -Delta[row pixel][col pixel] of one sample over all C: X_S and D of the row pixel block times
// D and X_T of the column pixel block, accumulated by chunk_product() (delta_chunk_fma or
// delta_chunk_mma) once per kChunk channels stored in tile ([4][kChunk][kRowOf<kTf32>]
// shared). Thread t loads pixel t % kTile of both blocks (row: pr, column: pc).
template <bool kTf32, typename scalar_t, typename ChunkProduct>
__device__ __forceinline__ void accumulate_delta_tile(const Feature<scalar_t>& teacher,
                                                      const Feature<scalar_t>& student, int64_t C,
                                                      const PixelRef& pr, const PixelRef& pc,
                                                      float (*tile)[kChunk][kRowOf<kTf32>],
                                                      ChunkProduct chunk_product) {
  const int p = threadIdx.x % kTile;
  for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
#pragma unroll
    for (int e = 0; e < kTile * kChunk / kThreads; ++e) {
      const int kc = threadIdx.x / kTile + e * (kThreads / kTile);
      const int64_t c = c0 + kc;
      float xsr = 0.0f, xtr = 0.0f, xsc = 0.0f, xtc = 0.0f;
      if (c < C && pr.valid) {
        xsr = student.at(pr.off_s, c) * pr.rs;
        xtr = teacher.at(pr.off_t, c) * pr.rt;
      }
      if (c < C && pc.valid) {
        xsc = student.at(pc.off_s, c) * pc.rs;
        xtc = teacher.at(pc.off_t, c) * pc.rt;
      }
      store_delta_operands<kTf32>(tile, kc, p, xsr, xtr, xsc, xtc);
    }
    __syncthreads();
    chunk_product();
    __syncthreads();
  }
}

// Tiled path, forward (l1; l2 when N <= C). Tile (I, J) of Delta = -(X_S^T D + D^T X_T) of one
// sample over all channels, reduced on chip. Delta is symmetric: tiles I <= J only.
template <typename scalar_t, bool kL1>
__global__ void __launch_bounds__(kThreads) intra_tiled_fwd_kernel(
    Feature<scalar_t> teacher, Feature<scalar_t> student, const float* __restrict__ inv_norm,
    int64_t b0, int64_t C, int64_t N, int64_t n_tiles, float* __restrict__ partials) {
  // [X_S rows I, D rows I, D cols J, X_T cols J][channel][pixel]
  __shared__ float tile[4][kChunk][kTilePad];
  const int64_t b = b0 + blockIdx.y;
  const int64_t tI = blockIdx.x / n_tiles, tJ = blockIdx.x % n_tiles;
  float* partial = partials + b * n_tiles * n_tiles + blockIdx.x;
  if (tI > tJ) {
    if (threadIdx.x == 0) *partial = 0.0f;
    return;
  }
  const int p = threadIdx.x % kTile;
  const PixelRef pi = pixel_ref(teacher, student, inv_norm, b, tI * kTile + p, N);
  const PixelRef pj = pixel_ref(teacher, student, inv_norm, b, tJ * kTile + p, N);
  float acc[kSub][kSub] = {};
  accumulate_delta_tile<false>(teacher, student, C, pi, pj, tile,
                              [&] { delta_chunk_fma(tile, acc); });
  // acc = -Delta; entries outside N x N are sums of zeros.
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  float v = 0.0f;
#pragma unroll
  for (int i = 0; i < kSub; ++i) {
#pragma unroll
    for (int j = 0; j < kSub; ++j) {
      const int64_t ni = tI * kTile + ty + 16 * i, nj = tJ * kTile + tx + 16 * j;
      if (kL1 && ni < N && nj < N && zero_pixel_pair(inv_norm, b, N, ni, nj)) continue;
      v += delta_loss<kL1>(acc[i][j]);
    }
  }
  const float total = block_sum(v);
  if (threadIdx.x == 0) *partial = (tI == tJ ? 1.0f : 2.0f) * total;
}

// Tiled path, backward. Block = pixels I x kBwdChannels channels of one sample. For each pixel
// block J: recompute the Delta tile (J x I) over all C, G = dL/dDelta into shared memory, then
// dX_S[c, I] += -2 X_S[c, J] G[J, I] and dX_T[c, I] += 2 X_T[c, J] G[J, I] (G is symmetric).
// dx_s / dx_t: (chunk, C, N) fp32, before the normalisation backward; dx_t may be null.
template <typename scalar_t, bool kL1>
__global__ void __launch_bounds__(kThreads) intra_tiled_bwd_kernel(
    Feature<scalar_t> teacher, Feature<scalar_t> student, const float* __restrict__ inv_norm,
    const float* __restrict__ grad_loss, float scale, int64_t b0, int64_t C, int64_t N,
    int64_t n_tiles, float* dx_s, float* dx_t) {
  // Phase 1: [X_S rows J, D rows J, D cols I, X_T cols I][channel][pixel].
  // Phase 2: [X_S, X_T][pixel of J (kChunk)][channel (kBwdChannels + kPad)], same storage.
  constexpr int kXRow = kBwdChannels + kPad;
  __shared__ float tile[4 * kChunk * kTilePad];
  __shared__ float grad[kTile][kTile];  // G[j][i]
  static_assert(2 * kChunk * kXRow <= 4 * kChunk * kTilePad, "phase 2 tiles must fit");
  float(*delta_tile)[kChunk][kTilePad] = reinterpret_cast<float(*)[kChunk][kTilePad]>(tile);
  float(*x_tile)[kChunk][kXRow] = reinterpret_cast<float(*)[kChunk][kXRow]>(tile);

  const bool with_teacher = dx_t != nullptr;
  const int64_t bb = blockIdx.y, b = b0 + bb;
  const int64_t i0 = (blockIdx.x % n_tiles) * kTile;
  const int64_t c_base = (blockIdx.x / n_tiles) * kBwdChannels;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const float g_scale = grad_loss[0] * scale;

  // Phase 1 loads: a fixed pixel of I (and of J) per thread.
  const int p = threadIdx.x % kTile;
  const PixelRef pi = pixel_ref(teacher, student, inv_norm, b, i0 + p, N);
  // Phase 2 loads: a fixed pixel offset within each kChunk of J per thread.
  const int jj = threadIdx.x % kChunk;

  float acc_s[kBwdSub][kSub] = {}, acc_t[kBwdSub][kSub] = {};
  for (int64_t j0 = 0; j0 < N; j0 += kTile) {
    const PixelRef pj = pixel_ref(teacher, student, inv_norm, b, j0 + p, N);
    float acc[kSub][kSub] = {};  // -Delta[j][i]
    accumulate_delta_tile<false>(teacher, student, C, pj, pi, delta_tile,
                                 [&] { delta_chunk_fma(delta_tile, acc); });
#pragma unroll
    for (int i = 0; i < kSub; ++i) {
#pragma unroll
      for (int j = 0; j < kSub; ++j) {
        const int64_t nj = j0 + ty + 16 * i, ni = i0 + tx + 16 * j;
        const bool valid = nj < N && ni < N && !(kL1 && zero_pixel_pair(inv_norm, b, N, nj, ni));
        grad[ty + 16 * i][tx + 16 * j] = valid ? delta_grad<kL1>(-acc[i][j], g_scale) : 0.0f;
      }
    }

    for (int64_t jc = 0; jc < kTile; jc += kChunk) {
      const PixelRef pc = pixel_ref(teacher, student, inv_norm, b, j0 + jc + jj, N);
      __syncthreads();  // previous readers of tile (and writers of grad) are done
#pragma unroll
      for (int e = 0; e < kBwdChannels * kChunk / kThreads; ++e) {
        const int ci = threadIdx.x / kChunk + e * (kThreads / kChunk);
        const int64_t c = c_base + ci;
        const bool valid = pc.valid && c < C;
        x_tile[0][jj][ci] = valid ? student.at(pc.off_s, c) * pc.rs : 0.0f;
        if (with_teacher) x_tile[1][jj][ci] = valid ? teacher.at(pc.off_t, c) * pc.rt : 0.0f;
      }
      __syncthreads();
#pragma unroll 4
      for (int k = 0; k < kChunk; ++k) {
        float gv[kSub];
#pragma unroll
        for (int j = 0; j < kSub; ++j) gv[j] = grad[jc + k][tx + 16 * j];
#pragma unroll
        for (int i = 0; i < kBwdSub; ++i) {
          const float xs = x_tile[0][k][ty + 16 * i];
#pragma unroll
          for (int j = 0; j < kSub; ++j) acc_s[i][j] += xs * gv[j];
        }
        if (with_teacher) {
#pragma unroll
          for (int i = 0; i < kBwdSub; ++i) {
            const float xt = x_tile[1][k][ty + 16 * i];
#pragma unroll
            for (int j = 0; j < kSub; ++j) acc_t[i][j] += xt * gv[j];
          }
        }
      }
    }
    __syncthreads();  // tile and grad are rewritten for the next J
  }
#pragma unroll
  for (int i = 0; i < kBwdSub; ++i) {
    const int64_t c = c_base + ty + 16 * i;
    if (c >= C) continue;
#pragma unroll
    for (int j = 0; j < kSub; ++j) {
      const int64_t n = i0 + tx + 16 * j;
      if (n >= N) continue;
      dx_s[(bb * C + c) * N + n] = -2.0f * acc_s[i][j];
      if (with_teacher) dx_t[(bb * C + c) * N + n] = 2.0f * acc_t[i][j];
    }
  }
}

// ---- Tiled path for l2 on tensor cores (l1 stays on FMA: its gradient sign(Delta) flips where
// tf32 rounding moves a small Delta across zero) ----

// intra_tiled_fwd_kernel<scalar_t, false> on tensor cores.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) intra_tiled_fwd_mma_kernel(
    Feature<scalar_t> teacher, Feature<scalar_t> student, const float* __restrict__ inv_norm,
    int64_t b0, int64_t C, int64_t N, int64_t n_tiles, float* __restrict__ partials) {
#if SNL_TF32_MMA
  // [X_S rows I, D rows I, D cols J, X_T cols J][channel][pixel], tf32
  __shared__ __align__(32) float tile[4][kChunk][kMmaRow];
  const int64_t b = b0 + blockIdx.y;
  const int64_t tI = blockIdx.x / n_tiles, tJ = blockIdx.x % n_tiles;
  float* partial = partials + b * n_tiles * n_tiles + blockIdx.x;
  if (tI > tJ) {
    if (threadIdx.x == 0) *partial = 0.0f;
    return;
  }
  const int p = threadIdx.x % kTile;
  const PixelRef pi = pixel_ref(teacher, student, inv_norm, b, tI * kTile + p, N);
  const PixelRef pj = pixel_ref(teacher, student, inv_norm, b, tJ * kTile + p, N);
  FragC acc[2];
  zero_fragments(acc);
  accumulate_delta_tile<true>(teacher, student, C, pi, pj, tile,
                              [&] { delta_chunk_mma(tile, acc); });
  // acc = -Delta; entries outside N x N are sums of zeros.
  float v = 0.0f;
#pragma unroll
  for (int f = 0; f < 2; ++f) {
#pragma unroll
    for (int e = 0; e < FragC::num_elements; ++e) v += delta_loss<false>(acc[f].x[e]);
  }
  const float total = block_sum(v);
  if (threadIdx.x == 0) *partial = (tI == tJ ? 1.0f : 2.0f) * total;
#else
  __trap();  // launched only on sm_80 and newer (use_tensor_cores)
#endif
}

// intra_tiled_bwd_kernel<scalar_t, false> on tensor cores. Phase 1 as the forward; phase 2
// (dX_S = -2 X_S G, dX_T = 2 X_T G for the block's kBwdChannels x kTile outputs): warp w holds
// channels 16 w .. + 15 of every pixel column of I, 4 fragments per operand.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) intra_tiled_bwd_mma_kernel(
    Feature<scalar_t> teacher, Feature<scalar_t> student, const float* __restrict__ inv_norm,
    const float* __restrict__ grad_loss, float scale, int64_t b0, int64_t C, int64_t N,
    int64_t n_tiles, float* dx_s, float* dx_t) {
#if SNL_TF32_MMA
  // Phase 1: [X_S rows J, D rows J, D cols I, X_T cols I][channel][pixel].
  // Phase 2: [X_S, X_T][pixel of J (kChunk)][channel (kBwdChannels + kMmaPad)], same storage.
  // All tf32.
  constexpr int kXRow = kBwdChannels + kMmaPad;
  constexpr int kPixelFrags = kTile / 16;
  static_assert(kBwdChannels == 16 * kWarps, "phase 2: one 16-channel row of fragments per warp");
  __shared__ __align__(32) float tile[4 * kChunk * kMmaRow];
  __shared__ __align__(32) float grad[kTile][kMmaRow];  // G[j][i], tf32
  __shared__ __align__(32) float stage[kWarps][16 * 16];
  static_assert(2 * kChunk * kXRow <= 4 * kChunk * kMmaRow, "phase 2 tiles must fit");
  float(*delta_tile)[kChunk][kMmaRow] = reinterpret_cast<float(*)[kChunk][kMmaRow]>(tile);
  float(*x_tile)[kChunk][kXRow] = reinterpret_cast<float(*)[kChunk][kXRow]>(tile);

  const bool with_teacher = dx_t != nullptr;
  const int64_t bb = blockIdx.y, b = b0 + bb;
  const int64_t i0 = (blockIdx.x % n_tiles) * kTile;
  const int64_t c_base = (blockIdx.x / n_tiles) * kBwdChannels;
  const int warp = threadIdx.x / 32;
  const float g_scale = grad_loss[0] * scale;

  // Phase 1 loads: a fixed pixel of I (and of J) per thread.
  const int p = threadIdx.x % kTile;
  const PixelRef pi = pixel_ref(teacher, student, inv_norm, b, i0 + p, N);
  // Phase 2 loads: a fixed pixel offset within each kChunk of J per thread.
  const int jj = threadIdx.x % kChunk;

  FragC acc_s[kPixelFrags], acc_t[kPixelFrags];
  zero_fragments(acc_s);
  zero_fragments(acc_t);
  for (int64_t j0 = 0; j0 < N; j0 += kTile) {
    const PixelRef pj = pixel_ref(teacher, student, inv_norm, b, j0 + p, N);
    FragC acc[2];  // -Delta[j][i]
    zero_fragments(acc);
    accumulate_delta_tile<true>(teacher, student, C, pj, pi, delta_tile,
                                [&] { delta_chunk_mma(delta_tile, acc); });
    // G = dL/dDelta = g_scale Delta, elementwise, then rounded: it is phase 2's B operand.
    // Entries outside N x N are sums of zeros, so G is 0 there without a mask.
#pragma unroll
    for (int f = 0; f < 2; ++f) {
#pragma unroll
      for (int e = 0; e < FragC::num_elements; ++e) {
        acc[f].x[e] = tf32_operand<true>(delta_grad<false>(-acc[f].x[e], g_scale));
      }
      wmma::store_matrix_sync(&grad[warp_row()][warp_col() + 16 * f], acc[f], kMmaRow,
                              wmma::mem_row_major);
    }

    for (int64_t jc = 0; jc < kTile; jc += kChunk) {
      const PixelRef pc = pixel_ref(teacher, student, inv_norm, b, j0 + jc + jj, N);
      __syncthreads();  // previous readers of tile (and writers of grad) are done
#pragma unroll
      for (int e = 0; e < kBwdChannels * kChunk / kThreads; ++e) {
        const int ci = threadIdx.x / kChunk + e * (kThreads / kChunk);
        const int64_t c = c_base + ci;
        const bool valid = pc.valid && c < C;
        x_tile[0][jj][ci] = tf32_operand<true>(valid ? student.at(pc.off_s, c) * pc.rs : 0.0f);
        if (with_teacher) {
          x_tile[1][jj][ci] = tf32_operand<true>(valid ? teacher.at(pc.off_t, c) * pc.rt : 0.0f);
        }
      }
      __syncthreads();
#pragma unroll
      for (int k = 0; k < kChunk; k += kMmaK) {
        FragB g[kPixelFrags];
#pragma unroll
        for (int f = 0; f < kPixelFrags; ++f) {
          wmma::load_matrix_sync(g[f], &grad[jc + k][16 * f], kMmaRow);
        }
        FragA x;
        wmma::load_matrix_sync(x, &x_tile[0][k][16 * warp], kXRow);
#pragma unroll
        for (int f = 0; f < kPixelFrags; ++f) wmma::mma_sync(acc_s[f], x, g[f], acc_s[f]);
        if (with_teacher) {
          wmma::load_matrix_sync(x, &x_tile[1][k][16 * warp], kXRow);
#pragma unroll
          for (int f = 0; f < kPixelFrags; ++f) wmma::mma_sync(acc_t[f], x, g[f], acc_t[f]);
        }
      }
    }
    __syncthreads();  // tile and grad are rewritten for the next J
  }
#pragma unroll
  for (int f = 0; f < kPixelFrags; ++f) {
    const int64_t c0 = c_base + 16 * warp, n0 = i0 + 16 * f;
    for_each_element(acc_s[f], stage[warp], c0, n0, [&](int64_t c, int64_t n, float value) {
      if (c < C && n < N) dx_s[(bb * C + c) * N + n] = -2.0f * value;
    });
    if (with_teacher) {
      for_each_element(acc_t[f], stage[warp], c0, n0, [&](int64_t c, int64_t n, float value) {
        if (c < C && n < N) dx_t[(bb * C + c) * N + n] = 2.0f * value;
      });
    }
  }
#else
  __trap();  // launched only on sm_80 and newer (use_tensor_cores)
#endif
}

// Backward of x = f / max(|f|, eps) over channels, per pixel: df = r (dx - x (x . dx)), or r dx
// where the norm is clamped (a clamped norm has zero slope). dx (chunk, C, N) fp32; out
// (B, C, N) contiguous, may alias dx (each element is read, then written, by one thread).
// Block = 32 pixels x 8 channel groups, as pixel_inv_norm_kernel.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) pixel_normalize_bwd_kernel(
    Feature<scalar_t> f, const float* dx, int64_t b0, int64_t C, int64_t N, scalar_t* out) {
  __shared__ float sums[2][8][32];
  const int lane = threadIdx.x % 32, group = threadIdx.x / 32;
  const int64_t bb = blockIdx.y, b = b0 + bb;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * 32 + lane;
  const bool valid = n < N;
  const int64_t off = valid ? f.pixel_offset(b, n) : 0;
  const float* dx_col = dx + bb * C * N + n;
  scalar_t* out_col = out + b * C * N + n;
  float ff = 0.0f, fd = 0.0f;
  if (valid) {
    for (int64_t c = group; c < C; c += 8) {
      const float v = f.at(off, c);
      ff += v * v;
      fd += v * dx_col[c * N];
    }
  }
  sums[0][group][lane] = ff;
  sums[1][group][lane] = fd;
  __syncthreads();
  if (!valid) return;
  ff = 0.0f;
  fd = 0.0f;
  for (int g = 0; g < 8; ++g) {
    ff += sums[0][g][lane];
    fd += sums[1][g][lane];
  }
  const float norm = sqrtf(ff);
  const float r = 1.0f / fmaxf(norm, kEps);
  // x (x . dx) r = f r^3 (f . dx)
  const float k = norm > kEps ? r * r * r * fd : 0.0f;
  for (int64_t c = group; c < C; c += 8) {
    out_col[c * N] = static_cast<scalar_t>(r * dx_col[c * N] - k * f.at(off, c));
  }
}

// ---- Inter-affinity ----

// inv_norm (B, C): 1 / max(|row|, eps) of each channel's pooled (or plain) spatial vector,
// negated for a row that is exactly zero (see zero_pair). Block = one row.
template <typename Source>
__global__ void __launch_bounds__(kThreads) row_inv_norm_kernel(Source src, int64_t C, int64_t N,
                                                                float* __restrict__ inv_norm) {
  const int64_t row = blockIdx.x;
  const int64_t b = row / C, c = row % C;
  float ss = 0.0f, nonzero = 0.0f;
  for (int64_t n = threadIdx.x; n < N; n += kThreads) {
    const float v = src.value(b, c, n);
    ss += v * v;
    nonzero += v != 0.0f ? 1.0f : 0.0f;
  }
  const float total = block_sum(ss);
  const float nonzeros = block_sum(nonzero);
  if (threadIdx.x == 0) {
    const float r = 1.0f / fmaxf(sqrtf(total), kEps);
    inv_norm[row] = nonzeros == 0.0f ? -r : r;
  }
}

// Tile (I, J) of Delta = G_T - G_S = -(P^_S DQ^T + DP Q^_T^T) over N_b (C_a x C_b, one sample),
// DP = P^_S - P^_T, DQ = Q^_S - Q^_T. Forward: Delta^2 or |Delta| summed into partials.
// Backward: grad = dL/dDelta (chunk, C_a, C_b) of samples b0 + blockIdx.y.
template <typename SourceA, typename SourceB, bool kL1, bool kBackward>
__global__ void __launch_bounds__(kThreads) inter_delta_kernel(
    SourceA pa_t, SourceA pa_s, SourceB q_t, SourceB q_s, const float* __restrict__ inv_p,
    const float* __restrict__ inv_q, const float* __restrict__ grad_loss, float scale, int64_t b0,
    int64_t B, int64_t Ca, int64_t Cb, int64_t N, int64_t n_col_tiles,
    float* __restrict__ partials, float* __restrict__ grad) {
  // [P^_S rows, DP rows, DQ cols, Q^_T cols][pixel][channel]
  __shared__ float tile[4][kChunk][kTilePad];
  const int64_t b = b0 + blockIdx.y;
  const int64_t i0 = (blockIdx.x / n_col_tiles) * kTile, j0 = (blockIdx.x % n_col_tiles) * kTile;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int kk = threadIdx.x % kChunk;
  // inv_p / inv_q: (2, B, C): teacher, then student.
  const float* rp_t = inv_p + b * Ca;
  const float* rp_s = inv_p + (B + b) * Ca;
  const float* rq_t = inv_q + b * Cb;
  const float* rq_s = inv_q + (B + b) * Cb;

  float acc[kSub][kSub] = {};  // -Delta
  for (int64_t n0 = 0; n0 < N; n0 += kChunk) {
    const int64_t n = n0 + kk;
    const bool valid_n = n < N;
#pragma unroll
    for (int e = 0; e < kTile * kChunk / kThreads; ++e) {
      const int ci = threadIdx.x / kChunk + e * (kThreads / kChunk);
      const int64_t i = i0 + ci, j = j0 + ci;
      float ps = 0.0f, pt = 0.0f, qs = 0.0f, qt = 0.0f;
      if (valid_n && i < Ca) {
        ps = pa_s.value(b, i, n) * rp_s[i];
        pt = pa_t.value(b, i, n) * rp_t[i];
      }
      if (valid_n && j < Cb) {
        qs = q_s.value(b, j, n) * rq_s[j];
        qt = q_t.value(b, j, n) * rq_t[j];
      }
      store_delta_operands(tile, kk, ci, ps, pt, qs, qt);
    }
    __syncthreads();
    delta_chunk_fma(tile, acc);
    __syncthreads();
  }
  if (kBackward) {
    const float g_scale = grad_loss[0] * scale;
#pragma unroll
    for (int i = 0; i < kSub; ++i) {
      const int64_t ci = i0 + ty + 16 * i;
#pragma unroll
      for (int j = 0; j < kSub; ++j) {
        const int64_t cj = j0 + tx + 16 * j;
        if (ci < Ca && cj < Cb) {
          const bool zero = kL1 && zero_pair(rp_t[ci], rp_s[ci], rq_t[cj], rq_s[cj]);
          grad[(blockIdx.y * Ca + ci) * Cb + cj] = zero ? 0.0f : delta_grad<kL1>(-acc[i][j], g_scale);
        }
      }
    }
  } else {
    float v = 0.0f;
#pragma unroll
    for (int i = 0; i < kSub; ++i) {
      const int64_t ci = i0 + ty + 16 * i;
#pragma unroll
      for (int j = 0; j < kSub; ++j) {
        const int64_t cj = j0 + tx + 16 * j;
        if (kL1 && ci < Ca && cj < Cb && zero_pair(rp_t[ci], rp_s[ci], rq_t[cj], rq_s[cj])) {
          continue;
        }
        v += delta_loss<kL1>(acc[i][j]);
      }
    }
    const float total = block_sum(v);
    if (threadIdx.x == 0) partials[b * gridDim.x + blockIdx.x] = total;
  }
}

// out[bb, r, n] = sign * sum_k A[bb, r, k] X^[b, k, n], b = b0 + bb, A = grad (a_sr = C_b,
// a_sk = 1) or its transpose (a_sr = 1, a_sk = C_b), X^ = src rows scaled by inv_norm (B, K).
// grad (chunk, C_a, C_b) and out (chunk, R, N) fp32 start at sample b0.
template <typename Source>
__global__ void __launch_bounds__(kThreads) inter_row_grad_kernel(
    const float* __restrict__ grad, int64_t a_sb, int64_t a_sr, int64_t a_sk, Source src,
    const float* __restrict__ inv_norm, float sign, int64_t b0, int64_t R, int64_t K, int64_t N,
    int64_t n_pixel_tiles, float* out) {
  __shared__ float a_tile[kChunk][kTilePad];
  __shared__ float x_tile[kChunk][kTile];
  const int64_t bb = blockIdx.y, b = b0 + bb;
  const int64_t r0 = (blockIdx.x / n_pixel_tiles) * kTile;
  const int64_t n0 = (blockIdx.x % n_pixel_tiles) * kTile;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int p = threadIdx.x % kTile;
  const int64_t n = n0 + p;
  const bool valid_n = n < N;
  const float* a = grad + bb * a_sb;
  const float* rinv = inv_norm + b * K;

  float acc[kSub][kSub] = {};
  for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
#pragma unroll
    for (int e = 0; e < kTile * kChunk / kThreads; ++e) {
      const int ka = threadIdx.x % kChunk;
      const int ri = threadIdx.x / kChunk + e * (kThreads / kChunk);
      const int64_t r = r0 + ri, k = k0 + ka;
      a_tile[ka][ri] = r < R && k < K ? a[r * a_sr + k * a_sk] : 0.0f;
      const int kx = threadIdx.x / kTile + e * (kThreads / kTile);
      const int64_t kxx = k0 + kx;
      x_tile[kx][p] = valid_n && kxx < K ? src.value(b, kxx, n) * rinv[kxx] : 0.0f;
    }
    __syncthreads();
#pragma unroll 4
    for (int k = 0; k < kChunk; ++k) {
      float av[kSub], xv[kSub];
#pragma unroll
      for (int i = 0; i < kSub; ++i) {
        av[i] = a_tile[k][ty + 16 * i];
        xv[i] = x_tile[k][tx + 16 * i];
      }
#pragma unroll
      for (int i = 0; i < kSub; ++i) {
#pragma unroll
        for (int j = 0; j < kSub; ++j) acc[i][j] += av[i] * xv[j];
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < kSub; ++i) {
    const int64_t r = r0 + ty + 16 * i;
#pragma unroll
    for (int j = 0; j < kSub; ++j) {
      const int64_t nj = n0 + tx + 16 * j;
      if (r < R && nj < N) out[(bb * R + r) * N + nj] = sign * acc[i][j];
    }
  }
}

// Backward of x = v / max(|v|, eps) over each row's N pixels: dv = r (dx - x (x . dx)), or r dx
// where the norm is clamped. Block = one row, source row row0 + blockIdx.x. dx (rows, N) fp32;
// out (rows, N) contiguous, may alias dx (each element is read, then written, by one thread).
template <typename Source, typename out_t>
__global__ void __launch_bounds__(kThreads) row_normalize_bwd_kernel(Source src, const float* dx,
                                                                     int64_t row0, int64_t C,
                                                                     int64_t N, out_t* out) {
  const int64_t row = blockIdx.x;
  const int64_t b = (row0 + row) / C, c = (row0 + row) % C;
  const float* dx_row = dx + row * N;
  float vv = 0.0f, vd = 0.0f;
  for (int64_t n = threadIdx.x; n < N; n += kThreads) {
    const float v = src.value(b, c, n);
    vv += v * v;
    vd += v * dx_row[n];
  }
  vv = block_sum(vv);
  vd = block_sum(vd);
  __shared__ float row_coef[2];
  if (threadIdx.x == 0) {
    const float norm = sqrtf(vv);
    const float r = 1.0f / fmaxf(norm, kEps);
    row_coef[0] = r;
    row_coef[1] = norm > kEps ? r * r * r * vd : 0.0f;
  }
  __syncthreads();
  const float r = row_coef[0], k = row_coef[1];
  out_t* out_row = out + row * N;
  for (int64_t n = threadIdx.x; n < N; n += kThreads) {
    out_row[n] = static_cast<out_t>(r * dx_row[n] - k * src.value(b, c, n));
  }
}

// Backward of adaptive_avg_pool2d: each input pixel gathers dP / bin size from every output bin
// that contains it (bins may overlap). dp (B, C, Hb * Wb) fp32; out (B, C, Ha, Wa) contiguous.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) pool_bwd_kernel(const float* __restrict__ dp,
                                                            int64_t total, int64_t Ha, int64_t Wa,
                                                            int64_t Hb, int64_t Wb,
                                                            scalar_t* __restrict__ out) {
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t w = idx % Wa, h = (idx / Wa) % Ha, row = idx / (Ha * Wa);
    const float* dp_row = dp + row * Hb * Wb;
    // Candidate bins: oh in [floor(h Hb / Ha), ceil((h + 1) Hb / Ha)), then an exact test.
    const int64_t oh0 = h * Hb / Ha, ow0 = w * Wb / Wa;
    int64_t oh1 = ((h + 1) * Hb + Ha - 1) / Ha, ow1 = ((w + 1) * Wb + Wa - 1) / Wa;
    oh1 = oh1 < Hb ? oh1 : Hb;
    ow1 = ow1 < Wb ? ow1 : Wb;
    float sum = 0.0f;
    for (int64_t oh = oh0; oh < oh1; ++oh) {
      const int64_t h0 = oh * Ha / Hb, h1 = ((oh + 1) * Ha + Hb - 1) / Hb;
      if (h < h0 || h >= h1) continue;
      for (int64_t ow = ow0; ow < ow1; ++ow) {
        const int64_t w0 = ow * Wa / Wb, w1 = ((ow + 1) * Wa + Wb - 1) / Wb;
        if (w < w0 || w >= w1) continue;
        sum += dp_row[oh * Wb + ow] / static_cast<float>((h1 - h0) * (w1 - w0));
      }
    }
    out[idx] = static_cast<scalar_t>(sum);
  }
}

}  // namespace
}  // namespace snl
