// The intra-node tier over POSIX shared memory, for the CPU path. Gloo moves intra-node data
// through loopback TCP: every byte is copied by the kernel twice and the ranks of a node spend
// their CPU time in it, which on small hosts makes the fast tier slower than the network one.
// Here the ranks of one tier row map one segment; a collective is one copy in and one read
// of the peers' slots, with futexes for the hand-offs. Connecting verifies that every member
// sees the same segment, so ranks in different containers or hosts fall back to Gloo.
#pragma once

#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "ddl/types.h"

namespace ddl::torch_adapter {

class SharedMemoryTier {
 public:
  // Bytes of one rank's slot: a collective on more data runs in pieces of this size.
  static constexpr std::size_t kSlotBytes = std::size_t{1} << 20;

  // Collective over `group` (every member calls it, in the same order as its other
  // collectives). Returns null, with the reason in *why_not, when some member could not map
  // the segment the group's first rank created.
  static std::unique_ptr<SharedMemoryTier> connect(c10d::ProcessGroup& group,
                                                   double timeout_seconds, std::string* why_not);

  ~SharedMemoryTier();
  SharedMemoryTier(const SharedMemoryTier&) = delete;
  SharedMemoryTier& operator=(const SharedMemoryTier&) = delete;

  // Same contracts as Transport's: in.count == out.count * size() for reduce_scatter, the
  // reverse for all_gather; blocking; every member calls them in the same order.
  void reduce_scatter(const Buffer& in, const Buffer& out);
  void all_gather(const Buffer& in, const Buffer& out);

  int size() const { return size_; }

  // Marks the row failed for every member and wakes their waits: called when this rank gives
  // up on an allreduce, so node-mates fail at once instead of waiting for it.
  void abort();

 private:
  SharedMemoryTier(void* base, std::size_t bytes, int rank, int size, double timeout_seconds);

  std::uint32_t* arrive(int rank) const;
  std::uint32_t* done(int rank) const;
  std::uint32_t* abort_word() const;
  char* slot(std::uint32_t sequence, int rank) const;

  // Throws when this row cannot be used any more (a collective failed on some member).
  void check_usable() const;
  // Marks the row failed for every member and wakes all their waits, then throws `message`.
  [[noreturn]] void fail(const std::string& message);
  // Whether `peer` is known to have exited (only judged when it shares our pid namespace).
  bool exited(int peer) const;

  // Starts operation number ++sequence_: waits until every member finished the operation
  // that last used this half of the slots, and returns the new sequence number.
  std::uint32_t begin_op();
  // Publishes this rank's slot and waits for every member's.
  void exchange(std::uint32_t sequence);
  void finish_op(std::uint32_t sequence);
  // Blocks until *word >= target (modulo 2^32); throws when `peer` exits or on timeout.
  void wait_at_least(std::uint32_t* word, std::uint32_t target, int peer);

  void* base_;
  std::size_t bytes_;
  int rank_;
  int size_;
  double timeout_seconds_;
  std::uint64_t pid_namespace_;  // ours; a peer's pid is judged only in the same namespace
  std::uint32_t sequence_ = 0;
};

}  // namespace ddl::torch_adapter
