"""The GPU queue and preemption on a mixed stream of DDLJobs, against both switched off, in one run.

Run: .venv/bin/python benchmarks/queue_bench.py [--nodes 1000] [--jobs 200] [--seed 14]
     [--time-scale 1] [--load 1.2]                                     (needs `make k8s`)
Quick (development): --nodes 100 --jobs 30 --time-scale 0.5

One control plane (kube-apiserver, kube-scheduler, kwok nodes of 8 GPUs in 4 zones x 10 racks)
and one seeded stream of DDLJobs, run twice: "ours", the operator as shipped (GPU queue by
PriorityClass then age, head-of-line reservation, preemption that shrinks elastic jobs first),
and "off", the operator with --no-queue-order --no-preemption (whichever job's pass comes first
takes free GPUs). Each pass has its own namespace and its own operator process, started with
--namespace for it; the other pass's objects are finished by then.

The stream: workers of 8 GPUs (one node each), 1, 2, 4, 8 or 16 per job; priority classes low /
normal / high (50/35/15%); half the jobs of 2 or more workers elastic (minReplicas = half).
Arrivals are uniform over the window, sorted (a Poisson process given the count). A job's work
is `workers x duration` worker-seconds (20-100 s at full size); it advances by the workers of
its rendezvous while the job is Running (linear scaling: shrunk, it runs longer; suspended or
re-forming, not at all), and when done the script marks its members' pods Succeeded, as their
kubelet would, so the operator ends the job. Other tenants' pods (plain pods, a PriorityClass
above all of the stream's) hold whole nodes, so that the stream's share of the cluster gives
the offered load asked for (`--load`: the stream's work over its GPUs x the window).

Measured from the cluster (the DDLJobs and pods, polled about once a second): GPU utilisation,
wait from apply to Running per priority, makespan, and idle GPU-seconds while jobs waited.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client
from scale_bench import (
    RACKS_PER_ZONE,
    ZONES,
    Histogram,
    _scrapes,
    cpu_seconds,
    create_all,
    ddljob,
    scrape,
)
from scale_bench import wait_all_running as wait_pods_running
from scheduler_compare import install_crds, kubectl, node_doc, pod_doc, start_kwok, start_operator

from ddl_localcluster.controlplane import ControlPlane, free_port, stop_process_group, wait_for
from ddl_operator.api import constants as c
from ddl_operator.apiclient import load_client
from ddl_operator.core.render import ANNOTATION_NODE

GPUS = 8  # per node and per worker
SIZES = (1, 2, 4, 8, 16)
# name, value, share of the stream; tenants' pods outrank them all, so kube-scheduler never
# evicts a tenant for a stream pod.
CLASSES = (("high", 10000, 0.15), ("normal", 1000, 0.35), ("low", 100, 0.50))
TENANT_CLASS = ("tenant", 1_000_000)
DURATION_S = (20.0, 100.0)  # at full size, before --time-scale
MODES = (("ours", ()), ("off", ("--no-queue-order", "--no-preemption")))


@dataclass(frozen=True)
class JobSpec:
    name: str
    klass: str
    workers: int
    min_workers: int
    duration: float  # seconds at full size
    arrival: float  # seconds after the pass starts

    @property
    def work(self) -> float:
        return self.workers * self.duration


@dataclass
class Track:
    """One job during one pass, as the polls saw it (seconds since the pass started)."""

    created: float | None = None
    running: float | None = None  # first seen Running
    finished: float | None = None  # its members marked Succeeded
    succeeded: float | None = None  # the DDLJob seen Succeeded
    progress: float = 0.0  # worker-seconds done
    rate: int = 0  # rendezvous workers at the last poll, while Running
    preemptions: set[str] = field(default_factory=set)  # "Shrunk@time", "Suspended@time"
    # What its Queued condition said while it waited (first few distinct, with the time).
    queued: list[tuple[float, str]] = field(default_factory=list)


@dataclass
class Sample:
    t: float
    running_gpus: int  # held by pods in phase Running
    free_gpus: int  # the stream's GPUs no bound or placed pod takes
    waiting: int  # jobs applied, not finished, holding no GPU
    fits: bool  # some waiting job's smallest gang fits the free GPUs by count


@dataclass
class Result:
    mode: str
    tracks: dict[str, Track]
    samples: list[Sample]
    cpu_s: float
    passes: Histogram  # the operator's reconcile pass durations
    scheduler_preemptions: int
    unfinished: list[str]

    def waits(self, jobs: Iterable[JobSpec]) -> list[float]:
        out = []
        for job in jobs:
            tr = self.tracks[job.name]
            if tr.created is not None and tr.running is not None:
                out.append(tr.running - tr.created)
        return out

    @property
    def makespan(self) -> float:
        ends = [t.succeeded for t in self.tracks.values() if t.succeeded is not None]
        return max(ends) if ends and not self.unfinished else math.nan

    def integral(self, value: Callable[[Sample], float], until: float | None = None) -> float:
        """Sum of value(sample) x the time until the next sample."""
        total = 0.0
        for a, b in zip(self.samples, self.samples[1:], strict=False):
            end = b.t if until is None else min(b.t, until)
            if end > a.t:
                total += value(a) * (end - a.t)
        return total


def make_stream(count: int, seed: int, scale: float, window: float) -> list[JobSpec]:
    rng = random.Random(seed)
    arrivals = sorted(rng.uniform(0, window) for _ in range(count))
    names = [name for name, _, _ in CLASSES]
    weights = [share for _, _, share in CLASSES]
    jobs = []
    for i, arrival in enumerate(arrivals):
        workers = rng.choice(SIZES)
        elastic = workers > 1 and rng.random() < 0.5
        jobs.append(
            JobSpec(
                name=f"j{i:03d}",
                klass=rng.choices(names, weights)[0],
                workers=workers,
                min_workers=workers // 2 if elastic else workers,
                duration=rng.uniform(*DURATION_S) * scale,
                arrival=arrival,
            )
        )
    return jobs


def manifest(job: JobSpec, ns: str) -> dict[str, Any]:
    doc = ddljob(job.name, ns, job.workers, GPUS)
    doc["spec"]["template"]["spec"]["priorityClassName"] = job.klass
    if job.min_workers < job.workers:
        doc["spec"]["elastic"] = {"minReplicas": job.min_workers, "maxReplicas": job.workers}
    return doc


def priority_classes() -> list[dict[str, Any]]:
    return [
        {
            "apiVersion": "scheduling.k8s.io/v1",
            "kind": "PriorityClass",
            "metadata": {"name": name},
            "value": value,
        }
        for name, value in [*((n, v) for n, v, _ in CLASSES), TENANT_CLASS]
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument(
        "--time-scale", type=float, default=1.0, help="multiplies durations and the window"
    )
    parser.add_argument(
        "--window", type=float, default=200.0, help="arrivals spread over this many seconds"
    )
    parser.add_argument(
        "--load", type=float, default=1.2, help="the stream's work / (its GPUs x the window)"
    )
    parser.add_argument("--bucket", type=float, default=30.0, help="utilisation table step (s)")
    parser.add_argument("--timeout", type=float, default=1200.0, help="per pass (s)")
    parser.add_argument("--operator-log", type=Path, help="copy the operators' log here")
    parser.add_argument("--jobs-out", type=Path, help="write each job's track (JSON) here")
    args = parser.parse_args(argv)
    window = args.window * args.time_scale
    stream = make_stream(args.jobs, args.seed, args.time_scale, window)
    work = sum(j.work for j in stream)
    biggest = max(j.workers for j in stream)
    free = min(args.nodes, max(biggest, math.ceil(work / (args.load * window))))
    with tempfile.TemporaryDirectory() as tmp:
        cp = ControlPlane(Path(tmp) / "cp")
        cp.start(node_grace_seconds=300)  # busy kwok nodes must not flap NotReady
        try:
            nodes = build_cluster(cp, args.nodes, args.nodes - free)
            results = [
                run_pass(cp, mode, flags, stream, free * GPUS, args.timeout)
                for mode, flags in MODES
            ]
        finally:
            if args.operator_log:
                args.operator_log.write_bytes(cp.log("ddl-operator").read_bytes())
            cp.stop()
    report(args, stream, nodes, free, work / (free * window), results)
    if args.jobs_out:
        args.jobs_out.write_text(json.dumps(job_tracks(stream, results), indent=1))
    return 0


def job_tracks(stream: Sequence[JobSpec], results: Sequence[Result]) -> list[dict[str, Any]]:
    """Each job's spec and, per pass, what the polls saw of it: for finding out why it waited."""
    out = []
    for job in stream:
        row: dict[str, Any] = {
            "name": job.name,
            "class": job.klass,
            "workers": job.workers,
            "min_workers": job.min_workers,
            "arrival": round(job.arrival, 1),
        }
        for r in results:
            tr = r.tracks[job.name]
            wait = None if tr.running is None or tr.created is None else tr.running - tr.created
            row[r.mode] = {
                "wait": None if wait is None else round(wait, 1),
                "running": tr.running,
                "succeeded": tr.succeeded,
                "preemptions": sorted(tr.preemptions),
                "queued": tr.queued,
            }
        out.append(row)
    return out


