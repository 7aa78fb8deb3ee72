"""Pydantic models of the DDLJob spec and status; the CRD schema is generated from these."""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel
from pydantic.config import JsonDict

from ddl_operator.api import constants as c

# A Kubernetes label key: optional DNS-subdomain prefix and "/", then a name of at most 63 chars.
LABEL_KEY_PATTERN = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)


# The most workers a job may have (replicas, elastic bounds).
MAX_REPLICAS: Final = 10000
# Bounds of the goodput state kept in status (anyone with status RBAC can write it, so the
# schema bounds it and the core parses it again before it trusts it).
MAX_STEP: Final = 2**53 - 1  # what survives a JSON reader that uses doubles
MAX_COOLING_NODES: Final = 64
MAX_SIZES_TRIED: Final = 32
MAX_SIZE_SAMPLES: Final = 16
MAX_GOODPUT_MESSAGE: Final = 1024
_POD_NAME_MAX: Final = 253
_DATE_TIME: Final[JsonDict] = {"format": "date-time"}


def cel(rule: str, message: str, field_path: str | None = None) -> JsonDict:
    """One CEL validation rule for the CRD (x-kubernetes-validations)."""
    out: JsonDict = {"rule": rule, "message": message}
    if field_path:
        out["fieldPath"] = field_path
    return out


def managed_here(managed_by: object) -> bool:
    """Whether a job with this spec.managedBy is this operator's to reconcile."""
    return managed_by in (None, c.CONTROLLER_NAME)


class ApiModel(BaseModel):
    """Base: camelCase on the wire, snake_case in Python, unknown fields refused."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class Elastic(ApiModel):
    """The range of workers a job may run with while it loses and regains capacity."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "self.minReplicas <= self.maxReplicas",
                    "minReplicas must be <= maxReplicas",
                    ".minReplicas",
                )
            ]
        }
    )

    min_replicas: int = Field(
        ge=1, le=MAX_REPLICAS, description="Fewest workers the job runs with."
    )
    max_replicas: int = Field(ge=1, le=MAX_REPLICAS, description="Most workers the job grows to.")
    rendezvous_timeout_seconds: int = Field(
        default=300,
        ge=10,
        description="How long workers wait for a new membership before the agent gives up.",
    )
    wait_for_capacity_seconds: int = Field(
        default=1800,
        ge=0,
        description="How long a job below minReplicas waits for capacity before it fails "
        "(0 waits forever).",
    )
    scaling: Literal["Replicas", "Throughput"] = Field(
        default="Replicas",
        description="Replicas: grow to replicas whenever workers fit. Throughput: grow one "
        "worker at a time toward replicas and keep a growth only if the job's samples/s "
        "(rank 0) rose by at least scalingGain of linear scaling; otherwise go back to the "
        "fastest size seen and try again after scalingCoolDownSeconds (status.sizing shows "
        "each size tried).",
    )
    scaling_gain: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="Scaling: Throughput keeps growing from p to w workers only if samples/s "
        "rose by at least this share of the linear gain (w - p) x throughput / p.",
    )
    scaling_settle_seconds: int = Field(
        default=60,
        ge=0,
        le=86400,
        description="Scaling: Throughput measures a size only this long after the gang "
        "re-formed (start-up and checkpoint loading read low).",
    )
    scaling_cool_down_seconds: int = Field(
        default=1800,
        ge=0,
        le=7 * 86400,
        description="Scaling: Throughput does not grow again for this long after a growth "
        "that did not pay.",
    )


class Stragglers(ApiModel):
    """What the operator does about a worker that computes slower than the rest."""

    action: Literal["Report", "Replace"] = Field(
        default="Report",
        description="Report: the Straggler condition names the slow worker. Replace: also, "
        "once the same worker computed over threshold x the others' median for forSteps "
        "steps, it is replaced at a re-form (every worker checkpoints at its step boundary) "
        "by a worker on another node of the gang's innermost domain that has room, and its "
        "node is avoided by this job for coolDownSeconds. At most one replacement per "
        "re-form; each further one waits twice as long as the last (5 min, doubling up to 4 "
        "h). Needs 3 or more workers.",
    )
    threshold: float = Field(
        default=1.2,
        gt=1.0,
        le=100.0,
        allow_inf_nan=False,
        description="A worker is slow when its compute time per step (step time minus "
        "sync-wait) exceeds this times the median of the others'; it stays slow while "
        "above the bar halfway between (1.1 for 1.2), so readings near the threshold do not "
        "restart the count.",
    )
    for_steps: int = Field(
        default=50,
        ge=1,
        le=1_000_000,
        description="Replace: how many steps a worker must stay slow before it is replaced.",
    )
    cool_down_seconds: int = Field(
        default=1800,
        ge=0,
        le=7 * 86400,
        description="Replace: how long this job places no worker on a replaced straggler's "
        "node (other jobs may still use it).",
    )


