// Conversions between torch values and the framework-agnostic core's types, and the checks
// every entry point applies to its arguments.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>

#include "ddl/types.h"

namespace ddl::torch_adapter {

DType to_dtype(at::ScalarType type, const char* argument);
at::ScalarType to_scalar_type(DType dtype);

// A view of a contiguous tensor's storage; the tensor must outlive the buffer's use.
Buffer as_buffer(const at::Tensor& tensor);
at::Tensor as_tensor(const Buffer& buffer, const at::Device& device);

ReduceOp parse_op(const std::string& op);
Compression parse_compression(const std::string& compression);

// TORCH_CHECKs shared by the entry points; each names the argument that is wrong.
void check_data(const at::Tensor& tensor, const char* argument);
void check_flatten_args(at::TensorList srcs, const at::Tensor& dst);
// Returns the residual's buffer when one is given.
std::optional<Buffer> check_compress_args(const at::Tensor& src, const at::Tensor& dst,
                                          const std::optional<at::Tensor>& residual);

}  // namespace ddl::torch_adapter