def build_cluster(cp: ControlPlane, count: int, busy: int) -> int:
    """`count` kwok nodes; tenants' pods hold all GPUs of the first `busy` (whole racks
    first, so the stream gets whole racks of the last zone)."""
    t = time.monotonic()
    install_crds(cp)
    start_kwok(cp, "--node-lease-duration-seconds=40")
    per_rack = math.ceil(count / (ZONES * RACKS_PER_ZONE))
    where = [
        (z, r, n) for z in range(ZONES) for r in range(RACKS_PER_ZONE) for n in range(per_rack)
    ]
    names = [f"z{z}-r{r}-n{n}" for z, r, n in where[:count]]
    create_all(cp, [node_doc(f"z{z}-r{r}-n{n}", z, r) for z, r, n in where[:count]])
    kubectl(cp, "wait", "--for=condition=Ready", "node", "--all", "--timeout=280s")
    kubectl(cp, "create", "-f", "-", input=json.dumps(_list(priority_classes())))
    kubectl(cp, "create", "namespace", "tenants")
    tenants = []
    for i, node in enumerate(names[:busy]):
        pod = pod_doc(f"t{i}", "tenants", GPUS, node)
        pod["spec"]["priorityClassName"] = TENANT_CLASS[0]
        tenants.append(pod)
    create_all(cp, tenants)
    wait_pods_running(cp, "tenants", timeout=1800)
    print(
        f"cluster: {count} kwok nodes x {GPUS} GPUs, tenants hold {busy} of them "
        f"(built in {time.monotonic() - t:.0f}s)",
        flush=True,
    )
    return count


