// The launch sequences of the affinity ops: which kernels run, on which grids, over which chunks
// of the batch, given the inputs and the scratch buffers the host has allocated. No ATen here:
// csrc/affinity.cu calls these with a launcher that starts CUDA kernels on the current stream,
// and tests/cuda_emulation with one that runs them on the CPU, so both run the same sequence.
//
// A launcher is called as launch(kernel, grid_x, grid_y, args...) with int64 grid sizes, for
// kThreads-thread blocks.
#pragma once

#include <algorithm>
#include <cstdint>

#include "inter_affinity_kernels.cuh"
#include "intra_affinity_kernels.cuh"

namespace snl {
namespace {

// Samples per backward chunk such that the chunk's scratch stays within kScratchBytes.
inline int64_t samples_per_chunk(int64_t B, int64_t bytes_per_sample) {
  int64_t chunk =
      bytes_per_sample > 0 ? std::max<int64_t>(1, kScratchBytes / bytes_per_sample) : B;
  chunk = std::min({chunk, B, kMaxGridY});
  const int64_t n_chunks = ceil_div(B, chunk);
  return ceil_div(B, n_chunks);  // balanced chunks
}

// How a tiled intra-affinity call runs (the C x C Gram path is csrc/gram_host.h's): products in
// fp32 FMA or on tensor cores (tf32 WMMA). Decided by the caller (snl_kernels/precision.py).
struct IntraPlan {
  int64_t B, C, N;
  bool l1, mma;

