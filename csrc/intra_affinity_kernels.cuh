// Intra-affinity kernels (math and paths: snl_kernels/intra_affinity_loss.py): per-pixel norms,
// the tiled Delta path, forward and backward, in fp32 FMA and (l2) TF32 WMMA, and the
// normalisation backward. The C x C Gram path's products run on cuBLAS (csrc/gram_host.h).
// Shared tile code: affinity_tiles.cuh.
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

// The block's pair of kTile-pixel tiles (tI, tJ) of sample b = b0 + blockIdx.y on the grid
// (n_tiles^2, samples) of the forward kernels, and its partial sum. A pair below the diagonal
// is counted by its mirror: below_diagonal() zeroes its partial, and the block returns.
struct TilePair {
  int64_t b, tI, tJ;
  float* partial;

  __device__ __forceinline__ TilePair(int64_t b0, int64_t n_tiles, float* partials)
      : b(b0 + blockIdx.y),
        tI(blockIdx.x / n_tiles),
        tJ(blockIdx.x % n_tiles),
        partial(partials + b * n_tiles * n_tiles + blockIdx.x) {}

  __device__ __forceinline__ bool below_diagonal() const {
    if (tI <= tJ) return false;
    if (threadIdx.x == 0) *partial = 0.0f;
    return true;
  }
};

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
// sample over all channels, reduced on chip. Delta is symmetric: tiles I <= J only. kMma (l2
// only): the products on tensor cores. l1 stays on FMA: its gradient sign(Delta) flips where
// tf32 rounding moves a small Delta across zero.
template <typename scalar_t, bool kL1, bool kMma>
__global__ void __launch_bounds__(kThreads) intra_tiled_fwd_kernel(
    Feature<scalar_t> teacher, Feature<scalar_t> student, const float* __restrict__ inv_norm,
    int64_t b0, int64_t C, int64_t N, int64_t n_tiles, float* __restrict__ partials) {
  static_assert(!(kL1 && kMma), "l1 runs on FMA");
  if constexpr (kMma && !kHasTf32Mma) {
    __trap();  // launched only on sm_80 and newer
  } else {
    // [X_S rows I, D rows I, D cols J, X_T cols J][channel][pixel]
    __shared__ __align__(32) float tile[4][kChunk][kRowOf<kMma>];
    const TilePair pair(b0, n_tiles, partials);
    if (pair.below_diagonal()) return;
    const int64_t b = pair.b, tI = pair.tI, tJ = pair.tJ;
    const int p = threadIdx.x % kTile;
    const PixelRef pi = pixel_ref(teacher, student, inv_norm, b, tI * kTile + p, N);
    const PixelRef pj = pixel_ref(teacher, student, inv_norm, b, tJ * kTile + p, N);
    TileAcc<kMma> acc;
    accumulate_delta_tile<kMma>(teacher, student, C, pi, pj, tile,
                                [&] { acc.add_delta_chunk(tile); });
    // acc = -Delta; entries outside N x N are sums of zeros.
    float v = 0.0f;
    if constexpr (kL1) {
      acc.for_each(nullptr, tI * kTile, tJ * kTile, [&](int64_t ni, int64_t nj, float value) {
        if (ni < N && nj < N && zero_pixel_pair(inv_norm, b, N, ni, nj)) return;
        v += delta_loss<true>(value);
      });
    } else {
#pragma unroll
      for (int e = 0; e < TileAcc<kMma>::kElems; ++e) v += delta_loss<false>(acc.elem(e));
    }
    const float total = block_sum(v);
    if (threadIdx.x == 0) *pair.partial = (tI == tJ ? 1.0f : 2.0f) * total;
  }
}

// Tiled backward, phase 2: dX_S = -2 X_S G and dX_T = 2 X_T G for a block's kBwdChannels x
// kTile outputs (channels c_base .., pixels i0 ..), accumulated over the kChunk pixels of J in
// x[0] (X_S), x[1] (X_T) ([pixel][channel] shared tiles) and g (rows of G[j][i] from jc on).
// fp32 FMA (thread t: channels t / 16 + 16 i, pixels t % 16 + 16 j) or TF32 WMMA (warp w:
// channels 16 w .. + 15, all kTile pixels, 4 fragments per operand).
template <bool kMma>
struct ChannelGradAcc;

template <>
struct ChannelGradAcc<false> {
  float s[kBwdSub][kSub] = {}, t[kBwdSub][kSub] = {};

