// NCCL transport and communicator: one communicator per tier, split from one world
// communicator, each on its own CUDA stream; dependencies between tiers are CUDA events, and
// the caller's stream is joined through events at both ends.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <nccl.h>

#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "../torch/adapter.h"
#include "../torch/communicator.h"
#include "ddl/stats.h"
#include "ddl/transport.h"
#include "kernels.h"
#include "nccl_api.h"

#define DDL_NCCL_CHECK(expr)                                                              \
  do {                                                                                   \
    const ncclResult_t ddl_nccl_result = (expr);                                         \
    TORCH_CHECK(ddl_nccl_result == ncclSuccess, "NCCL error in " #expr ": ",             \
                ncclGetErrorString(ddl_nccl_result), " (", ncclGetLastError(nullptr), ")"); \
  } while (0)

#if NCCL_VERSION_CODE >= NCCL_VERSION(2, 18, 0)
#define DDL_HAS_NCCL_SPLIT 1
#else
#define DDL_HAS_NCCL_SPLIT 0
#endif

namespace ddl::cuda {
namespace {

using torch_adapter::as_buffer;
using torch_adapter::to_scalar_type;

ncclDataType_t nccl_type(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return ncclFloat32;
    case DType::kFloat16:
      return ncclFloat16;
    case DType::kBFloat16:
      return ncclBfloat16;
  }
  TORCH_CHECK(false, "unknown ddl dtype");
}

// Start/stop events of finished or running NCCL operations, turned into per-tier seconds by
// flush_stats (lazily, so that timing never blocks the issuing thread).
struct TimedOp {
  std::string tier;
  std::uint64_t bytes;
  cudaEvent_t start;
  cudaEvent_t stop;
  c10::DeviceIndex device;
};

std::mutex& timed_mutex() {
  static std::mutex mutex;
  return mutex;
}

std::vector<TimedOp>& timed_ops() {
  static std::vector<TimedOp> ops;
  return ops;
}

class NcclTransport final : public Transport {
 public:
  NcclTransport(std::vector<ncclComm_t> comms, std::vector<int64_t> sizes,
                std::vector<c10::cuda::CUDAStream> streams, c10::DeviceIndex device)
      : comms_(std::move(comms)),
        sizes_(std::move(sizes)),
        names_(Grid::tier_names(static_cast<int>(comms_.size()))),
        streams_(std::move(streams)),
        device_(device),
        last_(comms_.size(), nullptr) {}

  ~NcclTransport() override {
    for (cudaEvent_t event : owned_) {
      (void)cudaEventDestroy(event);  // no throwing from a destructor
    }
  }

  NcclTransport(const NcclTransport&) = delete;
  NcclTransport& operator=(const NcclTransport&) = delete;

  int tiers() const override { return static_cast<int>(comms_.size()); }

  const std::vector<c10::cuda::CUDAStream>& streams() const { return streams_; }

  Buffer scratch(std::size_t count, DType dtype) override {
    scratch_.push_back(at::empty(
        {static_cast<int64_t>(count)},
        at::TensorOptions().dtype(to_scalar_type(dtype)).device(at::kCUDA, device_)));
    // The block may have been freed by work still queued on the caller's stream.
    join_caller_stream();
    return as_buffer(scratch_.back());
  }

  void begin() override {
    release_events();
    std::fill(last_.begin(), last_.end(), nullptr);
    join_caller_stream();
  }

  void end() override {
    // Lane 0 ends up after everything: the communicator completes its future there.
    for (std::size_t lane = 1; lane < streams_.size(); ++lane) {
      if (last_[lane] != nullptr) {
        C10_CUDA_CHECK(cudaStreamWaitEvent(streams_[0].stream(), last_[lane], 0));
      }
    }
    for (const at::Tensor& t : scratch_) {
      for (const auto& stream : streams_) {
        c10::cuda::CUDACachingAllocator::recordStream(t.storage().data_ptr(), stream);
      }
    }
    scratch_.clear();
  }

