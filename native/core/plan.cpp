// Chunk layout of the pipelined schedule.
#include "ddl/plan.h"

#include <algorithm>

namespace ddl {

Plan make_plan(std::size_t count, std::size_t element_size, const Grid& grid,
               std::size_t chunk_bytes) {
  Plan plan;
  plan.quantum = static_cast<std::size_t>(grid.inner_size());
  const std::size_t q = plan.quantum;
  const std::size_t chunk_elems = std::max(q, chunk_bytes / element_size / q * q);
  for (std::size_t offset = 0; offset < count; offset += chunk_elems) {
    Chunk chunk;
    chunk.offset = offset;
    chunk.count = std::min(chunk_elems, count - offset);
    chunk.padded = (chunk.count + q - 1) / q * q;
    chunk.padded_offset = plan.padded_total;
    plan.padded_total += chunk.padded;
    plan.chunks.push_back(chunk);
  }
  return plan;
}

}  // namespace ddl
