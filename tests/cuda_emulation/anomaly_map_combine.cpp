// Runs the anomaly map's combine and score kernels of csrc/anomaly_map_kernels.cuh on the CPU,
// with the launches of csrc/anomaly_map.cu (float32, contiguous inputs).
//
// Case (int64 values of a record, see driver.h): B, L, hk, wk, height, width; floats: m
// (B, L, hk, wk), mh (L, height, hk), mw (L, width, wk)
//   -> maps (B, height, width) = sum_k mh[k] @ m[b, k] @ mw[k]^T, then scores (B): each map's max.
#include "cuda_emulation.h"
#include "driver.h"

#include "anomaly_map_kernels.cuh"

namespace {

std::vector<float> run(emu::IntReader& in, emu::FloatReader& data) {
  const int64_t B = in.next(), L = in.next(), hk = in.next(), wk = in.next();
  const int64_t height = in.next(), width = in.next();
  const float* m = data.next(B * L * hk * wk);
  const float* mh = data.next(L * height * hk);
  const float* mw = data.next(L * width * wk);
  const int64_t n_tiles_w = snl::ceil_div(width, int64_t{snl::kTileW});
  const int64_t n_tiles = snl::ceil_div(height, int64_t{snl::kTileH}) * n_tiles_w;
  std::vector<float> maps(B * height * width), scores(B), tile_max(B * n_tiles);
  const dim3 grid(static_cast<unsigned>(n_tiles),
                  static_cast<unsigned>(std::min(B, snl::kMaxGridY)));
  emu::launch(grid, dim3(snl::kThreads), snl::anomaly_map_combine_kernel, m, mh, mw, B, L, hk, wk,
              height, width, n_tiles_w, n_tiles, maps.data(), tile_max.data());
  emu::launch(dim3(static_cast<unsigned>(snl::ceil_div(B, int64_t{snl::kThreads}))),
              dim3(snl::kThreads), snl::anomaly_map_score_kernel,
              static_cast<const float*>(tile_max.data()), B, n_tiles, scores.data());
  return emu::concat({&maps, &scores});
}

}  // namespace

int main() { return emu::serve_all(run); }
