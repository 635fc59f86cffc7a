// The host composition of the intra-affinity l2 Gram path (DESIGN §2.2, Gram form) of the CUDA
// backend: per chunk of samples, the operands [E; D] (E = X_S + X_T, D = X_S - X_T from the
// normalised pixels, rounded as the precision asks), the Gram of [E; D] and the backward's
// product as batched GEMMs, the loss and the backward's coefficients from the Gram.
// csrc/affinity.cu instantiates it with its CUDA kernels (csrc/gram_kernels.cuh; the
// normalisation backward) and cuBLAS products; csrc/gram_cpu.cpp with ATen ones, so that
// the composition (precisions, chunks, dtypes, layouts) is tested against the reference on
// machines without a GPU (the CUDA kernels: tests/test_cuda_emulation.py).
//
// Rows provides
//   operands(teacher, student, b0, nb, parts): the parts of [E; D] (nb, 2C, N) float32 of
//     images b0 .. b0 + nb (split() of gram_host::operands(), see below): {value} for parts 0,
//     {tf32(value)} for 1, {hi, lo} for 2;
//   gemm(a, b, out, accumulate, tensor_cores): out = a @ b (+ out when accumulate) for float32
//     batches a (nb, M, K) and b (nb, K, P), each contiguous in its last two dimensions or
//     their transpose; out (nb, M, P) contiguous. tensor_cores: the operands are tf32 values
//     (low 13 bits zero) and may run on tf32 tensor cores; else fp32 products.
//   add_loss(g, total): total (0-dim float64) += sum over i, j < C of G_EE[i, j] G_DD[i, j] +
//     G_ED[i, j] G_DE[i, j] for the Gram g (nb, 2C, 2C) of [E; D], in float64;
//   coefficients(g, grad_loss, M, teacher_side, parts): the parts (as operands()) of K (nb, C,
//     2C) = [G_DD + s G_ED, G_DE + s G_EE] float(grad_loss / M), s = -1 for the teacher's side;
//   normalize_bwd(f, dx, b0, grad): for images b0 .. b0 + nb of the input f (B, C, H, W) and
//     dx = dL/dX (nb, C, N) float32 contiguous, writes dL/dF = r dx - r^3 (f . dx) f per pixel
//     (r dx where the norm is clamped) into grad (B, C, H, W) contiguous, images b0 on.
//
// Precision "tf32": one product of operands rounded to nearest tf32; "tf32x3": each operand
// split into hi = tf32(x) and lo = tf32(x - hi), three products (lo hi, hi lo, hi hi) into one
// result; "ieee": fp32 products. Every sum runs in a fixed order (the products' too, for a given
// GPU and library), no atomics.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "checks.h"

