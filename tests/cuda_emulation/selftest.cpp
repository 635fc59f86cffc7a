// Checks of the emulation itself (tests/test_cuda_emulation.py runs them). One record per
// check; ints: the check number. Outputs:
//   0 warp_sum (common.cuh) of lane values l + 1 in every lane of a 64-thread block: 64 floats
//   1 wmma: D = A B for one 16 x 16 x 8 tile, A col_major from a [k][row] tile as the kernels
//     store it; floats A (8 x 16, [k][row]), B (8 x 16, [k][column]) -> D (16 x 16)
//   2 a block whose thread 0 waits at __syncwarp, the others at __syncthreads: the run
//     must stop (deadlock)
//   3 cram_chunk_images(B, cram_backward_bytes_per_image(D, N, K, convert)) (cram_sizes.h) of
//     ints B, D, N, K, convert: 1 float
#include "cuda_emulation.h"
#include "driver.h"

#include "common.cuh"
#include "cram_kernels.cuh"

namespace {

__global__ void warp_sum_kernel(float* out) {
  out[threadIdx.x] = snl::warp_sum(static_cast<float>(threadIdx.x % 32 + 1));
}

__global__ void mma_kernel(const float* a, const float* b, float* d) {
  namespace wmma = nvcuda::wmma;
  __shared__ __align__(32) float sa[8 * 16], sb[8 * 16], sd[16 * 16];
  for (int i = threadIdx.x; i < 8 * 16; i += 32) {
    sa[i] = a[i];
    sb[i] = b[i];
  }
  __syncthreads();
  wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::col_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 8, float> acc;
  wmma::load_matrix_sync(fa, sa, 16);
  wmma::load_matrix_sync(fb, sb, 16);
  wmma::fill_fragment(acc, 0.0f);
  wmma::mma_sync(acc, fa, fb, acc);
  wmma::store_matrix_sync(sd, acc, 16, wmma::mem_row_major);
  __syncthreads();
  for (int i = threadIdx.x; i < 16 * 16; i += 32) d[i] = sd[i];
}

__global__ void deadlock_kernel(float* out) {
  if (threadIdx.x == 0) {
    __syncwarp();  // its warp's other lanes never get here
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.0f;
}

}  // namespace

int main() {
  return emu::serve([](emu::IntReader& in, emu::FloatReader& data, std::vector<float>& out) {
    const int64_t check = in.next();
    if (check == 0) {
      out.resize(64);
      emu::launch(dim3(1), dim3(64), warp_sum_kernel, out.data());
    } else if (check == 1) {
      const float* a = data.next(8 * 16);
      const float* b = data.next(8 * 16);
      out.resize(16 * 16);
      emu::launch(dim3(1), dim3(32), mma_kernel, a, b, out.data());
    } else if (check == 2) {
      out.resize(64);
      emu::launch(dim3(1), dim3(64), deadlock_kernel, out.data());
    } else if (check == 3) {
      const int64_t B = in.next(), D = in.next(), N = in.next(), K = in.next();
      const bool convert = in.next() != 0;
      out.assign(1, static_cast<float>(snl::cram_chunk_images(
                        B, snl::cram_backward_bytes_per_image(D, N, K, convert))));
    } else {
      return false;
    }
    return true;
  });
}