  EventId reduce_scatter(int tier, Buffer in, Buffer out, EventId after) override {
    order(tier, after);
    const auto t = static_cast<std::size_t>(tier);
    return timed(tier, ring_bytes(CollectiveKind::kReduceScatter, in.bytes(), sizes_[t]), [&] {
      DDL_NCCL_CHECK(ncclReduceScatter(in.data, out.data, out.count, nccl_type(in.dtype), ncclSum,
                                       comms_[t], streams_[t].stream()));
    });
  }

  EventId all_gather(int tier, Buffer in, Buffer out, EventId after) override {
    order(tier, after);
    const auto t = static_cast<std::size_t>(tier);
    return timed(tier, ring_bytes(CollectiveKind::kAllGather, out.bytes(), sizes_[t]), [&] {
      DDL_NCCL_CHECK(ncclAllGather(in.data, out.data, in.count, nccl_type(in.dtype), comms_[t],
                                   streams_[t].stream()));
    });
  }

  EventId all_reduce(int tier, Buffer data, EventId after) override {
    order(tier, after);
    const auto t = static_cast<std::size_t>(tier);
    return timed(tier, ring_bytes(CollectiveKind::kAllReduce, data.bytes(), sizes_[t]), [&] {
      DDL_NCCL_CHECK(ncclAllReduce(data.data, data.data, data.count, nccl_type(data.dtype),
                                   ncclSum, comms_[t], streams_[t].stream()));
    });
  }

  EventId convert(int lane, Buffer src, Buffer dst, float scale, EventId after) override {
    order(lane, after);
    cuda::convert(src, dst, scale, streams_[static_cast<std::size_t>(lane)].stream());
    return mark(lane);
  }

  EventId compress(int lane, Buffer src, Buffer dst, const Buffer* residual, float scale,
                   EventId after) override {
    order(lane, after);
    cuda::compress(src, dst, residual, scale, streams_[static_cast<std::size_t>(lane)].stream());
    return mark(lane);
  }

 private:
  void join_caller_stream() {
    cudaEvent_t ready = new_event(cudaEventDisableTiming);
    C10_CUDA_CHECK(cudaEventRecord(ready, c10::cuda::getCurrentCUDAStream(device_).stream()));
    for (const auto& stream : streams_) {
      C10_CUDA_CHECK(cudaStreamWaitEvent(stream.stream(), ready, 0));
    }
  }

  // Same lane: stream order is enough. Another lane: wait for that operation's event.
  void order(int lane, EventId after) {
    if (after == kNoEvent) {
      return;
    }
    const auto a = static_cast<std::size_t>(after);
    if (lanes_[a] != lane) {
      C10_CUDA_CHECK(cudaStreamWaitEvent(streams_[static_cast<std::size_t>(lane)].stream(),
                                         events_[a], 0));
    }
  }

  cudaEvent_t new_event(unsigned flags) {
    cudaEvent_t event = nullptr;
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&event, flags));
    owned_.push_back(event);
    return event;
  }

  EventId mark(int lane) {
    cudaEvent_t event = new_event(cudaEventDisableTiming);
    C10_CUDA_CHECK(cudaEventRecord(event, streams_[static_cast<std::size_t>(lane)].stream()));
    events_.push_back(event);
    lanes_.push_back(lane);
    last_[static_cast<std::size_t>(lane)] = event;
    return static_cast<EventId>(events_.size()) - 1;
  }

  template <typename F>
  EventId timed(int tier, std::size_t bytes, F&& launch) {
    const auto t = static_cast<std::size_t>(tier);
    cudaEvent_t start = nullptr;
    cudaEvent_t stop = nullptr;
    C10_CUDA_CHECK(cudaEventCreate(&start));
    C10_CUDA_CHECK(cudaEventCreate(&stop));
    C10_CUDA_CHECK(cudaEventRecord(start, streams_[t].stream()));
    launch();
    C10_CUDA_CHECK(cudaEventRecord(stop, streams_[t].stream()));
    {
      // Only recorded events are queued: flush_stats may run on another thread at any time.
      std::lock_guard<std::mutex> lock(timed_mutex());
      timed_ops().push_back(TimedOp{names_[t], bytes, start, stop, device_});
    }
    return mark(tier);
  }

  void release_events() {
    for (cudaEvent_t event : owned_) {
      // Destroying a recorded event is safe: waits already enqueued keep their meaning.
      C10_CUDA_CHECK(cudaEventDestroy(event));
    }
    owned_.clear();
    events_.clear();
    lanes_.clear();
  }

  std::vector<ncclComm_t> comms_;
  std::vector<int64_t> sizes_;
  std::vector<std::string> names_;
  std::vector<c10::cuda::CUDAStream> streams_;
  c10::DeviceIndex device_;
  std::vector<cudaEvent_t> events_;  // by EventId
  std::vector<int> lanes_;           // by EventId
  std::vector<cudaEvent_t> last_;    // last event per lane since begin()
  std::vector<cudaEvent_t> owned_;
  std::vector<at::Tensor> scratch_;
};

