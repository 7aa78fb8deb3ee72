"""Typed Python face of the native hierarchical allreduce: plain API, DDP comm hook, tier stats.

The schedule and the transports are C++ (native/, loaded as ``torch.ops.ddl``). This module
creates the per-tier communicators (Gloo subgroups, or NCCL communicators split from one),
picks a backend from the ordered list hierarchical NCCL -> flat NCCL -> Gloo, and keeps the
error-feedback residuals of compressed DDP buckets.

    state = make_hook_state([8, 2], "Hierarchical", "BF16")     # grid innermost first
    ddp.register_comm_hook(state, hierarchical_hook)
"""

# No `from __future__ import annotations`: DDP checks the hook's annotations at runtime.
import atexit
import importlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, Literal, Protocol, TypeAlias, cast, get_args

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import GradBucket

BUILD_HINT: Final = (
    "the native allreduce extension (ddl_worker._native) is not built: run `make install`, or "
    "`pip install --no-build-isolation -e .` from the repository root with torch installed "
    "(CUDA/NCCL parts build where nvcc is found; DDL_NATIVE_CUDA=0/1 forces them off/on)"
)

try:
    importlib.import_module("ddl_worker._native")  # registers torch.ops.ddl
except ImportError as error:
    raise ImportError(f"{BUILD_HINT} ({error})") from error

# Let queued allreduces finish while the interpreter is whole: a CPU communicator's thread
# that completes a future during finalization would run Python callbacks it may not run.
atexit.register(torch.ops.ddl.drain_communicators)

Algorithm: TypeAlias = Literal["Ring", "Hierarchical", "Auto"]
Compression: TypeAlias = Literal["None", "BF16", "FP16"]
ReduceOp: TypeAlias = Literal["sum", "avg"]
Backend: TypeAlias = Literal["nccl-hierarchical", "nccl-flat", "gloo"]
BackendRequest: TypeAlias = Literal["auto", "nccl-hierarchical", "nccl-flat", "gloo"]

# Order of preference when the backend is "auto" (Horovod's rule: fastest first, the Gloo
# reference last); an explicitly requested backend that is unavailable raises instead.
BACKEND_ORDER: Final[tuple[Backend, ...]] = ("nccl-hierarchical", "nccl-flat", "gloo")
# Chunks of this size are pipelined through the tiers: large enough that per-operation
# latency stays small next to transfer time, small enough for several chunks per DDP bucket.
DEFAULT_CHUNK_BYTES: Final = 4 << 20
# Message sizes at which "Auto" times both algorithms to fit seconds = alpha + beta * bytes.
AUTO_PROBE_BYTES: Final = (16 << 10, 1 << 20)
_WIRE: Final[dict[Compression, str]] = {"None": "none", "BF16": "bf16", "FP16": "fp16"}


class Communicator(Protocol):
    """torch.classes.ddl.Communicator: a grid's communicators and one transport."""

    def grid(self) -> list[int]: ...
    def backend(self) -> str: ...
    def chunk_bytes(self) -> int: ...
    def residual_numel(self, numel: int, element_size: int) -> int: ...
    def transports(self) -> list[str]: ...


@dataclass(frozen=True)
class LineFit:
    """Alpha-beta model of one algorithm's allreduce time, fitted from two timed sizes."""

    alpha: float  # seconds per call
    beta: float  # seconds per byte

    def predict(self, nbytes: int) -> float:
        return self.alpha + self.beta * nbytes


@dataclass
class HookState:
    """Everything the DDP hook needs; build it with make_hook_state (a collective call)."""

    grid: tuple[int, ...]
    algorithm: Algorithm
    compression: Compression
    backend: Backend
    device: torch.device
    op: ReduceOp = "avg"
    hierarchical: Communicator | None = None
    flat: Communicator | None = None
    # Auto only: fitted models, identical on every rank so that all pick the same algorithm.
    fits: dict[str, LineFit] = field(default_factory=dict)
    # Error feedback per (communicator name, DDP bucket index).
    residuals: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)

    def communicator_for(self, nbytes: int) -> tuple[str, Communicator]:
        """The communicator this message goes through, and its name ("hierarchical"/"flat")."""
        if self.hierarchical is not None and self.flat is not None:
            flat_wins = self.fits["flat"].predict(nbytes) < self.fits["hierarchical"].predict(
                nbytes
            )
            return ("flat", self.flat) if flat_wins else ("hierarchical", self.hierarchical)
        if self.hierarchical is not None:
            return "hierarchical", self.hierarchical
        if self.flat is not None:
            return "flat", self.flat
        raise RuntimeError("this rank is not a member of the hook state's group")


