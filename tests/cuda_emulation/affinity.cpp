// Runs the affinity kernels of csrc/*affinity*.cuh on the CPU, through the launch
// sequences of csrc/affinity_launch.cuh that csrc/affinity.cu runs on a GPU. float32 inputs.
//
// Cases (the int64 values of a record, see driver.h):
//   0 intra forward:  0, B, C, H, W, l1, mma, teacher strides (4), student strides (4);
//                     floats: teacher storage, student storage -> loss
//   1 intra backward: as 0, then teacher_grad; floats: as 0, then grad_loss
//                     -> grad_student (B, C, H, W) [, grad_teacher]
//   2 inter forward:  2, B, Ca, Ha, Wa, Cb, Hb, Wb, l1, strides of teacher_a, teacher_b,
//                     student_a, student_b (4 each); floats: their storages -> loss
//   3 inter backward: as 2, then teacher_grad; floats: as 2, then grad_loss
//                     -> grad_student_a, grad_student_b [, grad_teacher_a, grad_teacher_b]
//   4 Gram operands:  4, B, C, H, W, parts, b0, nb, teacher strides (4), student strides (4);
//                     floats: teacher storage, student storage -> [E; D] (nb, 2C, N) of
//                     images b0 .. b0 + nb [, its low parts when parts == 2]
//   5 normalisation backward: 5, B, C, H, W, strides of f (4); floats: f storage, dx (B, C, N)
//                     -> dL/dF (B, C, N) (the Gram path's last step)
//   6 Gram loss sum:  6, nb, C; floats: the Gram (nb, 2C, 2C) -> its loss sum (as float32)
//   7 Gram coefficients: 7, nb, C, teacher_side, parts, M; floats: the Gram, grad_loss (1)
//                     -> K (nb, C, 2C) [, its low parts when parts == 2]
// Storages are read with the given strides (in elements); gradients come out contiguous.
#include "cuda_emulation.h"
#include "driver.h"

#include "affinity_launch.cuh"
#include "gram_kernels.cuh"

namespace {

struct EmuLaunch {
  template <typename... Params, typename... Args>
  void operator()(void (*kernel)(Params...), int64_t gx, int64_t gy, Args&&... args) const {
    emu::launch(dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)),
                dim3(snl::kThreads), kernel, std::forward<Args>(args)...);
  }
};

int64_t storage_size(const int64_t (&shape)[4], const int64_t (&st)[4]) {
  int64_t last = 0;
  for (int d = 0; d < 4; ++d) last += (shape[d] - 1) * st[d];
  return last + 1;
}

snl::Feature<float> feature(const float* ptr, const int64_t (&st)[4], int64_t W) {
  return {ptr, st[0], st[1], st[2], st[3], W};
}

void read_strides(emu::IntReader& in, int64_t (&st)[4]) {
  for (int64_t& s : st) s = in.next();
}

std::vector<float> intra(emu::IntReader& in, emu::FloatReader& data, bool backward) {
  int64_t shape[4];
  for (int64_t& d : shape) d = in.next();
  const bool l1 = in.next() != 0, mma = in.next() != 0;
  int64_t st_t[4], st_s[4];
  read_strides(in, st_t);
  read_strides(in, st_s);
  const int64_t B = shape[0], C = shape[1], N = shape[2] * shape[3];
  const snl::IntraPlan plan{B, C, N, l1, mma};
  const auto t = feature(data.next(storage_size(shape, st_t)), st_t, shape[3]);
  const auto s = feature(data.next(storage_size(shape, st_s)), st_s, shape[3]);
  std::vector<float> inv_norm(plan.inv_norm_floats());
  const EmuLaunch launch;
  if (!backward) {
    std::vector<float> partials(plan.partial_floats()), loss(1);
    snl::intra_forward(launch, plan, t, s, inv_norm.data(), partials.data(), loss.data());
    return loss;
  }
  const bool teacher_grad = in.next() != 0;
  const float* grad_loss = data.next(1);
  const auto scratch = snl::intra_backward_scratch(plan, true, teacher_grad);
  std::vector<float> dx(scratch.dx_floats);
  std::vector<float> out((teacher_grad ? 2 : 1) * B * C * N);
  snl::intra_backward(launch, plan, t, s, grad_loss, inv_norm.data(), scratch, dx.data(),
                      out.data(), teacher_grad ? out.data() + B * C * N : nullptr);
  return out;
}

