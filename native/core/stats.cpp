// Process-wide per-tier counters.
#include "ddl/stats.h"

#include <algorithm>

namespace ddl {

TierStats& TierStats::global() {
  static TierStats instance;
  return instance;
}

void TierStats::add(const std::string& tier, std::uint64_t bytes, double seconds) {
  std::lock_guard<std::mutex> lock(mutex_);
  for (TierTotals& totals : totals_) {
    if (totals.tier == tier) {
      totals.bytes += bytes;
      totals.seconds += seconds;
      return;
    }
  }
  totals_.push_back(TierTotals{tier, bytes, seconds});
}

std::vector<TierTotals> TierStats::snapshot() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return totals_;
}

void TierStats::reset() {
  std::lock_guard<std::mutex> lock(mutex_);
  totals_.clear();
}

double union_seconds(std::vector<std::pair<double, double>> intervals) {
  std::sort(intervals.begin(), intervals.end());
  double total = 0.0;
  double open_start = 0.0;
  double open_end = -1.0;
  bool open = false;
  for (const auto& [start, end] : intervals) {
    if (open && start <= open_end) {
      open_end = std::max(open_end, end);
      continue;
    }
    if (open) {
      total += open_end - open_start;
    }
    open_start = start;
    open_end = end;
    open = true;
  }
  if (open) {
    total += open_end - open_start;
  }
  return total;
}

}  // namespace ddl