class NcclCommunicator final : public torch_adapter::Communicator {
 public:
  NcclCommunicator(Grid grid, std::size_t chunk_bytes, const at::Tensor& unique_id, int64_t rank,
                   bool split, int64_t device)
      : Communicator(std::move(grid), chunk_bytes, split ? "nccl-hierarchical" : "nccl-flat"),
        device_(static_cast<c10::DeviceIndex>(device)) {
    TORCH_CHECK(unique_id.scalar_type() == at::kByte && unique_id.numel() == NCCL_UNIQUE_ID_BYTES,
                "unique_id: must be ", NCCL_UNIQUE_ID_BYTES, " uint8 values");
    TORCH_CHECK(rank >= 0 && rank < grid_.world(), "rank: must be in [0, ", grid_.world(),
                "), got ", rank);
    TORCH_CHECK(device >= 0 && device < c10::cuda::device_count(), "device: no CUDA device ",
                device);
    TORCH_CHECK(split || grid_.tiers() == 1,
                "split: a multi-dimensional grid needs one communicator per tier (split=true)");
    TORCH_CHECK(!split || nccl_has_split(), "split: needs ncclCommSplit (NCCL 2.18+), have ",
                nccl_version());
    const c10::cuda::CUDAGuard guard(device_);
    ncclUniqueId id;
    std::memcpy(&id, unique_id.contiguous().cpu().data_ptr(), sizeof(id));
    DDL_NCCL_CHECK(ncclCommInitRank(&world_, static_cast<int>(grid_.world()), id,
                                    static_cast<int>(rank)));
    std::vector<ncclComm_t> comms;
    std::vector<int64_t> sizes;
    std::vector<c10::cuda::CUDAStream> streams;
    for (int t = 0; t < grid_.tiers(); ++t) {
      ncclComm_t comm = world_;
      if (split) {
#if DDL_HAS_NCCL_SPLIT
        const std::vector<int64_t> coords = grid_.coords(rank);
        DDL_NCCL_CHECK(ncclCommSplit(world_, static_cast<int>(grid_.row_index(t, rank)),
                                     static_cast<int>(coords[static_cast<std::size_t>(t)]), &comm,
                                     nullptr));
        owned_.push_back(comm);
#endif
      }
      comms.push_back(comm);
      sizes.push_back(grid_.dim(t));
      streams.push_back(c10::cuda::getStreamFromPool(/*isHighPriority=*/true, device_));
    }
    transport_ = std::make_unique<NcclTransport>(std::move(comms), std::move(sizes),
                                                 std::move(streams), device_);
  }

  ~NcclCommunicator() override {
    try {
      const c10::cuda::CUDAGuard guard(device_);
      for (const auto& stream : transport_->streams()) {
        stream.synchronize();
      }
      transport_.reset();
      for (ncclComm_t comm : owned_) {
        DDL_NCCL_CHECK(ncclCommDestroy(comm));
      }
      DDL_NCCL_CHECK(ncclCommDestroy(world_));
    } catch (const std::exception& error) {
      TORCH_WARN("ddl: NCCL communicator teardown failed: ", error.what());
    }
  }

 protected:
  void check_device(const at::Tensor& data, const char* argument) const override {
    TORCH_CHECK(data.is_cuda() && data.device().index() == device_, argument,
                ": this NCCL communicator reduces tensors on cuda:", static_cast<int>(device_),
                ", got ", data.device());
  }

