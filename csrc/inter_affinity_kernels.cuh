// Inter-affinity kernels (math: snl_kernels/inter_affinity_loss.py): row norms of the pooled and
// plain levels, Delta tiles (loss partials or dL/dDelta), the row gradients, the normalisation
// and pooling backward. Shared tile code: affinity_tiles.cuh.
#pragma once

#include "affinity_tiles.cuh"

namespace snl {
namespace {

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
  const int kk = threadIdx.x % kChunk;
  // inv_p / inv_q: (2, B, C): teacher, then student.
  const float* rp_t = inv_p + b * Ca;
  const float* rp_s = inv_p + (B + b) * Ca;
  const float* rq_t = inv_q + b * Cb;
  const float* rq_s = inv_q + (B + b) * Cb;

  TileAcc<false> acc;  // -Delta
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
    acc.add_delta_chunk(tile);
    __syncthreads();
  }
  if (kBackward) {
    const float g_scale = grad_loss[0] * scale;
    acc.for_each(nullptr, i0, j0, [&](int64_t ci, int64_t cj, float value) {
      if (ci >= Ca || cj >= Cb) return;
      const bool zero = kL1 && zero_pair(rp_t[ci], rp_s[ci], rq_t[cj], rq_s[cj]);
      grad[(blockIdx.y * Ca + ci) * Cb + cj] = zero ? 0.0f : delta_grad<kL1>(-value, g_scale);
    });
  } else {
    float v = 0.0f;
    acc.for_each(nullptr, i0, j0, [&](int64_t ci, int64_t cj, float value) {
      if (kL1 && ci < Ca && cj < Cb && zero_pair(rp_t[ci], rp_s[ci], rq_t[cj], rq_s[cj])) return;
      v += delta_loss<kL1>(value);
    });
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
  const RowPixelBlock blk(b0, n_pixel_tiles, N);
  const int64_t bb = blk.bb, b = blk.b;
  const float* a = grad + bb * a_sb;
  const float* rinv = inv_norm + b * K;

  TileAcc<false> acc;
  for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
#pragma unroll
    for (int e = 0; e < kTile * kChunk / kThreads; ++e) {
      const int ka = threadIdx.x % kChunk;
      const int ri = threadIdx.x / kChunk + e * (kThreads / kChunk);
      const int64_t r = blk.row0 + ri, k = k0 + ka;
      a_tile[ka][ri] = r < R && k < K ? a[r * a_sr + k * a_sk] : 0.0f;
      const int kx = threadIdx.x / kTile + e * (kThreads / kTile);
      const int64_t kxx = k0 + kx;
      x_tile[kx][blk.p] = blk.valid_n && kxx < K ? src.value(b, kxx, blk.n) * rinv[kxx] : 0.0f;
    }
    __syncthreads();
    acc.add_chunk(a_tile, x_tile);
    __syncthreads();
  }
  acc.for_each(nullptr, blk.row0, blk.n0, [&](int64_t r, int64_t nj, float value) {
    if (r < R && nj < N) out[(bb * R + r) * N + nj] = sign * value;
  });
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
