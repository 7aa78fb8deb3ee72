// Rank <-> coordinate arithmetic of the process grid.
#include "ddl/grid.h"

#include <stdexcept>

namespace ddl {

Grid::Grid(std::vector<std::int64_t> dims) : dims_(std::move(dims)) {
  if (dims_.empty()) {
    throw std::invalid_argument("grid: needs at least one dimension");
  }
  for (std::int64_t d : dims_) {
    if (d < 1) {
      throw std::invalid_argument("grid: every dimension must be >= 1, got " + std::to_string(d));
    }
    world_ *= d;
  }
}

std::vector<std::int64_t> Grid::coords(std::int64_t rank) const {
  if (rank < 0 || rank >= world_) {
    throw std::out_of_range("grid: rank " + std::to_string(rank) + " outside world of " +
                            std::to_string(world_));
  }
  std::vector<std::int64_t> out(dims_.size());
  for (std::size_t t = 0; t < dims_.size(); ++t) {
    out[t] = rank % dims_[t];
    rank /= dims_[t];
  }
  return out;
}

std::int64_t Grid::rank_of(const std::vector<std::int64_t>& coords) const {
  std::int64_t rank = 0;
  for (std::size_t t = dims_.size(); t-- > 0;) {
    rank = rank * dims_[t] + coords.at(t);
  }
  return rank;
}

std::vector<std::int64_t> Grid::row(int tier, std::int64_t rank) const {
  std::vector<std::int64_t> c = coords(rank);
  std::vector<std::int64_t> out;
  out.reserve(static_cast<std::size_t>(dim(tier)));
  for (std::int64_t i = 0; i < dim(tier); ++i) {
    c[static_cast<std::size_t>(tier)] = i;
    out.push_back(rank_of(c));
  }
  return out;
}

std::int64_t Grid::row_index(int tier, std::int64_t rank) const {
  std::vector<std::int64_t> c = coords(rank);
  std::int64_t index = 0;
  for (std::size_t t = dims_.size(); t-- > 0;) {
    if (static_cast<int>(t) != tier) {
      index = index * dims_[t] + c[t];
    }
  }
  return index;
}

std::int64_t Grid::inner_size() const {
  std::int64_t product = 1;
  for (std::size_t t = 0; t + 1 < dims_.size(); ++t) {
    product *= dims_[t];
  }
  return product;
}

std::vector<std::string> Grid::tier_names(int tiers) {
  if (tiers == 1) {
    return {"flat"};
  }
  if (tiers == 2) {
    return {"intra", "inter"};
  }
  std::vector<std::string> names;
  for (int t = 0; t < tiers; ++t) {
    names.push_back("tier" + std::to_string(t));
  }
  return names;
}

}  // namespace ddl