  int64_t n_tiles() const { return ceil_div(N, kTile); }
  // Floats of the forward's scratch: inverse norms (B, 2, N) and per-tile partials.
  int64_t inv_norm_floats() const { return B * 2 * N; }
  int64_t partial_floats() const { return B * n_tiles() * n_tiles(); }
};

template <typename scalar_t, typename Launch>
void launch_pixel_inv_norm(const Launch& launch, const Feature<scalar_t>& t,
                           const Feature<scalar_t>& s, int64_t B, int64_t C, int64_t N,
                           float* inv_norm) {
  for (int64_t b0 = 0; b0 < B; b0 += kMaxGridY) {
    launch(pixel_inv_norm_kernel<scalar_t>, ceil_div(N, 32), std::min(B - b0, kMaxGridY), t, s,
           b0, C, N, inv_norm);
  }
}

template <typename Launch>
void launch_sum(const Launch& launch, const float* partials, int64_t count, double scale,
                float* out) {
  launch(sum_partials_kernel, 1, 1, partials, count, scale, out);
}

// loss = sum Delta^2 / M or sum |Delta| / M. inv_norm: plan.inv_norm_floats(), partials:
// plan.partial_floats(), loss: 1 float.
template <typename scalar_t, typename Launch>
void intra_forward(const Launch& launch, const IntraPlan& plan, const Feature<scalar_t>& t,
                   const Feature<scalar_t>& s, float* inv_norm, float* partials, float* loss) {
  const int64_t B = plan.B, C = plan.C, N = plan.N, n_tiles = plan.n_tiles();
  launch_pixel_inv_norm(launch, t, s, B, C, N, inv_norm);
  for (int64_t b0 = 0; b0 < B; b0 += kMaxGridY) {
    const int64_t gx = n_tiles * n_tiles, gy = std::min(B - b0, kMaxGridY);
    if (plan.l1) {
      launch(intra_tiled_fwd_kernel<scalar_t, true, false>, gx, gy, t, s, inv_norm, b0, C, N,
             n_tiles, partials);
    } else if (plan.mma) {
      launch(intra_tiled_fwd_kernel<scalar_t, false, true>, gx, gy, t, s, inv_norm, b0, C, N,
             n_tiles, partials);
    } else {
      launch(intra_tiled_fwd_kernel<scalar_t, false, false>, gx, gy, t, s, inv_norm, b0, C, N,
             n_tiles, partials);
    }
  }
  launch_sum(launch, partials, plan.partial_floats(), 1.0 / (static_cast<double>(B) * N * N),
             loss);
}

// Scratch of the intra backward, in floats, for chunks of `chunk` samples.
struct IntraBackwardScratch {
  int64_t chunk;      // samples per chunk
  int64_t dx_floats;  // fp16/bf16 inputs: fp32 gradients (n_halves, chunk, C, N)
};

inline IntraBackwardScratch intra_backward_scratch(const IntraPlan& plan, bool direct,
                                                   bool with_teacher) {
  const int64_t C = plan.C, N = plan.N;
  const int64_t n_halves = with_teacher ? 2 : 1;
  const int64_t bytes_per_sample = direct ? 0 : n_halves * C * N * 4;
  const int64_t chunk = samples_per_chunk(plan.B, bytes_per_sample);
  return {chunk, direct ? 0 : n_halves * chunk * C * N};
}

// Gradients (B, C, N) contiguous of the student (grad_s) and, when grad_t is not null, of the
// teacher. direct: fp32 gradients are accumulated straight into grad_s / grad_t (float32
// inputs), else through dx_scratch. grad_loss: 1 float (device).
template <typename scalar_t, typename Launch>
void intra_backward(const Launch& launch, const IntraPlan& plan, const Feature<scalar_t>& t,
                    const Feature<scalar_t>& s, const float* grad_loss, float* inv_norm,
                    const IntraBackwardScratch& scratch, float* dx_scratch,
                    scalar_t* grad_s, scalar_t* grad_t) {
  const int64_t B = plan.B, C = plan.C, N = plan.N, chunk = scratch.chunk;
  const bool with_teacher = grad_t != nullptr, direct = scratch.dx_floats == 0;
  const double M = static_cast<double>(B) * N * N;
  launch_pixel_inv_norm(launch, t, s, B, C, N, inv_norm);
  for (int64_t b0 = 0; b0 < B; b0 += chunk) {
    const int64_t nb = std::min(chunk, B - b0);
    float* dx_s = direct ? reinterpret_cast<float*>(grad_s) + b0 * C * N : dx_scratch;
    float* dx_t = nullptr;
    if (with_teacher) {
      dx_t = direct ? reinterpret_cast<float*>(grad_t) + b0 * C * N : dx_scratch + chunk * C * N;
    }
    const int64_t n_tiles = ceil_div(N, kTile);
    const int64_t gx = n_tiles * ceil_div(C, kBwdChannels);
    const float scale = static_cast<float>((plan.l1 ? 1.0 : 2.0) / M);
    if (plan.l1) {
      launch(intra_tiled_bwd_kernel<scalar_t, true, false>, gx, nb, t, s, inv_norm, grad_loss,
             scale, b0, C, N, n_tiles, dx_s, dx_t);
    } else if (plan.mma) {
      launch(intra_tiled_bwd_kernel<scalar_t, false, true>, gx, nb, t, s, inv_norm, grad_loss,
             scale, b0, C, N, n_tiles, dx_s, dx_t);
    } else {
      launch(intra_tiled_bwd_kernel<scalar_t, false, false>, gx, nb, t, s, inv_norm, grad_loss,
             scale, b0, C, N, n_tiles, dx_s, dx_t);
    }
    const int64_t norm_gx = ceil_div(N, 32);
    launch(pixel_normalize_bwd_kernel<scalar_t>, norm_gx, nb, s, dx_s, b0, C, N, grad_s);
    if (with_teacher) {
      launch(pixel_normalize_bwd_kernel<scalar_t>, norm_gx, nb, t, dx_t, b0, C, N, grad_t);
    }
  }
}

// How an inter-affinity call runs (its products are fp32 FMA).
struct InterPlan {
  int64_t B, Ca, Cb, N;
  bool l1;