namespace snl {
namespace gram_host {

constexpr double kEps = 1e-8;  // the reference's clamp of a pixel's norm
// Scratch per chunk of samples: operands, Gram, coefficients and dL/dX.
constexpr int64_t kScratchBytes = int64_t{512} << 20;

// The Gram path is the l2 loss's (the caller decides it: snl_kernels/precision.py).
inline void check_request(c10::string_view distance, bool grams) {
  TORCH_CHECK_VALUE(distance == "l2" && grams, "the Gram path (grams=True) is for distance "
                    "\"l2\" only, got distance \"", distance, "\" and grams=", grams);
}

inline int parts_of(c10::string_view precision) {
  if (precision == "ieee") return 0;
  if (precision == "tf32") return 1;
  TORCH_CHECK_VALUE(precision == "tf32x3", "precision must be \"ieee\", \"tf32x3\" or \"tf32\" ",
                    "for the Gram path, got \"", precision, "\"");
  return 2;
}

// x rounded in place to the nearest tf32 value (ties away from zero): add half of the dropped
// 13 bits to the magnitude's bits, then clear them. Finite values of magnitude < 2^127 only.
inline void round_tf32_(at::Tensor& x) {
  at::Tensor bits = x.view(at::kInt);
  bits.add_(0x1000).bitwise_and_(static_cast<int32_t>(0xFFFFE000u));
}

// The parts a product reads: {x} (ieee, unrounded), {tf32(x)} or {hi, lo}. x is consumed.
inline std::vector<at::Tensor> split(at::Tensor x, int parts) {
  if (parts == 0) return {x};
  if (parts == 1) {
    round_tf32_(x);
    return {x};
  }
  at::Tensor hi = x.clone();
  round_tf32_(hi);
  at::Tensor lo = x.sub_(hi);
  round_tf32_(lo);
  return {hi, lo};
}

// out = a @ b over the parts of split(): one product, or lo hi + hi lo + hi hi.
template <class Rows>
void product(const Rows& rows, const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b,
             at::Tensor& out, int parts) {
  if (parts < 2) {
    rows.gemm(a[0], b[0], out, false, parts == 1);
    return;
  }
  rows.gemm(a[1], b[0], out, false, true);
  rows.gemm(a[0], b[1], out, true, true);
  rows.gemm(a[0], b[0], out, true, true);
}

// Samples per chunk: all of them when their scratch fits kScratchBytes, else balanced chunks.
inline int64_t chunk_of(int64_t B, int64_t bytes_per_sample) {
  int64_t chunk = std::clamp<int64_t>(kScratchBytes / std::max<int64_t>(bytes_per_sample, 1), 1, B);
  const int64_t n_chunks = (B + chunk - 1) / chunk;
  return (B + n_chunks - 1) / n_chunks;
}

// The CPU registration's add_loss and coefficients (the CUDA ones: gram_loss_kernel and
// gram_coefficients_kernel, csrc/gram_kernels.cuh).
inline void add_loss_aten(const at::Tensor& g, at::Tensor& total) {
  const int64_t C = g.size(1) / 2;
  const at::Tensor gd = g.to(at::kDouble);
  const at::Tensor e_rows = gd.narrow(1, 0, C), d_rows = gd.narrow(1, C, C);
  total.add_((e_rows.narrow(2, 0, C) * d_rows.narrow(2, C, C)).sum() +
             (e_rows.narrow(2, C, C) * d_rows.narrow(2, 0, C)).sum());
}

inline std::vector<at::Tensor> coefficients_aten(const at::Tensor& g, const at::Tensor& grad_loss,
                                                 double M, bool teacher_side, int parts) {
  const int64_t nb = g.size(0), C = g.size(1) / 2;
  const at::Tensor g_e = g.narrow(1, 0, C), g_d = g.narrow(1, C, C);  // [G_EE G_ED], [G_DE G_DD]
  // Columns [0, C) multiply E, [C, 2C) multiply D: [G_DD +- G_ED, G_DE +- G_EE].
  const at::Tensor swapped = at::cat({g_d.narrow(2, C, C), g_d.narrow(2, 0, C)}, 2);
  const at::Tensor mirrored = at::cat({g_e.narrow(2, C, C), g_e.narrow(2, 0, C)}, 2);
  at::Tensor k = at::empty({nb, C, 2 * C}, g.options());
  if (teacher_side) {
    at::sub_out(k, swapped, mirrored);
  } else {
    at::add_out(k, swapped, mirrored);
  }
  k.mul_((grad_loss.to(at::kDouble).reshape({}) / M).to(at::kFloat));
  return split(k, parts);
}

// [E; D] (nb, 2C, N) float32 of images b0 .. b0 + nb, unrounded (the CPU registration's
// operands; the CUDA one forms the same in gram_operands_kernel, csrc/gram_kernels.cuh).
inline at::Tensor operands(const at::Tensor& teacher, const at::Tensor& student, int64_t b0,
                           int64_t nb) {
  const int64_t C = teacher.size(1), N = teacher.size(2) * teacher.size(3);
  auto normalised = [&](const at::Tensor& f) {
    const at::Tensor x = f.narrow(0, b0, nb).reshape({nb, C, N}).to(at::kFloat);
    const at::Tensor norm = at::linalg_vector_norm(x, 2, at::IntArrayRef{1}, true, at::kFloat);
    return x / norm.clamp_min(kEps);
  };
  const at::Tensor x_s = normalised(student), x_t = normalised(teacher);
  at::Tensor ed = at::empty({nb, 2 * C, N}, teacher.options().dtype(at::kFloat));
  at::Tensor e = ed.narrow(1, 0, C), d = ed.narrow(1, C, C);
  at::add_out(e, x_s, x_t);
  at::sub_out(d, x_s, x_t);
  return ed;
}

inline int64_t operand_bytes(int64_t C, int64_t N, int parts) {
  return (parts == 2 ? 3 : 2) * 2 * C * N * 4;  // [E; D], its parts, while they are formed
}

// G = [E; D] [E; D]^T (nb, 2C, 2C) of images b0 .. b0 + nb; ed: the operands' parts.
template <class Rows>
at::Tensor gram(const Rows& rows, const at::Tensor& teacher, const at::Tensor& student,
                int64_t b0, int64_t nb, int parts, std::vector<at::Tensor>& ed) {
  ed = rows.operands(teacher, student, b0, nb, parts);
  std::vector<at::Tensor> ed_t;
  for (const at::Tensor& x : ed) ed_t.push_back(x.transpose(1, 2));
  const int64_t rows_ed = ed[0].size(1);
  at::Tensor g = at::empty({nb, rows_ed, rows_ed}, ed[0].options());
  product(rows, ed, ed_t, g, parts);
  return g;
}

// L = sum_b ||A_T - A_S||_F^2 / (B N^2), a 0-dim float32 tensor.
template <class Rows>
at::Tensor forward(const at::Tensor& teacher, const at::Tensor& student,
                   c10::string_view precision, const Rows& rows) {
  const int parts = parts_of(precision);
  const int64_t B = teacher.size(0), C = teacher.size(1), N = teacher.size(2) * teacher.size(3);
  const int64_t chunk = chunk_of(B, operand_bytes(C, N, parts) + 4 * C * C * 4);
  at::Tensor total = at::zeros({}, teacher.options().dtype(at::kDouble));
  for (int64_t b0 = 0; b0 < B; b0 += chunk) {
    const int64_t nb = std::min(chunk, B - b0);
    std::vector<at::Tensor> ed;
    const at::Tensor g = gram(rows, teacher, student, b0, nb, parts, ed);
    rows.add_loss(g, total);
  }
  // (<G_EE, G_DD> + <G_ED, G_DE>) / 2 per sample, over B N^2
  return total.mul_(0.5 / (static_cast<double>(B) * N * N)).to(at::kFloat);
}

// (grad_teacher, grad_student): dL/dX_S = (g / M) K_S [E; D] with K_S = [G_DD + G_ED,
// G_DE + G_EE], dL/dX_T = (g / M) K_T [E; D] with K_T = [G_DD - G_ED, G_DE - G_EE], then through
// the normalisation. grad_teacher is empty unless teacher_requires_grad.
template <class Rows>
std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& teacher, const at::Tensor& student,
                                            const at::Tensor& grad_loss,
                                            c10::string_view precision,
                                            bool teacher_requires_grad, const Rows& rows) {
  const int parts = parts_of(precision);
  const int64_t B = teacher.size(0), C = teacher.size(1), N = teacher.size(2) * teacher.size(3);
  at::Tensor grad_student = at::empty(student.sizes(), student.options());
  at::Tensor grad_teacher = teacher_requires_grad ? at::empty(teacher.sizes(), teacher.options())
                                                  : at::empty({0}, teacher.options());
  const double M = static_cast<double>(B) * N * N;
  const int64_t chunk =
      chunk_of(B, operand_bytes(C, N, parts) + (4 * C * C + 2 * C * 2 * C + C * N) * 4);
  for (int64_t b0 = 0; b0 < B; b0 += chunk) {
    const int64_t nb = std::min(chunk, B - b0);
    std::vector<at::Tensor> ed;
    const at::Tensor g = gram(rows, teacher, student, b0, nb, parts, ed);
    for (const bool teacher_side : {false, true}) {
      if (teacher_side && !teacher_requires_grad) break;
      at::Tensor dx = at::empty({nb, C, N}, g.options());
      product(rows, rows.coefficients(g, grad_loss, M, teacher_side, parts), ed, dx, parts);
      rows.normalize_bwd(teacher_side ? teacher : student, dx, b0,
                         teacher_side ? grad_teacher : grad_student);
    }
  }
  return {grad_teacher, grad_student};
}

}  // namespace gram_host
}  // namespace snl
