// snl::intra_affinity_fwd / _bwd and snl::inter_affinity_fwd / _bwd. Math, paths and access
// plan: snl_kernels/intra_affinity_loss.py and snl_kernels/inter_affinity_loss.py.
//
// The intra-affinity Gram path (l2, C < N) forms its C x C Grams and the backward's product as
// batched GEMMs on cuBLAS, composed in csrc/gram_host.h (its operands: gram_kernels.cuh; its
// normalisation backward: intra_affinity_kernels.cuh). The tiled path (l1, and l2 where N <= C) and the
// inter-affinity products run in the tiled kernels below: normalised operands (and
// D = X_S - X_T) are formed on chip from strided reads of the inputs, so no fp32 copy of a
// feature map is made, and no N x N matrix is ever written to memory. No result depends on
// torch.backends.cuda.matmul.allow_tf32: each product's precision is named per call. Sums run
// in a fixed order (per-block partials, then one block summing them in float64; cuBLAS's own
// order for a given GPU): the same inputs give the same bits.
//
// Path and precision are op arguments, decided by the caller (snl_kernels/precision.py has the
// rule and what each backend runs): the Gram path in "ieee" (fp32 products, cuBLAS pedantic),
// "tf32x3" (three tf32 products of split operands) or "tf32" (one, operands rounded to nearest);
// the tiled intra-affinity l2 products on TF32 tensor cores (WMMA, sm_80 and newer; precision
// "tf32") or fp32 FMA ("ieee"); every inter-affinity and l1 product in fp32 FMA ("ieee").
// Kernels: intra_ and inter_affinity_kernels.cuh; launch sequences: affinity_launch.cuh.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublas_v2.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include "checks.h"
#include "host.h"
#include "affinity_launch.cuh"
#include "gram_host.h"
#include "gram_kernels.cuh"

namespace snl {
namespace {

// ---- Host side: checks, launches, registration ----

template <typename scalar_t>
Feature<scalar_t> feature_of(const at::Tensor& x) {
  return {x.const_data_ptr<scalar_t>(), x.stride(0), x.stride(1), x.stride(2), x.stride(3),
          x.size(3)};
}

bool is_l1(c10::string_view distance) {
  TORCH_CHECK(distance == "l2" || distance == "l1", "distance must be \"l2\" or \"l1\", got \"",
              distance, "\"");
  return distance == "l1";
}

void check_inter_features(const at::Tensor& teacher_a, const at::Tensor& teacher_b,
                          const at::Tensor& student_a, const at::Tensor& student_b) {
  check_features(teacher_a, student_a);
  check_features(teacher_b, student_b);
  CHECK_SAME_DEVICE(teacher_b, teacher_a);
  CHECK_SAME_DTYPE(teacher_b, teacher_a);
  TORCH_CHECK(teacher_b.size(0) == teacher_a.size(0),
              "teacher_b must have the batch size of teacher_a, got ", int_text(teacher_b.size(0)),
              " and ", int_text(teacher_a.size(0)));
  TORCH_CHECK(teacher_b.size(2) <= teacher_a.size(2) && teacher_b.size(3) <= teacher_a.size(3),
              "level b must not be finer than level a, got teacher_a spatial size ",
              shape_text(teacher_a.sizes().slice(2)), " and teacher_b ",
              shape_text(teacher_b.sizes().slice(2)));
}

// The plan of a tiled intra-affinity call, as the caller decided it (snl_kernels/precision.py):
// precision "ieee" (fp32 FMA kernels) or, for l2, "tf32" (TF32 WMMA kernels, operands rounded
// to nearest; sm_80 and newer).
IntraPlan intra_plan(const at::Tensor& teacher, c10::string_view distance,
                     c10::string_view precision) {
  const bool l1 = is_l1(distance);
  TORCH_CHECK_VALUE(precision == "ieee" || (!l1 && precision == "tf32"),
                    "precision must be \"ieee\"", l1 ? "" : " or \"tf32\"", " for distance \"",
                    distance, "\" in the CUDA backend, got \"", precision, "\"");
  const bool mma = precision == "tf32";
  if (mma) {
    const int major = at::cuda::getDeviceProperties(teacher.device().index())->major;
    TORCH_CHECK_VALUE(major >= 8, "precision \"tf32\" needs a GPU of compute capability 8.0 or "
                      "newer, got ", int_text(major), ".x");
  }
  return {teacher.size(0), teacher.size(1), teacher.size(2) * teacher.size(3), l1, mma};
}

// Starts kernels for the launch sequences of affinity_launch.cuh: kThreads-thread blocks on
// the current stream, each launch checked.
struct CudaLaunch {
  cudaStream_t stream;

