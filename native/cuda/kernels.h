// Device kernels of the schedule, enqueued on a given stream: the CUDA counterparts of
// native/torch/kernels_cpu.h, plus a multi-tensor flatten for gradient lists.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "ddl/types.h"

namespace ddl::cuda {

// dst[i] = cast(src[i] * scale) for i < src.count, zero for the rest; src == dst is allowed.
void convert(const Buffer& src, const Buffer& dst, float scale, cudaStream_t stream);

// y = src * scale + residual; dst = round_to_nearest(y); residual = y - dst.
void compress(const Buffer& src, const Buffer& dst, const Buffer* residual, float scale,
              cudaStream_t stream);

// Writes every src one after another into dst (cast, scaled) in few launches, and zeroes the
// rest of dst. All srcs share one dtype.
void flatten(const std::vector<Buffer>& srcs, const Buffer& dst, float scale,
             cudaStream_t stream);

}  // namespace ddl::cuda
