// Conversions between torch values and the core's types.
#include "adapter.h"

#include <ATen/ops/from_blob.h>

namespace ddl::torch_adapter {

DType to_dtype(at::ScalarType type, const char* argument) {
  switch (type) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK(false, argument, ": dtype must be float32, float16 or bfloat16, got ", type);
  }
}

at::ScalarType to_scalar_type(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return at::kFloat;
    case DType::kFloat16:
      return at::kHalf;
    case DType::kBFloat16:
      return at::kBFloat16;
  }
  TORCH_CHECK(false, "unknown ddl dtype");
}

Buffer as_buffer(const at::Tensor& tensor) {
  return Buffer{tensor.data_ptr(), static_cast<std::size_t>(tensor.numel()),
                to_dtype(tensor.scalar_type(), "tensor")};
}

at::Tensor as_tensor(const Buffer& buffer, const at::Device& device) {
  return at::from_blob(
      buffer.data, {static_cast<int64_t>(buffer.count)},
      at::TensorOptions().dtype(to_scalar_type(buffer.dtype)).device(device));
}

ReduceOp parse_op(const std::string& op) {
  if (op == "sum") {
    return ReduceOp::kSum;
  }
  if (op == "avg") {
    return ReduceOp::kAvg;
  }
  TORCH_CHECK(false, "op: must be \"sum\" or \"avg\", got \"", op, "\"");
}

Compression parse_compression(const std::string& compression) {
  if (compression == "none") {
    return Compression::kNone;
  }
  if (compression == "bf16") {
    return Compression::kBF16;
  }
  if (compression == "fp16") {
    return Compression::kFP16;
  }
  TORCH_CHECK(false, "compression: must be \"none\", \"bf16\" or \"fp16\", got \"", compression,
              "\"");
}

void check_data(const at::Tensor& tensor, const char* argument) {
  TORCH_CHECK(tensor.defined(), argument, ": undefined tensor");
  TORCH_CHECK(tensor.is_contiguous(), argument, ": must be contiguous");
  TORCH_CHECK(!tensor.is_complex(), argument, ": complex tensors are not supported");
  to_dtype(tensor.scalar_type(), argument);
}

void check_flatten_args(at::TensorList srcs, const at::Tensor& dst) {
  check_data(dst, "dst");
  int64_t total = 0;
  for (std::size_t i = 0; i < srcs.size(); ++i) {
    check_data(srcs[i], "srcs");
    TORCH_CHECK(srcs[i].device() == dst.device(), "srcs[", i, "]: on ", srcs[i].device(),
                ", dst on ", dst.device());
    total += srcs[i].numel();
  }
  TORCH_CHECK(total <= dst.numel(), "dst: has ", dst.numel(), " elements, srcs hold ", total);
}

std::optional<Buffer> check_compress_args(const at::Tensor& src, const at::Tensor& dst,
                                          const std::optional<at::Tensor>& residual) {
  check_data(src, "src");
  check_data(dst, "dst");
  TORCH_CHECK(src.scalar_type() == at::kFloat, "src: must be float32, got ", src.scalar_type());
  TORCH_CHECK(dst.scalar_type() != at::kFloat, "dst: must be float16 or bfloat16");
  TORCH_CHECK(dst.numel() == src.numel(), "dst: must have ", src.numel(), " elements, got ",
              dst.numel());
  TORCH_CHECK(dst.device() == src.device(), "dst: on ", dst.device(), ", src on ", src.device());
  if (!residual.has_value()) {
    return std::nullopt;
  }
  check_data(*residual, "residual");
  TORCH_CHECK(residual->scalar_type() == at::kFloat && residual->numel() == src.numel(),
              "residual: must be float32 with ", src.numel(), " elements");
  TORCH_CHECK(residual->device() == src.device(), "residual: on ", residual->device(),
              ", src on ", src.device());
  return as_buffer(*residual);
}

}  // namespace ddl::torch_adapter
