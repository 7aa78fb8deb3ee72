// Byte accounting shared by the transports.
#include "ddl/transport.h"

namespace ddl {

std::size_t ring_bytes(CollectiveKind kind, std::size_t full_bytes, std::int64_t tier_size) {
  const auto p = static_cast<std::size_t>(tier_size);
  const std::size_t one_pass = full_bytes / p * (p - 1);
  return kind == CollectiveKind::kAllReduce ? 2 * one_pass : one_pass;
}

}  // namespace ddl
