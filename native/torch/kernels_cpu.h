// Host implementations of the schedule's local kernels (cast/scale/pad and compression with
// error feedback); the CUDA versions live in native/cuda/kernels.cu.
#pragma once

#include "ddl/types.h"

namespace ddl::cpu {

// dst[i] = cast(src[i] * scale) for i < src.count, zero for the rest; src == dst is allowed.
void convert(const Buffer& src, const Buffer& dst, float scale);

// y = src * scale + residual; dst = round_to_nearest(y); residual = y - dst. src and residual
// float32, dst float16 or bfloat16; residual may be null (no error feedback).
void compress(const Buffer& src, const Buffer& dst, const Buffer* residual, float scale);

}  // namespace ddl::cpu