  c10::intrusive_ptr<c10::ivalue::Future> start(at::Tensor data,
                                                std::optional<at::Tensor> residual,
                                                Options options) override {
    const c10::cuda::CUDAGuard guard(device_);
    // One schedule at a time: the transport's events and scratch belong to the call.
    const std::lock_guard<std::mutex> lock(mutex_);
    flush_stats(/*block=*/false);
    const std::optional<Buffer> feedback =
        residual.has_value() ? std::optional<Buffer>(as_buffer(*residual)) : std::nullopt;
    run_allreduce(*transport_, grid_, as_buffer(data), feedback ? &*feedback : nullptr, options);
    for (const auto& stream : transport_->streams()) {
      c10::cuda::CUDACachingAllocator::recordStream(data.storage().data_ptr(), stream);
      if (residual.has_value()) {
        c10::cuda::CUDACachingAllocator::recordStream(residual->storage().data_ptr(), stream);
      }
    }
    // A CUDA-aware future: completing it on lane 0 records an event there, and whoever waits
    // on the future (DDP, or Future.wait()) makes its own stream wait for that event.
    auto future = c10::make_intrusive<c10::ivalue::Future>(
        c10::TensorType::get(), std::vector<c10::Device>{data.device()});
    {
      const c10::cuda::CUDAStreamGuard on_lane(transport_->streams().front());
      future->markCompleted(c10::IValue(data));
    }
    return future;
  }

 private:
  c10::DeviceIndex device_;
  ncclComm_t world_ = nullptr;
  std::vector<ncclComm_t> owned_;
  std::unique_ptr<NcclTransport> transport_;
  std::mutex mutex_;
};

}  // namespace

bool nccl_has_split() {
  int version = 0;
  DDL_NCCL_CHECK(ncclGetVersion(&version));
  return DDL_HAS_NCCL_SPLIT == 1 && version >= NCCL_VERSION(2, 18, 0);
}

std::string nccl_version() {
  int version = 0;
  DDL_NCCL_CHECK(ncclGetVersion(&version));
  return std::to_string(version / 10000) + "." + std::to_string(version / 100 % 100) + "." +
         std::to_string(version % 100);
}

at::Tensor nccl_unique_id() {
  ncclUniqueId id;
  DDL_NCCL_CHECK(ncclGetUniqueId(&id));
  at::Tensor out = at::empty({NCCL_UNIQUE_ID_BYTES}, at::kByte);
  std::memcpy(out.data_ptr(), &id, sizeof(id));
  return out;
}

c10::intrusive_ptr<torch_adapter::Communicator> make_nccl_communicator(
    const at::Tensor& unique_id, int64_t rank, std::vector<int64_t> grid, bool split,
    int64_t device, int64_t chunk_bytes) {
  TORCH_CHECK(chunk_bytes > 0, "chunk_bytes: must be positive, got ", chunk_bytes);
  return c10::make_intrusive<NcclCommunicator>(Grid(std::move(grid)),
                                               static_cast<std::size_t>(chunk_bytes), unique_id,
                                               rank, split, device);
}

void flush_stats(bool block) {
  std::vector<TimedOp> done;
  {
    std::lock_guard<std::mutex> lock(timed_mutex());
    std::vector<TimedOp> running;
    for (TimedOp& op : timed_ops()) {
      const c10::cuda::CUDAGuard guard(op.device);
      if (block) {
        C10_CUDA_CHECK(cudaEventSynchronize(op.stop));
        done.push_back(op);
        continue;
      }
      const cudaError_t state = cudaEventQuery(op.stop);
      if (state == cudaErrorNotReady) {
        (void)cudaGetLastError();  // not an error: clear it so later checks do not see it
        running.push_back(op);
      } else {
        C10_CUDA_CHECK(state);
        done.push_back(op);
      }
    }
    timed_ops().swap(running);
  }
  for (const TimedOp& op : done) {
    const c10::cuda::CUDAGuard guard(op.device);
    float ms = 0.0F;
    C10_CUDA_CHECK(cudaEventElapsedTime(&ms, op.start, op.stop));
    TierStats::global().add(op.tier, op.bytes, static_cast<double>(ms) / 1000.0);
    C10_CUDA_CHECK(cudaEventDestroy(op.start));
    C10_CUDA_CHECK(cudaEventDestroy(op.stop));
  }
}

}  // namespace ddl::cuda
