// Shared-memory intra-node tier (see shm_tier.h).
//
// Segment layout: one 64-byte line with the leader's token and the row's abort word, then one
// line per member for each of `arrive` (last operation whose slot the member filled), `done`
// (last operation it finished reading) and its identity (pid and pid namespace), then two
// halves of `size` slots. Operation s uses half s % 2, so a member may fill its slot for s as
// soon as every member is done with s - 2. A member whose collective fails sets the abort word
// and wakes everyone: the others fail too instead of pairing later operations wrongly.
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
#include <utility>
#include <cstdio>
#include <sched.h>
#include <signal.h>

namespace ddl::torch_adapter {
namespace {

constexpr std::size_t kLine = 64;
constexpr std::size_t kNameBytes = 56;
constexpr int kSpins = 64;                  // sched_yield rounds before sleeping on the futex
constexpr long kSleepNanos = 20'000'000;    // futex wait slice; also the liveness check period
constexpr std::size_t kAbortOffset = 8;     // in line 0, after the token

struct Identity {
  std::int32_t pid;
  std::uint64_t pid_namespace;
};

std::uint64_t own_pid_namespace() {
  struct stat info {};
  return stat("/proc/self/ns/pid", &info) == 0 ? static_cast<std::uint64_t>(info.st_ino) : 0;
}

Identity* identity(void* base, int size, int rank) {
  return reinterpret_cast<Identity*>(static_cast<char*>(base) + kLine * (1 + 2 * size + rank));
}

// Runs a cleanup when the scope is left, unless dismissed.
template <typename F>
class ScopeExit {
 public:
  explicit ScopeExit(F cleanup) : cleanup_(std::move(cleanup)) {}
  ~ScopeExit() {
    if (armed_) {
      cleanup_();
    }
  }
  ScopeExit(const ScopeExit&) = delete;
  ScopeExit& operator=(const ScopeExit&) = delete;
  void dismiss() { armed_ = false; }

 private:
  F cleanup_;
  bool armed_ = true;
};

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
  TORCH_CHECK(false, "shared-memory tier: unsupported dtype");
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
  std::string created;  // the name this rank must unlink (the leader's), whatever happens
  ScopeExit cleanup([&] {
    if (!created.empty()) {
      shm_unlink(created.c_str());
    }
    if (base != nullptr) {
      munmap(base, bytes);
    }
  });

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
      created = name;
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
  } else if (rank != 0) {
    error = "the tier's first rank could not create the segment";
  }
  if (base != nullptr) {
    // Before the agreement below: from then on a peer waiting for this rank can watch it.
    *identity(base, size, rank) = Identity{static_cast<std::int32_t>(getpid()),
                                           own_pid_namespace()};
  }

  // Every member must have mapped the same segment; then the name can go (cleanup).
  std::vector<at::Tensor> ok{at::full({1}, base != nullptr ? 1 : 0, at::kInt)};
  c10d::AllreduceOptions min;
  min.reduceOp = c10d::ReduceOp::MIN;
  group.allreduce(ok, min)->wait();
  if (ok[0].item<int>() == 0) {
    *why_not = error.empty() ? "another member of the tier could not map the segment "
                               "(ranks in different containers or hosts?)"
                             : error;
    return nullptr;
  }
  void* mapped = std::exchange(base, nullptr);  // the tier owns the mapping from here
  return std::unique_ptr<SharedMemoryTier>(
      new SharedMemoryTier(mapped, bytes, rank, size, timeout_seconds));
}

SharedMemoryTier::SharedMemoryTier(void* base, std::size_t bytes, int rank, int size,
                                   double timeout_seconds)
    : base_(base),
      bytes_(bytes),
      rank_(rank),
      size_(size),
      timeout_seconds_(timeout_seconds),
      pid_namespace_(own_pid_namespace()) {}

SharedMemoryTier::~SharedMemoryTier() { munmap(base_, bytes_); }