class Topology(ApiModel):
    """Which node labels describe the network's tiers, innermost first."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    f"self.levels[0] == '{c.LABEL_HOSTNAME}'",
                    f"levels must start with {c.LABEL_HOSTNAME} (the node level)",
                    ".levels",
                ),
                cel(
                    "!has(self.required) || self.required in self.levels",
                    "required must be one of levels",
                    ".required",
                ),
            ]
        }
    )

    levels: list[str] = Field(
        default_factory=lambda: list(c.DEFAULT_TOPOLOGY_LEVELS),
        min_length=1,
        max_length=8,
        description="Node label keys from the innermost tier (the node) outwards, e.g. "
        "node, NVLink domain, rack, zone. Ranks are ordered so that each tier's members "
        "are contiguous.",
        json_schema_extra={
            "items": {"type": "string", "pattern": LABEL_KEY_PATTERN, "maxLength": 317},
            "x-kubernetes-list-type": "set",
            "default": list(c.DEFAULT_TOPOLOGY_LEVELS),
        },
    )
    required: str | None = Field(
        default=None,
        max_length=317,
        description="A level the whole gang must fit inside (one domain of it), e.g. "
        f"{c.LABEL_ZONE}. Unset: the gang may span any domain.",
    )


class Allreduce(ApiModel):
    """How gradients are reduced across workers."""

    algorithm: Literal["Ring", "Hierarchical", "Auto"] = Field(
        default="Auto",
        description="Ring: flat allreduce. Hierarchical: reduce-scatter inside each tier, "
        "allreduce across the slowest, all-gather back. Auto: picks per message size.",
    )
    compression: Literal["None", "BF16", "FP16"] = Field(
        default="None",
        description="Compress gradients on the slowest tier (with error feedback).",
    )
    bucket_mb: int = Field(
        default=25, ge=1, le=1024, alias="bucketMB", description="DDP gradient bucket size, MiB."
    )


class Checkpoint(ApiModel):
    """Where and how often workers checkpoint; resumed from on every (re)start."""

    path: str | None = Field(
        default=None,
        min_length=1,
        description="Directory for checkpoints, on a volume every worker mounts. Unset: "
        "/ckpt/NAMESPACE/NAME, so jobs never share one unless they set the same path; "
        "even then each resumes from and prunes only its own (file names and contents "
        "carry the job's namespace and name).",
    )
    every_steps: int = Field(default=100, ge=1, description="Checkpoint every N steps.")
    keep: int = Field(
        default=3,
        ge=1,
        description="How many checkpoints that verify to keep (damaged ones are moved aside, "
        "not counted).",
    )

    def directory(self, namespace: str, name: str) -> str:
        """The directory a job's workers checkpoint to: path, or the job's own under /ckpt."""
        return self.path or f"/ckpt/{namespace}/{name}"


class FailurePolicy(ApiModel):
    """When a failed worker is restarted and when the job gives up."""

    max_restarts: int = Field(
        default=10, ge=0, description="Restarts of the gang before the job fails."
    )
    backoff_seconds: int = Field(default=10, ge=0, description="Wait before a restart.")
    non_retryable_exit_codes: list[int] = Field(
        default_factory=lambda: [c.EXIT_CODE_PERMANENT],
        description="Worker exit codes that fail the job at once (a retry cannot help).",
        json_schema_extra={"x-kubernetes-list-type": "set", "default": [c.EXIT_CODE_PERMANENT]},
    )


def _default_of(model: type[ApiModel]) -> JsonDict:
    """The full default object for the CRD, so the API server's defaulting and CEL agree."""
    default: JsonDict = model().model_dump(by_alias=True, exclude_none=True, mode="json")
    return {"default": default}


def _open_object(**properties: Any) -> dict[str, Any]:
    """An object whose listed fields are typed and whose other fields pass through as-is."""
    out: dict[str, Any] = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    if properties:
        out["properties"] = properties
    return out


