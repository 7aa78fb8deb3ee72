// Communicator base class, the serial executor and the c10d (CPU) communicator.
#include <Python.h>

#include "communicator.h"

#include "adapter.h"
#include "c10d_transport.h"
#include "ddl/plan.h"

#include <algorithm>

namespace ddl::torch_adapter {
namespace {

// How long a shared-memory collective waits for a live but absent peer (a dead one is noticed
// within tens of milliseconds): Gloo's default, so a long checkpoint write on one rank stalls
// its node-mates no sooner than it would stall the network tier.
constexpr double kSharedMemoryTimeoutSeconds = 1800.0;

// Releases the GIL for a scope when this thread holds it: waiting for work that may need it
// (Python continuations of finished futures) must not keep it.
class GilRelease {
 public:
  GilRelease() : saved_(Py_IsInitialized() && PyGILState_Check() ? PyEval_SaveThread() : nullptr) {}
  ~GilRelease() {
    if (saved_ != nullptr) {
      PyEval_RestoreThread(saved_);
    }
  }
  GilRelease(const GilRelease&) = delete;
  GilRelease& operator=(const GilRelease&) = delete;

 private:
  PyThreadState* saved_;
};

}  // namespace

Communicator::Communicator(Grid grid, std::size_t chunk_bytes, std::string backend)
    : grid_(std::move(grid)), chunk_bytes_(chunk_bytes), backend_(std::move(backend)) {
  TORCH_CHECK(chunk_bytes_ >= 1024, "chunk_bytes: must be at least 1024, got ", chunk_bytes_);
}

int64_t Communicator::residual_numel(int64_t numel, int64_t element_size) const {
  TORCH_CHECK(numel >= 0, "numel: must be >= 0, got ", numel);
  TORCH_CHECK(element_size == 2 || element_size == 4, "element_size: must be 2 or 4, got ",
              element_size);
  return static_cast<int64_t>(make_plan(static_cast<std::size_t>(numel),
                                        static_cast<std::size_t>(element_size), grid_,
                                        chunk_bytes_)
                                  .slow_count());
}

c10::intrusive_ptr<c10::ivalue::Future> Communicator::allreduce(
    const at::Tensor& data, const std::string& op, const std::string& compression,
    const std::optional<at::Tensor>& residual) {
  check_data(data, "tensor");
  check_device(data, "tensor");
  Options options;
  options.op = parse_op(op);
  options.compression = parse_compression(compression);
  options.chunk_bytes = chunk_bytes_;
  std::optional<at::Tensor> feedback;
  if (residual.has_value() && residual->defined() &&
      compresses(options.compression, to_dtype(data.scalar_type(), "tensor"))) {
    const at::Tensor& r = *residual;
    TORCH_CHECK(r.scalar_type() == at::kFloat, "residual: must be float32, got ",
                r.scalar_type());
    TORCH_CHECK(r.is_contiguous(), "residual: must be contiguous");
    TORCH_CHECK(r.device() == data.device(), "residual: must be on ", data.device(), ", got ",
                r.device());
    const int64_t expected = residual_numel(data.numel(), data.element_size());
    TORCH_CHECK(r.numel() == expected, "residual: must have ", expected,
                " elements for a tensor of ", data.numel(), ", got ", r.numel());
    feedback = r;
  }
  return start(data, feedback, options);
}

// Never destroyed, so they outlive any executor (some are destroyed late at exit).
std::mutex& SerialExecutor::registry_mutex() {
  static auto* mutex = new std::mutex;
  return *mutex;
}

std::vector<std::weak_ptr<SerialExecutor::Queue>>& SerialExecutor::registry() {
  static auto* queues = new std::vector<std::weak_ptr<Queue>>;
  return *queues;
}

SerialExecutor::SerialExecutor()
    : queue_(std::make_shared<Queue>()), thread_([queue = queue_] { loop(queue); }) {
  std::lock_guard<std::mutex> lock(registry_mutex());
  auto& queues = registry();
  queues.erase(std::remove_if(queues.begin(), queues.end(),
                              [](const std::weak_ptr<Queue>& q) { return q.expired(); }),
               queues.end());
  queues.push_back(queue_);
}

SerialExecutor::~SerialExecutor() { shutdown(); }

void SerialExecutor::shutdown() {
  {
    std::lock_guard<std::mutex> lock(queue_->mutex);
    queue_->stopping = true;
  }
  queue_->wake.notify_all();
  if (!thread_.joinable()) {
    return;
  }
  if (thread_.get_id() == std::this_thread::get_id()) {
    thread_.detach();
  } else {
    thread_.join();
  }
}

void SerialExecutor::drain_all() {
  std::vector<std::shared_ptr<Queue>> live;
  {
    std::lock_guard<std::mutex> lock(registry_mutex());
    for (const std::weak_ptr<Queue>& q : registry()) {
      if (auto queue = q.lock()) {
        live.push_back(std::move(queue));
      }
    }
  }
  GilRelease unlocked;
  for (const auto& queue : live) {
    std::unique_lock<std::mutex> lock(queue->mutex);
    queue->stopping = true;
    queue->wake.notify_all();
    queue->idle.wait(lock, [&] { return queue->jobs.empty() && !queue->running; });
  }
}

void SerialExecutor::post(std::function<void()> job) {
  {
    std::lock_guard<std::mutex> lock(queue_->mutex);
    TORCH_CHECK(!queue_->stopping,
                "ddl: the communicator is shut down (the process is exiting); no new allreduce "
                "can start");
    queue_->jobs.push_back(std::move(job));
  }
  queue_->wake.notify_one();
}

void SerialExecutor::loop(const std::shared_ptr<Queue>& queue) {
  for (;;) {
    std::function<void()> job;
    {
      std::unique_lock<std::mutex> lock(queue->mutex);
      queue->wake.wait(lock, [&] { return queue->stopping || !queue->jobs.empty(); });
      if (queue->jobs.empty()) {
        return;  // stopping, and every posted job has run
      }
      job = std::move(queue->jobs.front());
      queue->jobs.pop_front();
      queue->running = true;
    }
    job();
    job = nullptr;  // drops what the job held (maybe the executor's owner) before going idle
    {
      std::lock_guard<std::mutex> lock(queue->mutex);
      queue->running = false;
    }
    queue->idle.notify_all();
  }
}

C10dCommunicator::C10dCommunicator(Grid grid, std::size_t chunk_bytes,
                                   std::vector<c10::intrusive_ptr<c10d::ProcessGroup>> groups,
                                   bool shared_memory)
    : Communicator(std::move(grid), chunk_bytes, "gloo") {
  TORCH_CHECK(static_cast<int>(groups.size()) == grid_.tiers(), "group_names: grid has ",
              grid_.tiers(), " dimensions but ", groups.size(), " groups were given");
  for (int t = 0; t < grid_.tiers(); ++t) {
    TORCH_CHECK(groups[static_cast<std::size_t>(t)]->getSize() == grid_.dim(t), "group_names[",
                t, "]: group has ", groups[static_cast<std::size_t>(t)]->getSize(),
                " ranks but grid dimension ", t, " is ", grid_.dim(t));
  }
  std::vector<std::unique_ptr<SharedMemoryTier>> tiers(groups.size());
  for (int t = 0; t + 1 < grid_.tiers(); ++t) {
    if (shared_memory && grid_.dim(t) > 1) {
      std::string why_not;
      tiers[static_cast<std::size_t>(t)] = SharedMemoryTier::connect(
          *groups[static_cast<std::size_t>(t)], kSharedMemoryTimeoutSeconds, &why_not);
      if (!tiers[static_cast<std::size_t>(t)]) {
        TORCH_WARN_ONCE("ddl: tier ", t, " stays on Gloo: ", why_not);
      }
    }
    transports_.push_back(tiers[static_cast<std::size_t>(t)] ? "shm" : "gloo");
  }
  transports_.push_back("gloo");
  transport_ = std::make_unique<C10dTransport>(std::move(groups), std::move(tiers),
                                               Grid::tier_names(grid_.tiers()));
}

C10dCommunicator::~C10dCommunicator() {
  // A finishing job can need the GIL (a Python continuation of its future, or dropping the
  // last reference to one). Python drops the communicator with the GIL held: release it
  // while the executor drains, or both threads wait for each other.
  GilRelease unlocked;
  executor_.shutdown();
}

void C10dCommunicator::check_device(const at::Tensor& data, const char* argument) const {
  TORCH_CHECK(data.device().is_cpu(), argument,
              ": the gloo backend reduces CPU tensors, got a tensor on ", data.device());
}

c10::intrusive_ptr<c10::ivalue::Future> C10dCommunicator::start(
    at::Tensor data, std::optional<at::Tensor> residual, Options options) {
  auto future = c10::make_intrusive<c10::ivalue::Future>(c10::TensorType::get());
  // The job keeps the communicator alive: Python may drop its last reference (a DDP model
  // going away) while buckets are still queued.
  auto self = c10::intrusive_ptr<C10dCommunicator>::reclaim_copy(this);
  executor_.post([this, self, data, residual, options, future] {
    try {
      const Buffer buffer = as_buffer(data);
      const std::optional<Buffer> feedback =
          residual.has_value() ? std::optional<Buffer>(as_buffer(*residual)) : std::nullopt;
      run_allreduce(*transport_, grid_, buffer, feedback ? &*feedback : nullptr, options);
      future->markCompleted(c10::IValue(data));
    } catch (...) {
      // A continuation of the completed future may be what threw: the future keeps its value.
      if (!future->completed()) {
        transport_->abort_shared_memory();
        future->setError(std::current_exception());
      }
    }
  });
  return future;
}

}  // namespace ddl::torch_adapter