def available_backends(device: torch.device) -> list[Backend]:
    """Backends this build can run for tensors on device, in BACKEND_ORDER."""
    nccl = device.type == "cuda" and bool(torch.ops.ddl.has_nccl())
    usable = {
        "nccl-hierarchical": nccl and bool(torch.ops.ddl.has_nccl_split()),
        "nccl-flat": nccl,
        "gloo": True,  # CPU tensors directly, device tensors staged through host memory
    }
    return [backend for backend in BACKEND_ORDER if usable[backend]]


def make_hook_state(
    grid: Sequence[int],
    algorithm: Algorithm = "Hierarchical",
    compression: Compression = "None",
    group: dist.ProcessGroup | None = None,
    *,
    backend: BackendRequest = "auto",
    op: ReduceOp = "avg",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    device: torch.device | None = None,
    shared_memory: bool = True,
) -> HookState:
    """Create the communicators for grid (innermost tier first, product = size of group).

    Collective: every rank of the default group calls it with the same arguments (subgroups
    are created with torch.distributed.new_group). Ranks outside group get a state whose hook
    raises. device defaults to the current CUDA device when group runs NCCL, else the CPU.
    On Gloo, shared_memory lets the tiers below the slowest move data through a shared
    segment where their ranks share /dev/shm (Gloo otherwise; see Communicator.transports()).
    """
    _check_choice("algorithm", algorithm, Algorithm)
    _check_choice("compression", compression, Compression)
    _check_choice("backend", backend, BackendRequest)
    _check_choice("op", op, ReduceOp)
    dims = tuple(int(d) for d in grid)
    if not dims or min(dims) < 1:
        raise ValueError(f"grid: needs positive dimensions, got {list(grid)}")
    if not dist.is_initialized():
        raise RuntimeError("make_hook_state: call torch.distributed.init_process_group first")
    pg = _group_or_world(group)
    members = _group_members(pg)
    if math.prod(dims) != len(members):
        raise ValueError(
            f"grid: {'x'.join(map(str, dims))} has {math.prod(dims)} ranks but the group has "
            f"{len(members)}"
        )
    if device is None:
        member = dist.get_rank() in members
        device = _default_device(pg) if member else torch.device("cpu")
    chosen = _resolve_backend(backend, device, algorithm)
    state = HookState(dims, algorithm, compression, chosen, device, op)
    want_hierarchical = algorithm != "Ring" and chosen != "nccl-flat"
    want_flat = algorithm != "Hierarchical" or chosen == "nccl-flat"
    if chosen == "gloo":
        if want_hierarchical:
            state.hierarchical = _gloo_communicator(dims, members, chunk_bytes, shared_memory)
        if want_flat:
            state.flat = _gloo_communicator((len(members),), members, chunk_bytes, False)
    else:
        if want_hierarchical:
            state.hierarchical = _nccl_communicator(dims, members, pg, device, True, chunk_bytes)
        if want_flat:
            state.flat = _nccl_communicator(
                (len(members),), members, pg, device, False, chunk_bytes
            )
    if state.hierarchical is not None and state.flat is not None:
        state.fits = _fit_algorithms(state, pg)
    return state


