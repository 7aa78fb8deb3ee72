// The object Python holds (torch.classes.ddl.Communicator): a grid, a transport and the rule
// for when an allreduce's result is ready. One subclass per transport.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/ivalue.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/custom_class.h>

#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "ddl/grid.h"
#include "ddl/schedule.h"

namespace ddl::torch_adapter {

class Communicator : public torch::CustomClassHolder {
 public:
  Communicator(Grid grid, std::size_t chunk_bytes, std::string backend);
  ~Communicator() override = default;

  // Starts an in-place allreduce of `data`; the future's value is `data` once it is reduced
  // (for CUDA tensors: once the work is ordered before the consumer's stream).
  c10::intrusive_ptr<c10::ivalue::Future> allreduce(const at::Tensor& data, const std::string& op,
                                                    const std::string& compression,
                                                    const std::optional<at::Tensor>& residual);

  std::vector<int64_t> grid() const { return grid_.dims(); }
  std::string backend() const { return backend_; }
  // What carries each tier's collectives, fastest first ("gloo", "shm", "nccl").
  virtual std::vector<std::string> transports() const {
    return std::vector<std::string>(static_cast<std::size_t>(grid_.tiers()), backend_);
  }
  int64_t chunk_bytes() const { return static_cast<int64_t>(chunk_bytes_); }
  // Length of the float32 error-feedback buffer for `numel` elements of a given element size.
  int64_t residual_numel(int64_t numel, int64_t element_size) const;

 protected:
  virtual void check_device(const at::Tensor& data, const char* argument) const = 0;
  virtual c10::intrusive_ptr<c10::ivalue::Future> start(at::Tensor data,
                                                        std::optional<at::Tensor> residual,
                                                        Options options) = 0;

  Grid grid_;
  std::size_t chunk_bytes_;
  std::string backend_;
};

// Runs posted jobs one after another on its own thread, in posting order: the order of
// collectives must be the same on every rank, and callers (DDP buckets) post in that order.
// The queue lives in state shared with the thread, so the executor may be destroyed from one
// of its own jobs (the last reference to a communicator can go there): it then detaches the
// thread, which finds the queue stopped and ends.
class SerialExecutor {
 public:
  SerialExecutor();
  ~SerialExecutor();
  SerialExecutor(const SerialExecutor&) = delete;
  SerialExecutor& operator=(const SerialExecutor&) = delete;

  // Throws once the executor is shut down (or drained by drain_all).
  void post(std::function<void()> job);
  // Runs what is queued, then joins the thread (detaches it when called from it); idempotent.
  void shutdown();

  // Stops every executor in the process and waits until each has run what was queued. Called
  // at interpreter exit, before finalization: a job finishing later would run its futures'
  // Python continuations on a thread the finalizing interpreter no longer lets in.
  static void drain_all();

 private:
  struct Queue {
    std::mutex mutex;
    std::condition_variable wake;
    std::condition_variable idle;
    std::deque<std::function<void()>> jobs;
    bool running = false;
    bool stopping = false;
  };
  static void loop(const std::shared_ptr<Queue>& queue);
  // Every executor's queue, for drain_all (under registry_mutex()).
  static std::vector<std::weak_ptr<Queue>>& registry();
  static std::mutex& registry_mutex();

  std::shared_ptr<Queue> queue_;
  std::thread thread_;
};

// CPU tensors over c10d process groups (Gloo); the schedule runs on a background thread so a
// DDP hook returns at once and communication overlaps the rest of the backward pass.
class C10dTransport;

class C10dCommunicator final : public Communicator {
 public:
  // With shared_memory, every tier but the slowest (the network) tries the shared-memory
  // transport and keeps Gloo where its members cannot share a segment.
  C10dCommunicator(Grid grid, std::size_t chunk_bytes,
                   std::vector<c10::intrusive_ptr<c10d::ProcessGroup>> groups,
                   bool shared_memory);
  ~C10dCommunicator() override;

  std::vector<std::string> transports() const override { return transports_; }

 protected:
  void check_device(const at::Tensor& data, const char* argument) const override;
  c10::intrusive_ptr<c10::ivalue::Future> start(at::Tensor data,
                                                std::optional<at::Tensor> residual,
                                                Options options) override;

 private:
  std::vector<std::string> transports_;
  std::unique_ptr<C10dTransport> transport_;
  SerialExecutor executor_;  // last member: joined before the transport goes away
};

}  // namespace ddl::torch_adapter
