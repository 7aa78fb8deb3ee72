"""Parse and validate the environment contract between operator, agent and training processes."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal, TypeVar, get_args

from ddl_operator.api import constants

Algorithm = Literal["Ring", "Hierarchical", "Auto"]
Compression = Literal["None", "BF16", "FP16"]
_Choice = TypeVar("_Choice", bound=str)

# Exit codes of the agent and of training processes. 42 (permanent) is shared with the operator.
EXIT_CODE_PERMANENT: Final = constants.EXIT_CODE_PERMANENT
# A training process stopped at a step boundary because it was asked to (new epoch or SIGTERM),
# after the checkpoint was written. EX_TEMPFAIL from sysexits: "try again later".
EXIT_CODE_STOPPED: Final = 75
# A wait ran out (rendezvous, master); a restart may help.
EXIT_CODE_RETRYABLE: Final = 1
# The agent was asked to terminate (SIGTERM) and shut down cleanly: 128 + SIGTERM, as a shell
# reports it, so a terminated worker never looks like a finished one.
EXIT_CODE_TERMINATED: Final = 143

DEFAULT_METRICS_PORT: Final = 9400
DEFAULT_RENDEZVOUS_TIMEOUT: Final = 300.0
DEFAULT_STOP_TIMEOUT: Final = 20.0

# Job identities go into checkpoint file names, so they are held to Kubernetes' rules: a
# namespace is a DNS label (no dots, which keeps "<namespace>.<name>" unambiguous) and a DDLJob
# name a DNS subdomain, short enough that a checkpoint's temp file name stays within 255 bytes.
_NAMESPACE: Final = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_JOB_NAME: Final = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,148}[a-z0-9])?$")


class ConfigError(Exception):
    """The environment is wrong in a way no retry fixes; the message names the variable."""

    exit_code: int = EXIT_CODE_PERMANENT


@dataclass(frozen=True, order=True)
class JobIdentity:
    """Which DDLJob a process works for: its namespace and name (what checkpoints record)."""

    namespace: str
    name: str

    def __post_init__(self) -> None:
        if not _NAMESPACE.match(self.namespace):
            raise ValueError(
                f"namespace {self.namespace!r} is not a DNS label (lowercase letters, digits, "
                "'-'; at most 63)"
            )
        if not _JOB_NAME.match(self.name):
            raise ValueError(
                f"job name {self.name!r} is not a DNS subdomain of at most 150 characters "
                "(lowercase letters, digits, '-', '.')"
            )

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class CommSettings:
    """How gradients are reduced and checkpoints kept; the same in agent and training env."""

    algorithm: Algorithm = "Auto"
    compression: Compression = "None"
    bucket_mb: int = 25
    checkpoint_dir: str | None = None
    checkpoint_every: int = 100
    checkpoint_keep: int = 3


@dataclass(frozen=True)
class AgentConfig:
    """What the pod agent needs, from the variables the operator puts on the worker pod."""

    pod_name: str
    namespace: str
    job_name: str
    comm: CommSettings
    procs_per_worker: int | None
    metrics_port: int
    rendezvous_timeout: float
    stop_timeout: float
    # Local mode only: the membership file the local coordinator rewrites, where reports go,
    # and this agent's scratch directory. Unset in a cluster.
    membership_file: str | None
    report_dir: str | None
    work_dir: str | None
    node_name: str

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> AgentConfig:
        env = _Reader(os.environ if environ is None else environ)
        pod_name = env.required("POD_NAME", "the operator sets it from the downward API")
        return cls(
            pod_name=pod_name,
            namespace=env.required("POD_NAMESPACE", "the operator sets it from the downward API"),
            job_name=env.required("DDL_JOB_NAME", "the operator sets it on every worker pod"),
            comm=_comm_settings(env, checkpoint_required=True),
            procs_per_worker=env.optional_int("DDL_PROCS_PER_WORKER", minimum=1),
            metrics_port=env.integer("DDL_METRICS_PORT", DEFAULT_METRICS_PORT, 0, 65535),
            rendezvous_timeout=env.seconds("DDL_RENDEZVOUS_TIMEOUT", DEFAULT_RENDEZVOUS_TIMEOUT),
            stop_timeout=env.seconds("DDL_STOP_TIMEOUT", DEFAULT_STOP_TIMEOUT),
            membership_file=env.text("DDL_MEMBERSHIP_FILE", "") or None,
            report_dir=env.text("DDL_REPORT_DIR", "") or None,
            work_dir=env.text("DDL_WORK_DIR", "") or None,
            node_name=env.text("DDL_NODE_NAME", "") or env.text("NODE_NAME", ""),
        )


@dataclass(frozen=True)
class TrainEnv:
    """What a training process gets: torchrun's variables plus the DDL ones."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    group_rank: int
    master_addr: str
    master_port: int
    restart_count: int
    grid: tuple[int, ...]
    epoch: int
    comm: CommSettings
    job_name: str
    namespace: str
    node_name: str
    rendezvous_timeout: float
    progress_file: str | None
    total_steps: int | None

    @property
    def job(self) -> JobIdentity:
        """The DDLJob this process trains for (POD_NAMESPACE, DDL_JOB_NAME)."""
        return JobIdentity(self.namespace, self.job_name)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> TrainEnv:
        env = _Reader(os.environ if environ is None else environ)
        hint = "the agent (or torchrun) sets it"
        world_size = env.required_int("WORLD_SIZE", hint, minimum=1)
        rank = env.required_int("RANK", hint, minimum=0)
        if rank >= world_size:
            raise ConfigError(f"RANK={rank} must be smaller than WORLD_SIZE={world_size}")
        local_world_size = env.required_int("LOCAL_WORLD_SIZE", hint, minimum=1)
        local_rank = env.required_int("LOCAL_RANK", hint, minimum=0)
        if local_rank >= local_world_size:
            raise ConfigError(
                f"LOCAL_RANK={local_rank} must be smaller than LOCAL_WORLD_SIZE={local_world_size}"
            )
        grid_text = env.text("DDL_GRID", "")
        grid = parse_grid(grid_text) if grid_text else (world_size,)
        if math.prod(grid) != world_size:
            raise ConfigError(
                f"DDL_GRID={grid_text!r} has {math.prod(grid)} processes but "
                f"WORLD_SIZE={world_size}"
            )
        job_name = env.text("DDL_JOB_NAME", "local")
        namespace = env.text("POD_NAMESPACE", "default")
        try:
            JobIdentity(namespace, job_name)
        except ValueError as error:
            raise ConfigError(
                f"POD_NAMESPACE={namespace!r} / DDL_JOB_NAME={job_name!r}: {error}"
            ) from None
        return cls(
            rank=rank,
            local_rank=local_rank,
            world_size=world_size,
            local_world_size=local_world_size,
            group_rank=env.integer("GROUP_RANK", rank // local_world_size, 0, world_size),
            master_addr=env.required("MASTER_ADDR", hint),
            master_port=env.required_int("MASTER_PORT", hint, minimum=1, maximum=65535),
            restart_count=env.integer("TORCHELASTIC_RESTART_COUNT", 0, 0, None),
            grid=grid,
            epoch=env.integer("DDL_EPOCH", 0, 0, None),
            comm=_comm_settings(env, checkpoint_required=False),
            job_name=job_name,
            namespace=namespace,
            node_name=env.text("DDL_NODE_NAME", ""),
            rendezvous_timeout=env.seconds("DDL_RENDEZVOUS_TIMEOUT", DEFAULT_RENDEZVOUS_TIMEOUT),
            progress_file=env.text("DDL_PROGRESS_FILE", "") or None,
            total_steps=env.optional_int("DDL_TOTAL_STEPS", minimum=1),
        )


def parse_grid(text: str) -> tuple[int, ...]:
    """'8x2' -> (8, 2): processes per tier, innermost first."""
    parts = text.lower().split("x")
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        raise ConfigError(
            f"DDL_GRID={text!r} is not a grid like '8x2' (positive integers joined by 'x')"
        ) from None
    if not dims or any(d < 1 for d in dims):
        raise ConfigError(f"DDL_GRID={text!r} has a dimension below 1")
    return dims


def format_grid(grid: tuple[int, ...] | list[int]) -> str:
    """(8, 2) -> '8x2'."""
    return "x".join(str(d) for d in grid)


def _comm_settings(env: _Reader, *, checkpoint_required: bool) -> CommSettings:
    if checkpoint_required:
        checkpoint_dir: str | None = env.required(
            "DDL_CHECKPOINT_DIR", "spec.checkpoint.path of the DDLJob"
        )
    else:
        checkpoint_dir = env.text("DDL_CHECKPOINT_DIR", "") or None
    return CommSettings(
        algorithm=env.choice("DDL_ALLREDUCE_ALGORITHM", "Auto", get_args(Algorithm)),
        compression=env.choice("DDL_COMPRESSION", "None", get_args(Compression)),
        bucket_mb=env.integer("DDL_BUCKET_MB", 25, 1, 1024),
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=env.integer("DDL_CHECKPOINT_EVERY", 100, 1, None),
        checkpoint_keep=env.integer("DDL_CHECKPOINT_KEEP", 3, 1, None),
    )


class _Reader:
    """Typed reads of environment variables with errors that name the variable."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ

    def text(self, name: str, default: str) -> str:
        return self.environ.get(name, default).strip()

    def required(self, name: str, hint: str) -> str:
        value = self.environ.get(name, "").strip()
        if not value:
            raise ConfigError(f"required environment variable {name} is not set ({hint})")
        return value

    def required_int(
        self, name: str, hint: str, *, minimum: int, maximum: int | None = None
    ) -> int:
        return self._int(name, self.required(name, hint), minimum, maximum)

    def integer(self, name: str, default: int, minimum: int, maximum: int | None) -> int:
        raw = self.text(name, "")
        return default if not raw else self._int(name, raw, minimum, maximum)

    def optional_int(self, name: str, *, minimum: int) -> int | None:
        raw = self.text(name, "")
        return None if not raw else self._int(name, raw, minimum, None)

    def seconds(self, name: str, default: float) -> float:
        raw = self.text(name, "")
        if not raw:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r} is not a number of seconds") from None
        if not value > 0 or math.isinf(value):
            raise ConfigError(f"{name}={raw!r} must be a positive, finite number of seconds")
        return value

    def choice(self, name: str, default: _Choice, allowed: tuple[_Choice, ...]) -> _Choice:
        raw = self.text(name, "")
        if not raw:
            return default
        for option in allowed:
            if option == raw:
                return option
        raise ConfigError(f"{name}={raw!r} is not one of {', '.join(allowed)}")

    @staticmethod
    def _int(name: str, raw: str, minimum: int, maximum: int | None) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r} is not an integer") from None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
            raise ConfigError(f"{name}={value} must be {bound}")
        return value
