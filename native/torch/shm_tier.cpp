// Shared-memory intra-node tier (see shm_tier.h).
//
// Segment layout: one 64-byte line with the leader's token, then one line per member for each
// of `arrive` (last operation whose slot the member filled), `done` (last operation it finished
// reading) and its pid, then two halves of `size` slots. Operation s uses half s % 2, so a
// member may fill its slot for s as soon as every member is done with s - 2.
#include "shm_tier.h"

#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstring>
#include <random>
#include <sched.h>
#include <signal.h>

namespace ddl::torch_adapter {
namespace {

constexpr std::size_t kLine = 64;
constexpr std::size_t kNameBytes = 56;
constexpr int kSpins = 64;                  // sched_yield rounds before sleeping on the futex
constexpr long kSleepNanos = 20'000'000;    // futex wait slice; also the liveness check period

std::size_t header_bytes(int size) {
  const std::size_t raw = kLine * (1 + 3 * static_cast<std::size_t>(size));
  return (raw + 4095) / 4096 * 4096;
}

std::size_t segment_bytes(int size) {
  return header_bytes(size) + 2 * static_cast<std::size_t>(size) * SharedMemoryTier::kSlotBytes;
}

std::atomic<std::uint32_t>& as_atomic(std::uint32_t* word) {
  static_assert(sizeof(std::atomic<std::uint32_t>) == sizeof(std::uint32_t));
  static_assert(std::atomic<std::uint32_t>::is_always_lock_free);
  return *reinterpret_cast<std::atomic<std::uint32_t>*>(word);
}

void wake_all(std::uint32_t* word) {
  syscall(SYS_futex, word, FUTEX_WAKE, INT_MAX, nullptr, nullptr, 0);
}

bool reached(std::uint32_t value, std::uint32_t target) {
  return static_cast<std::int32_t>(value - target) >= 0;
}

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

std::string errno_text(const char* what) { return std::string(what) + ": " + std::strerror(errno); }

// Sum of `parts` arrays of n elements of T into out, accumulated in float in member order.
template <typename T>
void sum_into(const std::vector<const char*>& parts, std::size_t n, void* out) {
  constexpr std::size_t kBlock = 2048;
  float acc[kBlock];
  T* dst = static_cast<T*>(out);
  for (std::size_t begin = 0; begin < n; begin += kBlock) {
    const std::size_t len = std::min(kBlock, n - begin);
    const T* first = reinterpret_cast<const T*>(parts[0]) + begin;
    for (std::size_t i = 0; i < len; ++i) {
      acc[i] = static_cast<float>(first[i]);
    }
    for (std::size_t p = 1; p < parts.size(); ++p) {
      const T* src = reinterpret_cast<const T*>(parts[p]) + begin;
      for (std::size_t i = 0; i < len; ++i) {
        acc[i] += static_cast<float>(src[i]);
      }
    }
    for (std::size_t i = 0; i < len; ++i) {
      dst[begin + i] = static_cast<T>(acc[i]);
    }
  }
}

void sum_into(DType dtype, const std::vector<const char*>& parts, std::size_t n, void* out) {
  switch (dtype) {
    case DType::kFloat32:
      sum_into<float>(parts, n, out);
      return;
    case DType::kFloat16:
      sum_into<c10::Half>(parts, n, out);
      return;
    case DType::kBFloat16:
      sum_into<c10::BFloat16>(parts, n, out);
      return;
  }
}

// The leader's side of connect(): a fresh segment under a random name, sized and reserved
// (posix_fallocate, so a full /dev/shm fails here instead of faulting mid-collective).
void* create_segment(const std::string& name, std::size_t bytes, std::string* error) {
  const int fd = shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
  if (fd < 0) {
    *error = errno_text(("shm_open " + name).c_str());
    return nullptr;
  }
  const int reserve = posix_fallocate(fd, 0, static_cast<off_t>(bytes));
  void* base = nullptr;
  if (reserve != 0) {
    *error = "reserving " + std::to_string(bytes) + " bytes in /dev/shm: " + std::strerror(reserve);
  } else {
    base = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED) {
      *error = errno_text("mmap");
      base = nullptr;
    }
  }
  close(fd);
  if (base == nullptr) {
    shm_unlink(name.c_str());
  }
  return base;
}

void* open_segment(const std::string& name, std::size_t bytes, std::uint64_t token,
                   std::string* error) {
  const int fd = shm_open(name.c_str(), O_RDWR, 0600);
  if (fd < 0) {
    *error = errno_text(("shm_open " + name).c_str());
    return nullptr;
  }
  struct stat info {};
  void* base = nullptr;
  if (fstat(fd, &info) != 0 || static_cast<std::size_t>(info.st_size) != bytes) {
    *error = "segment " + name + " has an unexpected size";
  } else {
    base = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED) {
      *error = errno_text("mmap");
      base = nullptr;
    } else if (std::memcmp(base, &token, sizeof token) != 0) {
      *error = "segment " + name + " belongs to another group";
      munmap(base, bytes);
      base = nullptr;
    }
  }
  close(fd);
  return base;
}

}  // namespace

