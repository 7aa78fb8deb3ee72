// c10d transport: collectives are asynchronous c10d works; a dependency is honoured by waiting
// for the work it names before issuing, on the thread that runs the schedule.
#include "c10d_transport.h"

#include <ATen/ops/empty.h>

#include <chrono>
#include <exception>

#include "adapter.h"
#include "ddl/stats.h"
#include "kernels_cpu.h"

namespace ddl::torch_adapter {
namespace {

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

const at::Device kCpu(at::kCPU);

}  // namespace

C10dTransport::C10dTransport(std::vector<c10::intrusive_ptr<c10d::ProcessGroup>> groups,
                             std::vector<std::unique_ptr<SharedMemoryTier>> shared_memory,
                             std::vector<std::string> tier_names)
    : groups_(std::move(groups)),
      shared_memory_(std::move(shared_memory)),
      tier_names_(std::move(tier_names)) {
  TORCH_CHECK(!groups_.empty(), "group_names: needs one process group per grid dimension");
  TORCH_CHECK(groups_.size() == tier_names_.size() && groups_.size() == shared_memory_.size(),
              "tier names, groups and shared-memory tiers differ in length");
}

C10dTransport::~C10dTransport() { drain_quietly(); }

Buffer C10dTransport::scratch(std::size_t count, DType dtype) {
  scratch_.push_back(at::empty({static_cast<int64_t>(count)},
                               at::TensorOptions().dtype(to_scalar_type(dtype)).device(kCpu)));
  return as_buffer(scratch_.back());
}

void C10dTransport::begin() {
  drain_quietly();
  ops_.clear();
  scratch_.clear();
}

void C10dTransport::drain_quietly() {
  for (Op& op : ops_) {
    if (op.work && !op.waited) {
      try {
        op.work->wait();
      } catch (const std::exception&) {
        // The error was or will be reported by the wait that observed it first.
      }
      op.waited = true;
    }
  }
}

void C10dTransport::wait(EventId id) {
  if (id == kNoEvent) {
    return;
  }
  Op& op = ops_.at(static_cast<std::size_t>(id));
  if (op.waited || !op.work) {
    return;
  }
  op.waited = true;
  op.work->wait();
  std::unique_lock<std::mutex> lock(op.completion->mutex);
  if (op.completion->done && op.completion->end == 0.0) {
    op.completion->end = now_seconds();  // no future: completion seen here
  }
  op.completion->done_cv.wait(lock, [&] { return op.completion->done; });
}

EventId C10dTransport::track(int tier, std::size_t bytes, double start,
                             c10::intrusive_ptr<c10d::Work> work) {
  Op op;
  op.tier = tier;
  op.bytes = bytes;
  op.start = start;
  op.completion = std::make_shared<Completion>();
  if (work) {
    // Some Gloo works have no future; their completion time is taken when wait() returns.
    c10::intrusive_ptr<c10::ivalue::Future> future;
    try {
      future = work->getFuture();
    } catch (const c10::Error&) {
      op.completion->done = true;
    }
    if (future) {
      std::shared_ptr<Completion> completion = op.completion;
      future->addCallback([completion](c10::ivalue::Future&) {
        std::lock_guard<std::mutex> lock(completion->mutex);
        completion->end = now_seconds();
        completion->done = true;
        completion->done_cv.notify_all();
      });
    }
  } else {
    op.completion->done = true;
    op.waited = true;
  }
  op.work = std::move(work);
  ops_.push_back(std::move(op));
  return static_cast<EventId>(ops_.size()) - 1;
}

void C10dTransport::abort_shared_memory() {
  for (auto& shm : shared_memory_) {
    if (shm) {
      shm->abort();
    }
  }
}

EventId C10dTransport::track_inline(int tier, std::size_t bytes, double start) {
  const EventId id = track(tier, bytes, start, {});
  Op& op = ops_.back();
  op.counted = true;
  op.completion->end = now_seconds();
  return id;
}

void C10dTransport::end() {
  std::exception_ptr first_error;
  for (std::size_t i = 0; i < ops_.size(); ++i) {
    try {
      wait(static_cast<EventId>(i));
    } catch (...) {
      if (!first_error) {
        first_error = std::current_exception();
      }
    }
  }
  if (first_error) {
    std::rethrow_exception(first_error);
  }
  std::vector<std::vector<std::pair<double, double>>> busy(groups_.size());
  std::vector<std::uint64_t> bytes(groups_.size(), 0);
  for (const Op& op : ops_) {
    if (op.work || op.counted) {
      busy[static_cast<std::size_t>(op.tier)].emplace_back(op.start, op.completion->end);
      bytes[static_cast<std::size_t>(op.tier)] += op.bytes;
    }
  }
  for (std::size_t t = 0; t < groups_.size(); ++t) {
    TierStats::global().add(tier_names_[t], bytes[t], union_seconds(std::move(busy[t])));
  }
}

EventId C10dTransport::reduce_scatter(int tier, Buffer in, Buffer out, EventId after) {
  wait(after);
  auto& group = groups_.at(static_cast<std::size_t>(tier));
  TORCH_INTERNAL_ASSERT(in.count == out.count * static_cast<std::size_t>(group->getSize()));
  const std::size_t bytes =
      ring_bytes(CollectiveKind::kReduceScatter, in.bytes(), group->getSize());
  if (auto& shm = shared_memory_.at(static_cast<std::size_t>(tier))) {
    const double start = now_seconds();
    shm->reduce_scatter(in, out);
    return track_inline(tier, bytes, start);
  }
  at::Tensor input = as_tensor(in, kCpu);
  at::Tensor output = as_tensor(out, kCpu);
  c10d::ReduceScatterOptions options;
  options.reduceOp = c10d::ReduceOp::SUM;
  const double start = now_seconds();
  return track(tier, bytes, start, group->_reduce_scatter_base(output, input, options));
}

EventId C10dTransport::all_gather(int tier, Buffer in, Buffer out, EventId after) {
  wait(after);
  auto& group = groups_.at(static_cast<std::size_t>(tier));
  TORCH_INTERNAL_ASSERT(out.count == in.count * static_cast<std::size_t>(group->getSize()));
  const std::size_t bytes = ring_bytes(CollectiveKind::kAllGather, out.bytes(), group->getSize());
  if (auto& shm = shared_memory_.at(static_cast<std::size_t>(tier))) {
    const double start = now_seconds();
    shm->all_gather(in, out);
    return track_inline(tier, bytes, start);
  }
  at::Tensor input = as_tensor(in, kCpu);
  at::Tensor output = as_tensor(out, kCpu);
  const double start = now_seconds();
  return track(tier, bytes, start, group->_allgather_base(output, input));
}

EventId C10dTransport::all_reduce(int tier, Buffer data, EventId after) {
  wait(after);
  auto& group = groups_.at(static_cast<std::size_t>(tier));
  std::vector<at::Tensor> tensors{as_tensor(data, kCpu)};
  c10d::AllreduceOptions options;
  options.reduceOp = c10d::ReduceOp::SUM;
  const double start = now_seconds();
  return track(tier, ring_bytes(CollectiveKind::kAllReduce, data.bytes(), group->getSize()),
               start, group->allreduce(tensors, options));
}

EventId C10dTransport::convert(int lane, Buffer src, Buffer dst, float scale, EventId after) {
  wait(after);
  cpu::convert(src, dst, scale);
  return track(lane, 0, 0.0, {});
}

EventId C10dTransport::compress(int lane, Buffer src, Buffer dst, const Buffer* residual,
                                float scale, EventId after) {
  wait(after);
  cpu::compress(src, dst, residual, scale);
  return track(lane, 0, 0.0, {});
}

}  // namespace ddl::torch_adapter