def hierarchical_hook(state: HookState, bucket: GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: allreduce (average) the bucket through the state's communicators.

    Returns at once; the future completes when the bucket is reduced (CPU: on the native
    worker thread; CUDA: ordered on the communication streams, stream-aware for DDP).
    """
    future = submit(state, bucket.buffer(), residual_key=bucket.index())
    # DDP's Python hook glue wants the result as a Python object, which a future completed in
    # C++ does not hold; a Python continuation re-wraps it (what torch's own hooks do).
    return future.then(_value)


def _value(future: torch.futures.Future[torch.Tensor]) -> torch.Tensor:
    return future.value()


def allreduce(
    tensor: torch.Tensor,
    grid: Sequence[int],
    op: ReduceOp = "sum",
    compression: Compression = "None",
    group: dist.ProcessGroup | None = None,
    *,
    algorithm: Algorithm = "Hierarchical",
    backend: BackendRequest = "auto",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    shared_memory: bool = True,
) -> torch.Tensor:
    """Allreduce tensor in place over group arranged as grid, and return it.

    Collective like torch.distributed.all_reduce. The first call with a given grid/group
    creates the communicators (all ranks of the default group must make it). Compression here
    has no error feedback (there is no state between calls); the DDP hook keeps it.
    """
    _check_choice("op", op, ReduceOp)
    pg = _group_or_world(group)
    key = (
        tuple(int(d) for d in grid),
        algorithm,
        backend,
        pg.group_name,
        tensor.device.type,
        chunk_bytes,
        shared_memory,
    )
    state = _PLAIN_STATES.get(key)
    if state is None:
        state = make_hook_state(
            grid,
            algorithm,
            "None",
            group,
            backend=backend,
            op=op,
            chunk_bytes=chunk_bytes,
            device=tensor.device,
            shared_memory=shared_memory,
        )
        _PLAIN_STATES[key] = state
    work = tensor if tensor.is_contiguous() else tensor.contiguous()
    submit(state, work, op, compression=compression).wait()
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def stats() -> dict[str, tuple[int, float]]:
    """Cumulative (bytes sent, seconds busy) per tier since start or reset_stats().

    Tiers are "intra"/"inter" for 2-D grids, "tier0".. for more, "flat" for the ring. Bytes
    are what this rank sends under the ring algorithm ((p-1)/p of the buffer per
    reduce-scatter or all-gather, twice that per allreduce); seconds are the time at least one
    operation of the tier was in flight.
    """
    names, nbytes, seconds = torch.ops.ddl.stats()
    return {
        str(name): (int(b), float(s)) for name, b, s in zip(names, nbytes, seconds, strict=True)
    }


def reset_stats() -> None:
    torch.ops.ddl.reset_stats()


_PLAIN_STATES: dict[tuple[object, ...], HookState] = {}


def _check_choice(argument: str, value: str, allowed: object) -> None:
    choices = get_args(allowed)
    if value not in choices:
        raise ValueError(f"{argument}: must be one of {', '.join(choices)}; got {value!r}")


def submit(
    state: HookState,
    tensor: torch.Tensor,
    op: ReduceOp | None = None,
    *,
    residual_key: int | None = None,
    compression: Compression | None = None,
) -> torch.futures.Future[torch.Tensor]:
    """Start an in-place allreduce of a contiguous tensor through state's communicators.

    op and compression default to the state's. With compression, residual_key names the
    error-feedback buffer to use (the DDP hook passes the bucket index); None means none.
    Collective: every member issues the same sequence of calls.
    """
    wire = compression if compression is not None else state.compression
    name, comm = state.communicator_for(tensor.numel() * tensor.element_size())
    staged = state.backend == "gloo" and tensor.device.type != "cpu"
    data = tensor.detach().cpu() if staged else tensor
    residual = None
    if residual_key is not None and wire != "None" and tensor.dtype == torch.float32:
        residual = _residual(state, (name, residual_key), comm, data)
    future = cast(
        "torch.futures.Future[torch.Tensor]",
        torch.ops.ddl.allreduce_(data, comm, op or state.op, _WIRE[wire], residual),
    )
    if not staged:
        return future
    # Gloo reference for device tensors: reduce a host copy, then copy back.
    future.wait()
    tensor.copy_(data)
    done: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    done.set_result(tensor)
    return done


def _residual(
    state: HookState, key: tuple[str, int], comm: Communicator, data: torch.Tensor
) -> torch.Tensor:
    numel = comm.residual_numel(data.numel(), data.element_size())
    residual = state.residuals.get(key)
    # DDP rebuilds its buckets after the first iteration: a bucket whose size changed starts
    # with fresh (zero) feedback.
    if residual is None or residual.numel() != numel or residual.device != data.device:
        residual = torch.zeros(numel, dtype=torch.float32, device=data.device)
        state.residuals[key] = residual
    return residual


def _group_or_world(group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    if group is not None:
        return group
    world = dist.group.WORLD
    if world is None:
        raise RuntimeError("call torch.distributed.init_process_group first")
    return world


def _group_members(group: dist.ProcessGroup) -> list[int]:
    """Global ranks of group in group-rank order, known to members and non-members alike."""
    world = dist.get_world_size()
    if group is dist.group.WORLD:
        return list(range(world))
    mine = dist.get_rank(group)
    gathered: list[int | None] = [None] * world
    dist.all_gather_object(gathered, mine)
    ranks = {int(g): r for r, g in enumerate(gathered) if g is not None and int(g) >= 0}
    return [ranks[i] for i in range(len(ranks))]


def _default_device(group: dist.ProcessGroup) -> torch.device:
    if "nccl" in str(dist.get_backend(group)) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _resolve_backend(requested: BackendRequest, device: torch.device, algorithm: str) -> Backend:
    available = available_backends(device)
    if requested == "auto":
        if algorithm == "Ring" and available[0] == "nccl-hierarchical":
            return "nccl-flat"
        return available[0]
    if requested not in available:
        raise RuntimeError(
            f"backend: {requested!r} is unavailable for {device} tensors in this build "
            f"(available: {', '.join(available)}; NCCL built: {bool(torch.ops.ddl.has_nccl())}, "
            f"ncclCommSplit: {bool(torch.ops.ddl.has_nccl_split())}). {BUILD_HINT}"
        )
    return requested


def _rows(dims: tuple[int, ...], tier: int) -> list[list[int]]:
    """Every tier row of the grid (group ranks differing only in coordinate tier), in order."""
    stride = math.prod(dims[:tier])
    world = math.prod(dims)
    return [
        [r + j * stride for j in range(dims[tier])]
        for r in range(world)
        if (r // stride) % dims[tier] == 0
    ]


def _gloo_communicator(
    dims: tuple[int, ...], members: list[int], chunk_bytes: int, shared_memory: bool
) -> Communicator | None:
    """One Gloo subgroup per tier row; every rank creates every row, in the same order."""
    me = dist.get_rank()
    mine: list[str] = []
    for tier in range(len(dims)):
        for row in _rows(dims, tier):
            ranks = [members[i] for i in row]
            pg = dist.new_group(ranks, backend="gloo")
            if me in ranks:
                mine.append(pg.group_name)
    if me not in members:
        return None
    return cast(
        Communicator, torch.ops.ddl.c10d_communicator(mine, list(dims), chunk_bytes, shared_memory)
    )


def _nccl_communicator(
    dims: tuple[int, ...],
    members: list[int],
    group: dist.ProcessGroup,
    device: torch.device,
    split: bool,
    chunk_bytes: int,
) -> Communicator | None:
    """NCCL world communicator from a broadcast unique id, split per tier when split is set."""
    me = dist.get_rank()
    if me not in members:
        return None
    rank = members.index(me)
    payload: list[object] = [
        torch.ops.ddl.nccl_unique_id().tolist() if rank == 0 else None,
    ]
    if len(members) > 1:
        dist.broadcast_object_list(payload, src=members[0], group=group)
    unique_id = torch.tensor(payload[0], dtype=torch.uint8)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return cast(
        Communicator,
        torch.ops.ddl.nccl_communicator(unique_id, rank, list(dims), split, index, chunk_bytes),
    )


def _fit_algorithms(state: HookState, group: dist.ProcessGroup) -> dict[str, LineFit]:
    """Time flat and hierarchical at two sizes; the slowest rank's times decide for everyone."""
    assert state.flat is not None and state.hierarchical is not None
    comms = {"flat": state.flat, "hierarchical": state.hierarchical}
    times = torch.zeros(len(comms), len(AUTO_PROBE_BYTES), dtype=torch.float64)
    for a, comm in enumerate(comms.values()):
        for s, nbytes in enumerate(AUTO_PROBE_BYTES):
            probe = torch.zeros(nbytes // 4, dtype=torch.float32, device=state.device)
            best = math.inf
            for _ in range(3):
                start = time.perf_counter()
                torch.ops.ddl.allreduce_(probe, comm, "sum", "none", None).wait()
                if probe.is_cuda:
                    torch.cuda.synchronize(probe.device)
                best = min(best, time.perf_counter() - start)
            times[a, s] = best
    on_device = times.to(state.device) if "nccl" in str(dist.get_backend(group)) else times
    dist.all_reduce(on_device, op=dist.ReduceOp.MAX, group=group)
    times = on_device.cpu()
    small, large = AUTO_PROBE_BYTES
    fits: dict[str, LineFit] = {}
    for a, name in enumerate(comms):
        beta = max(float(times[a, 1] - times[a, 0]) / (large - small), 0.0)
        fits[name] = LineFit(alpha=max(float(times[a, 0]) - beta * small, 0.0), beta=beta)
    return fits