  template <int kXRow, int kGRow>
  __device__ __forceinline__ void add_chunk(const float (*x)[kChunk][kXRow],
                                            const float (*g)[kGRow], bool with_teacher) {
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll 4
    for (int k = 0; k < kChunk; ++k) {
      float gv[kSub];
#pragma unroll
      for (int j = 0; j < kSub; ++j) gv[j] = g[k][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < kBwdSub; ++i) {
        const float xs = x[0][k][ty + 16 * i];
#pragma unroll
        for (int j = 0; j < kSub; ++j) s[i][j] += xs * gv[j];
      }
      if (with_teacher) {
#pragma unroll
        for (int i = 0; i < kBwdSub; ++i) {
          const float xt = x[1][k][ty + 16 * i];
#pragma unroll
          for (int j = 0; j < kSub; ++j) t[i][j] += xt * gv[j];
        }
      }
    }
  }
  // out(c, n, value) for the student's (which = 0) or the teacher's (1) outputs.
  template <typename Out>
  __device__ __forceinline__ void for_each(float* /*stage*/, int which, int64_t c_base,
                                           int64_t i0, Out out) const {
    for_each_register(which == 0 ? s : t, c_base, i0, out);
  }
};

#if SNL_TF32_MMA
template <>
struct ChannelGradAcc<true> {
  static constexpr int kPixelFrags = kTile / 16;
  static_assert(kBwdChannels == 16 * kWarps, "one 16-channel row of fragments per warp");
  FragC s[kPixelFrags], t[kPixelFrags];

  __device__ __forceinline__ ChannelGradAcc() {
    zero_fragments(s);
    zero_fragments(t);
  }

  template <int kXRow, int kGRow>
  __device__ __forceinline__ void add_chunk(const float (*x)[kChunk][kXRow],
                                            const float (*g)[kGRow], bool with_teacher) {
    const int warp = threadIdx.x / 32;
#pragma unroll
    for (int k = 0; k < kChunk; k += kMmaK) {
      FragB gf[kPixelFrags];
#pragma unroll
      for (int f = 0; f < kPixelFrags; ++f) wmma::load_matrix_sync(gf[f], &g[k][16 * f], kGRow);
      FragA xf;
      wmma::load_matrix_sync(xf, &x[0][k][16 * warp], kXRow);
#pragma unroll
      for (int f = 0; f < kPixelFrags; ++f) wmma::mma_sync(s[f], xf, gf[f], s[f]);
      if (with_teacher) {
        wmma::load_matrix_sync(xf, &x[1][k][16 * warp], kXRow);
#pragma unroll
        for (int f = 0; f < kPixelFrags; ++f) wmma::mma_sync(t[f], xf, gf[f], t[f]);
      }
    }
  }
  template <typename Out>
  __device__ __forceinline__ void for_each(float* stage, int which, int64_t c_base, int64_t i0,
                                           Out out) const {
    const int warp = threadIdx.x / 32;
#pragma unroll
    for (int f = 0; f < kPixelFrags; ++f) {
      for_each_element(which == 0 ? s[f] : t[f], stage, c_base + 16 * warp, i0 + 16 * f, out);
    }
  }
};
#endif  // SNL_TF32_MMA