  int64_t n_row_tiles() const { return ceil_div(Ca, kTile); }
  int64_t n_col_tiles() const { return ceil_div(Cb, kTile); }
  // Floats of the scratch: inverse norms inv_p (2, B, C_a), inv_q (2, B, C_b), partials.
  int64_t inv_p_floats() const { return 2 * B * Ca; }
  int64_t inv_q_floats() const { return 2 * B * Cb; }
  int64_t partial_floats() const { return B * n_row_tiles() * n_col_tiles(); }
};

// Inverse row norms of (P_T, P_S) and (Q_T, Q_S): inv_p (2, B, C_a), inv_q (2, B, C_b).
template <typename scalar_t, typename Launch>
void launch_inter_inv_norms(const Launch& launch, const InterPlan& plan,
                            const PooledFeature<scalar_t>& pa_t,
                            const PooledFeature<scalar_t>& pa_s, const Feature<scalar_t>& q_t,
                            const Feature<scalar_t>& q_s, float* inv_p, float* inv_q) {
  const int64_t B = plan.B, Ca = plan.Ca, Cb = plan.Cb, N = plan.N;
  launch(row_inv_norm_kernel<PooledFeature<scalar_t>>, B * Ca, 1, pa_t, Ca, N, inv_p);
  launch(row_inv_norm_kernel<PooledFeature<scalar_t>>, B * Ca, 1, pa_s, Ca, N, inv_p + B * Ca);
  launch(row_inv_norm_kernel<Feature<scalar_t>>, B * Cb, 1, q_t, Cb, N, inv_q);
  launch(row_inv_norm_kernel<Feature<scalar_t>>, B * Cb, 1, q_s, Cb, N, inv_q + B * Cb);
}

template <typename scalar_t, typename Launch>
void inter_forward(const Launch& launch, const InterPlan& plan,
                   const PooledFeature<scalar_t>& pa_t, const PooledFeature<scalar_t>& pa_s,
                   const Feature<scalar_t>& q_t, const Feature<scalar_t>& q_s, float* inv_p,
                   float* inv_q, float* partials, float* loss) {
  using Pooled = PooledFeature<scalar_t>;
  using Plain = Feature<scalar_t>;
  const int64_t B = plan.B, Ca = plan.Ca, Cb = plan.Cb, N = plan.N;
  const int64_t n_col_tiles = plan.n_col_tiles();
  launch_inter_inv_norms(launch, plan, pa_t, pa_s, q_t, q_s, inv_p, inv_q);
  for (int64_t b0 = 0; b0 < B; b0 += kMaxGridY) {
    const int64_t gx = plan.n_row_tiles() * n_col_tiles, gy = std::min(B - b0, kMaxGridY);
    const float* no_grad = nullptr;
    float* no_out = nullptr;
    if (plan.l1) {
      launch(inter_delta_kernel<Pooled, Plain, true, false>, gx, gy, pa_t, pa_s, q_t, q_s, inv_p,
             inv_q, no_grad, 0.0f, b0, B, Ca, Cb, N, n_col_tiles, partials, no_out);
    } else {
      launch(inter_delta_kernel<Pooled, Plain, false, false>, gx, gy, pa_t, pa_s, q_t, q_s,
             inv_p, inv_q, no_grad, 0.0f, b0, B, Ca, Cb, N, n_col_tiles, partials, no_out);
    }
  }
  launch_sum(launch, partials, plan.partial_floats(), 1.0 / (static_cast<double>(B) * Ca * Cb),
             loss);
}

// Scratch of the inter backward, in floats, for chunks of `chunk` samples: grad = dL/dDelta
// (chunk, C_a, C_b), grad_p = dL/dP^ (chunk, C_a, N) for one of student / teacher at a time,
// and for fp16/bf16 inputs grad_q (chunk, C_b, N) (fp32 ones go straight to the outputs).
struct InterBackwardScratch {
  int64_t chunk, grad_floats, grad_p_floats, grad_q_floats;
};

inline InterBackwardScratch inter_backward_scratch(const InterPlan& plan, bool direct) {
  const int64_t Ca = plan.Ca, Cb = plan.Cb, N = plan.N;
  const int64_t bytes_per_sample = (Ca * Cb + Ca * N + (direct ? 0 : Cb * N)) * 4;
  const int64_t chunk = samples_per_chunk(plan.B, bytes_per_sample);
  return {chunk, chunk * Ca * Cb, chunk * Ca * N, direct ? 0 : chunk * Cb * N};
}

// Gradients, contiguous: grad_a_* (B, C_a, H_a, W_a), grad_b_* (B, C_b, N); the teacher's
// only when grad_a_t is not null.
template <typename scalar_t, typename Launch>
void inter_backward(const Launch& launch, const InterPlan& plan,
                    const PooledFeature<scalar_t>& pa_t, const PooledFeature<scalar_t>& pa_s,
                    const Feature<scalar_t>& q_t, const Feature<scalar_t>& q_s,
                    const float* grad_loss, float* inv_p, float* inv_q,
                    const InterBackwardScratch& scratch, float* grad, float* grad_p,
                    float* grad_q, scalar_t* grad_a_t, scalar_t* grad_b_t, scalar_t* grad_a_s,
                    scalar_t* grad_b_s) {
  using Pooled = PooledFeature<scalar_t>;
  using Plain = Feature<scalar_t>;
  const int64_t B = plan.B, Ca = plan.Ca, Cb = plan.Cb, N = plan.N, chunk = scratch.chunk;
  const int64_t Ha = pa_t.Ha, Wa = pa_t.Wa;
  const int64_t n_row_tiles = plan.n_row_tiles(), n_col_tiles = plan.n_col_tiles();
  const int64_t n_pixel_tiles = ceil_div(N, kTile);
  const bool with_teacher = grad_a_t != nullptr, direct = scratch.grad_q_floats == 0;
  const double M = static_cast<double>(B) * Ca * Cb;
  const float scale = static_cast<float>((plan.l1 ? 1.0 : 2.0) / M);
  launch_inter_inv_norms(launch, plan, pa_t, pa_s, q_t, q_s, inv_p, inv_q);
  float* no_partials = nullptr;

  for (int64_t b0 = 0; b0 < B; b0 += chunk) {
    const int64_t nb = std::min(chunk, B - b0);
    const int64_t gx = n_row_tiles * n_col_tiles;
    if (plan.l1) {
      launch(inter_delta_kernel<Pooled, Plain, true, true>, gx, nb, pa_t, pa_s, q_t, q_s, inv_p,
             inv_q, grad_loss, scale, b0, B, Ca, Cb, N, n_col_tiles, no_partials, grad);
    } else {
      launch(inter_delta_kernel<Pooled, Plain, false, true>, gx, nb, pa_t, pa_s, q_t, q_s, inv_p,
             inv_q, grad_loss, scale, b0, B, Ca, Cb, N, n_col_tiles, no_partials, grad);
    }
    // Student: dP^_S = -grad Q^_S, dQ^_S = -grad^T P^_S; teacher: the same with sign +1.
    for (int side = 0; side < (with_teacher ? 2 : 1); ++side) {
      const bool student_side = side == 0;
      const float sign = student_side ? -1.0f : 1.0f;
      const Pooled& pa = student_side ? pa_s : pa_t;
      const Plain& q = student_side ? q_s : q_t;
      const float* rp_side = inv_p + (student_side ? B * Ca : 0);
      const float* rq_side = inv_q + (student_side ? B * Cb : 0);
      scalar_t* out_a = student_side ? grad_a_s : grad_a_t;
      scalar_t* out_b_chunk = (student_side ? grad_b_s : grad_b_t) + b0 * Cb * N;
      float* gq = direct ? reinterpret_cast<float*>(out_b_chunk) : grad_q;
      launch(inter_row_grad_kernel<Plain>, n_row_tiles * n_pixel_tiles, nb, grad, Ca * Cb, Cb,
             int64_t{1}, q, rq_side, sign, b0, Ca, Cb, N, n_pixel_tiles, grad_p);
      launch(inter_row_grad_kernel<Pooled>, n_col_tiles * n_pixel_tiles, nb, grad, Ca * Cb,
             int64_t{1}, Cb, pa, rp_side, sign, b0, Cb, Ca, N, n_pixel_tiles, gq);
      launch(row_normalize_bwd_kernel<Pooled, float>, nb * Ca, 1, pa, grad_p, b0 * Ca, Ca, N,
             grad_p);
      launch(row_normalize_bwd_kernel<Plain, scalar_t>, nb * Cb, 1, q, gq, b0 * Cb, Cb, N,
             out_b_chunk);
      const int64_t total = nb * Ca * Ha * Wa;
      const int64_t blocks = std::min<int64_t>(ceil_div(total, kThreads), int64_t{1} << 20);
      launch(pool_bwd_kernel<scalar_t>, blocks, 1, grad_p, total, Ha, Wa, pa_t.Hb, pa_t.Wb,
             out_a + b0 * Ca * Ha * Wa);
    }
  }
}

}  // namespace
}  // namespace snl