def _list_of(item: dict[str, Any], max_items: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "array", "items": item}
    if max_items is not None:
        out["maxItems"] = max_items
    return out


def _named(*required: str, **properties: Any) -> dict[str, Any]:
    """A list item with a non-empty name (env vars, volumes, containers, gates)."""
    out = _open_object(name=_NAME, **properties)
    out["required"] = ["name", *required]
    return out


_STRING = {"type": "string"}
# At most a qualified name (a gate's may be prefixed); bounded, CEL may compare them.
_NAME = {"type": "string", "minLength": 1, "maxLength": 317}
_STRING_MAP = {"type": "object", "additionalProperties": _STRING}
# A resource.Quantity, as controller-gen writes it for a ResourceList.
_QUANTITY = {
    "anyOf": [{"type": "integer"}, {"type": "string"}],
    "pattern": r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|"
    r"([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$",
    "x-kubernetes-int-or-string": True,
}
_RESOURCE_LIST = {"type": "object", "maxProperties": 64, "additionalProperties": _QUANTITY}
_RESOURCES = _open_object(limits=_RESOURCE_LIST, requests=_RESOURCE_LIST)
_IMAGE = {"type": "string", "minLength": 1}
# Bounds that keep the CEL rules over containers inside the API server's cost budget; a pod
# with more containers than this is not a training worker.
MAX_CONTAINERS: Final = 32

# The fields the operator reads or extends are typed, so a template the renderer cannot use
# (say `env: "X"`) is refused at `kubectl apply`; everything else passes to the pod unchanged
# and the pod's own validation applies when the operator creates it.
_TEMPLATE_SCHEMA: dict[str, Any] = {
    **_open_object(
        metadata=_open_object(labels=_STRING_MAP, annotations=_STRING_MAP),
        spec={
            **_open_object(
                containers={
                    **_list_of(
                        _named(
                            "image",
                            image=_IMAGE,
                            env=_list_of(_named()),
                            ports=_list_of(_open_object()),
                            volumeMounts=_list_of(_open_object(name=_STRING, mountPath=_STRING)),
                            resources=_RESOURCES,
                        ),
                        MAX_CONTAINERS,
                    ),
                    "minItems": 1,
                },
                initContainers=_list_of(
                    _named("image", image=_IMAGE, resources=_RESOURCES), MAX_CONTAINERS
                ),
                schedulingGates=_list_of(_named()),
                volumes=_list_of(_named()),
                tolerations=_list_of(_open_object()),
                nodeSelector=_STRING_MAP,
                hostname=_STRING,
                subdomain=_STRING,
                serviceAccountName=_STRING,
            ),
            "required": ["containers"],
        },
    ),
    "description": (
        "Pod template of a worker (the user's container). Standard PodTemplateSpec. The "
        "operator adds a scheduling gate, restartPolicy Never, hostname and subdomain, the "
        "rendezvous env, a metrics port, the GPU limit, and a memory-backed /dev/shm (the "
        "ranks of a worker share memory) unless the first container mounts its own."
    ),
    "required": ["spec"],
}


def _asks_gpus(container: str) -> str:
    """CEL: the container's resources name nvidia.com/gpu (as a limit or a request)."""
    return " || ".join(
        f"(has({container}.resources) && has({container}.resources.{kind})"
        f" && '{c.GPU_RESOURCE}' in {container}.resources.{kind})"
        for kind in ("limits", "requests")
    )


def _gpu_rules() -> list[JsonDict]:
    """GPUs come from one place, gpusPerWorker: the operator sets the first container's
    nvidia.com/gpu from it. The template may repeat the same number, nothing else, and no other
    container may ask for GPUs (placement counts gpusPerWorker per worker, nothing more)."""
    first = "self.template.spec.containers[0]"
    same = " && ".join(
        f"(!has({first}.resources) || !has({first}.resources.{kind})"
        f" || !('{c.GPU_RESOURCE}' in {first}.resources.{kind})"
        f" || string({first}.resources.{kind}['{c.GPU_RESOURCE}']) == string(self.gpusPerWorker))"
        for kind in ("limits", "requests")
    )
    return [
        cel(
            same,
            f"containers[0].resources: {c.GPU_RESOURCE} must equal gpusPerWorker or be left "
            "out; the operator sets it from gpusPerWorker",
            ".template.spec.containers",
        ),
        cel(
            "self.template.spec.containers.all(x, x.name == self.template.spec.containers[0].name"
            f" || !({_asks_gpus('x')}))",
            f"only the first container gets GPUs (gpusPerWorker); another container must not "
            f"ask for {c.GPU_RESOURCE}",
            ".template.spec.containers",
        ),
        cel(
            "!has(self.template.spec.initContainers)"
            f" || self.template.spec.initContainers.all(x, !({_asks_gpus('x')}))",
            f"init containers must not ask for {c.GPU_RESOURCE}; the worker's GPUs come from "
            "gpusPerWorker",
            ".template.spec.initContainers",
        ),
    ]


