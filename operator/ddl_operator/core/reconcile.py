"""The job state machine: from a snapshot (job, its pods, nodes) to one plan of changes.

Pure: no API calls. The handler reads a snapshot, calls `reconcile`, applies the plan and
writes the returned status once. Every pass is level-triggered, so a restarted operator
continues from what it reads, and deterministic pod names make creation idempotent.

Lifecycle: a worker is placed in the pass that creates it when placement finds room for at
least minReplicas (it is created pinned to its node, ungated); otherwise it is created gated
(holding nothing) and gets its node and its gate lifted once there is room; when every placed
worker runs, the operator publishes a rendezvous (epoch, rank map, grid) that the agents act on.
A lost worker shrinks the membership (new epoch) if enough remain, else the job waits for
capacity; capacity coming back grows it again at the next epoch. spec.suspend stops the
gang the same way (an epoch without members), then deletes the pods; unsuspended, the job
starts over from gated workers and resumes from the last checkpoint at the next epoch.

Nothing a pass reads makes it raise: workers' reports are parsed as untrusted input
(core/reports.py) and a bad one is ignored with a condition; a gang spread across domains
of topology.required re-forms inside one (core/domains.py); a spec that breaks the schema's
topology rules gets a condition. Every status a pass returns is strict JSON.

Preemption (core/preemption.py) reaches a victim as a record in its annotation: while it
holds, the job keeps `held_replicas` workers, removing the pods it names at a new epoch, or
is suspended as by spec.suspend when it keeps none. The record is cleared (by the plan) once
the queue slot lets the job grow back, and the job grows to spec.replicas again.

Goodput (core/goodput.py) decides from the reports, with its state kept in status: under
spec.stragglers.action Replace a confirmed straggler's pod is deleted and a replacement
placed on the node the decision chose, at the re-form this causes (every worker checkpoints
at its step boundary when an epoch ends, so no periodic checkpoint needs to be waited for);
under elastic.scaling Throughput the size `_scale` keeps comes from the throughput measured
at each size. Nodes of replaced stragglers take none of this job's new workers for a while.
"""

from __future__ import annotations

import datetime as dt
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
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
from ddl_operator.core import goodput
from ddl_operator.core.domains import Split, find_split
from ddl_operator.core.goodput import Keep, Replace
from ddl_operator.core.placement import GangRequest, Unplaceable, place
from ddl_operator.core.preemption import (
    PODS_NAMED,
    PREEMPTED,
    PREEMPTED_BY,
    InvalidRecord,
    PreemptedRecord,
    held_replicas,
    may_regrow,
    parse_record,
)
from ddl_operator.core.progress import find_straggler, rank0_summary
from ddl_operator.core.queueing import Slot
from ddl_operator.core.render import placement_patch, pod_name, selector, worker_pod
from ddl_operator.core.reports import Rejected, WorkerReport, parse_report
from ddl_operator.core.topology import NodeInfo

MASTER_PORT_BASE = 20000
MASTER_PORT_SPAN = 30000

# Condition types besides Placed, Unschedulable, Ready and Straggler.
REPORT_REJECTED: Final = "ReportRejected"  # some worker's report is ignored (and why)
DOMAIN_SPLIT: Final = "DomainSplit"  # placed workers span domains of topology.required
INVALID_SPEC: Final = "InvalidSpec"  # the spec breaks a rule the CRD should have enforced
SUSPENDED: Final = "Suspended"  # spec.suspend holds the job (reason: Stopping, Suspended, Resumed)
QUEUED: Final = "Queued"  # the job waits in the GPU queue (position and what for)
# PREEMPTED (core/preemption.py): reason Shrunk or Suspended, Restored, or InvalidRecord.
STRAGGLER_REPLACED: Final = "StragglerReplaced"  # the last replacement, or why a straggler stays
SIZING: Final = "Sizing"  # throughput sizing: the last measurement and what it tries next
REJECTIONS_LISTED: Final = 10  # pods named in the ReportRejected condition
BIND_DEADLINE_SECONDS: Final = 60  # a placed pod unbound for longer is re-placed
# How long suspending waits for the workers to say they stopped at the stop epoch before it
# deletes them anyway: the agent gives its processes DDL_STOP_TIMEOUT (20 s) to checkpoint,
# and a deleted worker still checkpoints on SIGTERM, so a missing report costs no progress.
SUSPEND_GRACE_SECONDS: Final = 30
# Conditions about the gang that say nothing while a job is suspended (they are cleared).
_GANG_CONDITIONS: Final = frozenset({"Placed", "Unschedulable", "Ready", "Straggler", DOMAIN_SPLIT})