std::unique_ptr<SharedMemoryTier> SharedMemoryTier::connect(c10d::ProcessGroup& group,
                                                            double timeout_seconds,
                                                            std::string* why_not) {
  const int rank = group.getRank();
  const int size = group.getSize();
  const std::size_t bytes = segment_bytes(size);
  std::string error;
  void* base = nullptr;

  // The leader's segment name and token, broadcast to the others.
  at::Tensor card = at::zeros({static_cast<int64_t>(kNameBytes + sizeof(std::uint64_t))},
                              at::TensorOptions().dtype(at::kByte));
  if (rank == 0) {
    std::random_device entropy;
    const std::uint64_t token = (std::uint64_t{entropy()} << 32) | entropy();
    char name[kNameBytes];
    std::snprintf(name, sizeof name, "/ddl-tier-%d-%016llx", static_cast<int>(getpid()),
                  static_cast<unsigned long long>(token));
    base = create_segment(name, bytes, &error);
    if (base != nullptr) {
      std::memcpy(base, &token, sizeof token);
      std::memcpy(card.data_ptr(), name, std::strlen(name) + 1);
      std::memcpy(static_cast<char*>(card.data_ptr()) + kNameBytes, &token, sizeof token);
    }
  }
  std::vector<at::Tensor> cards{card};
  group.broadcast(cards, c10d::BroadcastOptions{})->wait();
  const std::string name(static_cast<const char*>(card.data_ptr()));
  if (rank != 0 && !name.empty()) {
    std::uint64_t token = 0;
    std::memcpy(&token, static_cast<const char*>(card.data_ptr()) + kNameBytes, sizeof token);
    base = open_segment(name, bytes, token, &error);
  }

  // Every member must have mapped the same segment; then the name can go.
  std::vector<at::Tensor> ok{at::full({1}, base != nullptr ? 1 : 0, at::kInt)};
  c10d::AllreduceOptions min;
  min.reduceOp = c10d::ReduceOp::MIN;
  group.allreduce(ok, min)->wait();
  if (rank == 0 && !name.empty()) {
    shm_unlink(name.c_str());
  }
  if (ok[0].item<int>() == 0) {
    if (base != nullptr) {
      munmap(base, bytes);
    }
    *why_not = error.empty() ? "another member of the tier could not map the segment "
                               "(ranks in different containers or hosts?)"
                             : error;
    return nullptr;
  }
  return std::unique_ptr<SharedMemoryTier>(
      new SharedMemoryTier(base, bytes, rank, size, timeout_seconds));
}

SharedMemoryTier::SharedMemoryTier(void* base, std::size_t bytes, int rank, int size,
                                   double timeout_seconds)
    : base_(base), bytes_(bytes), rank_(rank), size_(size), timeout_seconds_(timeout_seconds) {
  *pid(rank_) = static_cast<std::int32_t>(getpid());
}

SharedMemoryTier::~SharedMemoryTier() { munmap(base_, bytes_); }

std::uint32_t* SharedMemoryTier::arrive(int rank) const {
  return reinterpret_cast<std::uint32_t*>(static_cast<char*>(base_) + kLine * (1 + rank));
}

std::uint32_t* SharedMemoryTier::done(int rank) const {
  return reinterpret_cast<std::uint32_t*>(static_cast<char*>(base_) +
                                          kLine * (1 + size_ + rank));
}

std::int32_t* SharedMemoryTier::pid(int rank) const {
  return reinterpret_cast<std::int32_t*>(static_cast<char*>(base_) +
                                         kLine * (1 + 2 * size_ + rank));
}

char* SharedMemoryTier::slot(std::uint32_t sequence, int rank) const {
  const std::size_t index = (sequence % 2) * static_cast<std::size_t>(size_) + rank;
  return static_cast<char*>(base_) + header_bytes(size_) + index * kSlotBytes;
}