class DDLJobSpec(ApiModel):
    """What the user asks for."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "!has(self.elastic) || (self.replicas >= self.elastic.minReplicas"
                    " && self.replicas <= self.elastic.maxReplicas)",
                    "replicas must be within [elastic.minReplicas, elastic.maxReplicas]",
                    ".replicas",
                ),
                cel(
                    "!has(self.processesPerWorker) || self.gpusPerWorker == 0"
                    " || self.processesPerWorker == self.gpusPerWorker",
                    "processesPerWorker must equal gpusPerWorker on GPU jobs (one process per GPU)",
                    ".processesPerWorker",
                ),
                *_gpu_rules(),
                cel(
                    "has(self.managedBy) == has(oldSelf.managedBy)"
                    " && (!has(self.managedBy) || self.managedBy == oldSelf.managedBy)",
                    "managedBy is immutable",
                    ".managedBy",
                ),
            ]
        }
    )

    replicas: int = Field(ge=1, le=MAX_REPLICAS, description="Desired workers (pods).")
    elastic: Elastic | None = Field(
        default=None, description="Elastic range; unset means a fixed-size job."
    )
    gpus_per_worker: int = Field(
        default=0, ge=0, le=64, description="nvidia.com/gpu per worker; 0 is a CPU job on Gloo."
    )
    processes_per_worker: int | None = Field(
        default=None,
        ge=1,
        le=256,
        description="Training processes per worker. Defaults to gpusPerWorker, or 1 on CPU.",
    )
    topology: Topology = Field(
        default_factory=Topology,
        description=Topology.__doc__,
        json_schema_extra=_default_of(Topology),
    )
    allreduce: Allreduce = Field(
        default_factory=Allreduce,
        description=Allreduce.__doc__,
        json_schema_extra=_default_of(Allreduce),
    )
    checkpoint: Checkpoint = Field(
        default_factory=Checkpoint,
        description=Checkpoint.__doc__,
        json_schema_extra=_default_of(Checkpoint),
    )
    failure_policy: FailurePolicy = Field(
        default_factory=FailurePolicy,
        description=FailurePolicy.__doc__,
        json_schema_extra=_default_of(FailurePolicy),
    )
    suspend: bool = Field(
        default=False,
        description="True stops every worker at a step boundary after a checkpoint, then "
        "deletes the pods: the job holds no pods and no GPUs (phase Suspended). False again "
        "creates workers that resume from the last checkpoint at the next epoch. Time spent "
        "suspended counts neither as a restart nor toward elastic.waitForCapacitySeconds "
        "(the batch/v1 Job convention).",
    )
    stragglers: Stragglers = Field(
        default_factory=Stragglers,
        description=Stragglers.__doc__,
        json_schema_extra=_default_of(Stragglers),
    )
    preemptible: bool = Field(
        default=True,
        description="False keeps higher-priority jobs from taking this job's GPUs (it is "
        "never shrunk or suspended for them). True lets a job of higher priority that does not "
        "fit shrink it toward its minReplicas first, and suspend it only if shrinking is not "
        "enough; it grows back or resumes once the GPU queue lets it.",
    )
    managed_by: str | None = Field(
        default=None,
        min_length=1,
        max_length=63,
        description="The controller that reconciles this job. Unset or "
        f"'{c.CONTROLLER_NAME}' is this operator; any other value (Kueue's MultiKueue, "
        "'kueue.x-k8s.io/multikueue') leaves the job to that controller: the operator "
        "creates no pods and writes no status for it. Immutable (the batch/v1 Job convention).",
    )
    template: dict[str, Any] = Field(json_schema_extra=_TEMPLATE_SCHEMA)

    @property
    def procs_per_worker(self) -> int:
        """Training processes each worker runs."""
        if self.processes_per_worker is not None:
            return self.processes_per_worker
        return self.gpus_per_worker or 1

    @property
    def min_replicas(self) -> int:
        return self.elastic.min_replicas if self.elastic else self.replicas

    @property
    def max_replicas(self) -> int:
        return self.elastic.max_replicas if self.elastic else self.replicas


Phase = Literal["Pending", "Placing", "Running", "Rescaling", "Suspended", "Succeeded", "Failed"]


class Condition(ApiModel):
    """A Kubernetes-style condition (type, status, reason, message)."""

    type: str = Field(
        description="Placed (the gang holds its nodes), Unschedulable (why not, in the message), "
        "Ready (training), Straggler (a slow worker named), ReportRejected (worker reports "
        "ignored, and why), DomainSplit (workers span domains of topology.required), "
        "InvalidSpec (the spec cannot run: the field is named), Suspended (spec.suspend: reason "
        "Stopping while workers checkpoint, Suspended once nothing is held, Resumed after), "
        "Queued (waiting behind other jobs for GPUs: position and what it waits for), "
        "Preempted (a higher-priority job took GPUs: reason Shrunk or Suspended naming it, "
        "Restored once the queue let the job grow back, InvalidRecord if its record is ignored), "
        "StragglerReplaced (spec.stragglers Replace: True naming the rank and nodes of the "
        "last replacement, False saying why a slow worker stays), Sizing (elastic.scaling "
        "Throughput: the last measurement and what the job tries next)."
    )
    status: Literal["True", "False", "Unknown"]
    reason: str = ""
    message: str = ""
    last_transition_time: str | None = Field(
        default=None, json_schema_extra={"format": "date-time"}
    )


class Member(ApiModel):
    """One worker of the current membership, in rank order."""

    rank: int = Field(ge=0, description="Worker (group) rank.")
    pod: str
    node: str = ""
    domains: dict[str, str] = Field(
        default_factory=dict, description="Topology label -> domain of this worker's node."
    )


class Rendezvous(ApiModel):
    """What the workers of one epoch need to form their process group."""

    epoch: int = Field(ge=0)
    workers: int = Field(ge=0, description="Workers in this epoch.")
    processes_per_worker: int = Field(ge=1)
    master_addr: str = Field(default="", description="Address of rank 0 (its pod DNS name).")
    master_port: int = Field(default=29500, ge=1, le=65535)
    grid: list[int] = Field(
        default_factory=list,
        description="Process grid innermost tier first (e.g. [8, 4, 2]: 8 per node, "
        "4 nodes per rack, 2 racks); product = world size.",
    )
    members: list[Member] = Field(default_factory=list)

    @property
    def world_size(self) -> int:
        return self.workers * self.processes_per_worker


class CoolingNode(ApiModel):
    """A node this job's placement avoids until `until` (a replaced straggler's)."""

    node: str = Field(min_length=1, max_length=_POD_NAME_MAX)
    until: str = Field(max_length=64, json_schema_extra=_DATE_TIME)


class StragglerWatch(ApiModel):
    """The straggler watch's memory between passes (spec.stragglers.action Replace)."""

    epoch: int = Field(default=-1, ge=-1, le=MAX_STEP, description="Epoch of the streak.")
    suspect: str | None = Field(
        default=None,
        max_length=_POD_NAME_MAX,
        description="The worker pod found slow in every observation of the streak.",
    )
    since_step: int = Field(
        default=0, ge=0, le=MAX_STEP, description="Step at which the streak began."
    )
    last_step: int = Field(
        default=-1, ge=-1, le=MAX_STEP, description="Step of the last observation."
    )
    observations: int = Field(
        default=0, ge=0, le=MAX_STEP, description="Observations in the streak."
    )
    replacements: int = Field(
        default=0, ge=0, le=MAX_STEP, description="Stragglers replaced so far (back-off)."
    )
    last_replacement: str | None = Field(
        default=None,
        max_length=64,
        description="When the last straggler was replaced.",
        json_schema_extra=_DATE_TIME,
    )
    replaced_epoch: int = Field(
        default=-1,
        ge=-1,
        le=MAX_STEP,
        description="Epoch the last replaced straggler was seen in (one per re-form).",
    )
    cooling: list[CoolingNode] = Field(
        default_factory=list,
        max_length=MAX_COOLING_NODES,
        description="Nodes of replaced stragglers, avoided by this job until the time given.",
    )
    placing_on: str | None = Field(
        default=None,
        max_length=_POD_NAME_MAX,
        description="Node the pending replacement is placed on (cleared once placed).",
    )


