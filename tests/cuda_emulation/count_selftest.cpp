// Kernels whose global-memory traffic is known, for the counting build's tests
// (tests/test_perf_cuda.py; its WMMA product is selftest.cpp's). Case: ints n (floats of the
// input), check; floats: x (n) -> y (n). Blocks of 32 threads; thread i of block b handles element 32 b + i.
//   check 0: y = 2 x (reads x once, writes y once)
//   check 1: y = x + x read a second time, through another pointer (x requested twice)
//   check 2: x staged in __shared__, read there 8 times, and a local array: x requested once
#include "cuda_emulation.h"
#include "driver.h"

namespace {

__global__ void scale_kernel(const float* x, int64_t n, float* y) {
  const int64_t i = int64_t{blockIdx.x} * 32 + threadIdx.x;
  if (i < n) y[i] = 2.0f * x[i];
}

__global__ void read_twice_kernel(const float* x, const float* x_again, int64_t n, float* y) {
  const int64_t i = int64_t{blockIdx.x} * 32 + threadIdx.x;
  if (i < n) y[i] = x[i] + x_again[i];
}

__global__ void staged_kernel(const float* x, int64_t n, float* y) {
  __shared__ float tile[32];
  const int64_t i = int64_t{blockIdx.x} * 32 + threadIdx.x;
  tile[threadIdx.x] = i < n ? x[i] : 0.0f;
  __syncthreads();
  float local[8];
  for (int k = 0; k < 8; ++k) local[k] = tile[(threadIdx.x + k) % 32];
  float sum = 0.0f;
  for (int k = 0; k < 8; ++k) sum += local[k];
  if (i < n) y[i] = sum;
}

std::vector<float> run(emu::IntReader& in, emu::FloatReader& data) {
  const int64_t n = in.next(), check = in.next();
  const float* x = data.next(n);
  std::vector<float> y(n);
  const dim3 grid(static_cast<unsigned>((n + 31) / 32));
  if (check == 0) emu::launch(grid, dim3(32), scale_kernel, x, n, y.data());
  if (check == 1) emu::launch(grid, dim3(32), read_twice_kernel, x, x, n, y.data());
  if (check == 2) emu::launch(grid, dim3(32), staged_kernel, x, n, y.data());
  return y;
}

}  // namespace

int main() { return emu::serve_all(run); }
