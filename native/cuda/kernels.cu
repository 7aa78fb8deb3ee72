// CUDA kernels: fused cast/scale/zero-pad (bucket packing and the slow tier's decompression),
// compression with error feedback, multi-tensor flatten; and the CUDA registrations' bodies.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "../torch/adapter.h"
#include "kernels.h"
#include "nccl_api.h"

namespace ddl::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kVector = 4;  // elements per thread per step on aligned data (16 B of float32)

template <typename T>
struct Cast;
template <>
struct Cast<float> {
  __device__ static float load(float v) { return v; }
  __device__ static float store(float v) { return v; }
};
template <>
struct Cast<__half> {
  __device__ static float load(__half v) { return __half2float(v); }
  __device__ static __half store(float v) { return __float2half_rn(v); }
};
template <>
struct Cast<__nv_bfloat16> {
  __device__ static float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};

template <typename T>
struct alignas(sizeof(T) * kVector) Pack {
  T v[kVector];
};

template <typename F>
void with_type(DType dtype, F&& body) {
  switch (dtype) {
    case DType::kFloat32:
      body(float{});
      return;
    case DType::kFloat16:
      body(__half{});
      return;
    case DType::kBFloat16:
      body(__nv_bfloat16{});
      return;
  }
}

int grid_for(int64_t work_items) {
  static const int max_blocks = [] {
    int device = 0;
    int sms = 0;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    return sms * 8;
  }();
  const int64_t needed = (work_items + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(needed, max_blocks)));
}

bool aligned(const void* p, std::size_t bytes) {
  return reinterpret_cast<std::uintptr_t>(p) % bytes == 0;
}

template <typename S, typename D>
__global__ void convert_vector_kernel(const S* src, D* dst, int64_t packs, float scale) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < packs;
       i += stride) {
    const Pack<S> in = reinterpret_cast<const Pack<S>*>(src)[i];
    Pack<D> out;
#pragma unroll
    for (int k = 0; k < kVector; ++k) {
      out.v[k] = Cast<D>::store(Cast<S>::load(in.v[k]) * scale);
    }
    reinterpret_cast<Pack<D>*>(dst)[i] = out;
  }
}

template <typename S, typename D>
__global__ void convert_scalar_kernel(const S* src, D* dst, int64_t count, float scale) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += stride) {
    dst[i] = Cast<D>::store(Cast<S>::load(src[i]) * scale);
  }
}

template <typename D>
__global__ void compress_kernel(const float* src, D* dst, float* residual, int64_t count,
                                float scale) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += stride) {
    const float y = src[i] * scale + (residual != nullptr ? residual[i] : 0.0F);
    const D q = Cast<D>::store(y);
    dst[i] = q;
    if (residual != nullptr) {
      residual[i] = y - Cast<D>::load(q);
    }
  }
}

template <typename D>
__global__ void compress_vector_kernel(const float* src, D* dst, float* residual, int64_t packs,
                                       float scale) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < packs;
       i += stride) {
    const Pack<float> in = reinterpret_cast<const Pack<float>*>(src)[i];
    Pack<float> carry{};
    if (residual != nullptr) {
      carry = reinterpret_cast<const Pack<float>*>(residual)[i];
    }
    Pack<D> out;
#pragma unroll
    for (int k = 0; k < kVector; ++k) {
      const float y = in.v[k] * scale + carry.v[k];
      out.v[k] = Cast<D>::store(y);
      carry.v[k] = y - Cast<D>::load(out.v[k]);
    }
    reinterpret_cast<Pack<D>*>(dst)[i] = out;
    if (residual != nullptr) {
      reinterpret_cast<Pack<float>*>(residual)[i] = carry;
    }
  }
}

// Up to kSegments tensors per launch, passed by value; block b works on the segment whose
// [first_block, next first_block) range holds b.
constexpr int kSegments = 48;
constexpr int64_t kElementsPerBlock = kThreads * 8;

struct FlattenArgs {
  const void* src[kSegments];
  int64_t count[kSegments];
  int64_t dst_offset[kSegments];
  int64_t first_block[kSegments + 1];
  int segments;
};

template <typename S, typename D>
__global__ void flatten_kernel(FlattenArgs args, D* dst, float scale) {
  const int64_t block = blockIdx.x;
  int s = 0;
  while (s + 1 < args.segments && args.first_block[s + 1] <= block) {
    ++s;
  }
  const S* src = static_cast<const S*>(args.src[s]);
  const int64_t begin = (block - args.first_block[s]) * kElementsPerBlock;
  const int64_t end =
      begin + kElementsPerBlock < args.count[s] ? begin + kElementsPerBlock : args.count[s];
  D* out = dst + args.dst_offset[s];
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    out[i] = Cast<D>::store(Cast<S>::load(src[i]) * scale);
  }
}

}  // namespace

