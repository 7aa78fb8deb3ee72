// Host kernels: the CPU path runs them inline between collectives.
#include "kernels_cpu.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>

namespace ddl::cpu {
namespace {

constexpr int64_t kGrain = 1 << 16;

template <typename F>
void with_type(DType dtype, F&& body) {
  switch (dtype) {
    case DType::kFloat32:
      body(float{});
      return;
    case DType::kFloat16:
      body(c10::Half{});
      return;
    case DType::kBFloat16:
      body(c10::BFloat16{});
      return;
  }
}

}  // namespace

void convert(const Buffer& src, const Buffer& dst, float scale) {
  TORCH_CHECK(dst.count >= src.count, "convert: dst has ", dst.count, " elements, src ",
              src.count);
  if (src.dtype == dst.dtype && scale == 1.0F) {
    if (src.data != dst.data) {
      std::memmove(dst.data, src.data, src.bytes());
    }
  } else {
    with_type(src.dtype, [&](auto src_tag) {
      with_type(dst.dtype, [&](auto dst_tag) {
        using S = decltype(src_tag);
        using D = decltype(dst_tag);
        const S* in = static_cast<const S*>(src.data);
        D* out = static_cast<D*>(dst.data);
        at::parallel_for(0, static_cast<int64_t>(src.count), kGrain, [&](int64_t b, int64_t e) {
          for (int64_t i = b; i < e; ++i) {
            out[i] = static_cast<D>(static_cast<float>(in[i]) * scale);
          }
        });
      });
    });
  }
  if (dst.count > src.count) {
    std::memset(static_cast<char*>(dst.data) + src.bytes(), 0,
                (dst.count - src.count) * dtype_size(dst.dtype));
  }
}

void compress(const Buffer& src, const Buffer& dst, const Buffer* residual, float scale) {
  TORCH_CHECK(src.dtype == DType::kFloat32, "compress: src must be float32");
  TORCH_CHECK(dst.dtype != DType::kFloat32, "compress: dst must be float16 or bfloat16");
  TORCH_CHECK(dst.count == src.count, "compress: dst has ", dst.count, " elements, src ",
              src.count);
  TORCH_CHECK(residual == nullptr ||
                  (residual->dtype == DType::kFloat32 && residual->count == src.count),
              "compress: residual must be float32 with ", src.count, " elements");
  const auto* in = static_cast<const float*>(src.data);
  float* carry = residual != nullptr ? static_cast<float*>(residual->data) : nullptr;
  with_type(dst.dtype, [&](auto dst_tag) {
    using D = decltype(dst_tag);
    D* out = static_cast<D*>(dst.data);
    at::parallel_for(0, static_cast<int64_t>(src.count), kGrain, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const float y = in[i] * scale + (carry != nullptr ? carry[i] : 0.0F);
        const D q = static_cast<D>(y);
        out[i] = q;
        if (carry != nullptr) {
          carry[i] = y - static_cast<float>(q);
        }
      }
    });
  });
}

}  // namespace ddl::cpu
