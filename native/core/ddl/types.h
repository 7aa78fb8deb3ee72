// Plain value types shared by the schedule and every transport; no framework headers.
#pragma once

#include <cstddef>
#include <cstdint>

namespace ddl {

enum class DType : std::uint8_t { kFloat32, kFloat16, kBFloat16 };

inline std::size_t dtype_size(DType dtype) {
  return dtype == DType::kFloat32 ? 4 : 2;
}

enum class ReduceOp : std::uint8_t { kSum, kAvg };

// Wire format of the slowest tier; kNone keeps the tensor's own dtype.
enum class Compression : std::uint8_t { kNone, kBF16, kFP16 };

// A typed, contiguous range of device or host memory owned by someone else.
struct Buffer {
  void* data = nullptr;
  std::size_t count = 0;
  DType dtype = DType::kFloat32;

  std::size_t bytes() const { return count * dtype_size(dtype); }

  Buffer slice(std::size_t offset, std::size_t length) const {
    return Buffer{static_cast<char*>(data) + offset * dtype_size(dtype), length, dtype};
  }
};

}  // namespace ddl
