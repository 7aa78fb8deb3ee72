// What the CUDA/NCCL half of the extension offers the op registrations in torch/ops.cpp.
// Compiled only where a CUDA toolkit is found (DDL_WITH_CUDA).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <vector>

#include "../torch/communicator.h"

namespace ddl::cuda {

// NCCL found at build time, and whether it has ncclCommSplit (2.18+), which the hierarchical
// backend needs; "major.minor.patch" of the headers built against.
bool nccl_has_split();
std::string nccl_version();

// A fresh ncclUniqueId as 128 uint8 values, to be broadcast from rank 0 of the group.
at::Tensor nccl_unique_id();

// Collective over the world: every rank calls it with the same unique id and grid. `split`
// creates one communicator per tier with ncclCommSplit, otherwise the grid must be 1-D.
c10::intrusive_ptr<torch_adapter::Communicator> make_nccl_communicator(
    const at::Tensor& unique_id, int64_t rank, std::vector<int64_t> grid, bool split,
    int64_t device, int64_t chunk_bytes);

// Adds the timings of finished NCCL operations to the per-tier counters; `block` waits for
// the ones still running.
void flush_stats(bool block);

// CUDA implementations of the ddl::flatten_scale_cast_ and ddl::compress_ef_ ops.
void flatten_scale_cast(at::TensorList srcs, const at::Tensor& dst, double scale);
void compress_ef(const at::Tensor& src, const at::Tensor& dst,
                 const std::optional<at::Tensor>& residual, double scale);

}  // namespace ddl::cuda
