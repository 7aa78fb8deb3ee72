// Transport over torch c10d process groups (one per tier), used for CPU tensors on Gloo: the
// same schedule the GPUs run, testable with real processes on machines without GPUs.
#pragma once

#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "ddl/transport.h"
#include "shm_tier.h"

namespace ddl::torch_adapter {

class C10dTransport final : public Transport {
 public:
  // shared_memory[t], where not null, carries tier t's reduce-scatter and all-gather instead of
  // groups[t] (which still serves its allreduce).
  C10dTransport(std::vector<c10::intrusive_ptr<c10d::ProcessGroup>> groups,
                std::vector<std::unique_ptr<SharedMemoryTier>> shared_memory,
                std::vector<std::string> tier_names);
  ~C10dTransport() override;

  int tiers() const override { return static_cast<int>(groups_.size()); }
  Buffer scratch(std::size_t count, DType dtype) override;
  void begin() override;
  void end() override;
  EventId reduce_scatter(int tier, Buffer in, Buffer out, EventId after) override;
  EventId all_gather(int tier, Buffer in, Buffer out, EventId after) override;
  EventId all_reduce(int tier, Buffer data, EventId after) override;
  EventId convert(int lane, Buffer src, Buffer dst, float scale, EventId after) override;
  EventId compress(int lane, Buffer src, Buffer dst, const Buffer* residual, float scale,
                   EventId after) override;

  // After a failed allreduce: node-mates waiting in a shared-memory collective for this rank
  // fail at once (and the rows cannot be used again) instead of waiting out the timeout.
  void abort_shared_memory();

 private:
  // Set from the work's future callback: completion time for the per-tier busy time.
  struct Completion {
    std::mutex mutex;
    std::condition_variable done_cv;
    bool done = false;
    double end = 0.0;
  };
  struct Op {
    c10::intrusive_ptr<c10d::Work> work;  // null for work done inline on this thread
    bool counted = false;  // inline collectives (shared memory) still count in the tier stats
    int tier = -1;
    std::size_t bytes = 0;
    double start = 0.0;
    std::shared_ptr<Completion> completion;
    bool waited = false;
  };

  void wait(EventId id);
  EventId track(int tier, std::size_t bytes, double start, c10::intrusive_ptr<c10d::Work> work);
  EventId track_inline(int tier, std::size_t bytes, double start);
  void drain_quietly();

  std::vector<c10::intrusive_ptr<c10d::ProcessGroup>> groups_;
  std::vector<std::unique_ptr<SharedMemoryTier>> shared_memory_;
  std::vector<std::string> tier_names_;
  std::vector<Op> ops_;
  std::vector<at::Tensor> scratch_;
};

}  // namespace ddl::torch_adapter
