// How a tensor is cut into chunks for the pipelined schedule.
#pragma once

#include <cstddef>
#include <vector>

#include "ddl/grid.h"

namespace ddl {

struct Chunk {
  std::size_t offset = 0;         // first element in the tensor
  std::size_t count = 0;          // elements of the tensor in this chunk
  std::size_t padded = 0;         // count rounded up to a multiple of the grid's inner size
  std::size_t padded_offset = 0;  // first element in the padded layout
};

struct Plan {
  std::vector<Chunk> chunks;
  std::size_t padded_total = 0;  // sum of Chunk::padded
  std::size_t quantum = 1;       // the grid's inner size; every padded count divides by it

  // Elements of the slow-tier segment this rank owns across all chunks (the residual length).
  std::size_t slow_count() const { return padded_total / quantum; }
};

// Every chunk but the last is exactly `chunk_bytes` rounded down to a whole quantum (at least
// one quantum); only the last chunk can need padding.
Plan make_plan(std::size_t count, std::size_t element_size, const Grid& grid,
               std::size_t chunk_bytes);

}  // namespace ddl