std::uint32_t* SharedMemoryTier::arrive(int rank) const {
  return reinterpret_cast<std::uint32_t*>(static_cast<char*>(base_) + kLine * (1 + rank));
}

std::uint32_t* SharedMemoryTier::done(int rank) const {
  return reinterpret_cast<std::uint32_t*>(static_cast<char*>(base_) +
                                          kLine * (1 + size_ + rank));
}

std::uint32_t* SharedMemoryTier::abort_word() const {
  return reinterpret_cast<std::uint32_t*>(static_cast<char*>(base_) + kAbortOffset);
}

bool SharedMemoryTier::exited(int peer) const {
  const Identity* who = identity(base_, size_, peer);
  const std::int32_t peer_pid = __atomic_load_n(&who->pid, __ATOMIC_RELAXED);
  const std::uint64_t space = __atomic_load_n(&who->pid_namespace, __ATOMIC_RELAXED);
  // A pid from another pid namespace (containers sharing /dev/shm) means nothing here.
  if (peer_pid <= 0 || space == 0 || space != pid_namespace_) {
    return false;
  }
  if (kill(peer_pid, 0) != 0) {
    return errno == ESRCH;
  }
  // A zombie (exited, not yet reaped) still answers kill(0).
  char path[64];
  std::snprintf(path, sizeof path, "/proc/%d/stat", static_cast<int>(peer_pid));
  FILE* stat_file = std::fopen(path, "r");
  if (stat_file == nullptr) {
    return false;
  }
  char state = '?';
  const int read = std::fscanf(stat_file, "%*d %*s %c", &state);
  std::fclose(stat_file);
  return read == 1 && (state == 'Z' || state == 'X');
}

void SharedMemoryTier::check_usable() const {
  TORCH_CHECK(as_atomic(abort_word()).load(std::memory_order_acquire) == 0,
              "shared-memory tier: a collective failed on a member of this row earlier; the "
              "communicator cannot be used again (the job must re-form)");
}

void SharedMemoryTier::abort() {
  as_atomic(abort_word()).store(1, std::memory_order_release);
  for (int member = 0; member < size_; ++member) {
    wake_all(arrive(member));
    wake_all(done(member));
  }
}

void SharedMemoryTier::fail(const std::string& message) {
  abort();
  TORCH_CHECK(false, message);
}

char* SharedMemoryTier::slot(std::uint32_t sequence, int rank) const {
  const std::size_t index = (sequence % 2) * static_cast<std::size_t>(size_) + rank;
  return static_cast<char*>(base_) + header_bytes(size_) + index * kSlotBytes;
}

void SharedMemoryTier::wait_at_least(std::uint32_t* word, std::uint32_t target, int peer) {
  std::atomic<std::uint32_t>& value = as_atomic(word);
  const double deadline = now_seconds() + timeout_seconds_;
  for (int round = 0;; ++round) {
    const std::uint32_t seen = value.load(std::memory_order_acquire);
    if (reached(seen, target)) {
      return;
    }
    check_usable();
    if (round < kSpins) {
      sched_yield();
      continue;
    }
    const timespec slice{0, kSleepNanos};
    syscall(SYS_futex, word, FUTEX_WAIT, seen, &slice, nullptr, 0);
    // Liveness first, then the word: a peer that stored its last value and then exited (it
    // finished the collective first) is not a failure. Its store precedes its exit.
    const bool gone = exited(peer);
    if (reached(value.load(std::memory_order_acquire), target)) {
      return;
    }
    if (gone) {
      fail("shared-memory tier: member " + std::to_string(peer) + " (pid " +
           std::to_string(identity(base_, size_, peer)->pid) + ") exited during a collective");
    }
    if (now_seconds() >= deadline) {
      fail("shared-memory tier: member " + std::to_string(peer) + " did not reach collective " +
           std::to_string(target) + " within " + std::to_string(timeout_seconds_) + " s");
    }
  }
}

std::uint32_t SharedMemoryTier::begin_op() {
  check_usable();
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