void SharedMemoryTier::wait_at_least(std::uint32_t* word, std::uint32_t target, int peer) const {
  std::atomic<std::uint32_t>& value = as_atomic(word);
  const double deadline = now_seconds() + timeout_seconds_;
  for (int round = 0;; ++round) {
    const std::uint32_t seen = value.load(std::memory_order_acquire);
    if (reached(seen, target)) {
      return;
    }
    if (round < kSpins) {
      sched_yield();
      continue;
    }
    const timespec slice{0, kSleepNanos};
    syscall(SYS_futex, word, FUTEX_WAIT, seen, &slice, nullptr, 0);
    const std::int32_t peer_pid = __atomic_load_n(pid(peer), __ATOMIC_RELAXED);
    TORCH_CHECK(peer_pid == 0 || kill(peer_pid, 0) == 0 || errno != ESRCH,
                "shared-memory tier: member ", peer, " (pid ", peer_pid,
                ") exited during a collective");
    TORCH_CHECK(now_seconds() < deadline, "shared-memory tier: member ", peer,
                " did not reach collective ", target, " within ", timeout_seconds_, " s");
  }
}

std::uint32_t SharedMemoryTier::begin_op() {
  const std::uint32_t sequence = ++sequence_;
  for (int peer = 0; peer < size_; ++peer) {
    wait_at_least(done(peer), sequence - 2, peer);
  }
  return sequence;
}

void SharedMemoryTier::exchange(std::uint32_t sequence) {
  as_atomic(arrive(rank_)).store(sequence, std::memory_order_release);
  wake_all(arrive(rank_));
  for (int peer = 0; peer < size_; ++peer) {
    if (peer != rank_) {
      wait_at_least(arrive(peer), sequence, peer);
    }
  }
}

void SharedMemoryTier::finish_op(std::uint32_t sequence) {
  as_atomic(done(rank_)).store(sequence, std::memory_order_release);
  wake_all(done(rank_));
}

void SharedMemoryTier::reduce_scatter(const Buffer& in, const Buffer& out) {
  TORCH_INTERNAL_ASSERT(in.count == out.count * static_cast<std::size_t>(size_));
  TORCH_INTERNAL_ASSERT(in.dtype == out.dtype);
  const std::size_t element = dtype_size(in.dtype);
  const std::size_t part = out.count;
  // Each piece takes `step` elements of every member's part; a slot holds one piece.
  const std::size_t step = std::max<std::size_t>(1, kSlotBytes / (element * size_));
  const char* source = static_cast<const char*>(in.data);
  std::vector<const char*> parts(static_cast<std::size_t>(size_));
  for (std::size_t offset = 0; offset < part; offset += step) {
    const std::size_t len = std::min(step, part - offset);
    const std::uint32_t sequence = begin_op();
    char* mine = slot(sequence, rank_);
    for (int p = 0; p < size_; ++p) {
      std::memcpy(mine + p * len * element, source + (p * part + offset) * element,
                  len * element);
    }
    exchange(sequence);
    for (int p = 0; p < size_; ++p) {
      parts[static_cast<std::size_t>(p)] = slot(sequence, p) + rank_ * len * element;
    }
    sum_into(in.dtype, parts, len, static_cast<char*>(out.data) + offset * element);
    finish_op(sequence);
  }
}

void SharedMemoryTier::all_gather(const Buffer& in, const Buffer& out) {
  TORCH_INTERNAL_ASSERT(out.count == in.count * static_cast<std::size_t>(size_));
  TORCH_INTERNAL_ASSERT(in.dtype == out.dtype);
  const std::size_t element = dtype_size(in.dtype);
  const std::size_t part = in.count;
  const std::size_t step = kSlotBytes / element;
  const char* source = static_cast<const char*>(in.data);
  char* target = static_cast<char*>(out.data);
  for (std::size_t offset = 0; offset < part; offset += step) {
    const std::size_t len = std::min(step, part - offset);
    const std::uint32_t sequence = begin_op();
    std::memcpy(slot(sequence, rank_), source + offset * element, len * element);
    exchange(sequence);
    for (int p = 0; p < size_; ++p) {
      const char* from = p == rank_ ? source + offset * element : slot(sequence, p);
      std::memmove(target + (p * part + offset) * element, from, len * element);
    }
    finish_op(sequence);
  }
}

}  // namespace ddl::torch_adapter
