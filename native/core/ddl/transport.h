// What the schedule needs from a communication backend: per-tier collectives and two local
// kernels, issued asynchronously with one dependency each. Implemented over torch c10d process
// groups (CPU, Gloo) and over NCCL communicators with CUDA streams.
#pragma once

#include <cstddef>
#include <cstdint>

#include "ddl/types.h"

namespace ddl {

// Handle of an issued operation; kNoEvent means "no dependency".
using EventId = std::int64_t;
inline constexpr EventId kNoEvent = -1;

class Transport {
 public:
  virtual ~Transport() = default;

  // Number of tiers (communicators) this transport holds, fastest first.
  virtual int tiers() const = 0;

  // Scratch memory on the transport's device, valid until end() returns.
  virtual Buffer scratch(std::size_t count, DType dtype) = 0;

  // Brackets one allreduce: begin() orders the work after the caller's pending writes to the
  // data, end() orders everything issued since begin() before the caller's next use of it.
  virtual void begin() = 0;
  virtual void end() = 0;

  // Collectives on the communicator of `tier`; each starts after `after` completed.
  // reduce_scatter: in.count == out.count * tier size; this rank receives its part's sum.
  virtual EventId reduce_scatter(int tier, Buffer in, Buffer out, EventId after) = 0;
  // all_gather: out.count == in.count * tier size; parts ordered by tier coordinate.
  virtual EventId all_gather(int tier, Buffer in, Buffer out, EventId after) = 0;
  virtual EventId all_reduce(int tier, Buffer data, EventId after) = 0;

  // Local kernels on the execution lane of `lane` (the stream of that tier on a GPU).
  // convert: dst[i] = cast(src[i] * scale) for i < src.count, zero for the rest of dst.
  virtual EventId convert(int lane, Buffer src, Buffer dst, float scale, EventId after) = 0;
  // compress: y = src * scale (+ residual); dst = round(y); residual = y - dst (error feedback).
  virtual EventId compress(int lane, Buffer src, Buffer dst, const Buffer* residual, float scale,
                           EventId after) = 0;
};

// Bytes one rank sends on a tier for a collective under the ring algorithm, the figure the
// per-tier counters add up: (p-1)/p of the full buffer for reduce-scatter and all-gather,
// twice that for allreduce.
enum class CollectiveKind : std::uint8_t { kReduceScatter, kAllGather, kAllReduce };
std::size_t ring_bytes(CollectiveKind kind, std::size_t full_bytes, std::int64_t tier_size);

}  // namespace ddl
