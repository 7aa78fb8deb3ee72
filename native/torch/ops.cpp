// Registers the ddl operator library (torch.ops.ddl.*) and the Communicator class, and gives
// Python an importable module (ddl_worker._native) whose import loads them.
#include <Python.h>

#include <ATen/core/stack.h>
#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>
#include <torch/library.h>

#include <cstring>
#include <tuple>

#include "adapter.h"
#include "communicator.h"
#include "ddl/stats.h"
#include "kernels_cpu.h"

#ifdef DDL_WITH_CUDA
#include "../cuda/nccl_api.h"
#endif

namespace ddl::torch_adapter {
namespace {

c10::intrusive_ptr<Communicator> make_c10d_communicator(std::vector<std::string> group_names,
                                                         std::vector<int64_t> grid,
                                                         int64_t chunk_bytes,
                                                         bool shared_memory) {
  TORCH_CHECK(chunk_bytes > 0, "chunk_bytes: must be positive, got ", chunk_bytes);
  std::vector<c10::intrusive_ptr<c10d::ProcessGroup>> groups;
  for (const std::string& name : group_names) {
    groups.push_back(c10d::resolve_process_group(name));
  }
  return c10::make_intrusive<C10dCommunicator>(Grid(std::move(grid)),
                                               static_cast<std::size_t>(chunk_bytes),
                                               std::move(groups), shared_memory);
}

bool has_nccl() {
#ifdef DDL_WITH_CUDA
  return true;
#else
  return false;
#endif
}

bool has_nccl_split() {
#ifdef DDL_WITH_CUDA
  return cuda::nccl_has_split();
#else
  return false;
#endif
}

std::string nccl_version() {
#ifdef DDL_WITH_CUDA
  return cuda::nccl_version();
#else
  return "";
#endif
}

constexpr const char* kNoCuda =
    "the ddl extension was built without CUDA/NCCL; rebuild it where nvcc and NCCL are "
    "installed (DDL_NATIVE_CUDA=1 pip install --no-build-isolation -e .)";

at::Tensor nccl_unique_id() {
#ifdef DDL_WITH_CUDA
  return cuda::nccl_unique_id();
#else
  TORCH_CHECK(false, kNoCuda);
#endif
}

c10::intrusive_ptr<Communicator> make_nccl_communicator(const at::Tensor& unique_id, int64_t rank,
                                                         std::vector<int64_t> grid, bool split,
                                                         int64_t device, int64_t chunk_bytes) {
#ifdef DDL_WITH_CUDA
  return cuda::make_nccl_communicator(unique_id, rank, std::move(grid), split, device,
                                      chunk_bytes);
#else
  (void)unique_id, (void)rank, (void)grid, (void)split, (void)device, (void)chunk_bytes;
  TORCH_CHECK(false, kNoCuda);
#endif
}

// Boxed because the unboxed wrappers cannot return a Future: pops the arguments in reverse
// schema order and pushes the future.
void allreduce_boxed(const c10::OperatorHandle& /*op*/, torch::jit::Stack* stack) {
  c10::IValue residual_value = torch::jit::pop(*stack);
  const std::string compression = torch::jit::pop(*stack).toStringRef();
  const std::string op = torch::jit::pop(*stack).toStringRef();
  c10::IValue comm_value = torch::jit::pop(*stack);
  const at::Tensor tensor = torch::jit::pop(*stack).toTensor();
  TORCH_CHECK(comm_value.isCustomClass(), "comm: expected a ddl Communicator");
  auto comm = comm_value.toCustomClass<Communicator>();
  std::optional<at::Tensor> residual;
  if (!residual_value.isNone()) {
    residual = residual_value.toTensor();
  }
  torch::jit::push(*stack, c10::IValue(comm->allreduce(tensor, op, compression, residual)));
}

void flatten_scale_cast_cpu(at::TensorList srcs, const at::Tensor& dst, double scale) {
  check_flatten_args(srcs, dst);
  const Buffer out = as_buffer(dst);
  std::size_t offset = 0;
  for (const at::Tensor& src : srcs) {
    const Buffer in = as_buffer(src);
    cpu::convert(in, out.slice(offset, in.count), static_cast<float>(scale));
    offset += in.count;
  }
  std::memset(static_cast<char*>(out.data) + offset * dtype_size(out.dtype), 0,
              (out.count - offset) * dtype_size(out.dtype));
}

void compress_ef_cpu(const at::Tensor& src, const at::Tensor& dst,
                     const std::optional<at::Tensor>& residual, double scale) {
  const std::optional<Buffer> feedback = check_compress_args(src, dst, residual);
  cpu::compress(as_buffer(src), as_buffer(dst), feedback ? &*feedback : nullptr,
                static_cast<float>(scale));
}

std::tuple<std::vector<std::string>, std::vector<int64_t>, std::vector<double>> stats() {
#ifdef DDL_WITH_CUDA
  cuda::flush_stats(/*block=*/true);
#endif
  std::tuple<std::vector<std::string>, std::vector<int64_t>, std::vector<double>> out;
  for (const TierTotals& totals : TierStats::global().snapshot()) {
    std::get<0>(out).push_back(totals.tier);
    std::get<1>(out).push_back(static_cast<int64_t>(totals.bytes));
    std::get<2>(out).push_back(totals.seconds);
  }
  return out;
}

void drain_communicators() { SerialExecutor::drain_all(); }

void reset_stats() {
#ifdef DDL_WITH_CUDA
  cuda::flush_stats(/*block=*/true);
#endif
  TierStats::global().reset();
}

}  // namespace

TORCH_LIBRARY(ddl, m) {
  m.class_<Communicator>("Communicator")
      .def("grid", &Communicator::grid)
      .def("backend", &Communicator::backend)
      .def("transports", &Communicator::transports)
      .def("chunk_bytes", &Communicator::chunk_bytes)
      .def("residual_numel", &Communicator::residual_numel);
  m.def(
      "c10d_communicator(str[] group_names, int[] grid, int chunk_bytes, "
      "bool shared_memory=True) "
      "-> __torch__.torch.classes.ddl.Communicator",
      &make_c10d_communicator);
  m.def(
      "nccl_communicator(Tensor unique_id, int rank, int[] grid, bool split, int device, "
      "int chunk_bytes) -> __torch__.torch.classes.ddl.Communicator",
      &make_nccl_communicator);
  m.def("nccl_unique_id() -> Tensor", &nccl_unique_id);
  m.def("has_nccl() -> bool", &has_nccl);
  m.def("has_nccl_split() -> bool", &has_nccl_split);
  m.def("nccl_version() -> str", &nccl_version);
  m.def(torch::schema("allreduce_(Tensor(a!) tensor, __torch__.torch.classes.ddl.Communicator "
                      "comm, str op, str compression, Tensor(b!)? residual) -> Future(Tensor)",
                      c10::AliasAnalysisKind::FROM_SCHEMA),
        torch::CppFunction::makeFromBoxedFunction<&allreduce_boxed>());
  m.def("flatten_scale_cast_(Tensor[] srcs, Tensor(a!) dst, float scale) -> ()");
  m.def("compress_ef_(Tensor src, Tensor(a!) dst, Tensor(b!)? residual, float scale) -> ()");
  m.def("stats() -> (str[], int[], float[])", &stats);
  m.def("reset_stats() -> ()", &reset_stats);
  m.def("drain_communicators() -> ()", &drain_communicators);
}

TORCH_LIBRARY_IMPL(ddl, CPU, m) {
  m.impl("flatten_scale_cast_", &flatten_scale_cast_cpu);
  m.impl("compress_ef_", &compress_ef_cpu);
}

#ifdef DDL_WITH_CUDA
TORCH_LIBRARY_IMPL(ddl, CUDA, m) {
  m.impl("flatten_scale_cast_", &cuda::flatten_scale_cast);
  m.impl("compress_ef_", &cuda::compress_ef);
}
#endif

}  // namespace ddl::torch_adapter

PyMODINIT_FUNC PyInit__native() {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native",
                               "Loads the ddl operator library into torch.ops.ddl.", -1, nullptr,
                               nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