def _list(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "List", "items": list(items)}


def run_pass(
    cp: ControlPlane,
    mode: str,
    flags: Sequence[str],
    stream: Sequence[JobSpec],
    capacity: int,
    timeout: float,
) -> Result:
    api = load_client(str(cp.kubeconfig))
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    ns = mode
    kubectl(cp, "create", "namespace", ns)
    port = free_port()
    pid = start_operator(cp, port, f"--namespace={ns}", *flags)
    wait_for("operator /metrics", lambda: _scrapes(port), 120, lambda: cp.log_tail("ddl-operator"))
    time.sleep(3)  # its cache's first lists
    by_name = {j.name: j for j in stream}
    tracks = {j.name: Track() for j in stream}
    todo = sorted(stream, key=lambda j: j.arrival)
    samples: list[Sample] = []
    t0 = time.monotonic()
    last_print = 0.0
    print(f"[{mode}] operator {' '.join(flags) or 'as shipped'}: stream started", flush=True)
    while True:
        now = time.monotonic() - t0
        while todo and todo[0].arrival <= now:
            job = todo.pop(0)
            tracks[job.name].created = time.monotonic() - t0
            _discard(custom.create_namespaced_custom_object(
                c.GROUP, c.VERSION, ns, c.PLURAL, manifest(job, ns), _preload_content=False
            ))  # fmt: skip
        jobs = _items(custom.list_namespaced_custom_object(
            c.GROUP, c.VERSION, ns, c.PLURAL, _preload_content=False
        ))  # fmt: skip
        pods = _items(core.list_namespaced_pod(
            ns, field_selector="status.phase!=Succeeded,status.phase!=Failed",
            _preload_content=False,
        ))  # fmt: skip
        t = time.monotonic() - t0
        if samples:  # progress over the last interval, at the rate the last poll saw
            dt = t - samples[-1].t
            for tr in tracks.values():
                tr.progress += tr.rate * dt
        samples.append(observe(t, jobs, pods, tracks, by_name, capacity))
        failed = [j["metadata"]["name"] for j in jobs if _phase(j) == "Failed"]
        if failed:
            raise RuntimeError(f"[{mode}] DDLJobs failed: {failed}")
        for job_doc in jobs:
            name = job_doc["metadata"]["name"]
            tr = tracks[name]
            if tr.finished is None and tr.rate and tr.progress >= by_name[name].work:
                finish(core, ns, job_doc)
                tr.finished, tr.rate = time.monotonic() - t0, 0
        done = sum(1 for tr in tracks.values() if tr.succeeded is not None)
        if t - last_print >= 30:
            last = samples[-1]
            print(
                f"[{mode}] t={t:4.0f}s applied {len(stream) - len(todo)}/{len(stream)}, "
                f"done {done}, waiting {last.waiting}, GPUs running "
                f"{100 * last.running_gpus / capacity:.0f}%",
                flush=True,
            )
            last_print = t
        if done == len(stream) or t > timeout:
            break
        time.sleep(max(0.0, 1.0 - (time.monotonic() - t0 - now)))
    cpu, passes = cpu_seconds(pid), scrape(port)
    stop_process_group(pid, 15)
    events = _items(core.list_namespaced_event(  # the operator's own are on DDLJobs
        ns, field_selector="reason=Preempted,involvedObject.kind=Pod", _preload_content=False
    ))  # fmt: skip
    unfinished = [n for n, tr in tracks.items() if tr.succeeded is None]
    return Result(mode, tracks, samples, cpu, passes, len(events), unfinished)


