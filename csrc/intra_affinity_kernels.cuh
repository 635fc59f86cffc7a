// Intra-affinity kernels (math and paths: snl_kernels/intra_affinity_loss.py): per-pixel norms,
// the C x C Gram path and the tiled Delta path, forward and backward, each in fp32 FMA and (l2)
// TF32 WMMA, and the normalisation backward. Shared tile code: affinity_tiles.cuh.
#pragma once

#include "affinity_tiles.cuh"

namespace snl {
namespace {

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

}  // namespace
}  // namespace snl