class TriedSize(ApiModel):
    """The job's throughput measured at one size."""

    workers: int = Field(ge=1, le=MAX_REPLICAS)
    samples_per_second: float = Field(ge=0.0, le=1e15, allow_inf_nan=False)
    at: str = Field(max_length=64, json_schema_extra=_DATE_TIME)
    kept: bool = Field(
        default=True,
        description="False: a growth to this size gained too little and was undone.",
    )


class Sizing(ApiModel):
    """Throughput sizing's memory between passes (elastic.scaling Throughput)."""

    target: int = Field(ge=0, le=MAX_REPLICAS, description="Workers the job should run with.")
    epoch: int = Field(default=-1, ge=-1, le=MAX_STEP, description="Epoch being measured.")
    workers: int = Field(default=0, ge=0, le=MAX_REPLICAS, description="Size being measured.")
    formed_at: str | None = Field(
        default=None,
        max_length=64,
        description="When the measured gang formed (it settles first).",
        json_schema_extra=_DATE_TIME,
    )
    last_step: int = Field(
        default=-1, ge=-1, le=MAX_STEP, description="Rank 0's step at the last sample."
    )
    samples: list[Annotated[float, Field(ge=0.0, le=1e15, allow_inf_nan=False)]] = Field(
        default_factory=list,
        max_length=MAX_SIZE_SAMPLES,
        description="Samples/s readings of the measurement under way.",
    )
    measured: bool = Field(default=False, description="The current size has been measured.")
    tried: list[TriedSize] = Field(
        default_factory=list,
        max_length=MAX_SIZES_TRIED,
        description="The latest throughput measured at each size tried, by size.",
    )
    grew_from: int | None = Field(
        default=None, ge=1, le=MAX_REPLICAS, description="Size a growth under test began at."
    )
    hold_until: str | None = Field(
        default=None,
        max_length=64,
        description="No growth before this time (after a growth that did not pay).",
        json_schema_extra=_DATE_TIME,
    )
    message: str = Field(default="", max_length=MAX_GOODPUT_MESSAGE)


