// Input checks for the CUDA ops. Each failure names the argument (the macro stringifies the
// variable, which carries the schema's argument name) and shows the offending value.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstddef>
#include <cstdint>
#include <string>

namespace snl {

// Messages format integers and shapes to text themselves, without iostream's numeric formatting:
// streaming a number into a check's message crashed the process on the GPU machine's toolchain
// when the check failed, and a failing check must raise, never crash.
inline std::string int_text(int64_t v) { return std::to_string(v); }

// A shape as c10 prints an IntArrayRef: "[2, 3, 4, 4]", "[]" when empty.
inline std::string shape_text(at::IntArrayRef s) {
  std::string text = "[";
  for (size_t i = 0; i < s.size(); ++i) {
    if (i > 0) text += ", ";
    text += int_text(s[i]);
  }
  return text + "]";
}

inline void check_cuda(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.is_cuda(), name, " must be a CUDA tensor, got device ", x.device());
}

inline void check_same_device(const at::Tensor& x, const char* name, const at::Tensor& ref,
                              const char* ref_name) {
  TORCH_CHECK(x.device() == ref.device(), name, " must be on the same device as ", ref_name,
              ", got ", x.device(), " and ", ref.device());
}

inline void check_float_dtype(const at::Tensor& x, const char* name) {
  const at::ScalarType dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, name,
              " must be float32, float16 or bfloat16, got ", dtype);
}

inline void check_dtype(const at::Tensor& x, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(x.scalar_type() == dtype, name, " must be ", dtype, ", got ", x.scalar_type());
}

inline void check_same_dtype(const at::Tensor& x, const char* name, const at::Tensor& ref,
                             const char* ref_name) {
  TORCH_CHECK(x.scalar_type() == ref.scalar_type(), name, " must have the dtype of ", ref_name,
              ", got ", x.scalar_type(), " and ", ref.scalar_type());
}

inline void check_dim(const at::Tensor& x, const char* name, int64_t dim) {
  TORCH_CHECK(x.dim() == dim, name, " must have ", int_text(dim), " dimensions, got shape ",
              shape_text(x.sizes()));
}

inline void check_shape(const at::Tensor& x, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK(x.sizes() == shape, name, " must have shape ", shape_text(shape), ", got ",
              shape_text(x.sizes()));
}

inline void check_nonempty(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.numel() > 0, name, " must not be empty, got shape ", shape_text(x.sizes()));
}

// A small fp32 operand (saved statistics, upstream gradients) on ref's device with the given
// shape, made contiguous: upstream gradients of a mean arrive expanded, with zero strides.
inline at::Tensor checked_fp32(const at::Tensor& x, const char* name, at::IntArrayRef shape,
                               const at::Tensor& ref, const char* ref_name) {
  check_same_device(x, name, ref, ref_name);
  check_dtype(x, name, at::kFloat);
  check_shape(x, name, shape);
  return x.contiguous();
}

}  // namespace snl

#define CHECK_CUDA(x) ::snl::check_cuda(x, #x)
#define CHECK_SAME_DEVICE(x, ref) ::snl::check_same_device(x, #x, ref, #ref)
#define CHECK_FLOAT_DTYPE(x) ::snl::check_float_dtype(x, #x)
#define CHECK_DTYPE(x, dtype) ::snl::check_dtype(x, #x, dtype)
#define CHECK_SAME_DTYPE(x, ref) ::snl::check_same_dtype(x, #x, ref, #ref)
#define CHECK_DIM(x, dim) ::snl::check_dim(x, #x, dim)
#define CHECK_SHAPE(x, ...) ::snl::check_shape(x, #x, __VA_ARGS__)
#define CHECK_NONEMPTY(x) ::snl::check_nonempty(x, #x)

namespace snl {

// A (teacher, student) pair of (B, C, H, W) feature maps: same device, shape and dtype
// (float32, float16 or bfloat16), not empty.
inline void check_feature_pair(const at::Tensor& teacher, const at::Tensor& student) {
  CHECK_SAME_DEVICE(student, teacher);
  CHECK_DIM(teacher, 4);
  CHECK_SHAPE(student, teacher.sizes());
  CHECK_FLOAT_DTYPE(teacher);
  CHECK_SAME_DTYPE(student, teacher);
  CHECK_NONEMPTY(teacher);
}

// The same for CUDA feature maps.
inline void check_features(const at::Tensor& teacher, const at::Tensor& student) {
  CHECK_CUDA(teacher);
  CHECK_CUDA(student);
  check_feature_pair(teacher, student);
}

// The upstream gradient of a 0-dim float32 loss: float32, one element, on ref's device.
inline at::Tensor checked_grad_loss(const at::Tensor& grad_loss, const at::Tensor& ref) {
  CHECK_SAME_DEVICE(grad_loss, ref);
  CHECK_DTYPE(grad_loss, at::kFloat);
  TORCH_CHECK(grad_loss.numel() == 1, "grad_loss must hold one element, got shape ",
              shape_text(grad_loss.sizes()));
  return grad_loss.contiguous();
}

}  // namespace snl
