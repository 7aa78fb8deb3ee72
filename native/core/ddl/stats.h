// Process-wide per-tier counters (bytes sent, seconds busy), read by the metrics exporter.
#pragma once

#include <cstdint>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace ddl {

struct TierTotals {
  std::string tier;
  std::uint64_t bytes = 0;
  double seconds = 0.0;
};

class TierStats {
 public:
  static TierStats& global();

  void add(const std::string& tier, std::uint64_t bytes, double seconds);
  std::vector<TierTotals> snapshot() const;
  void reset();

 private:
  mutable std::mutex mutex_;
  std::vector<TierTotals> totals_;
};

// Length of the union of [start, end) intervals: the time at least one operation of a tier was
// in flight, so overlapping chunks on one tier are not counted twice.
double union_seconds(std::vector<std::pair<double, double>> intervals);

}  // namespace ddl