// Tiled path, backward. Block = pixels I x kBwdChannels channels of one sample. For each pixel
// block J: recompute the Delta tile (J x I) over all C, G = dL/dDelta into shared memory, then
// dX_S[c, I] += -2 X_S[c, J] G[J, I] and dX_T[c, I] += 2 X_T[c, J] G[J, I] (G is symmetric).
// dx_s / dx_t: (chunk, C, N) fp32, before the normalisation backward; dx_t may be null. kMma
// (l2 only): both phases on tensor cores, G rounded to tf32 as it is stored.
template <typename scalar_t, bool kL1, bool kMma>
__global__ void __launch_bounds__(kThreads) intra_tiled_bwd_kernel(
    Feature<scalar_t> teacher, Feature<scalar_t> student, const float* __restrict__ inv_norm,
    const float* __restrict__ grad_loss, float scale, int64_t b0, int64_t C, int64_t N,
    int64_t n_tiles, float* dx_s, float* dx_t) {
  static_assert(!(kL1 && kMma), "l1 runs on FMA");
  if constexpr (kMma && !kHasTf32Mma) {
    __trap();  // launched only on sm_80 and newer
  } else {
    // Phase 1: [X_S rows J, D rows J, D cols I, X_T cols I][channel][pixel].
    // Phase 2: [X_S, X_T][pixel of J (kChunk)][channel (kBwdChannels + padding)], same storage.
    constexpr int kRow = kRowOf<kMma>;
    constexpr int kXRow = kBwdChannels + (kMma ? kMmaPad : kPad);
    constexpr int kGRow = kMma ? kMmaRow : kTile;
    __shared__ __align__(32) float tile[4 * kChunk * kRow];
    __shared__ __align__(32) float grad[kTile][kGRow];  // G[j][i]
    __shared__ __align__(32) float stage[kMma ? kWarps : 1][kMma ? 16 * 16 : 1];
    static_assert(2 * kChunk * kXRow <= 4 * kChunk * kRow, "phase 2 tiles must fit");
    float(*delta_tile)[kChunk][kRow] = reinterpret_cast<float(*)[kChunk][kRow]>(tile);
    float(*x_tile)[kChunk][kXRow] = reinterpret_cast<float(*)[kChunk][kXRow]>(tile);

    const bool with_teacher = dx_t != nullptr;
    const int64_t bb = blockIdx.y, b = b0 + bb;
    const int64_t i0 = (blockIdx.x % n_tiles) * kTile;
    const int64_t c_base = (blockIdx.x / n_tiles) * kBwdChannels;
    const float g_scale = grad_loss[0] * scale;

    // Phase 1 loads: a fixed pixel of I (and of J) per thread.
    const int p = threadIdx.x % kTile;
    const PixelRef pi = pixel_ref(teacher, student, inv_norm, b, i0 + p, N);
    // Phase 2 loads: a fixed pixel offset within each kChunk of J per thread.
    const int jj = threadIdx.x % kChunk;

    ChannelGradAcc<kMma> out_acc;
    for (int64_t j0 = 0; j0 < N; j0 += kTile) {
      const PixelRef pj = pixel_ref(teacher, student, inv_norm, b, j0 + p, N);
      TileAcc<kMma> acc;  // -Delta[j][i]
      accumulate_delta_tile<kMma>(teacher, student, C, pj, pi, delta_tile,
                                  [&] { acc.add_delta_chunk(delta_tile); });
      if constexpr (kMma) {
        // G = g_scale Delta, elementwise, then rounded: it is phase 2's B operand. Entries
        // outside N x N are sums of zeros, so G is 0 there without a mask.
#pragma unroll
        for (int e = 0; e < TileAcc<kMma>::kElems; ++e) {
          acc.elem(e) = tf32_operand<true>(delta_grad<false>(-acc.elem(e), g_scale));
        }
        acc.store(&grad[0][0], kGRow);
      } else {
        acc.for_each(nullptr, j0, i0, [&](int64_t nj, int64_t ni, float value) {
          const bool valid =
              nj < N && ni < N && !(kL1 && zero_pixel_pair(inv_norm, b, N, nj, ni));
          grad[nj - j0][ni - i0] = valid ? delta_grad<kL1>(-value, g_scale) : 0.0f;
        });
      }

      for (int64_t jc = 0; jc < kTile; jc += kChunk) {
        const PixelRef pc = pixel_ref(teacher, student, inv_norm, b, j0 + jc + jj, N);
        __syncthreads();  // previous readers of tile (and writers of grad) are done
#pragma unroll
        for (int e = 0; e < kBwdChannels * kChunk / kThreads; ++e) {
          const int ci = threadIdx.x / kChunk + e * (kThreads / kChunk);
          const int64_t c = c_base + ci;
          const bool valid = pc.valid && c < C;
          x_tile[0][jj][ci] = tf32_operand<kMma>(valid ? student.at(pc.off_s, c) * pc.rs : 0.0f);
          if (with_teacher) {
            x_tile[1][jj][ci] =
                tf32_operand<kMma>(valid ? teacher.at(pc.off_t, c) * pc.rt : 0.0f);
          }
        }
        __syncthreads();
        out_acc.add_chunk(x_tile, &grad[jc], with_teacher);
      }
      __syncthreads();  // tile and grad are rewritten for the next J
    }
    float* my_stage = stage[kMma ? threadIdx.x / 32 : 0];
    out_acc.for_each(my_stage, 0, c_base, i0, [&](int64_t c, int64_t n, float value) {
      if (c < C && n < N) dx_s[(bb * C + c) * N + n] = -2.0f * value;
    });
    if (with_teacher) {
      out_acc.for_each(my_stage, 1, c_base, i0, [&](int64_t c, int64_t n, float value) {
        if (c < C && n < N) dx_t[(bb * C + c) * N + n] = 2.0f * value;
      });
    }
  }
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