@dataclass(frozen=True)
class WorkerPod:
    """What the state machine needs to know about one worker pod."""

    name: str
    slot: int
    phase: str = "Pending"  # Pending | Running | Succeeded | Failed | Unknown
    node: str | None = None  # bound by the scheduler
    assigned: str | None = None  # chosen by our placement (may not be bound yet)
    placed_at: str | None = None  # when our placement pinned it (ISO time)
    unscheduled: str = ""  # the scheduler's reason it is not bound, if it gave one
    gates: tuple[Mapping[str, Any], ...] = ()
    # Its own required node-affinity terms: placement ANDs its node pin into each.
    node_terms: tuple[Mapping[str, Any], ...] = ()
    deleting: bool = False
    ip: str | None = None
    exit_code: int | None = None
    report: str | None = None  # the raw report annotation: untrusted, parsed by the core

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
    # A merge patch on the job's own metadata.annotations (None removes the key), applied
    # before the status write.
    annotations: dict[str, str | None] = field(default_factory=dict)
    requeue_after: float = 30.0

    def update_status(self, **fields: Any) -> None:
        """Change fields of the status draft (snake_case names)."""
        self.status = self.status.model_copy(update=fields)


def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse(t: str | None) -> dt.datetime | None:
    """A timestamp of our own status; None when absent or unreadable (status is writable)."""
    if not t:
        return None
    try:
        parsed = dt.datetime.fromisoformat(t.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


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


def _kept_on(pods: Iterable[WorkerPod]) -> dict[str, str]:
    """Workers that stay where they are: pod name -> the node it is bound or placed on."""
    return {p.name: p.placed_on or "" for p in pods}


def _lost(pod: WorkerPod, nodes: Mapping[str, NodeInfo], now: dt.datetime) -> str | None:
    """Why a pod no longer counts as a worker, or None."""
    if pod.deleting:
        return "deleted"
    if pod.phase == "Failed":
        return f"failed (exit code {pod.exit_code})"
    if pod.node is None and pod.assigned and not pod.gated:
        placed = _parse(pod.placed_at)
        if placed is not None and (now - placed).total_seconds() > BIND_DEADLINE_SECONDS:
            # Another scheduler took the GPUs, or CPU, memory, affinity or volumes do not fit:
            # give the GPUs back and place it again (a gate cannot be put back on a pod).
            why = pod.unscheduled or "the scheduler gave no reason"
            return f"not bound to {pod.assigned} within {BIND_DEADLINE_SECONDS}s ({why})"
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
class Hold:
    """What the job's preemption record asks of this pass: the workers to keep, and what
    becomes of the record. Users can edit annotations, so an invalid record is ignored."""

    replicas: int  # workers to keep: spec.replicas, or held_replicas while a record holds
    record: PreemptedRecord | None = None  # the record that holds this pass
    restored: PreemptedRecord | None = None  # the record this pass clears (regrowth)
    invalid: str | None = None  # why the annotation is ignored

    @property
    def suspended(self) -> bool:
        return self.record is not None and self.replicas == 0

    @property
    def leaving(self) -> frozenset[str]:
        """The pods the record names: the ones a shrink removes first."""
        return frozenset(self.record.pods) if self.record is not None else frozenset()


def _hold(
    job: DDLJob, pods: Sequence[WorkerPod], lost: Mapping[str, str], queue: Slot | None
) -> Hold:
    """A record holds until the queue lets the job grow (`may_regrow`), and at least until
    a pass has said so and the job is down to the workers it holds: clearing the record
    sooner would keep the workers the preemptor waits for."""
    spec = job.spec
    parsed = parse_record(job.metadata.annotations.get(PREEMPTED_BY))
    if parsed is None:
        return Hold(spec.replicas)
    if isinstance(parsed, InvalidRecord):
        return Hold(spec.replicas, invalid=parsed.reason)
    held = held_replicas(spec.replicas, spec.min_replicas, parsed)
    was = next((x for x in job.status.conditions if x.type == PREEMPTED), None)
    shown = was is not None and was.status == "True"
    alive = sum(1 for p in pods if p.name not in lost and p.phase != "Succeeded")
    if shown and alive <= held and may_regrow(parsed, queue):
        return Hold(spec.replicas, restored=parsed)
    return Hold(held, record=parsed)


@dataclass(frozen=True)
class Observed:
    """What one pass reads, indexed: the job, its pods, the nodes and the clock."""

    job: DDLJob
    pods: Sequence[WorkerPod]
    nodes: Sequence[NodeInfo]
    now: dt.datetime
    service_account: str | None
    queue: Slot | None  # where the job stands in the GPU queue, when the caller keeps one
    by_node: Mapping[str, NodeInfo]
    by_name: Mapping[str, WorkerPod]
    members: Sequence[str]  # the published membership, in rank order
    lost: Mapping[str, str]  # pod -> why it no longer counts as a worker
    reports: Mapping[str, WorkerReport]  # pod -> its valid report
    rejected: Mapping[str, str]  # pod -> why its report is ignored
    hold: Hold  # what the preemption record, if any, asks of this pass

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
    """The workers kept after scaling: placed ones, gated ones, members scaled away, and
    how the placed ones are split across domains of topology.required (if they are)."""

    placed: Sequence[WorkerPod]
    unplaced: Sequence[WorkerPod]
    removed: Sequence[str]
    split: Split | None = None

    @property
    def anchored(self) -> list[WorkerPod]:
        """Placed workers that new ones join (the group that stays when split)."""
        split = self.split
        return [p for p in self.placed if split is None or p.name in split.inside]


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
    queue: Slot | None = None,
) -> Plan:
    """Decides one pass. `nodes` count every placed pod's GPUs (ours included) in `used`.

    With a `queue` slot (core/queueing.py), new workers are placed only on the capacity the
    slot allows, and a job that must wait says its position and what it waits for.

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
    if _refuse_invalid_spec(job, plan, _iso(now)):
        return plan
    seen = observe(job, pods, nodes, now, service_account, queue)
    if _outcome(seen, plan):
        return plan
    _preemption(seen, plan)
    if _suspend(seen, plan):
        return plan
    losses = _losses(seen, plan)
    if _over_restart_limit(seen, plan, losses):
        return plan
    decided = _goodput(seen, plan, losses)
    gang = _scale(seen, plan, decided.target, decided.replacing)
    unschedulable = _place(seen, plan, gang)
    membership = _rendezvous(seen, plan, gang, losses)
    if _out_of_patience(seen, plan, membership):
        return plan
    _conditions(seen, plan, gang, membership, unschedulable, decided)
    return plan


def observe(
    job: DDLJob,
    pods: Sequence[WorkerPod],
    nodes: Sequence[NodeInfo],
    now: dt.datetime,
    service_account: str | None = None,
    queue: Slot | None = None,
) -> Observed:
    """Index the snapshot and say which pods no longer count."""
    by_node = {n.name: n for n in nodes}
    rendezvous = job.status.rendezvous
    reports: dict[str, WorkerReport] = {}
    rejected: dict[str, str] = {}
    for pod in pods:
        if pod.report is None:
            continue
        parsed = parse_report(pod.report)
        if isinstance(parsed, Rejected):
            rejected[pod.name] = parsed.reason
        else:
            reports[pod.name] = parsed
    lost = {p.name: why for p in pods if (why := _lost(p, by_node, now))}
    return Observed(
        job=job,
        pods=pods,
        nodes=nodes,
        now=now,
        service_account=service_account,
        queue=queue,
        by_node=by_node,
        by_name={p.name: p for p in pods},
        members=[m.pod for m in rendezvous.members] if rendezvous else [],
        lost=lost,
        reports=reports,
        rejected=rejected,
        hold=_hold(job, pods, lost, queue),
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
        **rank0_summary(seen.old.rendezvous, seen.reports),
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


def _by(record: PreemptedRecord) -> str:
    return f"{record.by[0]}/{record.by[1]}"


def _named(pods: Sequence[str]) -> str:
    shown = ", ".join(pods[:PODS_NAMED])
    more = len(pods) - PODS_NAMED
    return f"{shown} and {more} more" if more > 0 else shown


def _preempted_state(seen: Observed) -> ConditionState | None:
    """The Preempted condition; None for a job that never had one. Its message depends on
    the record alone, so a new record (and only that) makes a new event."""
    hold, replicas = seen.hold, seen.spec.replicas
    was = next((x for x in seen.old.conditions if x.type == PREEMPTED), None)
    if hold.record is not None:
        record = hold.record
        head = f"preempted by {_by(record)} at {_iso(record.at)}"
        if hold.suspended:
            resumes = "resumes from the last checkpoint when the queue has room"
            return (PREEMPTED, True, SUSPENDED, f"{head}: suspended; {resumes}")
        removing = f", removing {_named(record.pods)}" if record.pods else ""
        held = f"{hold.replicas} of {replicas} workers{removing}"
        grows = f"grows back to {replicas} when the queue has room"
        return (PREEMPTED, True, "Shrunk", f"{head}: {held}; {grows}")
    if hold.restored is not None:
        after = f"after preemption by {_by(hold.restored)}"
        back = "resuming" if hold.restored.replicas == 0 else f"growing back to {replicas} workers"
        return (PREEMPTED, False, "Restored", f"the queue has room: {back} {after}")
    if hold.invalid is not None:
        ignored = f"ignoring the {PREEMPTED_BY} annotation: {hold.invalid}"
        return (PREEMPTED, False, "InvalidRecord", ignored)
    if was is None:
        return None
    if was.status == "True":  # the annotation was removed by hand
        removed = f"the {PREEMPTED_BY} annotation was removed: growing back to {replicas} workers"
        return (PREEMPTED, False, "Restored", removed)
    return (PREEMPTED, False, was.reason, was.message)


def _preemption(seen: Observed, plan: Plan) -> None:
    """The record's events, once per change of the Preempted condition, and the record's
    removal when the job may grow back."""
    state = _preempted_state(seen)
    if seen.hold.restored is not None:
        plan.annotations[PREEMPTED_BY] = None
    if state is None:
        return
    _, status, reason, message = state
    was = next((x for x in seen.old.conditions if x.type == PREEMPTED), None)
    if was is not None and (was.status == "True") == status and was.message == message:
        return
    if status:
        plan.events.append(Event("Warning", PREEMPTED, message))
    elif reason == "Restored":
        plan.events.append(Event("Normal", "Restored", message))
    elif reason == "InvalidRecord":
        plan.events.append(Event("Warning", "InvalidPreemptionRecord", message))


def _suspension(seen: Observed) -> tuple[str, str] | None:
    """Why the job holds nothing (for messages) and what resumes it; None if it runs."""
    if seen.spec.suspend:
        return "spec.suspend", "when spec.suspend is false"
    if seen.hold.record is not None and seen.hold.suspended:
        return f"preempted by {_by(seen.hold.record)}", "when the queue has room"
    return None


def _suspend(seen: Observed, plan: Plan) -> bool:
    """spec.suspend, or a preemption record that keeps no worker: stop the gang at a step
    boundary, then delete every pod. True when the job is suspended (the pass ends here,
    before losses, restarts and patience are counted).

    The stop reuses the rendezvous of a gang with too few workers: an epoch with no members,
    at which every agent checkpoints at a step boundary and reports that it waits. The pods
    go once each has said so, or once SUSPEND_GRACE_SECONDS have passed since the stop.
    """
    why = _suspension(seen)
    if why is None:
        return False
    cause, resumes = why
    by_user = cause == "spec.suspend"
    prefix = "" if by_user else f"{cause}: "
    stop = _stop_epoch(seen, plan, cause)
    was = next((x for x in seen.old.conditions if x.type == SUSPENDED), None)
    since = _parse(was.last_transition_time) if was is not None and was.status == "True" else None
    elapsed = (seen.now - since).total_seconds() if since is not None else 0.0
    pods = [p for p in seen.pods if not p.deleting]
    training = [p.name for p in pods if not _stopped(p, seen, stop)]
    if training and elapsed < SUSPEND_GRACE_SECONDS:
        reason = "Stopping"
        message = (
            f"{prefix}stopping {', '.join(training)} at a step boundary after a checkpoint "
            f"(epoch {stop}); the pods are deleted once they stop, at most "
            f"{SUSPEND_GRACE_SECONDS}s"
        )
        plan.requeue_after = min(5.0, SUSPEND_GRACE_SECONDS - elapsed)
    else:
        reason = SUSPENDED
        plan.delete.extend(p.name for p in pods)
        releasing = len(pods) + sum(1 for p in seen.pods if p.deleting)
        message = (
            prefix
            + (f"releasing {releasing} pods" if releasing else "holding no pods")
            + f"; resumes from the last checkpoint {resumes} (epoch {stop})"
        )
        # Only a spec change resumes a user's suspension; the queue's verdict may change
        # without an event on this job, so a preempted one looks again now and then.
        plan.requeue_after = 5.0 if releasing else 0 if by_user else plan.requeue_after
        if was is None or was.status != "True" or was.reason != SUSPENDED:
            late = f"; {', '.join(training)} did not confirm a stop in time" if training else ""
            plan.events.append(Event("Normal", SUSPENDED, f"epoch {stop}: suspended{late}"))
    stamp = seen.stamp
    conditions = [
        _condition(seen.old.conditions, x.type, False, SUSPENDED, "", stamp)
        if x.type in _GANG_CONDITIONS
        else x
        for x in seen.old.conditions
        if x.type not in (SUSPENDED, PREEMPTED)
    ]
    preempted = _preempted_state(seen)
    if preempted is not None:
        conditions.append(_condition(seen.old.conditions, *preempted, stamp))
    conditions.append(_condition(seen.old.conditions, SUSPENDED, True, reason, message, stamp))
    plan.update_status(
        phase="Suspended",
        replicas=0,
        ready_replicas=0,
        conditions=conditions,
        message=message,
        waiting_since=None,
        throughput=0.0,
        sync_wait_ratio=0.0,
    )
    return True


def _stop_epoch(seen: Observed, plan: Plan, cause: str) -> int:
    """The epoch at which the workers stop: a new one without members if a gang trains."""
    old = seen.old
    if old.rendezvous is None or old.rendezvous.workers == 0:
        return old.epoch  # nobody trains: there is nothing to stop
    epoch = old.epoch + 1
    plan.update_status(
        epoch=epoch,
        rendezvous=Rendezvous(
            epoch=epoch, workers=0, processes_per_worker=seen.spec.procs_per_worker
        ),
    )
    plan.events.append(
        Event(
            "Normal",
            "Suspending",
            f"epoch {epoch}: {old.rendezvous.workers} workers stop at a step boundary after "
            f"a checkpoint ({cause})",
        )
    )
    return epoch


def _stopped(pod: WorkerPod, seen: Observed, stop: int) -> bool:
    """Whether a pod has nothing left to checkpoint: it never trained, ended, or its agent
    reported that it waits at (or after) the stop epoch."""
    if seen.old.rendezvous is None or pod.phase not in ("Running", "Unknown"):
        return True
    report = seen.reports.get(pod.name)
    return report is not None and report.epoch >= stop and report.state != "Running"


def _losses(seen: Observed, plan: Plan) -> Losses:
    """Lost members and failed training count one restart; lost pods are deleted."""
    old, by_name, reports = seen.old, seen.by_name, seen.reports
    lost_members = [m for m in seen.members if m not in by_name or m in seen.lost]
    # A training process failed while its pod lives on: the agent says so at this epoch and
    # waits; the gang restarts at a new epoch (from the last checkpoint).
    failed_training = [
        m
        for m in seen.members
        if m not in seen.lost
        and (r := reports.get(m)) is not None
        and r.epoch == old.epoch
        and r.state == "Failed"
    ]
    losses = Losses(members=lost_members, failed_training=failed_training)
    if losses:
        # Counted once: this pass publishes a new epoch, so the same losses are not seen again.
        plan.update_status(restarts=old.restarts + 1, last_failure_time=seen.stamp)
        reasons = ", ".join(
            [f"{m} {seen.lost.get(m, 'is gone')}" for m in lost_members]
            + [f"{m} failed: {reports[m].message}" for m in failed_training]
        )
        plan.events.append(Event("Warning", "WorkerLost", f"epoch {old.epoch}: {reasons}"))
    dropped = sorted(n for n in seen.lost if not by_name[n].deleting)
    plan.delete.extend(dropped)
    for name in dropped:  # not members (those are WorkerLost above): say why they go
        if name not in seen.members:
            why = seen.lost[name]
            plan.events.append(Event("Warning", "WorkerReplaced", f"{name} {why}; replacing it"))
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


@dataclass(frozen=True)
class Decisions:
    """What the goodput policies ask of this pass: the size to keep, the straggler to
    replace (if any), and their conditions."""

    target: int
    replacing: Replace | None = None
    conditions: Sequence[ConditionState] = ()


def _goodput(seen: Observed, plan: Plan, losses: Losses) -> Decisions:
    """Straggler replacement and throughput sizing (core/goodput.py); neither acts on a
    pass that loses workers, whose re-form starts every measurement over anyway."""
    replacing, replaced = _stragglers(seen, plan, losses)
    target, sized = _sizing(seen, plan)
    conditions = tuple(x for x in (replaced, sized) if x is not None)
    return Decisions(target=target, replacing=replacing, conditions=conditions)


def _previous(old: DDLJobStatus, type_: str) -> ConditionState | None:
    was = next((x for x in old.conditions if x.type == type_), None)
    return None if was is None else (type_, was.status == "True", was.reason, was.message)


def _stragglers(
    seen: Observed, plan: Plan, losses: Losses
) -> tuple[Replace | None, ConditionState | None]:
    """spec.stragglers.action Replace: fold the reports into the watch; a confirmed
    straggler is replaced this pass (the plan re-forms without it), or its condition says
    why it stays. The watch lives in status.stragglers."""
    spec, old, now = seen.spec, seen.old, seen.now
    if spec.stragglers.action != "Replace":
        plan.update_status(stragglers=None)
        return None, None
    policy = goodput.straggler_policy(spec.stragglers)
    state = goodput.straggler_state(old.stragglers, policy, old.epoch, now)
    placing_on = old.stragglers.placing_on if old.stragglers is not None else None
    verdict = goodput.watch_stragglers(
        state,
        policy,
        old.rendezvous,
        seen.reports,
        _capacity(seen),
        spec.topology.levels,
        spec.topology.required,
        spec.gpus_per_worker,
        now,
    )
    state, action = verdict.state, verdict.action
    condition = _previous(old, STRAGGLER_REPLACED)
    replacing = None
    if isinstance(action, Replace) and not losses:
        state = goodput.replaced(state, policy, action, now)
        replacing, placing_on = action, action.to
        condition = (STRAGGLER_REPLACED, True, "Replaced", action.message)
        plan.events.append(
            Event("Normal", STRAGGLER_REPLACED, f"epoch {old.epoch}: {action.message}")
        )
    elif isinstance(action, Keep):
        condition = (STRAGGLER_REPLACED, False, "Kept", action.message)
    plan.update_status(stragglers=goodput.straggler_watch(state, placing_on))
    return replacing, condition


def _sizing(seen: Observed, plan: Plan) -> tuple[int, ConditionState | None]:
    """The workers to keep: under elastic.scaling Throughput the size the throughput
    measured so far says (status.sizing), else spec.replicas. A preemption record's hold
    wins and pauses the measuring."""
    elastic, held = seen.spec.elastic, seen.hold.replicas
    if elastic is None or elastic.scaling != "Throughput":
        plan.update_status(sizing=None)
        return held, None
    if seen.hold.record is not None:
        return held, _previous(seen.old, SIZING)
    policy = goodput.sizing_policy(elastic)
    old, low = seen.old, seen.spec.min_replicas
    state = goodput.sizing_state(old.sizing, policy, len(seen.members) or low, seen.now)
    rank0 = rank0_summary(old.rendezvous, seen.reports)
    observed = goodput.Observed(
        epoch=old.epoch,
        workers=old.rendezvous.workers if old.rendezvous is not None else 0,
        throughput=rank0.get("throughput"),
        step=rank0.get("step"),
    )
    sized = goodput.size_by_throughput(state, policy, observed, low, held, seen.now)
    if sized.target != state.target:
        why = f": {sized.message}" if sized.message else ""
        plan.events.append(
            Event("Normal", "Resizing", f"{state.target} -> {sized.target} workers{why}")
        )
    plan.update_status(sizing=goodput.sizing_status(sized, held))
    return min(sized.target, held), (
        SIZING,
        True,
        _sizing_reason(sized, seen.now),
        _sizing_message(sized),
    )


def _sizing_reason(state: goodput.SizingState, now: dt.datetime) -> str:
    if state.target > state.workers:
        return "Growing"
    if state.target < state.workers:
        return "ShrinkingBack"
    if state.hold_until is not None and now < state.hold_until:
        return "CoolingDown"
    return "Sized" if state.measured else "Measuring"


def _sizing_message(state: goodput.SizingState) -> str:
    return state.message or f"measuring {state.workers} workers once they settle"


def _scale(seen: Observed, plan: Plan, target: int, replacing: Replace | None = None) -> Gang:
    """Keep `target` workers alive (spec.replicas, fewer while a preemption record holds or
    throughput sizing says so): drop the straggler being replaced and the surplus (the
    record's pods first), create what is missing."""
    alive = [p for p in seen.pods if p.name not in seen.lost and p.phase != "Succeeded"]
    removed: list[str] = []
    if replacing is not None and any(p.name == replacing.pod for p in alive):
        plan.delete.append(replacing.pod)
        removed.append(replacing.pod)
        alive = [p for p in alive if p.name != replacing.pod]
    if len(alive) > target:
        surplus = _surplus(alive, seen.members, len(alive) - target, seen.hold.leaving)
        plan.delete.extend(p.name for p in surplus)
        removed += [p.name for p in surplus if p.name in seen.members]
        alive = [p for p in alive if p not in surplus]
    if len(alive) < target:
        _create(seen, plan, target - len(alive))
    placed = [p for p in alive if p.placed_on]
    # New workers are placed in the pass that creates them: placed ones are created pinned
    # (render.pinned_creates), one write each and no second pass to lift their gate.
    fresh = [_new_worker(m) for m in plan.create]
    topology = seen.spec.topology
    split = find_split(
        {p.name: p.placed_on or "" for p in placed},
        seen.by_node,
        topology.levels,
        topology.required,
        seen.members,
    )
    return Gang(
        placed=placed,
        unplaced=[*(p for p in alive if not p.placed_on), *fresh],
        removed=removed,
        split=split,
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


def _new_worker(manifest: Mapping[str, Any]) -> WorkerPod:
    """The view of a worker this pass creates (gated, on no node), as podview reads pods."""
    from ddl_operator.core.podview import worker_view  # podview imports this module

    return worker_view(manifest)


def _gang_request(seen: Observed, gang: Gang) -> GangRequest | None:
    """The gang to place this pass: the rest of it, at least up to minReplicas; None if
    nothing is to be placed."""
    if not gang.unplaced:
        return None
    spec = seen.spec
    target = spec.replicas
    keep = _kept_on(gang.anchored)
    low = min(target, max(spec.min_replicas, len(keep) + 1))
    high = min(target, len(keep) + len(gang.unplaced))
    if low > high:
        return None  # fewer workers than the smallest gang (the failure backoff holds them)
    return _request(seen.job, low, high, keep)


def pending_request(
    job: DDLJob, pods: Sequence[WorkerPod], nodes: Sequence[NodeInfo], now: dt.datetime
) -> GangRequest | None:
    """What a job asks of the GPU queue now: the gang its next pass would place (a
    core/queueing.Demand's request); None when it places nothing (finished, suspended,
    invalid, or every worker placed)."""
    if job.status.phase in TERMINAL or job.spec.suspend or _spec_problem(job) is not None:
        return None
    seen = observe(job, pods, nodes, now)
    draft = Plan(status=job.status)
    target, _ = _sizing(seen, draft)
    gang = _scale(seen, draft, target)
    if seen.hold.record is None:
        return _gang_request(seen, gang)
    return _growth_request(seen, gang)


def _growth_request(seen: Observed, gang: Gang) -> GangRequest:
    """A preempted job's growth back to spec.replicas, whose fit in the queue clears the
    record: its kept workers plus at least one more (the smallest gang when it holds none),
    asked even though the record keeps it from creating them yet."""
    replicas = seen.spec.replicas
    keep = _kept_on(gang.anchored)
    low = min(replicas, max(seen.spec.min_replicas, len(keep) + 1))
    return _request(seen.job, low, replicas, keep)


def _capacity(seen: Observed) -> Sequence[NodeInfo]:
    """The nodes new workers may use: what the queue slot allows, when there is one."""
    return seen.queue.nodes if seen.queue is not None else seen.nodes


def _place(seen: Observed, plan: Plan, gang: Gang) -> Unplaceable | None:
    """Place gated workers: the whole rest of the gang, or as many as fit; else say why."""
    request = _gang_request(seen, gang)
    if request is None:
        return None
    watch = plan.status.stragglers
    capacity = goodput.avoided(_capacity(seen), watch, seen.now)
    pin = watch.placing_on if watch is not None else None
    # A straggler's replacement goes to the node its decision named, if that still fits.
    result = place(goodput.pinned(capacity, pin), request) if pin else None
    if result is None or isinstance(result, Unplaceable):
        result = place(capacity, request)
    if isinstance(result, Unplaceable):
        return result
    if watch is not None and pin is not None:
        plan.update_status(stragglers=watch.model_copy(update={"placing_on": None}))
    new = [w for w in result.workers if w.pod is None]
    for pod, worker in zip(sorted(gang.unplaced, key=lambda p: p.slot), new, strict=False):
        patch = placement_patch(worker.node, pod.gates, seen.stamp, terms=pod.node_terms)
        plan.place.append((pod.name, patch))
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
    # Split across required domains: only the group that stays can form the next epoch.
    eligible = [p for p in running if gang.split is None or p.name in gang.split.inside]
    published = None
    if (must_change or can_grow) and len(eligible) >= spec.min_replicas:
        published = _publish(seen.job, old.epoch + 1, seen.nodes, eligible)
    rendezvous, epoch = old.rendezvous, old.epoch
    if published is not None:
        epoch, rendezvous = published.epoch, published
        grid = "x".join(map(str, published.grid))
        plan.events.append(
            Event(
                "Normal", "Rendezvous", f"epoch {epoch}: {published.workers} workers, grid {grid}"
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
                f"epoch {epoch}: {len(eligible)} workers left, fewer than minReplicas "
                f"{spec.min_replicas}; waiting for capacity",
            )
        )
    if epoch != old.epoch and gang.split is not None:
        _release(plan, gang.split, epoch)
    plan.update_status(epoch=epoch, rendezvous=rendezvous)
    return Membership(rendezvous=rendezvous, running=running_names, waiting=bool(waiting))


def _release(plan: Plan, split: Split, epoch: int) -> None:
    """The workers outside the domain that stays leave at this epoch (replacements join it)."""
    leaving = split.outside  # placed and alive, so neither lost nor surplus (not deleted yet)
    plan.delete.extend(leaving)
    plan.events.append(
        Event(
            "Warning",
            DOMAIN_SPLIT,
            f"epoch {epoch}: releasing {', '.join(leaving)}: outside "
            f"{split.level} {split.domain}, where the gang stays",
        )
    )


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


ConditionState = tuple[str, bool, str, str]  # type, status, reason, message


def _conditions(
    seen: Observed,
    plan: Plan,
    gang: Gang,
    membership: Membership,
    unschedulable: Unplaceable | None,
    decided: Decisions,
) -> None:
    """Phase, conditions and the rank-0 summary; events for conditions that just turned."""
    old, target, split = seen.old, decided.target, gang.split
    phase = _phase(plan, gang, membership)
    members = membership.members
    ready = sum(1 for m in members if m in membership.running)
    placed_count = len(gang.placed) + len(plan.place)
    placed_all = placed_count >= target
    threshold = seen.spec.stragglers.threshold
    straggler = find_straggler(membership.rendezvous, seen.reports, threshold)
    was = {x.type: x for x in old.conditions}
    rejections, rejection_events = _rejections(seen.rejected, was.get(REPORT_REJECTED))
    states: list[ConditionState] = [
        ("Placed", placed_all, "GangPlaced" if placed_all else "Placing",
         f"{placed_count}/{target} workers placed"),
        ("Unschedulable", unschedulable is not None,
         unschedulable.short if unschedulable else "Placed",
         unschedulable.reason if unschedulable else ""),
        ("Ready", phase == "Running", "Training" if phase == "Running" else phase,
         f"{ready}/{len(members)} members running at epoch {plan.status.epoch}"),
        ("Straggler", straggler is not None, "SlowWorker" if straggler else "Balanced",
         straggler or ""),
        (DOMAIN_SPLIT, split is not None, "WorkersSpanDomains" if split else "WithinDomain",
         split.describe() if split else ""),
        rejections,
        *decided.conditions,
    ]  # fmt: skip
    queue = seen.queue
    waits_for = queue.waits_for if queue is not None and unschedulable is not None else ""
    if waits_for or QUEUED in was:
        states.append((QUEUED, bool(waits_for), "Waiting" if waits_for else "Claimed", waits_for))
    preempted = _preempted_state(seen)
    if preempted is not None:
        states.append(preempted)
    if SUSPENDED in was:  # once suspended, the condition stays and says it resumed
        resumed = was[SUSPENDED].message
        if was[SUSPENDED].status == "True":
            by = was.get(PREEMPTED)
            cause = (
                "the queue has room"
                if by is not None and by.status == "True" and by.reason == SUSPENDED
                else "spec.suspend is false"
            )
            resumed = f"{cause}; the workers resume from the last checkpoint"
            msg = f"resuming after epoch {old.epoch} from the last checkpoint"
            plan.events.append(Event("Normal", "Resumed", msg))
        states.append((SUSPENDED, False, "Resumed", resumed))
    conditions = [_condition(old.conditions, *state, seen.stamp) for state in states]
    for type_, message in (
        ("Straggler", straggler),
        (DOMAIN_SPLIT, split.describe() if split else None),
    ):
        if message and (was.get(type_) is None or was[type_].status != "True"):
            plan.events.append(Event("Warning", type_, message))
    if unschedulable and (
        was.get("Unschedulable") is None or was["Unschedulable"].message != unschedulable.reason
    ):
        plan.events.append(Event("Warning", "Unschedulable", unschedulable.reason))
    plan.events.extend(rejection_events)
    plan.update_status(
        phase=phase,
        replicas=len(members),
        ready_replicas=ready,
        conditions=conditions,
        message=waits_for
        or (unschedulable.reason if unschedulable else "")
        or (preempted[3] if preempted is not None and preempted[1] else ""),
        **rank0_summary(membership.rendezvous, seen.reports),
    )
    if unschedulable or membership.waiting or plan.create or plan.place or plan.delete:
        plan.requeue_after = min(plan.requeue_after, 5.0)


def _rejections(
    rejected: Mapping[str, str], previous: Condition | None
) -> tuple[ConditionState, list[Event]]:
    """The ReportRejected condition, and one warning per pod whose report newly fails.

    The condition remembers what was said: it lists `pod: reason` entries, and a pod gets an
    event only when its entry is not in the last written condition (new, or a new reason).
    """
    entries = [f"{pod}: {why}" for pod, why in sorted(rejected.items())]
    listed = entries[:REJECTIONS_LISTED]
    more = [f"and {len(entries) - len(listed)} more"] if len(entries) > len(listed) else []
    said = set(previous.message.split("; ")) if previous and previous.status == "True" else set()
    events = [
        Event("Warning", REPORT_REJECTED, f"ignoring the report of {entry}")
        for entry in listed
        if entry not in said
    ]
    reason = "InvalidReport" if entries else "ReportsValid"
    return (REPORT_REJECTED, bool(entries), reason, "; ".join(listed + more)), events


def _spec_problem(job: DDLJob) -> str | None:
    """A rule of the CRD's schema that the spec breaks, naming the field; None if none.

    The API server enforces these; the check keeps placement from ever seeing a spec that
    slipped past (an outdated CRD), which would otherwise fail every pass.
    """
    topology = job.spec.topology
    levels = topology.levels
    if not levels or levels[0] != c.LABEL_HOSTNAME:
        return f"spec.topology.levels must start with {c.LABEL_HOSTNAME}"
    if len(set(levels)) != len(levels):
        return "spec.topology.levels must not repeat a level"
    if topology.required is not None and topology.required not in levels:
        return "spec.topology.required must be one of spec.topology.levels"
    return None


def _refuse_invalid_spec(job: DDLJob, plan: Plan, stamp: str) -> bool:
    """Leave the children alone and say what to fix, once per problem."""
    problem = _spec_problem(job)
    if problem is None:
        return False
    old = job.status.conditions
    previous = next((x for x in old if x.type == INVALID_SPEC), None)
    if previous is None or previous.message != problem:
        plan.events.append(Event("Warning", INVALID_SPEC, problem))
    refused = _condition(old, INVALID_SPEC, True, "SpecBreaksSchema", problem, stamp)
    plan.update_status(
        conditions=[*(x for x in old if x.type != INVALID_SPEC), refused], message=problem
    )
    plan.requeue_after = 0  # a spec change starts the next pass
    return True


def _publish(
    job: DDLJob, epoch: int, nodes: Sequence[NodeInfo], running: Sequence[WorkerPod]
) -> Rendezvous | None:
    """Rank map and grid for running workers, ordered by topology; None if none exists.

    Every worker is kept where it runs, so ordering only fails if they break
    `topology.required` (the caller passes one domain's workers); then they are ordered
    without it rather than not at all.
    """
    keep = _kept_on(running)
    request = _request(job, len(running), len(running), keep)
    # Every worker is kept, so only their nodes matter: ordered among those alone, the ranks
    # are the same, and a re-form costs the gang's size, not the cluster's.
    hosts = set(keep.values())
    nodes = [n for n in nodes if n.name in hosts]
    ordered = place(nodes, request)
    if isinstance(ordered, Unplaceable) and request.required is not None:
        ordered = place(nodes, replace(request, required=None))
    if isinstance(ordered, Unplaceable):
        return None
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


def _surplus(
    alive: Sequence[WorkerPod],
    members: Sequence[str],
    count: int,
    leaving: frozenset[str] = frozenset(),
) -> list[WorkerPod]:
    """Which workers to drop when scaling down: those a preemption record names (their
    GPUs are what the preemptor was promised), then unplaced, non-members, high ranks."""
    rank = {name: i for i, name in enumerate(members)}

    def cost(p: WorkerPod) -> tuple[int, int, int, int]:
        return (
            0 if p.name in leaving else 1,
            0 if not p.placed_on else 1 if p.name not in rank else 2,
            -rank.get(p.name, 0),
            -p.slot,
        )

    return sorted(alive, key=cost)[:count]


__all__ = ["Event", "Plan", "WorkerPod", "master_port", "pending_request", "pod_name", "reconcile"]
