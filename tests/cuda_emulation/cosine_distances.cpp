// Runs the cosine-distance kernels of csrc/cosine_distances_kernels.cuh on the CPU, with the
// launches of csrc/cosine_distances.cu (float32 inputs, one chunk of the grid).
//
// Case (int64 values of a record, see driver.h): B, C, H, W, teacher strides (4), student
// strides (4), teacher_grad; floats: teacher storage, student storage, grad_pixel (B, H, W),
// grad_channel (B, C), grad_sample (B)
//   -> pixel (B, H, W), channel (B, C), sample (B), grad_student (B, C, H, W) contiguous
//      [, grad_teacher].
#include "cuda_emulation.h"
#include "driver.h"

#include "cosine_distances_kernels.cuh"
#include "strides4.h"

namespace {

using snl::kThreads;

std::vector<float> run(emu::IntReader& in, emu::FloatReader& data) {
  int64_t shape[4];
  for (int64_t& d : shape) d = in.next();
  const snl::Strides4 st_t = emu::read_strides4(in), st_s = emu::read_strides4(in);
  const bool teacher_grad = in.next() != 0;
  const int64_t B = shape[0], C = shape[1], W = shape[3], N = shape[2] * shape[3];
  if (B > snl::kMaxGridYZ) emu::fail("driver: B over one grid");
  const float* t = data.next(emu::storage_size4(shape[0], shape[1], shape[2], shape[3], st_t));
  const float* s = data.next(emu::storage_size4(shape[0], shape[1], shape[2], shape[3], st_s));
  const float* grad_pixel = data.next(B * N);
  const float* grad_channel = data.next(B * C);
  const float* grad_sample = data.next(B);

  // Forward.
  std::vector<float> pixel(B * N), channel(B * C), sample(B);
  std::vector<float> pixel_stats(B * 3 * N), channel_stats(B * 3 * C);
  const int tile = snl::fwd_tile_pixels(B, N);
  const int64_t n_tiles = snl::ceil_div(N, int64_t{tile});
  std::vector<float> partials(B * n_tiles * 3 * C);
  const dim3 pixel_grid(static_cast<unsigned>(n_tiles), static_cast<unsigned>(B));
  auto pixel_kernel = tile == 128  ? snl::cosine_distances_fwd_pixel_kernel<float, 32, 4>
                      : tile == 64 ? snl::cosine_distances_fwd_pixel_kernel<float, 32, 2>
                      : tile == 32 ? snl::cosine_distances_fwd_pixel_kernel<float, 32, 1>
                                   : snl::cosine_distances_fwd_pixel_kernel<float, 16, 1>;
  emu::launch(pixel_grid, dim3(kThreads), pixel_kernel, t, s, st_t, st_s, B, C, W, N, n_tiles,
              pixel_stats.data(), pixel.data(), partials.data());
  emu::launch(dim3(static_cast<unsigned>(snl::ceil_div(C, snl::kFinishChannels)),
                   static_cast<unsigned>(B)),
              dim3(kThreads), snl::cosine_distances_fwd_channel_kernel,
              static_cast<const float*>(partials.data()),
              static_cast<const float*>(pixel_stats.data()), B, C, N, n_tiles,
              channel_stats.data(), channel.data(), sample.data());

  // Backward, gradients written contiguous.
  std::vector<float> coef(B * 3 * C), grad_s(B * C * N), grad_t(teacher_grad ? B * C * N : 0);
  emu::launch(dim3(static_cast<unsigned>(snl::ceil_div(C, snl::kCoefChannels)),
                   static_cast<unsigned>(B)),
              dim3(kThreads), snl::cosine_distances_bwd_coef_kernel,
              static_cast<const float*>(channel_stats.data()),
              static_cast<const float*>(pixel_stats.data()), grad_channel, grad_sample, B, C, N,
              coef.data());
  const snl::Strides4 st_out{C * N, N, W, 1};
  const dim3 grid(static_cast<unsigned>(snl::ceil_div(N, kThreads)),
                  static_cast<unsigned>(snl::ceil_div(C, snl::kBwdChannels)),
                  static_cast<unsigned>(B));
  emu::launch(grid, dim3(kThreads), snl::cosine_distances_bwd_kernel<float>, t, s, st_t, st_s,
              static_cast<const float*>(pixel_stats.data()), grad_pixel,
              static_cast<const float*>(coef.data()), B, C, W, N,
              teacher_grad ? grad_t.data() : nullptr, grad_s.data(),
              teacher_grad ? st_out : snl::Strides4{0, 0, 0, 0}, st_out);

  return emu::concat({&pixel, &channel, &sample, &grad_s, &grad_t});
}

}  // namespace

int main() { return emu::serve_all(run); }
