// Runs the CRAM kernels of csrc/cram_kernels.cuh on the CPU, with the launches of csrc/cram.cu
// (float32 embedding and centres).
//
// Case (int64 values of a record, see driver.h): B, D, H, W, K, embedding strides (4);
// floats: embedding storage, centres (K, D), log_tau (1), grad_central (B, D, H, W)
// contiguous, grad_assign (B, K, H, W), grad_compact (B, H, W)
//   -> central (B, D, H, W), assign (B, K, H, W), compact (B, H, W), grad_embedding
//      (B, D, H, W) contiguous, grad_centers (K, D), grad_log_tau (1).
#include "cuda_emulation.h"
#include "driver.h"

#include "cram_kernels.cuh"

namespace {

std::vector<float> run(emu::IntReader& in, emu::FloatReader& data) {
  int64_t shape[4];
  for (int64_t& d : shape) d = in.next();
  const int64_t K = in.next();
  snl::Strides4 st_e;
  st_e.b = in.next();
  st_e.c = in.next();
  st_e.h = in.next();
  st_e.w = in.next();
  const int64_t B = shape[0], D = shape[1], H = shape[2], W = shape[3];
  const int64_t N = H * W, P = B * N;
  const int64_t storage =
      (B - 1) * st_e.b + (D - 1) * st_e.c + (H - 1) * st_e.h + (W - 1) * st_e.w + 1;
  const float* embedding = data.next(storage);
  const float* centers = data.next(K * D);
  const float* log_tau = data.next(1);
  const float* grad_central = data.next(B * D * N);
  const float* grad_assign = data.next(B * K * N);
  const float* grad_compact = data.next(B * N);
  const snl::Strides4 st_dense{D * N, N, W, 1};
  const int group_k = snl::centre_group_size(K);

  // Forward.
  std::vector<float> central(B * D * N), assign(B * K * N), compact(P), dist(P * K);
  emu::launch(dim3(static_cast<unsigned>(snl::ceil_div(P, snl::kTile))), dim3(snl::kThreads),
              snl::cram_fwd_assign_kernel<float>, embedding, st_e, centers, log_tau, P, N, W, D,
              static_cast<int>(K), group_k, assign.data(), compact.data(), dist.data());
  emu::launch(dim3(static_cast<unsigned>(snl::ceil_div(P, snl::kWideTile)),
                   static_cast<unsigned>(snl::ceil_div(D, snl::kWideThreads))),
              dim3(snl::kWideThreads), snl::cram_fwd_central_kernel,
              static_cast<const float*>(assign.data()), centers, P, N, D, static_cast<int>(K),
              central.data());

  // Backward (gradients contiguous).
  std::vector<float> delta(B * K * N), delta_sum(P), log_tau_terms(P);
  const int64_t slices = snl::center_slices(P, K, D);
  std::vector<float> center_partials(slices * K * D), grad_log_tau(1);
  std::vector<float> grad_embedding(B * D * N), grad_centers(K * D);
  emu::launch(dim3(static_cast<unsigned>(snl::ceil_div(P, snl::kTile))), dim3(snl::kThreads),
              snl::cram_bwd_delta_kernel, grad_central, st_dense, centers, log_tau,
              static_cast<const float*>(assign.data()), static_cast<const float*>(dist.data()),
              grad_assign, grad_compact, P, N, W, D, static_cast<int>(K), group_k, delta.data(),
              delta_sum.data(), log_tau_terms.data());
  emu::launch(dim3(static_cast<unsigned>(slices),
                   static_cast<unsigned>(snl::ceil_div(D, snl::kWideThreads))),
              dim3(snl::kWideThreads), snl::cram_bwd_embedding_kernel<float>, embedding, st_e,
              grad_central, st_dense, centers, static_cast<const float*>(assign.data()),
              static_cast<const float*>(delta.data()),
              static_cast<const float*>(delta_sum.data()), P, N, W, D, static_cast<int>(K),
              grad_embedding.data(), st_dense, center_partials.data());
  emu::launch(dim3(static_cast<unsigned>(snl::ceil_div(K * D, snl::kThreads))),
              dim3(snl::kThreads), snl::cram_bwd_centers_kernel<float>,
              static_cast<const float*>(center_partials.data()), slices, K, D,
              grad_centers.data(), D, int64_t{1});
  emu::launch(dim3(1), dim3(snl::kThreads), snl::cram_bwd_log_tau_kernel,
              static_cast<const float*>(log_tau_terms.data()), P, grad_log_tau.data());

  return emu::concat(
      {&central, &assign, &compact, &grad_embedding, &grad_centers, &grad_log_tau});
}

}  // namespace

int main() { return emu::serve_all(run); }
