// The DDL process grid: one dimension per network tier, ranks contiguous by tier
// (rank = x + X*(y + Y*z)), dimension 0 the fastest tier.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace ddl {

class Grid {
 public:
  // Throws std::invalid_argument when dims is empty or holds a size below 1.
  explicit Grid(std::vector<std::int64_t> dims);

  int tiers() const { return static_cast<int>(dims_.size()); }
  std::int64_t dim(int tier) const { return dims_.at(static_cast<std::size_t>(tier)); }
  const std::vector<std::int64_t>& dims() const { return dims_; }
  std::int64_t world() const { return world_; }

  std::vector<std::int64_t> coords(std::int64_t rank) const;
  std::int64_t rank_of(const std::vector<std::int64_t>& coords) const;

  // Ranks that differ from `rank` only in coordinate `tier`, ordered by that coordinate:
  // the members of rank's communicator on that tier.
  std::vector<std::int64_t> row(int tier, std::int64_t rank) const;

  // Which of the world/dim(tier) rows of `tier` holds `rank` (the NCCL split colour).
  std::int64_t row_index(int tier, std::int64_t rank) const;

  // Product of every dimension but the slowest: the reduce-scatter steps divide each chunk by
  // it, so chunks are padded to a multiple of it.
  std::int64_t inner_size() const;

  // "flat" for one tier, "intra"/"inter" for two, "tier0".. beyond.
  static std::vector<std::string> tier_names(int tiers);

 private:
  std::vector<std::int64_t> dims_;
  std::int64_t world_ = 1;
};

}  // namespace ddl