class DDLJobStatus(ApiModel):
    """What the operator observed and decided; written once per reconcile pass."""

    phase: Phase = "Pending"
    replicas: int = Field(default=0, description="Workers in the current membership.")
    ready_replicas: int = Field(default=0, description="Workers running.")
    selector: str = Field(default="", description="Label selector of the workers (scale).")
    observed_generation: int = 0
    epoch: int = Field(default=0, description="Rendezvous round; bumps on membership changes.")
    restarts: int = Field(default=0, description="Gang restarts so far (failurePolicy).")
    rendezvous: Rendezvous | None = None
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    step: int = Field(default=0, description="Training step reported by rank 0.")
    throughput: float = Field(default=0.0, description="Samples/s across the job (rank 0).")
    sync_wait_ratio: float = Field(
        default=0.0, description="Share of step time blocked on communication (rank 0)."
    )
    message: str = ""
    waiting_since: str | None = Field(
        default=None,
        description="When the job last fell below minReplicas (for waitForCapacitySeconds).",
        json_schema_extra={"format": "date-time"},
    )
    last_failure_time: str | None = Field(
        default=None,
        description="When a worker was last lost (for backoffSeconds).",
        json_schema_extra={"format": "date-time"},
    )
    stragglers: StragglerWatch | None = Field(default=None, description=StragglerWatch.__doc__)
    sizing: Sizing | None = Field(default=None, description=Sizing.__doc__)


class ObjectMeta(BaseModel):
    """The slice of metadata the operator reads."""

    model_config = ConfigDict(extra="allow")

    name: str
    namespace: str = "default"
    uid: str = ""
    generation: int = 0
    # Typed because the core reads one (core/preemption.py's record); absent means none.
    annotations: dict[str, str] = Field(default_factory=dict)


class DDLJob(ApiModel):
    """A DDLJob as the API server stores it."""

    model_config = ConfigDict(extra="ignore")

    api_version: str = c.API_VERSION
    kind: str = c.KIND
    metadata: ObjectMeta
    spec: DDLJobSpec
    status: DDLJobStatus = Field(default_factory=DDLJobStatus)
