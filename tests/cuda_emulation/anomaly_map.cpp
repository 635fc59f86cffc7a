// Runs the anomaly map's per-level distance kernel of csrc/anomaly_map_kernels.cuh on the CPU,
// with the launch choices of csrc/anomaly_map.cu (float32 inputs, one level). The combine
// kernel has no driver yet.
//
// Case (int64 values of a record, see driver.h): B, C, H, W, teacher strides (4), student
// strides (4); floats: teacher storage, student storage
//   -> m (B, H, W + 1): the level's 1 - cos over C, written with a row stride of W + 1 (the
//      op's zero-padded buffer); the padding column must stay 0.
#include "cuda_emulation.h"
#include "driver.h"

#include "anomaly_map_kernels.cuh"
#include "strides4.h"

namespace {

std::vector<float> run(emu::IntReader& in, emu::FloatReader& data) {
  const int64_t B = in.next(), C = in.next(), H = in.next(), W = in.next();
  const snl::Strides4 st_t = emu::read_strides4(in), st_s = emu::read_strides4(in);
  const float* t = data.next(emu::storage_size4(B, C, H, W, st_t));
  const float* s = data.next(emu::storage_size4(B, C, H, W, st_s));
  const int64_t N = H * W, wk = W + 1;
  std::vector<float> m(B * H * wk, 0.0f);
  const int pixels = snl::distance_pixels(B, N);
  const int warps = snl::distance_warps(B, N);
  const dim3 grid(static_cast<unsigned>(snl::ceil_div(N, pixels)), static_cast<unsigned>(B));
  if (pixels < snl::kWarpSize) {
    emu::launch(grid, dim3(32 * snl::kWarpSize),
                snl::anomaly_map_distance_kernel<float, 32, snl::kWarpSize / 2>, t, s, st_t, st_s,
                B, C, W, N, m.data(), H * wk, wk);
  } else if (warps == 32) {
    emu::launch(grid, dim3(32 * snl::kWarpSize),
                snl::anomaly_map_distance_kernel<float, 32, snl::kWarpSize>, t, s, st_t, st_s, B,
                C, W, N, m.data(), H * wk, wk);
  } else {
    emu::launch(grid, dim3(8 * snl::kWarpSize),
                snl::anomaly_map_distance_kernel<float, 8, snl::kWarpSize>, t, s, st_t, st_s, B,
                C, W, N, m.data(), H * wk, wk);
  }
  return m;
}

}  // namespace

int main() { return emu::serve_all(run); }