def observe(
    t: float,
    jobs: Sequence[dict[str, Any]],
    pods: Sequence[dict[str, Any]],
    tracks: dict[str, Track],
    specs: dict[str, JobSpec],
    capacity: int,
) -> Sample:
    """One poll: what the jobs and pods say now, into the tracks and a sample."""
    holding: set[str] = set()
    running = taken = 0
    for pod in pods:
        meta, spec = pod["metadata"], pod["spec"]
        node = spec.get("nodeName") or (meta.get("annotations") or {}).get(ANNOTATION_NODE)
        if not node or meta.get("labels", {}).get(c.LABEL_ROLE) != "worker":
            continue
        taken += GPUS
        holding.add(meta["labels"][c.LABEL_JOB])
        if pod.get("status", {}).get("phase") == "Running" and spec.get("nodeName"):
            running += GPUS
    free = capacity - taken
    waiting = []
    for doc in jobs:
        name, status = doc["metadata"]["name"], doc.get("status") or {}
        tr, phase = tracks[name], _phase(doc)
        rendezvous = status.get("rendezvous") or {}
        if phase == "Running" and rendezvous.get("workers"):
            tr.running = t if tr.running is None else tr.running
            tr.rate = int(rendezvous["workers"]) if tr.finished is None else 0
        else:
            tr.rate = 0
        if phase == "Succeeded" and tr.succeeded is None:
            tr.succeeded = t
        for cond in status.get("conditions") or []:
            if cond.get("type") == "Preempted" and cond.get("status") == "True":
                tr.preemptions.add(f"{cond.get('reason')}@{cond.get('lastTransitionTime')}")
            said = str(cond.get("message") or "")
            queued = cond.get("type") == "Queued" and cond.get("status") == "True"
            if queued and said and len(tr.queued) < 8 and all(said != m for _, m in tr.queued):
                tr.queued.append((round(t, 1), said))
        if phase != "Succeeded" and tr.finished is None and name not in holding:
            waiting.append(specs[name])
    fits = any(j.min_workers * GPUS <= free for j in waiting)
    return Sample(t, running, free, len(waiting), fits)


