// The hierarchical allreduce schedule: reduce-scatter tier by tier from the fastest outwards,
// allreduce on the slowest, all-gather back in reverse order; chunked and issued as a wavefront
// so that different chunks occupy different tiers at the same time.
#pragma once

#include <cstddef>

#include "ddl/grid.h"
#include "ddl/transport.h"
#include "ddl/types.h"

namespace ddl {

struct Options {
  ReduceOp op = ReduceOp::kSum;
  Compression compression = Compression::kNone;
  std::size_t chunk_bytes = std::size_t{4} << 20;
};

// True when `compression` changes the wire format for data of this dtype (only float32 data is
// compressed; 16-bit data already moves half the bytes).
bool compresses(Compression compression, DType dtype);

// In-place allreduce of `data` over the transport's tiers, which must match `grid`.
// `residual` (float32, Plan::slow_count() elements, may be null) carries the error feedback of
// the slow-tier compression between calls.
void run_allreduce(Transport& transport, const Grid& grid, Buffer data, const Buffer* residual,
                   const Options& options);

}  // namespace ddl
