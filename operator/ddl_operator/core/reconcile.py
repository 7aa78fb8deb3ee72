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
from typing import Any, Literal

from ddl_operator.api import constants as c
from ddl_operator.api.models import (
    Condition,
    DDLJob,
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


def reconcile(
    job: DDLJob,
    pods: Sequence[WorkerPod],
    nodes: Sequence[NodeInfo],
    now: dt.datetime,
    service_account: str | None = None,
) -> Plan:
    """Decides one pass. `nodes` count every placed pod's GPUs (ours included) in `used`."""
    spec, old = job.spec, job.status
    stamp = _iso(now)
    status = old.model_copy(
        update={
            "observed_generation": job.metadata.generation,
            "selector": selector(job.metadata.name),
        }
    )
    plan = Plan(status=status)
    if old.phase in ("Succeeded", "Failed"):
        plan.requeue_after = 0
        return plan

    by_node = {n.name: n for n in nodes}
    by_name = {p.name: p for p in pods}
    members = [m.pod for m in old.rendezvous.members] if old.rendezvous else []
    lost = {p.name: why for p in pods if (why := _lost(p, by_node))}
    alive = [p for p in pods if p.name not in lost and p.phase != "Succeeded"]

    def finish(phase: Phase, message: str, event: Event) -> Plan:
        # Free the GPUs of whatever still runs; keep finished pods for their logs.
        plan.delete = sorted(
            p.name for p in pods if p.phase in ("Pending", "Running", "Unknown") and not p.deleting
        )
        # The last progress rank 0 reported stays on the job (the summary of the run).
        plan.status = plan.status.model_copy(
            update={
                "phase": phase,
                "message": message,
                "ready_replicas": 0,
                **_rank0_report(old.rendezvous, by_name),
            }
        )
        plan.events.append(event)
        plan.requeue_after = 0
        return plan

    # -- terminal outcomes ------------------------------------------------------------------
    permanent = [
        p
        for p in pods
        if p.phase == "Failed" and p.exit_code in spec.failure_policy.non_retryable_exit_codes
    ]
    if permanent:
        msg = f"worker {permanent[0].name} exited with non-retryable code {permanent[0].exit_code}"
        return finish("Failed", msg, Event("Warning", "Failed", msg))
    phase_of = {m: by_name[m].phase if m in by_name else "Gone" for m in members}
    finished = [m for m in members if phase_of[m] == "Succeeded"]
    if finished:
        # Training is over once any member completed: no re-forming, no replacements; the
        # job succeeds when no member is left running.
        busy = [m for m in members if phase_of[m] in ("Pending", "Running")]
        if not busy:
            msg = f"{len(finished)} of {len(members)} workers succeeded at epoch {old.epoch}"
            return finish("Succeeded", msg, Event("Normal", "Succeeded", msg))
        plan.delete = sorted(p.name for p in pods if p.name not in members and not p.deleting)
        plan.status = status.model_copy(
            update={
                "phase": "Running",
                "ready_replicas": len(busy),
                "message": f"finishing: {len(finished)} of {len(members)} workers done",
            }
        )
        plan.requeue_after = 5.0
        return plan

    # -- losses -------------------------------------------------------------------------------
    lost_members = [m for m in members if m not in by_name or m in lost]
    # A training process failed while its pod lives on: the agent says so at this epoch and
    # waits; the gang restarts at a new epoch (from the last checkpoint).
    failed_training = [
        m
        for m in members
        if m not in lost
        and (r := by_name[m].report) is not None
        and r.get("epoch") == old.epoch
        and r.get("state") == "Failed"
    ]
    restarts, last_failure = old.restarts, old.last_failure_time
    if lost_members or failed_training:
        # Counted once: this pass publishes a new epoch, so the same losses are not seen again.
        restarts += 1
        last_failure = stamp
        reasons = ", ".join(
            [f"{m} {lost.get(m, 'is gone')}" for m in lost_members]
            + [
                f"{m} failed: {by_name[m].report.get('message', '')}"  # type: ignore[union-attr]
                for m in failed_training
            ]
        )
        plan.events.append(Event("Warning", "WorkerLost", f"epoch {old.epoch}: {reasons}"))
        limit = spec.failure_policy.max_restarts
        if restarts > limit:
            msg = f"{restarts} restarts exceed failurePolicy.maxRestarts={limit}"
            return finish("Failed", msg, Event("Warning", "Failed", msg))
    plan.delete.extend(sorted(n for n in lost if not by_name[n].deleting))
    status = status.model_copy(update={"restarts": restarts, "last_failure_time": last_failure})

    # -- scale: keep `target` workers alive --------------------------------------------------
    target = spec.replicas
    removed: list[str] = []
    if len(alive) > target:
        surplus = _surplus(alive, members, len(alive) - target)
        plan.delete.extend(p.name for p in surplus)
        removed = [p.name for p in surplus if p.name in members]
        alive = [p for p in alive if p not in surplus]
    placed = [p for p in alive if p.placed_on]
    unplaced = [p for p in alive if not p.placed_on]

    backoff_left = 0.0
    if last_failure and (since := _parse(last_failure)):
        backoff_left = spec.failure_policy.backoff_seconds - (now - since).total_seconds()
    if len(alive) < target:
        if backoff_left > 0:
            plan.requeue_after = min(plan.requeue_after, backoff_left)
        else:
            taken = {p.slot for p in pods}
            free_slots = (s for s in range(len(pods) + target + 1) if s not in taken)
            for _ in range(target - len(alive)):
                plan.create.append(worker_pod(job, next(free_slots), service_account))

    # -- placement of gated workers: the whole rest of the gang, or as many as fit ----------
    unschedulable: Unplaceable | None = None
    if unplaced:
        keep = {p.name: p.node or p.assigned or "" for p in placed}
        low = min(target, max(spec.min_replicas, len(keep) + 1))
        high = min(target, len(keep) + len(unplaced))
        result = place(nodes, _request(job, low, high, keep))
        if isinstance(result, Unplaceable):
            unschedulable = result
        else:
            new = [w for w in result.workers if w.pod is None]
            for pod, worker in zip(sorted(unplaced, key=lambda p: p.slot), new, strict=False):
                plan.place.append((pod.name, placement_patch(worker.node, pod.gates)))
            plan.events.append(
                Event(
                    "Normal",
                    "Placed",
                    f"placed {len(new)} worker(s) on {', '.join(sorted({w.node for w in new}))}",
                )
            )

    # -- rendezvous: publish a new epoch when the membership must or can change ---------------
    running = [p for p in placed if p.phase == "Running" and p.ip]
    waiting = [p for p in placed if p not in running] + [
        p for p in unplaced if p.name in dict(plan.place)
    ]
    rendezvous, epoch = old.rendezvous, old.epoch
    running_names = {p.name for p in running}
    must_change = bool(lost_members or removed or failed_training)
    can_grow = running_names != set(members) and not waiting
    if (must_change or can_grow) and len(running) >= spec.min_replicas:
        epoch += 1
        rendezvous = _publish(job, epoch, nodes, running)
        plan.events.append(
            Event(
                "Normal",
                "Rendezvous",
                f"epoch {epoch}: {rendezvous.workers} workers, grid "
                f"{'x'.join(map(str, rendezvous.grid))}",
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

    members_now = [m.pod for m in rendezvous.members] if rendezvous else []
    ready = sum(1 for m in members_now if m in running_names)
    phase: Phase
    if members_now:
        settled = set(members_now) == running_names and not waiting and not plan.create
        phase = "Running" if settled else "Rescaling"
    else:
        phase = "Placing" if placed or plan.place else "Pending"

    waiting_since = status.waiting_since
    if len(members_now) < spec.min_replicas:
        waiting_since = waiting_since or stamp
        limit = spec.elastic.wait_for_capacity_seconds if spec.elastic else 0
        started = _parse(waiting_since)
        if limit and started and (now - started).total_seconds() > limit:
            msg = f"fewer than {spec.min_replicas} workers for over {limit}s"
            return finish("Failed", msg, Event("Warning", "Failed", msg))
    else:
        waiting_since = None

    conds = old.conditions
    placed_count = len(placed) + len(plan.place)
    placed_all = placed_count >= target
    new_conditions = [
        _condition(
            conds,
            "Placed",
            placed_all,
            "GangPlaced" if placed_all else "Placing",
            f"{placed_count}/{target} workers placed",
            stamp,
        ),
        _condition(
            conds,
            "Unschedulable",
            unschedulable is not None,
            unschedulable.short if unschedulable else "Placed",
            unschedulable.reason if unschedulable else "",
            stamp,
        ),
        _condition(
            conds,
            "Ready",
            phase == "Running",
            "Training" if phase == "Running" else phase,
            f"{ready}/{len(members_now)} members running at epoch {epoch}",
            stamp,
        ),
    ]
    straggler = find_straggler(rendezvous, by_name)
    new_conditions.append(
        _condition(
            conds,
            "Straggler",
            straggler is not None,
            "SlowWorker" if straggler else "Balanced",
            straggler or "",
            stamp,
        )
    )
    previous_straggler = next((x for x in conds if x.type == "Straggler"), None)
    if straggler and (previous_straggler is None or previous_straggler.status != "True"):
        plan.events.append(Event("Warning", "Straggler", straggler))
    previous = next((x for x in conds if x.type == "Unschedulable"), None)
    if unschedulable and (previous is None or previous.message != unschedulable.reason):
        plan.events.append(Event("Warning", "Unschedulable", unschedulable.reason))

    plan.status = status.model_copy(
        update={
            "phase": phase,
            "epoch": epoch,
            "rendezvous": rendezvous,
            "replicas": len(members_now),
            "ready_replicas": ready,
            "conditions": new_conditions,
            "waiting_since": waiting_since,
            "message": unschedulable.reason if unschedulable else "",
            **_rank0_report(rendezvous, by_name),
        }
    )
    if unschedulable or waiting or plan.create or plan.place or plan.delete:
        plan.requeue_after = min(plan.requeue_after, 5.0)
    return plan


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