def finish(core: Any, ns: str, job: dict[str, Any]) -> None:
    """Every member of the job's rendezvous Succeeded, as its kubelet would say."""
    members = ((job.get("status") or {}).get("rendezvous") or {}).get("members") or []
    for member in members:
        try:
            _discard(core.patch_namespaced_pod_status(
                member["pod"], ns, {"status": {"phase": "Succeeded"}},
                _content_type="application/merge-patch+json", _preload_content=False,
            ))  # fmt: skip
        except client.ApiException as err:
            if err.status != 404:  # a worker preemption removed meanwhile
                raise


def _discard(response: Any) -> None:
    """Done with a raw response: read its body, so the connection goes back clean."""
    response.drain_conn()
    response.release_conn()


def _items(response: Any) -> list[dict[str, Any]]:
    try:
        items: list[dict[str, Any]] = json.loads(response.data)["items"]
        return items
    finally:
        response.release_conn()


def _phase(job: dict[str, Any]) -> str:
    return str((job.get("status") or {}).get("phase") or "Pending")


# -- the report ------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear between closest ranks (numpy's default)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def bucket_means(result: Result, width: float, capacity: int, end: float) -> list[float | None]:
    """Time-weighted % of GPUs held by Running workers in each bucket; None past the end."""
    out: list[float | None] = []
    span = result.makespan if not math.isnan(result.makespan) else result.samples[-1].t
    for i in range(math.ceil(end / width)):
        a, b = i * width, min((i + 1) * width, end)
        if a >= span:
            out.append(None)
            continue
        held = 0.0
        for s, nxt in zip(result.samples, result.samples[1:], strict=False):
            lo, hi = max(a, s.t), min(b, nxt.t)
            if hi > lo:
                held += s.running_gpus * (hi - lo)
        out.append(100 * held / (capacity * (min(b, span) - a)))
    return out


def _ratio(ours: float, off: float) -> str:
    if math.isnan(ours) or math.isnan(off) or off == 0:
        return "-"
    return f"{ours / off:.2f}x"


def _f(value: float, digits: int = 0) -> str:
    return "-" if math.isnan(value) else f"{value:,.{digits}f}"