std::vector<float> inter(emu::IntReader& in, emu::FloatReader& data, bool backward) {
  int64_t shape_a[4], shape_b[4];
  shape_a[0] = shape_b[0] = in.next();
  for (int d = 1; d < 4; ++d) shape_a[d] = in.next();
  for (int d = 1; d < 4; ++d) shape_b[d] = in.next();
  const bool l1 = in.next() != 0;
  int64_t st[4][4];
  for (auto& s : st) read_strides(in, s);
  const float* ptr[4];
  for (int i = 0; i < 4; ++i) ptr[i] = data.next(storage_size(i % 2 ? shape_b : shape_a, st[i]));
  const int64_t B = shape_a[0], Ca = shape_a[1], Cb = shape_b[1], N = shape_b[2] * shape_b[3];
  const snl::InterPlan plan{B, Ca, Cb, N, l1};
  auto pooled = [&](int i) {
    return snl::PooledFeature<float>{feature(ptr[i], st[i], shape_a[3]), shape_a[2], shape_a[3],
                                     shape_b[2], shape_b[3]};
  };
  const auto pa_t = pooled(0), pa_s = pooled(2);
  const auto q_t = feature(ptr[1], st[1], shape_b[3]), q_s = feature(ptr[3], st[3], shape_b[3]);
  std::vector<float> inv_p(plan.inv_p_floats()), inv_q(plan.inv_q_floats());
  const EmuLaunch launch;
  if (!backward) {
    std::vector<float> partials(plan.partial_floats()), loss(1);
    snl::inter_forward(launch, plan, pa_t, pa_s, q_t, q_s, inv_p.data(), inv_q.data(),
                       partials.data(), loss.data());
    return loss;
  }
  const bool teacher_grad = in.next() != 0;
  const float* grad_loss = data.next(1);
  const auto scratch = snl::inter_backward_scratch(plan, true);
  std::vector<float> grad(scratch.grad_floats), grad_p(scratch.grad_p_floats);
  std::vector<float> grad_q(scratch.grad_q_floats);
  const int64_t na = B * Ca * shape_a[2] * shape_a[3], nb = B * Cb * N;
  std::vector<float> out((teacher_grad ? 2 : 1) * (na + nb));
  float* gs_a = out.data();
  float* gs_b = gs_a + na;
  float* gt_a = teacher_grad ? gs_b + nb : nullptr;
  float* gt_b = teacher_grad ? gt_a + na : nullptr;
  snl::inter_backward(launch, plan, pa_t, pa_s, q_t, q_s, grad_loss, inv_p.data(), inv_q.data(),
                      scratch, grad.data(), grad_p.data(), grad_q.data(), gt_a, gt_b, gs_a,
                      gs_b);
  return out;
}

std::vector<float> gram_operands(emu::IntReader& in, emu::FloatReader& data) {
  int64_t shape[4];
  for (int64_t& d : shape) d = in.next();
  const int parts = static_cast<int>(in.next());
  const int64_t b0 = in.next(), nb = in.next();
  int64_t st_t[4], st_s[4];
  read_strides(in, st_t);
  read_strides(in, st_s);
  const int64_t C = shape[1], N = shape[2] * shape[3];
  const auto t = feature(data.next(storage_size(shape, st_t)), st_t, shape[3]);
  const auto s = feature(data.next(storage_size(shape, st_s)), st_s, shape[3]);
  const int64_t size = nb * 2 * C * N;
  std::vector<float> out((parts == 2 ? 2 : 1) * size);
  snl::launch_gram_operands(EmuLaunch{}, t, s, b0, nb, C, N, parts, out.data(),
                            parts == 2 ? out.data() + size : nullptr);
  return out;
}

std::vector<float> normalize_backward(emu::IntReader& in, emu::FloatReader& data) {
  int64_t shape[4], st[4];
  for (int64_t& d : shape) d = in.next();
  read_strides(in, st);
  const int64_t B = shape[0], C = shape[1], N = shape[2] * shape[3];
  const auto f = feature(data.next(storage_size(shape, st)), st, shape[3]);
  const float* dx = data.next(B * C * N);
  std::vector<float> out(B * C * N);
  EmuLaunch{}(snl::pixel_normalize_bwd_kernel<float>, snl::ceil_div(N, 32), B, f, dx, 0, C, N,
              out.data());
  return out;
}

std::vector<float> gram_loss(emu::IntReader& in, emu::FloatReader& data) {
  const int64_t nb = in.next(), C = in.next();
  const float* g = data.next(nb * 4 * C * C);
  std::vector<double> partials(snl::ceil_div(C, snl::kLossRows) * nb), total(1, 0.0);
  snl::launch_gram_loss(EmuLaunch{}, g, nb, C, partials.data(), total.data());
  return {static_cast<float>(total[0])};
}

std::vector<float> gram_coefficients(emu::IntReader& in, emu::FloatReader& data) {
  const int64_t nb = in.next(), C = in.next();
  const bool teacher_side = in.next() != 0;
  const int parts = static_cast<int>(in.next());
  const double M = static_cast<double>(in.next());
  const float* g = data.next(nb * 4 * C * C);
  const float* grad_loss = data.next(1);
  const int64_t size = nb * 2 * C * C;
  std::vector<float> out((parts == 2 ? 2 : 1) * size);
  snl::launch_gram_coefficients(EmuLaunch{}, g, nb, C, teacher_side, grad_loss, M, parts,
                                out.data(), parts == 2 ? out.data() + size : nullptr);
  return out;
}

}  // namespace

int main() {
  return emu::serve([](emu::IntReader& in, emu::FloatReader& data, std::vector<float>& out) {
    const int64_t op = in.next();
    if (op == 0 || op == 1) {
      out = intra(in, data, op == 1);
    } else if (op == 2 || op == 3) {
      out = inter(in, data, op == 3);
    } else if (op == 4) {
      out = gram_operands(in, data);
    } else if (op == 5) {
      out = normalize_backward(in, data);
    } else if (op == 6) {
      out = gram_loss(in, data);
    } else if (op == 7) {
      out = gram_coefficients(in, data);
    } else {
      return false;
    }
    return true;
  });
}
