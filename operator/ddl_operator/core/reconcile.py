"""The job state machine: from a snapshot (job, its pods, nodes) to one plan of changes.

Pure: no API calls. The handler reads a snapshot, calls `reconcile`, applies the plan and
writes the returned status once. Every pass is level-triggered, so a restarted operator
continues from what it reads, and deterministic pod names make creation idempotent.

Lifecycle: workers are created gated (holding nothing); once placement finds room for at
least minReplicas of them, each gets its node and its gate lifted; when every placed worker
runs, the operator publishes a rendezvous (epoch, rank map, grid) that the agents act on.
A lost worker shrinks the membership (new epoch) if enough remain, else the job waits for
capacity; capacity coming back grows it again at the next epoch.
"""

from __future__ import annotations

import datetime as dt
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from ddl_operator.api import constants as c
from ddl_operator.api.models import (
    Condition,
    DDLJob,
    DDLJobSpec,
    DDLJobStatus,
    Member,
    Phase,
    Rendezvous,
)
from ddl_operator.core.placement import GangRequest, Unplaceable, place
from ddl_operator.core.render import placement_patch, pod_name, selector, worker_pod
from ddl_operator.core.topology import NodeInfo

MASTER_PORT_BASE = 20000
MASTER_PORT_SPAN = 30000


@dataclass(frozen=True)
class WorkerPod:
    """What the state machine needs to know about one worker pod."""

    name: str
    slot: int
    phase: str = "Pending"  # Pending | Running | Succeeded | Failed | Unknown
    node: str | None = None  # bound by the scheduler
    assigned: str | None = None  # chosen by our placement (may not be bound yet)
    gates: tuple[Mapping[str, Any], ...] = ()
    deleting: bool = False
    ip: str | None = None
    exit_code: int | None = None
    report: Mapping[str, Any] | None = None

    @property
    def placed_on(self) -> str | None:
        return self.node or self.assigned

    @property
    def gated(self) -> bool:
        return any(g.get("name") == c.SCHEDULING_GATE for g in self.gates)


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass
class Plan:
    """Changes to apply, then the status to write (once)."""

    status: DDLJobStatus
    create: list[dict[str, Any]] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)
    place: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    requeue_after: float = 30.0

    def update_status(self, **fields: Any) -> None:
        """Change fields of the status draft (snake_case names)."""
        self.status = self.status.model_copy(update=fields)


