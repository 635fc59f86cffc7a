// The host composition of snl::cram_fwd / _bwd (math: snl_kernels/cram.py): the products with
// the centres as batched matrix products (at::bmm: cuBLAS on a GPU, fp32 in and out), the
// per-position softmax steps between them through a Rows policy. csrc/cram.cu instantiates it
// with the CUDA row kernels of csrc/cram_kernels.cuh; csrc/cram_cpu.cpp with ATen ops, so that
// the composition (layouts, chunks, dtypes) is tested on machines without a GPU.
//
// Rows provides
//   forward(dist, e_sq, c_sq, log_tau, N, assign, compact): dist (P, K) holds e.c_k on entry
//     and d on exit; writes the softmax into assign (B, K, N) and the compactness (P);
//   backward(work, assign, dist, grad_assign, grad_compact, log_tau, N, delta_sum,
//     log_tau_terms): work (P, K) holds G_mu.c_k on entry and delta on exit; writes
//     sum_k delta (P) and each position's share of dL/dlog_tau (P).
// Every sum runs in a fixed order (the products' too, for a given GPU and library), no atomics.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "checks.h"
#include "cram_sizes.h"

namespace snl {
namespace cram_host {

inline void check_inputs(const at::Tensor& embedding, const at::Tensor& centers,
                         const at::Tensor& log_tau) {
  CHECK_DIM(embedding, 4);
  CHECK_FLOAT_DTYPE(embedding);
  CHECK_NONEMPTY(embedding);
  CHECK_SAME_DEVICE(centers, embedding);
  CHECK_DIM(centers, 2);
  CHECK_FLOAT_DTYPE(centers);
  const int64_t K = centers.size(0), D = embedding.size(1);
  TORCH_CHECK(K >= 1 && K <= kMaxK, "centers must hold 1 to ", int_text(kMaxK),
              " centres for the CUDA kernels, got K=", int_text(K));
  TORCH_CHECK(centers.size(1) == D, "centers must have width D=", int_text(D),
              " (the channels of embedding), got shape ", shape_text(centers.sizes()));
  CHECK_SAME_DEVICE(log_tau, embedding);
  TORCH_CHECK(log_tau.numel() == 1, "log_tau must hold one element, got shape ",
              shape_text(log_tau.sizes()));
  TORCH_CHECK(log_tau.is_floating_point(), "log_tau must be a floating tensor, got ",
              log_tau.scalar_type());
}

// Images b0 .. b0 + nb of x (B, C, H, W) as a float32 (nb, C, N) tensor: a view of x when it is
// float32 and its H and W merge (NCHW, channels_last), else a copy.
inline at::Tensor images_f32(const at::Tensor& x, int64_t b0, int64_t nb) {
  const at::Tensor part = x.narrow(0, b0, nb);
  return part.reshape({nb, x.size(1), x.size(2) * x.size(3)}).to(at::kFloat);
}

template <class Rows>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& embedding,
                                                                   const at::Tensor& centers,
                                                                   const at::Tensor& log_tau,
                                                                   const Rows& rows) {
  const int64_t B = embedding.size(0), D = embedding.size(1), H = embedding.size(2),
                W = embedding.size(3);
  const int64_t N = H * W, P = B * N, K = centers.size(0);
  const at::Tensor c = centers.to(at::kFloat).contiguous();
  const at::Tensor c_sq = c.square().sum(1);
  const at::Tensor lt = log_tau.to(at::kFloat).reshape({1}).contiguous();
  const auto f32 = embedding.options().dtype(at::kFloat);
  at::Tensor central = at::empty({B, D, H, W}, f32);
  at::Tensor assign = at::empty({B, K, H, W}, f32);
  at::Tensor compact = at::empty({B, H, W}, f32);
  at::Tensor dist = at::empty({P, K}, f32);
  at::Tensor e_sq = at::empty({P}, f32);

  // Chunks only bound the fp32 copy of a half-precision embedding.
  const bool convert = embedding.scalar_type() != at::kFloat;
  const int64_t chunk = convert ? cram_chunk_images(B, 4 * D * N) : B;
  for (int64_t b0 = 0; b0 < B; b0 += chunk) {
    const int64_t nb = std::min(chunk, B - b0);
    const at::Tensor e = images_f32(embedding, b0, nb);  // (nb, D, N)
    e_sq.narrow(0, b0 * N, nb * N).copy_(
        at::linalg_vector_norm(e, 2, at::IntArrayRef{1}, false, at::kFloat).square().reshape(-1));
    // e_i.c_k: (nb, N, D) x (D, K), the centres shared through a zero batch stride.
    at::Tensor dots = dist.narrow(0, b0 * N, nb * N).view({nb, N, K});
    at::bmm_out(dots, e.transpose(1, 2), c.t().expand({nb, D, K}));
  }
  rows.forward(dist, e_sq, c_sq, lt, N, assign, compact);
  // mu = C^T a per image: (D, K) x (K, N).
  at::Tensor mu = central.view({B, D, N});
  at::bmm_out(mu, c.t().expand({B, D, K}), assign.view({B, K, N}));
  return {central, assign, compact, dist};
}

template <class Rows>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& embedding, const at::Tensor& centers, const at::Tensor& log_tau,
    const at::Tensor& assign, const at::Tensor& dist, const at::Tensor& grad_central,
    const at::Tensor& grad_assign, const at::Tensor& grad_compact, const Rows& rows) {
  const int64_t B = embedding.size(0), D = embedding.size(1), H = embedding.size(2),
                W = embedding.size(3);
  const int64_t N = H * W, P = B * N, K = centers.size(0);
  const at::Tensor assign_c = checked_fp32(assign, "assign", {B, K, H, W}, embedding, "embedding");
  const at::Tensor dist_c = checked_fp32(dist, "dist", {P, K}, embedding, "embedding");
  // grad_central is read through its strides (expanded or channels_last as it comes).
  CHECK_SAME_DEVICE(grad_central, embedding);
  CHECK_DTYPE(grad_central, at::kFloat);
  CHECK_SHAPE(grad_central, embedding.sizes());
  const at::Tensor grad_assign_c =
      checked_fp32(grad_assign, "grad_assign", {B, K, H, W}, embedding, "embedding");
  const at::Tensor grad_compact_c =
      checked_fp32(grad_compact, "grad_compact", {B, H, W}, embedding, "embedding");
  const at::Tensor c = centers.to(at::kFloat).contiguous();
  const at::Tensor lt = log_tau.to(at::kFloat).reshape({1}).contiguous();
  const auto f32 = embedding.options().dtype(at::kFloat);

  // G_mu,i . c_k for every position, then delta in place.
  const at::Tensor g_mu = grad_central.reshape({B, D, N});
  at::Tensor work = at::empty({P, K}, f32);
  at::Tensor g_mu_dots = work.view({B, N, K});
  at::bmm_out(g_mu_dots, g_mu.transpose(1, 2), c.t().expand({B, D, K}));
  at::Tensor delta_sum = at::empty({P}, f32);
  at::Tensor log_tau_terms = at::empty({P}, f32);
  rows.backward(work, assign_c, dist_c, grad_assign_c, grad_compact_c, lt, N, delta_sum,
                log_tau_terms);
  const at::Tensor delta = work.view({B, N, K});

  // dL/dc_k = sum_i a_ik G_mu,i - 2 sum_i delta_ik e_i + 2 c_k sum_i delta_ik.
  at::Tensor grad_c = c * delta.sum(at::IntArrayRef{0, 1}).unsqueeze(1).mul(2.0);
  at::Tensor grad_embedding = at::empty_like(embedding);
  const bool convert = embedding.scalar_type() != at::kFloat;
  const int64_t chunk = cram_chunk_images(B, cram_backward_bytes_per_image(D, N, K, convert));
  const at::Tensor a = assign_c.view({B, K, N});
  // The centre gradient's per-image partials, written by bmm_out (at::bmm may route to a
  // Python override for some shapes in recent PyTorch; the out variant does not).
  at::Tensor partials = at::empty({chunk, K, D}, f32);
  for (int64_t b0 = 0; b0 < B; b0 += chunk) {
    const int64_t nb = std::min(chunk, B - b0);
    const at::Tensor e = images_f32(embedding, b0, nb);  // (nb, D, N)
    const at::Tensor delta_t = delta.narrow(0, b0, nb).transpose(1, 2);  // (nb, K, N)
    // dL/de_i = 2 e_i sum_k delta_ik - 2 C^T delta_i: (D, K) x (K, N) per image.
    const at::Tensor scaled = e * delta_sum.narrow(0, b0 * N, nb * N).view({nb, 1, N});
    // Written in place when the gradient is float32 (empty_like keeps a dense layout, whose H
    // and W merge), else in fp32 and then cast.
    const at::Tensor out = grad_embedding.narrow(0, b0, nb).reshape({nb, D, N});
    const bool direct = !convert && out.is_alias_of(grad_embedding);
    at::Tensor ge = direct ? out : at::empty({nb, D, N}, f32);
    at::baddbmm_out(ge, scaled, c.t().expand({nb, D, K}), delta_t, 2.0, -2.0);
    if (!direct) grad_embedding.narrow(0, b0, nb).copy_(ge.view({nb, D, H, W}));
    // The centre gradient's two products over the chunk's positions: (K, N) x (N, D) per image.
    at::Tensor part = partials.narrow(0, 0, nb);
    at::bmm_out(part, a.narrow(0, b0, nb), g_mu.narrow(0, b0, nb).transpose(1, 2));
    part.baddbmm_(delta_t, e.transpose(1, 2), 1.0, -2.0);
    grad_c.add_(part.sum(0));
  }
  at::Tensor grad_centers = at::empty_like(centers);
  grad_centers.copy_(grad_c);
  const at::Tensor grad_log_tau =
      log_tau_terms.sum().reshape(log_tau.sizes()).to(log_tau.scalar_type());
  return {grad_embedding, grad_centers, grad_log_tau};
}

}  // namespace cram_host
}  // namespace snl