  template <typename... Params, typename... Args>
  void operator()(void (*kernel)(Params...), int64_t gx, int64_t gy, Args&&... args) const {
    TORCH_CHECK(gx <= int64_t{0x7fffffff}, "problem too large for one launch: ", int_text(gx),
                " blocks");
    kernel<<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), kThreads, 0, stream>>>(
        std::forward<Args>(args)...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

float* floats(at::Tensor& x) { return x.mutable_data_ptr<float>(); }

// A float32 batch (nb, rows, cols) as cuBLAS reads it (column-major): row-major (last dimension
// contiguous) it is the transpose, op N with ld = stride(1); transposed-contiguous it is the
// matrix itself, op T with ld = stride(2); any other layout is copied first.
struct BlasOperand {
  at::Tensor data;
  cublasOperation_t op;
  int64_t ld;
};

BlasOperand blas_operand(const at::Tensor& x) {
  const int64_t rows = x.size(1), cols = x.size(2);
  if (x.stride(2) == 1 && x.stride(1) >= std::max<int64_t>(cols, 1)) return {x, CUBLAS_OP_N, x.stride(1)};
  if (x.stride(1) == 1 && x.stride(2) >= std::max<int64_t>(rows, 1)) return {x, CUBLAS_OP_T, x.stride(2)};
  const at::Tensor y = x.contiguous();
  return {y, CUBLAS_OP_N, std::max<int64_t>(cols, 1)};
}

int blas_int(int64_t v, const char* what) {
  TORCH_CHECK(v <= int64_t{0x7fffffff}, "problem too large for one cuBLAS call: ", what, "=",
              int_text(v));
  return static_cast<int>(v);
}

// The Gram path's operands and normalisation backward in CUDA kernels, its products on cuBLAS
// (csrc/gram_host.h says what each does). tf32 tensor cores or fp32 with every reduced-precision
// path off ("pedantic"), named per call: torch.backends.cuda.matmul.allow_tf32 does not enter.
struct CudaGram {
  std::vector<at::Tensor> operands(const at::Tensor& teacher, const at::Tensor& student,
                                   int64_t b0, int64_t nb, int parts) const {
    const int64_t C = teacher.size(1), N = teacher.size(2) * teacher.size(3);
    const auto f32 = teacher.options().dtype(at::kFloat);
    std::vector<at::Tensor> out{at::empty({nb, 2 * C, N}, f32)};
    if (parts == 2) out.push_back(at::empty({nb, 2 * C, N}, f32));
    const CudaLaunch launch{at::cuda::getCurrentCUDAStream()};
    SNL_DISPATCH_FEATURE_TYPES(teacher.scalar_type(), "intra_affinity_gram_operands", [&] {
      launch_gram_operands(launch, feature_of<scalar_t>(teacher), feature_of<scalar_t>(student),
                           b0, nb, C, N, parts, floats(out[0]),
                           parts == 2 ? floats(out[1]) : nullptr);
    });
    return out;
  }

  void add_loss(const at::Tensor& g, at::Tensor& total) const {
    const int64_t nb = g.size(0), C = g.size(1) / 2;
    at::Tensor partials = at::empty({ceil_div(C, kLossRows) * nb}, total.options());
    launch_gram_loss(CudaLaunch{at::cuda::getCurrentCUDAStream()}, g.const_data_ptr<float>(), nb,
                     C, partials.mutable_data_ptr<double>(), total.mutable_data_ptr<double>());
  }

  std::vector<at::Tensor> coefficients(const at::Tensor& g, const at::Tensor& grad_loss, double M,
                                       bool teacher_side, int parts) const {
    const int64_t nb = g.size(0), C = g.size(1) / 2;
    std::vector<at::Tensor> out{at::empty({nb, C, 2 * C}, g.options())};
    if (parts == 2) out.push_back(at::empty({nb, C, 2 * C}, g.options()));
    launch_gram_coefficients(CudaLaunch{at::cuda::getCurrentCUDAStream()},
                             g.const_data_ptr<float>(), nb, C, teacher_side,
                             grad_loss.const_data_ptr<float>(), M, parts, floats(out[0]),
                             parts == 2 ? floats(out[1]) : nullptr);
    return out;
  }

  void gemm(const at::Tensor& a, const at::Tensor& b, at::Tensor& out, bool accumulate,
            bool tensor_cores) const {
    // Row-major out (M, P) is column-major out^T = b^T a^T: cuBLAS's A is b, its B is a.
    const int64_t nb = a.size(0), M = a.size(1), K = a.size(2), P = b.size(2);
    const BlasOperand x = blas_operand(b), y = blas_operand(a);
    const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
    const cublasStatus_t status = cublasGemmStridedBatchedEx(
        at::cuda::getCurrentCUDABlasHandle(), x.op, y.op, blas_int(P, "P"), blas_int(M, "M"),
        blas_int(K, "K"), &alpha, x.data.const_data_ptr<float>(), CUDA_R_32F,
        blas_int(x.ld, "ld"), x.data.stride(0), y.data.const_data_ptr<float>(), CUDA_R_32F,
        blas_int(y.ld, "ld"), y.data.stride(0), &beta, out.mutable_data_ptr<float>(), CUDA_R_32F,
        blas_int(P, "P"), out.stride(0), blas_int(nb, "batch"),
        tensor_cores ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F_PEDANTIC,
        CUBLAS_GEMM_DEFAULT);
    TORCH_CHECK(status == CUBLAS_STATUS_SUCCESS, "cuBLAS GEMM failed: ",
                cublasGetStatusString(status));
  }

  void normalize_bwd(const at::Tensor& f, const at::Tensor& dx, int64_t b0,
                     at::Tensor& grad) const {
    const int64_t nb = dx.size(0), C = dx.size(1), N = dx.size(2);
    const CudaLaunch launch{at::cuda::getCurrentCUDAStream()};
    SNL_DISPATCH_FEATURE_TYPES(f.scalar_type(), "intra_affinity_bwd", [&] {
      for (int64_t i = 0; i < nb; i += kMaxGridY) {
        launch(pixel_normalize_bwd_kernel<scalar_t>, ceil_div(N, 32), std::min(nb - i, kMaxGridY),
               feature_of<scalar_t>(f), dx.const_data_ptr<float>() + i * C * N, b0 + i, C, N,
               grad.mutable_data_ptr<scalar_t>());
      }
    });
  }
};

std::tuple<at::Tensor, at::Tensor> intra_affinity_fwd_cuda(const at::Tensor& teacher,
                                                           const at::Tensor& student,
                                                           c10::string_view distance, bool grams,
                                                           c10::string_view precision) {
  check_features(teacher, student);
  const at::cuda::CUDAGuard device_guard(teacher.device());
  if (grams) {
    gram_host::check_request(distance, grams);
    // No signs of Delta: the backward forms the Gram again.
    return {gram_host::forward(teacher, student, precision, CudaGram{}),
            at::empty({0}, teacher.options().dtype(at::kInt))};
  }
  const IntraPlan plan = intra_plan(teacher, distance, precision);

  const auto f32 = teacher.options().dtype(at::kFloat);
  at::Tensor inv_norm = at::empty({plan.inv_norm_floats()}, f32);
  at::Tensor partials = at::empty({plan.partial_floats()}, f32);
  at::Tensor loss = at::empty({}, f32);
  const CudaLaunch launch{at::cuda::getCurrentCUDAStream()};
  SNL_DISPATCH_FEATURE_TYPES(teacher.scalar_type(), "intra_affinity_fwd", [&] {
    intra_forward(launch, plan, feature_of<scalar_t>(teacher), feature_of<scalar_t>(student),
                  floats(inv_norm), floats(partials), floats(loss));
  });
  // No signs of Delta: the backward recomputes it.
  return {loss, at::empty({0}, teacher.options().dtype(at::kInt))};
}

std::tuple<at::Tensor, at::Tensor> intra_affinity_bwd_cuda(
    const at::Tensor& teacher, const at::Tensor& student, const at::Tensor& grad_loss,
    const at::Tensor& signs, c10::string_view distance, bool grams, c10::string_view precision,
    bool teacher_requires_grad) {
  check_features(teacher, student);
  TORCH_CHECK_VALUE(signs.numel() == 0, "signs must be the CUDA forward's empty tensor (the "
                    "backward recomputes Delta), got shape ", shape_text(signs.sizes()));
  const at::Tensor grad_loss_c = checked_grad_loss(grad_loss, teacher);
  const at::cuda::CUDAGuard device_guard(teacher.device());
  if (grams) {
    gram_host::check_request(distance, grams);
    return gram_host::backward(teacher, student, grad_loss_c, precision, teacher_requires_grad,
                               CudaGram{});
  }
  const IntraPlan plan = intra_plan(teacher, distance, precision);

  const auto f32 = teacher.options().dtype(at::kFloat);
  at::Tensor grad_student = at::empty(student.sizes(), student.options());
  at::Tensor grad_teacher = teacher_requires_grad ? at::empty(teacher.sizes(), teacher.options())
                                                  : at::empty({0}, teacher.options());
  at::Tensor inv_norm = at::empty({plan.inv_norm_floats()}, f32);
  // fp32 gradients are accumulated straight into the outputs (contiguous, (C, N) per sample);
  // fp16/bf16 ones go through an fp32 scratch first.
  const IntraBackwardScratch scratch = intra_backward_scratch(
      plan, teacher.scalar_type() == at::kFloat, teacher_requires_grad);
  at::Tensor dx_scratch = at::empty({scratch.dx_floats}, f32);
  const CudaLaunch launch{at::cuda::getCurrentCUDAStream()};
  SNL_DISPATCH_FEATURE_TYPES(teacher.scalar_type(), "intra_affinity_bwd", [&] {
    intra_backward(launch, plan, feature_of<scalar_t>(teacher), feature_of<scalar_t>(student),
                   grad_loss_c.const_data_ptr<float>(), floats(inv_norm), scratch,
                   floats(dx_scratch),
                   grad_student.mutable_data_ptr<scalar_t>(),
                   teacher_requires_grad ? grad_teacher.mutable_data_ptr<scalar_t>() : nullptr);
  });
  return {grad_teacher, grad_student};
}

template <typename scalar_t>
PooledFeature<scalar_t> pooled_of(const at::Tensor& fa, const at::Tensor& fb) {
  return {feature_of<scalar_t>(fa), fa.size(2), fa.size(3), fb.size(2), fb.size(3)};
}

// The inter-affinity products are fp32 FMA: precision "ieee" only.
InterPlan inter_plan(const at::Tensor& teacher_a, const at::Tensor& teacher_b,
                     c10::string_view distance, c10::string_view precision) {
  const bool l1 = is_l1(distance);
  TORCH_CHECK_VALUE(precision == "ieee", "precision must be \"ieee\" for the inter-affinity "
                    "products of the CUDA backend, got \"", precision, "\"");
  return {teacher_a.size(0), teacher_a.size(1), teacher_b.size(1),
          teacher_b.size(2) * teacher_b.size(3), l1};
}

at::Tensor inter_affinity_fwd_cuda(const at::Tensor& teacher_a, const at::Tensor& teacher_b,
                                   const at::Tensor& student_a, const at::Tensor& student_b,
                                   c10::string_view distance, c10::string_view precision) {
  check_inter_features(teacher_a, teacher_b, student_a, student_b);
  const InterPlan plan = inter_plan(teacher_a, teacher_b, distance, precision);
  const at::cuda::CUDAGuard device_guard(teacher_a.device());

  const auto f32 = teacher_a.options().dtype(at::kFloat);
  at::Tensor inv_p = at::empty({plan.inv_p_floats()}, f32);
  at::Tensor inv_q = at::empty({plan.inv_q_floats()}, f32);
  at::Tensor partials = at::empty({plan.partial_floats()}, f32);
  at::Tensor loss = at::empty({}, f32);
  const CudaLaunch launch{at::cuda::getCurrentCUDAStream()};
  SNL_DISPATCH_FEATURE_TYPES(teacher_a.scalar_type(), "inter_affinity_fwd", [&] {
    inter_forward(launch, plan, pooled_of<scalar_t>(teacher_a, teacher_b),
                  pooled_of<scalar_t>(student_a, student_b), feature_of<scalar_t>(teacher_b),
                  feature_of<scalar_t>(student_b), floats(inv_p), floats(inv_q),
                  floats(partials), floats(loss));
  });
  return loss;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> inter_affinity_bwd_cuda(
    const at::Tensor& teacher_a, const at::Tensor& teacher_b, const at::Tensor& student_a,
    const at::Tensor& student_b, const at::Tensor& grad_loss, c10::string_view distance,
    c10::string_view precision, bool teacher_requires_grad) {
  check_inter_features(teacher_a, teacher_b, student_a, student_b);
  const InterPlan plan = inter_plan(teacher_a, teacher_b, distance, precision);
  const at::Tensor grad_loss_c = checked_grad_loss(grad_loss, teacher_a);
  const at::cuda::CUDAGuard device_guard(teacher_a.device());

  const auto f32 = teacher_a.options().dtype(at::kFloat);
  auto grad_like = [&](const at::Tensor& x, bool wanted) {
    return wanted ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  };
  at::Tensor grad_student_a = grad_like(student_a, true);
  at::Tensor grad_student_b = grad_like(student_b, true);
  at::Tensor grad_teacher_a = grad_like(teacher_a, teacher_requires_grad);
  at::Tensor grad_teacher_b = grad_like(teacher_b, teacher_requires_grad);
  at::Tensor inv_p = at::empty({plan.inv_p_floats()}, f32);
  at::Tensor inv_q = at::empty({plan.inv_q_floats()}, f32);
  const InterBackwardScratch scratch =
      inter_backward_scratch(plan, teacher_a.scalar_type() == at::kFloat);
  at::Tensor grad = at::empty({scratch.grad_floats}, f32);
  at::Tensor grad_p = at::empty({scratch.grad_p_floats}, f32);
  at::Tensor grad_q = at::empty({scratch.grad_q_floats}, f32);
  const CudaLaunch launch{at::cuda::getCurrentCUDAStream()};
  SNL_DISPATCH_FEATURE_TYPES(teacher_a.scalar_type(), "inter_affinity_bwd", [&] {
    auto out = [&](at::Tensor& x) {
      return x.numel() > 0 ? x.mutable_data_ptr<scalar_t>() : nullptr;
    };
    inter_backward(launch, plan, pooled_of<scalar_t>(teacher_a, teacher_b),
                   pooled_of<scalar_t>(student_a, student_b), feature_of<scalar_t>(teacher_b),
                   feature_of<scalar_t>(student_b), grad_loss_c.const_data_ptr<float>(),
                   floats(inv_p), floats(inv_q), scratch, floats(grad), floats(grad_p),
                   floats(grad_q), out(grad_teacher_a), out(grad_teacher_b),
                   out(grad_student_a), out(grad_student_b));
  });
  return {grad_teacher_a, grad_teacher_b, grad_student_a, grad_student_b};
}

}  // namespace
}  // namespace snl

TORCH_LIBRARY_IMPL(snl, CUDA, m) {
  m.impl("intra_affinity_fwd", &snl::intra_affinity_fwd_cuda);
  m.impl("intra_affinity_bwd", &snl::intra_affinity_bwd_cuda);
  m.impl("inter_affinity_fwd", &snl::inter_affinity_fwd_cuda);
  m.impl("inter_affinity_bwd", &snl::inter_affinity_bwd_cuda);
}