def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse(t: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(t.replace("Z", "+00:00")) if t else None


def master_port(uid: str, epoch: int) -> int:
    """A port that differs per job and epoch, so re-forming never races a closing store."""
    return MASTER_PORT_BASE + zlib.crc32(f"{uid}/{epoch}".encode()) % MASTER_PORT_SPAN


def _condition(
    old: Sequence[Condition], type_: str, status: bool, reason: str, message: str, now: str
) -> Condition:
    value: Literal["True", "False"] = "True" if status else "False"
    previous = next((x for x in old if x.type == type_), None)
    since = previous.last_transition_time if previous and previous.status == value else now
    return Condition(
        type=type_, status=value, reason=reason, message=message, last_transition_time=since
    )


def _request(job: DDLJob, low: int, high: int, keep: Mapping[str, str]) -> GangRequest:
    spec = job.spec
    return GangRequest(
        min_workers=low,
        max_workers=high,
        units_per_worker=spec.gpus_per_worker,
        levels=tuple(spec.topology.levels),
        required=spec.topology.required,
        procs_per_worker=spec.procs_per_worker,
        resource_name="GPUs",
        keep=keep,
    )


def _lost(pod: WorkerPod, nodes: Mapping[str, NodeInfo]) -> str | None:
    """Why a pod no longer counts as a worker, or None."""
    if pod.deleting:
        return "deleted"
    if pod.phase == "Failed":
        return f"failed (exit code {pod.exit_code})"
    where = pod.placed_on
    if where is not None:
        node = nodes.get(where)
        if node is None:
            return f"node {where} is gone"
        if not node.ready:
            return f"node {where} is not ready"
    return None


TERMINAL: Final = ("Succeeded", "Failed")


@dataclass(frozen=True)
class Observed:
    """What one pass reads, indexed: the job, its pods, the nodes and the clock."""

    job: DDLJob
    pods: Sequence[WorkerPod]
    nodes: Sequence[NodeInfo]
    now: dt.datetime
    service_account: str | None
    by_node: Mapping[str, NodeInfo]
    by_name: Mapping[str, WorkerPod]
    members: Sequence[str]  # the published membership, in rank order
    lost: Mapping[str, str]  # pod -> why it no longer counts as a worker

    @property
    def spec(self) -> DDLJobSpec:
        return self.job.spec

    @property
    def old(self) -> DDLJobStatus:
        return self.job.status

    @property
    def stamp(self) -> str:
        return _iso(self.now)


@dataclass(frozen=True)
class Losses:
    """Members this pass lost: pods gone or failed, and training that failed in a live pod."""

    members: Sequence[str]
    failed_training: Sequence[str]

    def __bool__(self) -> bool:
        return bool(self.members or self.failed_training)


@dataclass(frozen=True)
class Gang:
    """The workers kept after scaling: placed ones, gated ones, and members scaled away."""

    placed: Sequence[WorkerPod]
    unplaced: Sequence[WorkerPod]
    removed: Sequence[str]


@dataclass(frozen=True)
class Membership:
    """The rendezvous after this pass, and what it is waiting on."""

    rendezvous: Rendezvous | None
    running: frozenset[str]
    waiting: bool

    @property
    def members(self) -> list[str]:
        return [m.pod for m in self.rendezvous.members] if self.rendezvous else []


def reconcile(
    job: DDLJob,
    pods: Sequence[WorkerPod],
    nodes: Sequence[NodeInfo],
    now: dt.datetime,
    service_account: str | None = None,
) -> Plan:
    """Decides one pass. `nodes` count every placed pod's GPUs (ours included) in `used`.

    Every step reads the observation and writes into one plan, whose status is the draft
    that is written once; a step that ends the pass says so.
    """
    plan = Plan(
        status=job.status.model_copy(
            update={
                "observed_generation": job.metadata.generation,
                "selector": selector(job.metadata.name),
            }
        )
    )
    if job.status.phase in TERMINAL:
        plan.requeue_after = 0
        return plan
    seen = observe(job, pods, nodes, now, service_account)
    if _outcome(seen, plan):
        return plan
    losses = _losses(seen, plan)
    if _over_restart_limit(seen, plan, losses):
        return plan
    gang = _scale(seen, plan)
    unschedulable = _place(seen, plan, gang)
    membership = _rendezvous(seen, plan, gang, losses)
    if _out_of_patience(seen, plan, membership):
        return plan
    _conditions(seen, plan, gang, membership, unschedulable)
    return plan


def observe(
    job: DDLJob,
    pods: Sequence[WorkerPod],
    nodes: Sequence[NodeInfo],
    now: dt.datetime,
    service_account: str | None = None,
) -> Observed:
    """Index the snapshot and say which pods no longer count."""
    by_node = {n.name: n for n in nodes}
    rendezvous = job.status.rendezvous
    return Observed(
        job=job,
        pods=pods,
        nodes=nodes,
        now=now,
        service_account=service_account,
        by_node=by_node,
        by_name={p.name: p for p in pods},
        members=[m.pod for m in rendezvous.members] if rendezvous else [],
        lost={p.name: why for p in pods if (why := _lost(p, by_node))},
    )


def _finish(seen: Observed, plan: Plan, phase: Phase, message: str, event: Event) -> None:
    """End the job: free the GPUs of whatever still runs, keep finished pods for their logs."""
    plan.delete = sorted(
        p.name for p in seen.pods if p.phase in ("Pending", "Running", "Unknown") and not p.deleting
    )
    # The last progress rank 0 reported stays on the job (the summary of the run).
    plan.update_status(
        phase=phase,
        message=message,
        ready_replicas=0,
        **_rank0_report(seen.old.rendezvous, seen.by_name),
    )
    plan.events.append(event)
    plan.requeue_after = 0


def _outcome(seen: Observed, plan: Plan) -> bool:
    """Terminal outcomes: a non-retryable exit fails the job; a finished member ends training.

    True when the pass ends here.
    """
    codes = seen.spec.failure_policy.non_retryable_exit_codes
    permanent = [p for p in seen.pods if p.phase == "Failed" and p.exit_code in codes]
    if permanent:
        msg = f"worker {permanent[0].name} exited with non-retryable code {permanent[0].exit_code}"
        _finish(seen, plan, "Failed", msg, Event("Warning", "Failed", msg))
        return True
    members = seen.members
    phase_of = {m: seen.by_name[m].phase if m in seen.by_name else "Gone" for m in members}
    finished = [m for m in members if phase_of[m] == "Succeeded"]
    if not finished:
        return False
    # Training is over once any member completed: no re-forming, no replacements; the job
    # succeeds when no member is left running.
    busy = [m for m in members if phase_of[m] in ("Pending", "Running")]
    if not busy:
        msg = f"{len(finished)} of {len(members)} workers succeeded at epoch {seen.old.epoch}"
        _finish(seen, plan, "Succeeded", msg, Event("Normal", "Succeeded", msg))
        return True
    plan.delete = sorted(p.name for p in seen.pods if p.name not in members and not p.deleting)
    plan.update_status(
        phase="Running",
        ready_replicas=len(busy),
        message=f"finishing: {len(finished)} of {len(members)} workers done",
    )
    plan.requeue_after = 5.0
    return True


def _losses(seen: Observed, plan: Plan) -> Losses:
    """Lost members and failed training count one restart; lost pods are deleted."""
    old, by_name = seen.old, seen.by_name
    lost_members = [m for m in seen.members if m not in by_name or m in seen.lost]
    # A training process failed while its pod lives on: the agent says so at this epoch and
    # waits; the gang restarts at a new epoch (from the last checkpoint).
    failed_training = [
        m
        for m in seen.members
        if m not in seen.lost
        and (r := by_name[m].report) is not None
        and r.get("epoch") == old.epoch
        and r.get("state") == "Failed"
    ]
    losses = Losses(members=lost_members, failed_training=failed_training)
    if losses:
        # Counted once: this pass publishes a new epoch, so the same losses are not seen again.
        plan.update_status(restarts=old.restarts + 1, last_failure_time=seen.stamp)
        reasons = ", ".join(
            [f"{m} {seen.lost.get(m, 'is gone')}" for m in lost_members]
            + [
                f"{m} failed: {by_name[m].report.get('message', '')}"  # type: ignore[union-attr]
                for m in failed_training
            ]
        )
        plan.events.append(Event("Warning", "WorkerLost", f"epoch {old.epoch}: {reasons}"))
    plan.delete.extend(sorted(n for n in seen.lost if not by_name[n].deleting))
    return losses


def _over_restart_limit(seen: Observed, plan: Plan, losses: Losses) -> bool:
    """Fail the job when this pass's restart exceeds failurePolicy.maxRestarts."""
    limit = seen.spec.failure_policy.max_restarts
    restarts = plan.status.restarts
    if not losses or restarts <= limit:
        return False
    msg = f"{restarts} restarts exceed failurePolicy.maxRestarts={limit}"
    _finish(seen, plan, "Failed", msg, Event("Warning", "Failed", msg))
    return True


def _scale(seen: Observed, plan: Plan) -> Gang:
    """Keep spec.replicas workers alive: drop the surplus, create what is missing."""
    target = seen.spec.replicas
    alive = [p for p in seen.pods if p.name not in seen.lost and p.phase != "Succeeded"]
    removed: list[str] = []
    if len(alive) > target:
        surplus = _surplus(alive, seen.members, len(alive) - target)
        plan.delete.extend(p.name for p in surplus)
        removed = [p.name for p in surplus if p.name in seen.members]
        alive = [p for p in alive if p not in surplus]
    if len(alive) < target:
        _create(seen, plan, target - len(alive))
    return Gang(
        placed=[p for p in alive if p.placed_on],
        unplaced=[p for p in alive if not p.placed_on],
        removed=removed,
    )


def _create(seen: Observed, plan: Plan, count: int) -> None:
    """New gated workers in the lowest free slots, once the failure backoff has passed."""
    backoff_left = 0.0
    last_failure = plan.status.last_failure_time
    if last_failure and (since := _parse(last_failure)):
        backoff = seen.spec.failure_policy.backoff_seconds
        backoff_left = backoff - (seen.now - since).total_seconds()
    if backoff_left > 0:
        plan.requeue_after = min(plan.requeue_after, backoff_left)
        return
    taken = {p.slot for p in seen.pods}
    free_slots = (s for s in range(len(seen.pods) + count + 1) if s not in taken)
    for _ in range(count):
        plan.create.append(worker_pod(seen.job, next(free_slots), seen.service_account))


def _place(seen: Observed, plan: Plan, gang: Gang) -> Unplaceable | None:
    """Place gated workers: the whole rest of the gang, or as many as fit; else say why."""
    if not gang.unplaced:
        return None
    spec = seen.spec
    target = spec.replicas
    keep = {p.name: p.node or p.assigned or "" for p in gang.placed}
    low = min(target, max(spec.min_replicas, len(keep) + 1))
    high = min(target, len(keep) + len(gang.unplaced))
    result = place(seen.nodes, _request(seen.job, low, high, keep))
    if isinstance(result, Unplaceable):
        return result
    new = [w for w in result.workers if w.pod is None]
    for pod, worker in zip(sorted(gang.unplaced, key=lambda p: p.slot), new, strict=False):
        plan.place.append((pod.name, placement_patch(worker.node, pod.gates)))
    nodes = ", ".join(sorted({w.node for w in new}))
    plan.events.append(Event("Normal", "Placed", f"placed {len(new)} worker(s) on {nodes}"))
    return None


def _rendezvous(seen: Observed, plan: Plan, gang: Gang, losses: Losses) -> Membership:
    """Publish a new epoch when the membership must (losses, scale-down) or can (growth) change."""
    spec, old = seen.spec, seen.old
    running = [p for p in gang.placed if p.phase == "Running" and p.ip]
    placing = dict(plan.place)
    waiting = [p for p in gang.placed if p not in running] + [
        p for p in gang.unplaced if p.name in placing
    ]
    running_names = frozenset(p.name for p in running)
    must_change = bool(losses or gang.removed)
    can_grow = running_names != set(seen.members) and not waiting
    rendezvous, epoch = old.rendezvous, old.epoch
    if (must_change or can_grow) and len(running) >= spec.min_replicas:
        epoch += 1
        rendezvous = _publish(seen.job, epoch, seen.nodes, running)
        grid = "x".join(map(str, rendezvous.grid))
        plan.events.append(
            Event(
                "Normal", "Rendezvous", f"epoch {epoch}: {rendezvous.workers} workers, grid {grid}"
            )
        )
    elif must_change:
        # Too few left to train: the survivors stop and wait for capacity.
        epoch += 1
        rendezvous = Rendezvous(epoch=epoch, workers=0, processes_per_worker=spec.procs_per_worker)
        plan.events.append(
            Event(
                "Warning",
                "WaitingForCapacity",
                f"epoch {epoch}: {len(running)} workers left, fewer than minReplicas "
                f"{spec.min_replicas}; waiting for capacity",
            )
        )
    plan.update_status(epoch=epoch, rendezvous=rendezvous)
    return Membership(rendezvous=rendezvous, running=running_names, waiting=bool(waiting))


def _out_of_patience(seen: Observed, plan: Plan, membership: Membership) -> bool:
    """Fail a job that stayed below minReplicas longer than elastic.waitForCapacitySeconds."""
    spec = seen.spec
    if len(membership.members) >= spec.min_replicas:
        plan.update_status(waiting_since=None)
        return False
    waiting_since = plan.status.waiting_since or seen.stamp
    plan.update_status(waiting_since=waiting_since)
    limit = spec.elastic.wait_for_capacity_seconds if spec.elastic else 0
    started = _parse(waiting_since)
    if not (limit and started and (seen.now - started).total_seconds() > limit):
        return False
    msg = f"fewer than {spec.min_replicas} workers for over {limit}s"
    _finish(seen, plan, "Failed", msg, Event("Warning", "Failed", msg))
    return True


def _phase(plan: Plan, gang: Gang, membership: Membership) -> Phase:
    if membership.members:
        settled = (
            set(membership.members) == membership.running
            and not membership.waiting
            and not plan.create
        )
        return "Running" if settled else "Rescaling"
    return "Placing" if gang.placed or plan.place else "Pending"


def _conditions(
    seen: Observed,
    plan: Plan,
    gang: Gang,
    membership: Membership,
    unschedulable: Unplaceable | None,
) -> None:
    """Phase, conditions and the rank-0 summary; events for conditions that just turned."""
    old, stamp, target = seen.old, seen.stamp, seen.spec.replicas
    phase = _phase(plan, gang, membership)
    members = membership.members
    ready = sum(1 for m in members if m in membership.running)
    placed_count = len(gang.placed) + len(plan.place)
    placed_all = placed_count >= target
    straggler = find_straggler(membership.rendezvous, seen.by_name)
    states: list[tuple[str, bool, str, str]] = [
        (
            "Placed",
            placed_all,
            "GangPlaced" if placed_all else "Placing",
            f"{placed_count}/{target} workers placed",
        ),
        (
            "Unschedulable",
            unschedulable is not None,
            unschedulable.short if unschedulable else "Placed",
            unschedulable.reason if unschedulable else "",
        ),
        (
            "Ready",
            phase == "Running",
            "Training" if phase == "Running" else phase,
            f"{ready}/{len(members)} members running at epoch {plan.status.epoch}",
        ),
        (
            "Straggler",
            straggler is not None,
            "SlowWorker" if straggler else "Balanced",
            straggler or "",
        ),
    ]
    conditions = [_condition(old.conditions, *state, stamp) for state in states]
    was = {x.type: x for x in old.conditions}
    if straggler and (was.get("Straggler") is None or was["Straggler"].status != "True"):
        plan.events.append(Event("Warning", "Straggler", straggler))
    if unschedulable and (
        was.get("Unschedulable") is None or was["Unschedulable"].message != unschedulable.reason
    ):
        plan.events.append(Event("Warning", "Unschedulable", unschedulable.reason))
    plan.update_status(
        phase=phase,
        replicas=len(members),
        ready_replicas=ready,
        conditions=conditions,
        message=unschedulable.reason if unschedulable else "",
        **_rank0_report(membership.rendezvous, seen.by_name),
    )
    if unschedulable or membership.waiting or plan.create or plan.place or plan.delete:
        plan.requeue_after = min(plan.requeue_after, 5.0)


def _publish(
    job: DDLJob, epoch: int, nodes: Sequence[NodeInfo], running: Sequence[WorkerPod]
) -> Rendezvous:
    """Rank map and grid for running workers, ordered by topology."""
    keep = {p.name: p.node or p.assigned or "" for p in running}
    ordered = place(nodes, _request(job, len(running), len(running), keep))
    if isinstance(ordered, Unplaceable):  # cannot happen: every worker is kept in place
        raise AssertionError(f"ordering running workers failed: {ordered.reason}")
    by_name = {p.name: p for p in running}
    members = [
        Member(rank=w.rank, pod=w.pod or "", node=w.node, domains=dict(w.domains))
        for w in ordered.workers
    ]
    return Rendezvous(
        epoch=epoch,
        workers=len(members),
        processes_per_worker=job.spec.procs_per_worker,
        master_addr=by_name[members[0].pod].ip or "",
        master_port=master_port(job.metadata.uid, epoch),
        grid=list(ordered.grid),
        members=members,
    )


def _surplus(alive: Sequence[WorkerPod], members: Sequence[str], count: int) -> list[WorkerPod]:
    """Which workers to drop when scaling down: unplaced, then non-members, then high ranks."""
    rank = {name: i for i, name in enumerate(members)}

    def cost(p: WorkerPod) -> tuple[int, int, int]:
        return (
            0 if not p.placed_on else 1 if p.name not in rank else 2,
            -rank.get(p.name, 0),
            -p.slot,
        )

    return sorted(alive, key=cost)[:count]


STRAGGLER_RATIO = 1.2


def find_straggler(rendezvous: Rendezvous | None, pods: Mapping[str, WorkerPod]) -> str | None:
    """A sentence naming the slowest worker if its compute time per step (step time minus
    sync-wait) exceeds the median of the others by over 20%; None otherwise.

    In synchronous training every rank's step takes as long as the slowest, so the step time
    cannot tell; the straggler is the one that waits least for communication.
    """
    if not rendezvous or len(rendezvous.members) < 3:
        return None
    compute: list[tuple[float, Member]] = []
    for member in rendezvous.members:
        pod = pods.get(member.pod)
        report = pod.report if pod else None
        if not report or report.get("epoch") != rendezvous.epoch:
            return None
        try:
            step = float(report["stepSeconds"])
            wait = float(report["syncWaitRatio"])
        except (KeyError, TypeError, ValueError):
            return None
        compute.append((step * (1.0 - wait), member))
    compute.sort(key=lambda pair: pair[0])
    slowest, member = compute[-1]
    others = [seconds for seconds, _ in compute[:-1]]
    median = others[len(others) // 2]
    if median <= 0 or slowest <= STRAGGLER_RATIO * median:
        return None
    return (
        f"rank {member.rank} ({member.pod} on {member.node}) computes "
        f"{(slowest / median - 1) * 100:.0f}% slower per step than the median worker"
    )


def _rank0_report(rendezvous: Rendezvous | None, pods: Mapping[str, WorkerPod]) -> dict[str, Any]:
    if not rendezvous or not rendezvous.members:
        return {}
    pod = pods.get(rendezvous.members[0].pod)
    report = pod.report if pod else None
    if not report or report.get("epoch") != rendezvous.epoch:
        return {}
    out: dict[str, Any] = {}
    for key, field_name, kind in (
        ("step", "step", int),
        ("throughput", "throughput", float),
        ("syncWaitRatio", "sync_wait_ratio", float),
    ):
        try:
            out[field_name] = kind(report[key])
        except (KeyError, TypeError, ValueError):
            continue
    return out


__all__ = ["Event", "Plan", "WorkerPod", "master_port", "pod_name", "reconcile"]