def report(
    args: argparse.Namespace,
    stream: Sequence[JobSpec],
    nodes: int,
    free: int,
    load: float,
    results: Sequence[Result],
) -> None:
    capacity = free * GPUS
    ours, off = results
    elastic = sum(1 for j in stream if j.min_workers < j.workers)
    shares = " / ".join(f"{n} {sum(1 for j in stream if j.klass == n)}" for n, _, _ in CLASSES)
    mean_workers = sum(j.workers for j in stream) / len(stream)
    print()
    print(
        f"cluster: {nodes} kwok nodes x {GPUS} GPUs; other tenants hold {nodes - free}, the "
        f"stream may use {free} nodes = {capacity} GPUs"
    )
    print(
        f"stream (seed {args.seed}): {len(stream)} DDLJobs of {min(SIZES)}-{max(SIZES)} workers x "
        f"{GPUS} GPUs (mean {mean_workers:.1f}), {elastic} elastic (minReplicas = half); "
        f"priorities {shares}"
    )
    lo, hi = (d * args.time_scale for d in DURATION_S)
    print(
        f"  work {lo:.0f}-{hi:.0f} s at full size; arrivals over "
        f"{args.window * args.time_scale:.0f} s; offered load {load:.2f} of the stream's GPUs "
        "over that window"
    )
    print(f"ours = the operator as shipped; off = {' '.join(MODES[1][1])}")

    end = max(r.makespan if not math.isnan(r.makespan) else r.samples[-1].t for r in results)
    columns = [bucket_means(r, args.bucket, capacity, end) for r in results]
    print(f"\nGPU utilisation: % of the stream's {capacity} GPUs held by Running workers")
    print(f"{'t (s)':>11} {'ours':>6} {'off':>6}")
    for i, row in enumerate(zip(*columns, strict=True)):
        a = i * args.bucket
        cells = " ".join(f"{'done' if v is None else f'{v:.0f}':>6}" for v in row)
        print(f"{f'{a:.0f}-{a + args.bucket:.0f}':>11} {cells}")

    print("\nwait from apply to Running (s)")
    print(
        f"{'priority':<9} {'jobs':>5} | {'ours p50':>8} {'p90':>6} {'max':>6} | "
        f"{'off p50':>8} {'p90':>6} {'max':>6} | p90 ours/off"
    )
    groups = [(n, [j for j in stream if j.klass == n]) for n, _, _ in CLASSES]
    for label, jobs in [*groups, ("all", list(stream))]:
        parts, p90s = [], []
        for r in results:
            w = r.waits(jobs)
            p50, p90, most = percentile(w, 0.5), percentile(w, 0.9), max(w, default=math.nan)
            p90s.append(p90)
            parts.append(f"{_f(p50, 1):>8} {_f(p90, 1):>6} {_f(most, 1):>6}")
        print(f"{label:<9} {len(jobs):>5} | {parts[0]} | {parts[1]} | {_ratio(*p90s)}")

    def idle(r: Result) -> float:
        return r.integral(lambda s: s.free_gpus if s.waiting else 0)

    def idle_fit(r: Result) -> float:
        return r.integral(lambda s: s.free_gpus if s.fits else 0)

    def util(r: Result) -> float:
        return 100 * r.integral(lambda s: s.running_gpus, r.makespan) / (capacity * r.makespan)

    def mean_wait(r: Result) -> float:
        w = r.waits(stream)
        return sum(w) / len(w) if w else math.nan

    def preempted(r: Result, reason: str) -> float:
        return sum(1 for tr in r.tracks.values() for p in tr.preemptions if p.startswith(reason))

    high = [j for j in stream if j.klass == "high"]
    rows: list[tuple[str, Callable[[Result], float], int, bool]] = [  # digits, with a ratio
        ("makespan (s)", lambda r: r.makespan, 0, True),
        ("mean GPU utilisation over the makespan (%)", util, 1, True),
        ("GPU-s idle while any job waited", idle, 0, True),
        ("GPU-s idle while a waiting job fit by count", idle_fit, 0, True),
        ("mean wait, all jobs (s)", mean_wait, 1, True),
        ("p90 wait, high priority (s)", lambda r: percentile(r.waits(high), 0.9), 1, True),
        ("max wait, all jobs (s)", lambda r: max(r.waits(stream), default=math.nan), 1, True),
        ("preemptions: jobs shrunk", lambda r: preempted(r, "Shrunk"), 0, False),
        ("preemptions: jobs suspended", lambda r: preempted(r, "Suspended"), 0, False),
        ("pods preempted by kube-scheduler", lambda r: r.scheduler_preemptions, 0, False),
        ("operator CPU time (s)", lambda r: r.cpu_s, 1, True),
        ("operator reconcile passes", lambda r: r.passes.count, 0, True),
        ("reconcile pass p99 (ms)", lambda r: 1000 * r.passes.quantile(0.99), 0, True),
    ]
    print(f"\n{'what':<44} {'ours':>10} {'off':>10} {'ours/off':>9}")
    for label, value, digits, with_ratio in rows:
        a, b = value(ours), value(off)
        ratio = _ratio(a, b) if with_ratio else ""
        print(f"{label:<44} {_f(a, digits):>10} {_f(b, digits):>10} {ratio:>9}".rstrip())
    print(
        "\nidle GPU-s: the stream's free GPUs (no pod bound or placed there) x time, summed while"
        "\nat least one applied job held no GPU; 'fit by count': while some waiting job's"
        "\nminReplicas x 8 GPUs were free (no topology requirement in this stream)."
    )
    for r in results:
        if r.unfinished:
            print(f"{r.mode}: {len(r.unfinished)} jobs unfinished at the timeout: {r.unfinished}")


if __name__ == "__main__":
    sys.exit(main())
