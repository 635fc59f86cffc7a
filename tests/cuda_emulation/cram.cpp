// Runs CRAM's CUDA row kernels (csrc/cram_kernels.cuh) on the CPU inside the composition of
// csrc/cram_host.h, whose products (at::bmm there) are plain loops here (float32 embedding and
// centres).
//
// Case (int64 values of a record, see driver.h): B, D, H, W, K, embedding strides (4);
// floats: embedding storage, centres (K, D), log_tau (1), grad_central (B, D, H, W)
// contiguous, grad_assign (B, K, H, W), grad_compact (B, H, W)
//   -> central (B, D, H, W), assign (B, K, H, W), compact (B, H, W), grad_embedding
//      (B, D, H, W) contiguous, grad_centers (K, D), grad_log_tau (1).
#include <cmath>

#include "cuda_emulation.h"
#include "driver.h"

#include "cram_kernels.cuh"
#include "strides4.h"

namespace {

std::vector<float> run(emu::IntReader& in, emu::FloatReader& data) {
  int64_t shape[4];
  for (int64_t& d : shape) d = in.next();
  const int64_t K = in.next();
  const snl::Strides4 st_e = emu::read_strides4(in);
  const int64_t B = shape[0], D = shape[1], H = shape[2], W = shape[3];
  const int64_t N = H * W, P = B * N;
  const float* embedding = data.next(emu::storage_size4(B, D, H, W, st_e));
  const float* centers = data.next(K * D);
  const float* log_tau = data.next(1);
  const float* grad_central = data.next(B * D * N);
  const float* grad_assign = data.next(B * K * N);
  const float* grad_compact = data.next(B * N);
  auto e_at = [&](int64_t p, int64_t d) {
    return embedding[(p / N) * st_e.b + d * st_e.c + ((p % N) / W) * st_e.h + (p % W) * st_e.w];
  };
  auto g_at = [&](int64_t p, int64_t d) { return grad_central[((p / N) * D + d) * N + p % N]; };
  const dim3 grid(static_cast<unsigned>(snl::ceil_div(P, snl::kRowWarps)));
  const dim3 block(snl::kRowThreads);

  // Forward: |e|^2, |c|^2 and e.c_k, then the row kernel, then mu = C^T a.
  std::vector<float> e_sq(P), c_sq(K), dist(P * K);
  for (int64_t k = 0; k < K; ++k) {
    float s = 0.0f;
    for (int64_t d = 0; d < D; ++d) s += centers[k * D + d] * centers[k * D + d];
    c_sq[k] = s;
  }
  for (int64_t p = 0; p < P; ++p) {
    float s = 0.0f;
    for (int64_t d = 0; d < D; ++d) s += e_at(p, d) * e_at(p, d);
    e_sq[p] = s;
    for (int64_t k = 0; k < K; ++k) {
      float dot = 0.0f;
      for (int64_t d = 0; d < D; ++d) dot += e_at(p, d) * centers[k * D + d];
      dist[p * K + k] = dot;
    }
  }
  std::vector<float> central(B * D * N), assign(B * K * N), compact(P);
  emu::launch(grid, block, snl::cram_fwd_rows_kernel, dist.data(),
              static_cast<const float*>(e_sq.data()), static_cast<const float*>(c_sq.data()),
              log_tau, P, N, static_cast<int>(K), assign.data(), compact.data());
  auto a_at = [&](int64_t p, int64_t k) { return assign[((p / N) * K + k) * N + p % N]; };
  for (int64_t p = 0; p < P; ++p) {
    for (int64_t d = 0; d < D; ++d) {
      float s = 0.0f;
      for (int64_t k = 0; k < K; ++k) s += a_at(p, k) * centers[k * D + d];
      central[((p / N) * D + d) * N + p % N] = s;
    }
  }

  // Backward: G_mu.c_k, the row kernel, then the embedding and centre gradients.
  std::vector<float> work(P * K), delta_sum(P), log_tau_terms(P);
  for (int64_t p = 0; p < P; ++p) {
    for (int64_t k = 0; k < K; ++k) {
      float s = 0.0f;
      for (int64_t d = 0; d < D; ++d) s += g_at(p, d) * centers[k * D + d];
      work[p * K + k] = s;
    }
  }
  emu::launch(grid, block, snl::cram_bwd_rows_kernel, work.data(),
              static_cast<const float*>(assign.data()), static_cast<const float*>(dist.data()),
              grad_assign, grad_compact, log_tau, P, N, static_cast<int>(K), delta_sum.data(),
              log_tau_terms.data());
  std::vector<float> grad_embedding(B * D * N), grad_centers(K * D, 0.0f), grad_log_tau(1, 0.0f);
  for (int64_t p = 0; p < P; ++p) {
    for (int64_t d = 0; d < D; ++d) {
      float s = 0.0f;
      for (int64_t k = 0; k < K; ++k) s += work[p * K + k] * centers[k * D + d];
      grad_embedding[((p / N) * D + d) * N + p % N] = 2.0f * (e_at(p, d) * delta_sum[p] - s);
    }
    grad_log_tau[0] += log_tau_terms[p];
  }
  for (int64_t k = 0; k < K; ++k) {
    float col = 0.0f;
    for (int64_t p = 0; p < P; ++p) col += work[p * K + k];
    for (int64_t d = 0; d < D; ++d) {
      float s = 2.0f * centers[k * D + d] * col;
      for (int64_t p = 0; p < P; ++p) {
        s += a_at(p, k) * g_at(p, d) - 2.0f * work[p * K + k] * e_at(p, d);
      }
      grad_centers[k * D + d] = s;
    }
  }

  return emu::concat(
      {&central, &assign, &compact, &grad_embedding, &grad_centers, &grad_log_tau});
}

}  // namespace

int main() { return emu::serve_all(run); }