void convert(const Buffer& src, const Buffer& dst, float scale, cudaStream_t stream) {
  TORCH_CHECK(dst.count >= src.count, "convert: dst has ", dst.count, " elements, src ",
              src.count);
  if (src.count > 0) {
    if (src.dtype == dst.dtype && scale == 1.0F) {
      if (src.data != dst.data) {
        C10_CUDA_CHECK(
            cudaMemcpyAsync(dst.data, src.data, src.bytes(), cudaMemcpyDeviceToDevice, stream));
      }
    } else {
      with_type(src.dtype, [&](auto src_tag) {
        with_type(dst.dtype, [&](auto dst_tag) {
          using S = decltype(src_tag);
          using D = decltype(dst_tag);
          const auto* in = static_cast<const S*>(src.data);
          auto* out = static_cast<D*>(dst.data);
          const auto count = static_cast<int64_t>(src.count);
          int64_t done = 0;
          if (aligned(in, sizeof(Pack<S>)) && aligned(out, sizeof(Pack<D>))) {
            const int64_t packs = count / kVector;
            if (packs > 0) {
              convert_vector_kernel<S, D>
                  <<<grid_for(packs), kThreads, 0, stream>>>(in, out, packs, scale);
              C10_CUDA_KERNEL_LAUNCH_CHECK();
            }
            done = packs * kVector;
          }
          if (done < count) {
            convert_scalar_kernel<S, D><<<grid_for(count - done), kThreads, 0, stream>>>(
                in + done, out + done, count - done, scale);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          }
        });
      });
    }
  }
  if (dst.count > src.count) {
    C10_CUDA_CHECK(cudaMemsetAsync(static_cast<char*>(dst.data) + src.bytes(), 0,
                                   (dst.count - src.count) * dtype_size(dst.dtype), stream));
  }
}

void compress(const Buffer& src, const Buffer& dst, const Buffer* residual, float scale,
              cudaStream_t stream) {
  TORCH_CHECK(src.dtype == DType::kFloat32, "compress: src must be float32");
  TORCH_CHECK(dst.dtype != DType::kFloat32, "compress: dst must be float16 or bfloat16");
  TORCH_CHECK(dst.count == src.count, "compress: dst has ", dst.count, " elements, src ",
              src.count);
  TORCH_CHECK(residual == nullptr ||
                  (residual->dtype == DType::kFloat32 && residual->count == src.count),
              "compress: residual must be float32 with ", src.count, " elements");
  if (src.count == 0) {
    return;
  }
  const auto* in = static_cast<const float*>(src.data);
  float* carry = residual != nullptr ? static_cast<float*>(residual->data) : nullptr;
  const auto count = static_cast<int64_t>(src.count);
  with_type(dst.dtype, [&](auto dst_tag) {
    using D = decltype(dst_tag);
    auto* out = static_cast<D*>(dst.data);
    int64_t done = 0;
    if (aligned(in, sizeof(Pack<float>)) && aligned(out, sizeof(Pack<D>)) &&
        (carry == nullptr || aligned(carry, sizeof(Pack<float>)))) {
      const int64_t packs = count / kVector;
      if (packs > 0) {
        compress_vector_kernel<D>
            <<<grid_for(packs), kThreads, 0, stream>>>(in, out, carry, packs, scale);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      done = packs * kVector;
    }
    if (done < count) {
      compress_kernel<D><<<grid_for(count - done), kThreads, 0, stream>>>(
          in + done, out + done, carry != nullptr ? carry + done : nullptr, count - done, scale);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

void flatten(const std::vector<Buffer>& srcs, const Buffer& dst, float scale,
             cudaStream_t stream) {
  std::size_t total = 0;
  for (const Buffer& src : srcs) {
    TORCH_CHECK(src.dtype == srcs.front().dtype, "srcs: must share one dtype");
    total += src.count;
  }
  TORCH_CHECK(total <= dst.count, "flatten: dst has ", dst.count, " elements, srcs ", total);
  std::size_t offset = 0;
  for (std::size_t first = 0; first < srcs.size(); first += kSegments) {
    FlattenArgs args{};
    int64_t blocks = 0;
    for (std::size_t i = first; i < std::min(srcs.size(), first + kSegments); ++i) {
      const int s = args.segments++;
      args.src[s] = srcs[i].data;
      args.count[s] = static_cast<int64_t>(srcs[i].count);
      args.dst_offset[s] = static_cast<int64_t>(offset);
      args.first_block[s] = blocks;
      blocks += (args.count[s] + kElementsPerBlock - 1) / kElementsPerBlock;
      offset += srcs[i].count;
    }
    args.first_block[args.segments] = blocks;
    if (blocks == 0) {
      continue;
    }
    with_type(srcs.front().dtype, [&](auto src_tag) {
      with_type(dst.dtype, [&](auto dst_tag) {
        using S = decltype(src_tag);
        using D = decltype(dst_tag);
        flatten_kernel<S, D><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
            args, static_cast<D*>(dst.data), scale);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  if (dst.count > total) {
    C10_CUDA_CHECK(cudaMemsetAsync(static_cast<char*>(dst.data) + total * dtype_size(dst.dtype),
                                   0, (dst.count - total) * dtype_size(dst.dtype), stream));
  }
}

void flatten_scale_cast(at::TensorList srcs, const at::Tensor& dst, double scale) {
  torch_adapter::check_flatten_args(srcs, dst);
  TORCH_CHECK(dst.is_cuda(), "dst: must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(dst.device());
  std::vector<Buffer> buffers;
  for (const at::Tensor& src : srcs) {
    buffers.push_back(torch_adapter::as_buffer(src));
  }
  flatten(buffers, torch_adapter::as_buffer(dst), static_cast<float>(scale),
          c10::cuda::getCurrentCUDAStream(dst.device().index()).stream());
}

void compress_ef(const at::Tensor& src, const at::Tensor& dst,
                 const std::optional<at::Tensor>& residual, double scale) {
  const std::optional<Buffer> feedback = torch_adapter::check_compress_args(src, dst, residual);
  TORCH_CHECK(src.is_cuda(), "src: must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(src.device());
  compress(torch_adapter::as_buffer(src), torch_adapter::as_buffer(dst),
           feedback ? &*feedback : nullptr, static_cast<float>(scale),
           c10::cuda::getCurrentCUDAStream(src.device().index()).stream());
}

}  // namespace ddl::cuda
