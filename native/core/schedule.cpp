// The pipelined multi-tier allreduce schedule (see schedule.h).
#include "ddl/schedule.h"

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "ddl/plan.h"

namespace ddl {
namespace {

enum class StageKind : std::uint8_t {
  kPack,           // copy a ragged last chunk into a zero-padded buffer
  kReduceScatter,  // one tier, fastest first
  kScale,          // average: scale the slow-tier segment in place
  kCompress,       // scale + cast to the wire format with error feedback
  kSlowAllReduce,  // the slowest tier
  kDecompress,     // wire format back to the data's dtype
  kAllGather,      // one tier, slowest first
  kUnpack,         // copy the ragged last chunk back out
};

struct Stage {
  StageKind kind;
  int tier;
};

// Where one chunk lives at every level of the schedule. Level t holds what is left after the
// reduce-scatters of tiers 0..t-1; level 0 is the tensor itself, or a padded copy of it.
struct ChunkBuffers {
  Buffer user;                 // the chunk's elements in the caller's tensor
  std::vector<Buffer> levels;  // size tiers
  Buffer wire;                 // compressed slow-tier segment (count 0 when not compressing)
  Buffer residual;             // error feedback of that segment (count 0 when none)
  bool padded = false;
};

std::vector<Stage> stages_for(const ChunkBuffers& chunk, int tiers, bool compress, bool average) {
  std::vector<Stage> stages;
  const int slow = tiers - 1;
  if (chunk.padded) {
    stages.push_back({StageKind::kPack, 0});
  }
  for (int t = 0; t < slow; ++t) {
    stages.push_back({StageKind::kReduceScatter, t});
  }
  if (compress) {
    stages.push_back({StageKind::kCompress, slow});
  } else if (average) {
    stages.push_back({StageKind::kScale, slow});
  }
  stages.push_back({StageKind::kSlowAllReduce, slow});
  if (compress) {
    stages.push_back({StageKind::kDecompress, slow});
  }
  for (int t = slow - 1; t >= 0; --t) {
    stages.push_back({StageKind::kAllGather, t});
  }
  if (chunk.padded) {
    stages.push_back({StageKind::kUnpack, 0});
  }
  return stages;
}

EventId issue(Transport& transport, const ChunkBuffers& chunk, const Stage& stage, float scale,
              EventId after) {
  const int slow = static_cast<int>(chunk.levels.size()) - 1;
  const Buffer& segment = chunk.levels[static_cast<std::size_t>(slow)];
  switch (stage.kind) {
    case StageKind::kPack:
      return transport.convert(stage.tier, chunk.user, chunk.levels[0], 1.0F, after);
    case StageKind::kReduceScatter:
      return transport.reduce_scatter(stage.tier, chunk.levels[static_cast<std::size_t>(stage.tier)],
                                      chunk.levels[static_cast<std::size_t>(stage.tier) + 1],
                                      after);
    case StageKind::kScale:
      return transport.convert(stage.tier, segment, segment, scale, after);
    case StageKind::kCompress:
      return transport.compress(stage.tier, segment, chunk.wire,
                                chunk.residual.count > 0 ? &chunk.residual : nullptr, scale,
                                after);
    case StageKind::kSlowAllReduce:
      return transport.all_reduce(stage.tier, chunk.wire.count > 0 ? chunk.wire : segment, after);
    case StageKind::kDecompress:
      return transport.convert(stage.tier, chunk.wire, segment, 1.0F, after);
    case StageKind::kAllGather:
      return transport.all_gather(stage.tier,
                                  chunk.levels[static_cast<std::size_t>(stage.tier) + 1],
                                  chunk.levels[static_cast<std::size_t>(stage.tier)], after);
    case StageKind::kUnpack:
      return transport.convert(stage.tier, chunk.levels[0].slice(0, chunk.user.count), chunk.user,
                               1.0F, after);
  }
  throw std::logic_error("schedule: unknown stage");
}

}  // namespace

bool compresses(Compression compression, DType dtype) {
  return compression != Compression::kNone && dtype == DType::kFloat32;
}

void run_allreduce(Transport& transport, const Grid& grid, Buffer data, const Buffer* residual,
                   const Options& options) {
  const int tiers = grid.tiers();
  if (transport.tiers() != tiers) {
    throw std::invalid_argument("schedule: transport has " + std::to_string(transport.tiers()) +
                                " tiers, grid has " + std::to_string(tiers));
  }
  if (data.count == 0) {
    return;
  }
  const Plan plan = make_plan(data.count, dtype_size(data.dtype), grid, options.chunk_bytes);
  const bool compress = compresses(options.compression, data.dtype);
  const bool average = options.op == ReduceOp::kAvg;
  const float scale = average ? 1.0F / static_cast<float>(grid.world()) : 1.0F;
  if (residual != nullptr && compress) {
    if (residual->dtype != DType::kFloat32 || residual->count != plan.slow_count()) {
      throw std::invalid_argument("schedule: residual must be float32 with " +
                                  std::to_string(plan.slow_count()) + " elements, got " +
                                  std::to_string(residual->count));
    }
  }

  transport.begin();
  // Level buffers below the tensor itself; level t is divided by dims 0..t-1.
  std::vector<Buffer> level_buffers(static_cast<std::size_t>(tiers));
  std::vector<std::size_t> divisor(static_cast<std::size_t>(tiers), 1);
  for (int t = 1; t < tiers; ++t) {
    divisor[static_cast<std::size_t>(t)] =
        divisor[static_cast<std::size_t>(t) - 1] * static_cast<std::size_t>(grid.dim(t - 1));
    level_buffers[static_cast<std::size_t>(t)] =
        transport.scratch(plan.padded_total / divisor[static_cast<std::size_t>(t)], data.dtype);
  }
  const Chunk& last = plan.chunks.back();
  const Buffer tail = last.padded != last.count ? transport.scratch(last.padded, data.dtype)
                                                : Buffer{nullptr, 0, data.dtype};
  const DType wire_dtype =
      options.compression == Compression::kFP16 ? DType::kFloat16 : DType::kBFloat16;
  const Buffer wire =
      compress ? transport.scratch(plan.slow_count(), wire_dtype) : Buffer{nullptr, 0, wire_dtype};

  std::vector<ChunkBuffers> chunks;
  std::vector<std::vector<Stage>> stages;
  for (const Chunk& c : plan.chunks) {
    ChunkBuffers b;
    b.user = data.slice(c.offset, c.count);
    b.padded = c.padded != c.count;
    b.levels.push_back(b.padded ? tail : b.user);
    for (int t = 1; t < tiers; ++t) {
      const std::size_t d = divisor[static_cast<std::size_t>(t)];
      b.levels.push_back(
          level_buffers[static_cast<std::size_t>(t)].slice(c.padded_offset / d, c.padded / d));
    }
    if (compress) {
      b.wire = wire.slice(c.padded_offset / plan.quantum, c.padded / plan.quantum);
      if (residual != nullptr) {
        b.residual = residual->slice(c.padded_offset / plan.quantum, c.padded / plan.quantum);
      }
    }
    stages.push_back(stages_for(b, tiers, compress, average));
    chunks.push_back(b);
  }

  // Wavefront: at step s chunk c runs its stage s - c, so chunk c crosses the slow tier while
  // chunk c + 1 is still being reduced on the fast ones. Newest chunk first within a step: its
  // stage depends on work issued a step earlier, so issuing it never waits behind an older
  // chunk's slow operation, and consecutive slow-tier operations overlap instead of leaving
  // the link idle in between. Every rank issues the same sequence, which keeps the operations
  // of each communicator in the same order everywhere.
  std::vector<EventId> last_event(chunks.size(), kNoEvent);
  std::size_t longest = 0;
  for (const auto& s : stages) {
    longest = std::max(longest, s.size());
  }
  try {
    for (std::size_t step = 0; step < longest + chunks.size(); ++step) {
      for (std::size_t c = std::min(step + 1, chunks.size()); c-- > 0;) {
        const std::size_t s = step - c;
        if (s < stages[c].size()) {
          last_event[c] = issue(transport, chunks[c], stages[c][s], scale, last_event[c]);
        }
      }
    }
  } catch (...) {
    // Operations already in flight still use the scratch buffers: drain them before unwinding,
    // and report the first error rather than a secondary one.
    try {
      transport.end();
    } catch (...) {
    }
    throw;
  }
  transport.end();
}

}  // namespace ddl
