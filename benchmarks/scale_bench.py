"""The operator at cluster scale against the stock kube-scheduler, on one kwok cluster, in one run.

Run: .venv/bin/python benchmarks/scale_bench.py [--nodes 1000] [--unrelated-pods 3000]
     [--jobs 40] [--more-unrelated 10000,30000] [--breakdown]         (needs `make k8s`)

Builds `--nodes` kwok nodes with 8 GPUs each (4 zones x 10 racks), and `--unrelated-pods`
ordinary pods bound to them (no GPUs, like daemonsets). Then, in order: the same gang pods
as plain pods bound by kube-scheduler alone (apply -> all Running); `--jobs` DDLJobs of
`--workers` x 8 GPUs applied at once (apply -> every job Running, with its rendezvous);
one more job on that load, with one gang's worth of plain pods applied at the same moment.
Printed: both times and their ratio, the extra job's latency and the plain gang's, reconcile
pass p50/p99 from the operator's own histogram (its /metrics) and its decisions' (the pass
without API calls), and its peak RSS. For each of the two bursts, where the wait went: CPU
seconds by process and the API server's busiest request kinds; for the plain pods, and with
--breakdown for the jobs' too, the pods' created -> bound (kube-scheduler) and bound ->
Running (kwok) times, and each job's lag after its last pod ran (the operator's own share).
All timed ends are watched, not polled. With
--more-unrelated, unrelated pods are added up to each count and one more job and one plain
gang are timed again, side by side, with the passes of that step, to show what unrelated
pods cost us and what they cost the cluster itself.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import math
import os
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import urllib3
from kubernetes import client, config
from kubernetes.watch.watch import iter_resp_lines
from scheduler_compare import install_crds, kubectl, node_doc, pod_doc, start_kwok, start_operator

from ddl_localcluster.controlplane import ControlPlane, free_port, wait_for
from ddl_operator.api.constants import GROUP, LABEL_JOB, PLURAL, VERSION

ZONES, RACKS_PER_ZONE = 4, 10
GPUS_PER_NODE = 8
# Goals from the issue, for this 2-core machine.
GOAL_RATIO, GOAL_EXTRA_S, GOAL_P99_S, GOAL_RSS_MB = 2.0, 3.0, 0.100, 300.0
PASS_METRIC = "ddl_operator_reconcile_seconds"
# A pass's decision: the wait for the claim lock, placement and the claim; no API calls.
DECISION_METRIC = "ddl_operator_placement_seconds"


@dataclass
class Histogram:
    """Cumulative bucket counts of one Prometheus histogram, as scraped."""

    buckets: list[tuple[float, float]]  # (upper bound, cumulative count), ascending

    @property
    def count(self) -> float:
        return self.buckets[-1][1] if self.buckets else 0.0

    def __sub__(self, other: Histogram) -> Histogram:
        before = dict(other.buckets)
        return Histogram([(le, n - before.get(le, 0.0)) for le, n in self.buckets])

    def quantile(self, q: float) -> float:
        """Prometheus' histogram_quantile: linear inside the bucket the rank falls in."""
        total = self.count
        if total <= 0:
            return math.nan
        rank = q * total
        lower, below = 0.0, 0.0
        for le, cumulative in self.buckets:
            if cumulative >= rank:
                if math.isinf(le):
                    return lower
                inside = cumulative - below
                return lower + (le - lower) * ((rank - below) / inside if inside else 1.0)
            lower, below = le, cumulative
        return lower


def scrape(port: int, name: str = PASS_METRIC) -> Histogram:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    pattern = re.compile(rf'^{name}_bucket{{le="([^"]+)"}} (\S+)$', re.M)
    buckets = [(float(le), float(n)) for le, n in pattern.findall(text)]
    return Histogram(sorted(buckets))


def peak_rss_mb(pid: int) -> float:
    """The process' high-water mark of resident memory (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return math.nan


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks


def cpu_by_component(cp: ControlPlane) -> dict[str, float]:
    """CPU seconds used so far by each process of the control plane, and by this bench."""
    used = {name: cpu_seconds(pid) for name, pid in cp.running().items()}
    return {**used, "bench": sum(os.times()[:4])}  # with its kubectl children


def cpu_share(before: Mapping[str, float], after: Mapping[str, float], seconds: float) -> str:
    """Who used the CPU between two `cpu_by_component` readings, busiest first."""
    used = {name: after[name] - before.get(name, 0.0) for name in after}
    busy = sorted(used.items(), key=lambda item: -item[1])
    parts = ", ".join(f"{name} {s:.1f}" for name, s in busy if s >= 0.05)
    return f"CPU s in {seconds:.1f} s on {os.cpu_count()} cores: {parts}"


def api_requests(cp: ControlPlane) -> dict[tuple[str, str], float]:
    """The API server's request counts so far by (verb, resource), from its /metrics."""
    text = kubectl(cp, "get", "--raw", "/metrics")
    counts: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}", 1)[0]))
        resource = "/".join(x for x in (labels.get("resource"), labels.get("subresource")) if x)
        key = (labels.get("verb", ""), resource)
        counts[key] = counts.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def busiest_requests(
    before: Mapping[tuple[str, str], float], after: Mapping[tuple[str, str], float]
) -> str:
    """The ten request kinds the API server served most between two readings."""
    diff = {k: n - before.get(k, 0.0) for k, n in after.items()}
    top = sorted(((n, k) for k, n in diff.items() if n >= 1), reverse=True)[:10]
    return ", ".join(f"{verb} {resource} {n:.0f}" for n, (verb, resource) in top)


def create_all(cp: ControlPlane, docs: Sequence[dict[str, Any]], parallel: int = 6) -> None:
    """`kubectl create` in a few parallel processes (one per chunk)."""
    if not docs:
        return
    size = math.ceil(len(docs) / parallel)
    chunks = [docs[i : i + size] for i in range(0, len(docs), size)]

    def create(chunk: Sequence[dict[str, Any]]) -> None:
        body = json.dumps({"apiVersion": "v1", "kind": "List", "items": list(chunk)})
        kubectl(cp, "create", "-f", "-", input=body)

    with concurrent.futures.ThreadPoolExecutor(len(chunks)) as pool:
        list(pool.map(create, chunks))


class WriteProbe:
    """One small write (a ConfigMap annotation patch) every 0.25 s in its own thread, timed:
    the API server's round trip for a write under the same load, the floor under any pass
    that writes (pod creates, gate lifts and the status are writes, one after another)."""

    def __init__(self, cp: ControlPlane, namespace: str) -> None:
        self.api = client.CoreV1Api(config.new_client_from_config(str(cp.kubeconfig)))
        self.namespace = namespace
        self.api.create_namespaced_config_map(
            namespace, {"metadata": {"name": "write-probe"}, "data": {}}
        )
        self.seconds: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        n = 0
        while not self._stop.wait(0.25):
            n += 1
            began = time.monotonic()
            patch = {"metadata": {"annotations": {"probe": str(n)}}}
            self.api.patch_namespaced_config_map("write-probe", self.namespace, patch)
            self.seconds.append(time.monotonic() - began)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


Lister = Callable[..., Any]


Listed = tuple[dict[str, Any], str]  # objects by name, and the list's resourceVersion


def watch_until(
    lister: Lister,
    what: str,
    done: Callable[[Mapping[str, Any]], bool],
    timeout: float,
    start: Listed | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Watch from a list (`start`, else one made now) until `done(objects by name)`; returns
    early, quietly, once `stop` is set. Relists when the watch's version expired or its
    connection broke, as informers do.

    The timed waits watch rather than poll: polling with kubectl forks a process and lists
    the namespace every time, on the same two cores the operator and the cluster run on,
    and the heavier the objects (a DDLJob's status), the more the observer slows the observed.
    """
    deadline = time.monotonic() + timeout
    objects, version = start or _listed(lister)
    while not done(objects):
        if stop is not None and stop.is_set():
            return
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
        try:
            resp = lister(
                watch=True,
                resource_version=version,
                allow_watch_bookmarks=True,
                timeout_seconds=max(1, int(min(left, 5))),
                _request_timeout=60,
                _preload_content=False,
            )
            try:
                for line in iter_resp_lines(resp):
                    event = json.loads(line) if line else None
                    if event is None:
                        continue
                    obj, kind = event["object"], event["type"]
                    if kind == "ERROR":
                        if obj.get("code") != 410:
                            raise RuntimeError(f"watch for {what}: {obj.get('message')}")
                        objects, version = _listed(lister)  # the version expired
                        break
                    version = obj["metadata"]["resourceVersion"]
                    if kind == "DELETED":
                        objects.pop(obj["metadata"]["name"], None)
                    elif kind != "BOOKMARK":
                        objects[obj["metadata"]["name"]] = obj
                    if done(objects) or (stop is not None and stop.is_set()):
                        return
            finally:
                resp.close()
                resp.release_conn()
        except (client.ApiException, urllib3.exceptions.HTTPError) as err:
            if isinstance(err, client.ApiException) and err.status not in (410, 429, 500, 503):
                raise
            objects, version = _listed(lister)  # expired or broken: list again


def _listed(lister: Lister) -> Listed:
    listed = json.loads(lister(_preload_content=False).data)
    objects = {o["metadata"]["name"]: o for o in listed["items"]}
    return objects, listed["metadata"]["resourceVersion"]


def watched_while(
    lister: Lister,
    what: str,
    done: Callable[[Mapping[str, Any]], bool],
    action: Callable[[], None],
    timeout: float,
) -> float:
    """Seconds from the start of `action()` until `done`, watched (in a thread) from a list
    made before it, so that what the action creates is seen as it comes. The watch stops
    when the action fails."""
    start = _listed(lister)
    stop = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        watched = pool.submit(watch_until, lister, what, done, timeout, start, stop)
        try:
            began = time.monotonic()
            action()
            watched.result()
        finally:
            stop.set()
    return time.monotonic() - began


def pods_running(
    cp: ControlPlane, ns: str, names: Collection[str], create: Callable[[], None], timeout: float
) -> tuple[float, PodStages]:
    """`create()` the pods `names` of `ns`; seconds until every one of them is Running, and
    when each was bound and ran."""
    api = client.CoreV1Api(config.new_client_from_config(str(cp.kubeconfig)))
    stages = PodStages()
    wanted = set(names)

    def done(pods: Mapping[str, Any]) -> bool:
        stages(pods)
        return all(
            (pods.get(name, {}).get("status") or {}).get("phase") == "Running" for name in wanted
        )

    lister = functools.partial(api.list_namespaced_pod, ns)
    seconds = watched_while(lister, f"{len(wanted)} pods of {ns} running", done, create, timeout)
    return seconds, stages


def count(cp: ControlPlane, *args: str) -> int:
    out = kubectl(cp, "get", *args, "-o", "name")
    return len(out.split())


def wait_all_running(cp: ControlPlane, ns: str, timeout: float) -> None:
    """Until no pod of `ns` is anything but Running (cheap on the server: names only)."""
    wait_for(
        f"every pod of {ns} running",
        lambda: count(cp, "pods", "-n", ns, "--field-selector=status.phase!=Running") == 0,
        timeout,
        lambda: kubectl(cp, "get", "pods", "-n", ns, "--field-selector=status.phase!=Running"),
    )


def settled(node: dict[str, Any]) -> bool:
    """Ready, and no longer tainted not-ready: the node lifecycle controller lifts that taint
    some time after the node turns Ready (about ten nodes a second), and until then neither
    scheduler may place a pod there, while each lift is a node event to both."""
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in (node.get("status") or {}).get("conditions") or []
    )
    taints = (node.get("spec") or {}).get("taints") or []
    return ready and not any(t.get("key") == "node.kubernetes.io/not-ready" for t in taints)


def wait_nodes_ready(cp: ControlPlane, want: int, timeout: float) -> None:
    """Until `want` nodes are settled, saying how many are every 30 s; on timeout, how far
    they got (at thousands of nodes on two cores, kwok's heartbeats are what limits)."""
    started = last = time.monotonic()
    while True:
        nodes = json.loads(kubectl(cp, "get", "nodes", "-o", "json"))["items"]
        ready = sum(1 for node in nodes if settled(node))
        elapsed = time.monotonic() - started
        if ready >= want:
            return
        if elapsed > timeout:
            raise RuntimeError(f"{ready} of {want} kwok nodes settled after {elapsed:.0f}s")
        if time.monotonic() - last >= 30:
            print(f"  {ready} of {want} nodes Ready and untainted after {elapsed:.0f}s", flush=True)
            last = time.monotonic()
        time.sleep(5)


def unrelated_pods(nodes: Sequence[str], start: int, stop: int) -> list[dict[str, Any]]:
    """Ordinary pods bound round-robin to the nodes, without GPUs."""
    docs = []
    for i in range(start, stop):
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": f"u{i}", "namespace": "unrelated", "labels": {"app": "u"}},
                "spec": {
                    "nodeName": nodes[i % len(nodes)],
                    "containers": [
                        {
                            "name": "c",
                            "image": "sidecar",
                            "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}},
                        }
                    ],
                },
            }
        )
    return docs


def ddljob(name: str, ns: str, workers: int, gpus: int) -> dict[str, Any]:
    return {
        "apiVersion": "ddl-operator.dev/v1alpha1",
        "kind": "DDLJob",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "replicas": workers,
            "gpusPerWorker": gpus,
            "failurePolicy": {"backoffSeconds": 0},
            "template": {"spec": {"containers": [{"name": "w", "image": "trainer"}]}},
        },
    }


def time_stock_gang(cp: ControlPlane, ns: str, tag: str, workers: int) -> float:
    """One gang's worth of plain pods, bound by kube-scheduler alone, under the same load:
    what the cluster itself takes to start `workers` pods (apply -> all Running)."""
    pods = [pod_doc(f"{tag}-w{i}", ns, GPUS_PER_NODE) for i in range(workers)]
    names = [p["metadata"]["name"] for p in pods]
    return pods_running(cp, ns, names, lambda: create_all(cp, pods, parallel=1), 600)[0]


def side_by_side(cp: ControlPlane, tag: str, workers: int) -> tuple[float, float]:
    """One more DDLJob and one plain gang of the same pods, applied at the same moment, so
    both meet the same cluster: (ours, stock) seconds until Running."""
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        ours = pool.submit(
            time_jobs, cp, "ours", [ddljob(f"extra{tag}", "ours", workers, GPUS_PER_NODE)], 600
        )
        stock = pool.submit(time_stock_gang, cp, "stock-gangs", f"g{tag}", workers)
        return ours.result(), stock.result()


def running_jobs(jobs: Mapping[str, Any], names: Collection[str]) -> set[str]:
    """The jobs of `names` that run with a rendezvous; raises if one failed."""
    status = {n: (j.get("status") or {}) for n, j in jobs.items() if n in names}
    failed = sorted(n for n, s in status.items() if s.get("phase") == "Failed")
    if failed:
        raise RuntimeError(f"DDLJobs failed: {failed}: {[status[n] for n in failed]}")
    return {
        n
        for n, s in status.items()
        if s.get("phase") == "Running" and (s.get("rendezvous") or {}).get("workers")
    }


class FirstSeen:
    """When each of `names` was first seen done, for watch_until's predicate."""

    def __init__(self, names: Collection[str], done: Callable[[Mapping[str, Any]], set[str]]):
        self.names, self.done = set(names), done
        self.at: dict[str, float] = {}

    def __call__(self, objects: Mapping[str, Any]) -> bool:
        now = time.monotonic()
        for name in self.done(objects) - self.at.keys():
            self.at[name] = now
        return self.names <= self.at.keys()


class PodStages:
    """When each pod was first seen created, bound to a node and Running (a watch predicate's
    side effect), so a wait splits into kube-scheduler's part and kwok's."""

    def __init__(self) -> None:
        self.seen: dict[str, list[float | None]] = {}
        self.versions: dict[str, set[str]] = {}

    def __call__(self, pods: Mapping[str, Any]) -> bool:
        """Stamps what is new; never done by itself (False)."""
        now = time.monotonic()
        for name, pod in pods.items():
            stamps = self.seen.setdefault(name, [now, None, None])
            self.versions.setdefault(name, set()).add(pod["metadata"]["resourceVersion"])
            if stamps[1] is None and (pod.get("spec") or {}).get("nodeName"):
                stamps[1] = now
            if stamps[2] is None and (pod.get("status") or {}).get("phase") == "Running":
                stamps[2] = now
        return False

    def summary(self) -> str:
        bound: list[float] = []
        ran: list[float] = []
        for created, bound_at, running_at in self.seen.values():
            if created is not None and bound_at is not None and running_at is not None:
                bound.append(bound_at - created)
                ran.append(running_at - bound_at)
        versions = [len(v) for v in self.versions.values()]
        per_pod = statistics.median(versions) if versions else 0
        return (
            f"created -> bound {_spread(bound)}; bound -> Running {_spread(ran)}; "
            f"{per_pod:g} versions per pod (p50)"
        )


def _spread(values: Sequence[float]) -> str:
    if not values:
        return "-"
    return f"p50 {statistics.median(values):.2f}s, max {max(values):.2f}s"


def gangs_running(pods: Mapping[str, Any], sizes: Mapping[str, int]) -> set[str]:
    """The jobs of `sizes` whose worker pods are all there and Running."""
    running: dict[str, int] = {}
    for pod in pods.values():
        job = str((pod["metadata"].get("labels") or {}).get(LABEL_JOB))
        if job in sizes and (pod.get("status") or {}).get("phase") == "Running":
            running[job] = running.get(job, 0) + 1
    return {job for job, n in running.items() if n >= sizes[job]}


def time_jobs(
    cp: ControlPlane,
    ns: str,
    jobs: Sequence[dict[str, Any]],
    timeout: float,
    say: Callable[[str], None] = lambda _: None,
    breakdown: bool = False,
) -> float:
    """Apply `jobs` at once; seconds until all of them run with a rendezvous (watched).

    `say` hears how long the create took (kubectl creates a List's items one by one, so the
    last job arrives that much after the first). With `breakdown`, a watch of the jobs' pods
    beside that of the jobs also tells how long after its last pod turned Running each job
    did (the operator's own share of the wait) and the pods' stages; that watch is one more
    watcher of every pod event, so it is off unless asked for."""
    api_client = config.new_client_from_config(str(cp.kubeconfig))
    jobs_api, core = client.CustomObjectsApi(api_client), client.CoreV1Api(api_client)
    names = {j["metadata"]["name"] for j in jobs}
    sizes = {j["metadata"]["name"]: int(j["spec"]["replicas"]) for j in jobs}
    pods_seen = FirstSeen(names, lambda pods: gangs_running(pods, sizes))
    jobs_seen = FirstSeen(names, lambda objects: running_jobs(objects, names))
    stages = PodStages()
    body = json.dumps({"apiVersion": "v1", "kind": "List", "items": list(jobs)})

    def create_and_wait() -> None:
        began = time.monotonic()
        kubectl(cp, "create", "-f", "-", input=body)
        say(f"{len(jobs)} DDLJobs created in {time.monotonic() - began:.1f}s (kubectl, in turn)")
        try:
            watch_until(
                functools.partial(
                    jobs_api.list_namespaced_custom_object, GROUP, VERSION, ns, PLURAL
                ),
                f"{len(names)} DDLJobs of {ns} running",
                jobs_seen,
                timeout,
            )
        except RuntimeError as err:
            raise RuntimeError(f"{err}:\n{kubectl(cp, 'get', 'ddlj', '-n', ns)}") from None

    if not breakdown:
        started = time.monotonic()
        create_and_wait()
        return time.monotonic() - started
    started = time.monotonic()
    total = watched_while(
        functools.partial(core.list_namespaced_pod, ns),
        f"the pods of {len(names)} DDLJobs of {ns} running",
        lambda objects: stages(objects) or pods_seen(objects),
        create_and_wait,
        timeout,
    )
    lags = sorted(jobs_seen.at[n] - pods_seen.at[n] for n in names)
    say(
        f"  a job Running after its last pod did: p50 {statistics.median(lags):.2f}s, "
        f"max {lags[-1]:.2f}s; all pods Running {max(pods_seen.at.values()) - started:.1f}s "
        f"after the create"
    )
    say(f"  pods: {stages.summary()}")
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--unrelated-pods", type=int, default=3000)
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--workers", type=int, default=8, help="workers per job (8 GPUs each)")
    parser.add_argument(
        "--more-unrelated",
        default="",
        help="comma-separated larger unrelated-pod counts to step up to afterwards",
    )
    parser.add_argument(
        "--operator-arg", action="append", default=[], help="passed to the operator"
    )
    parser.add_argument("--operator-log", type=Path, help="copy the operator's log here")
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="also watch the jobs' pods: their stages and each job's lag after them",
    )
    parser.add_argument(
        "--lease-seconds",
        type=int,
        default=40,
        help="kwok's node lease duration (under the 300 s grace; longer = fewer writes)",
    )
    args = parser.parse_args(argv)
    more = [int(x) for x in args.more_unrelated.split(",") if x]
    # The jobs, then per row one more job and one stock gang beside it.
    wanted = (args.jobs + 2 * (1 + len(more))) * args.workers
    if wanted > args.nodes:
        parser.error(f"{wanted} workers of 8 GPUs do not fit on {args.nodes} nodes of 8")
    with tempfile.TemporaryDirectory() as tmp:
        cp = ControlPlane(Path(tmp) / "cp")
        # A thousand kwok nodes on a busy machine miss the tests' 20 s heartbeat grace now
        # and then; a NotReady node costs a gang its worker and the run its meaning.
        cp.start(node_grace_seconds=300)
        try:
            return run(cp, args, more)
        finally:
            cp.stop()
            if args.operator_log and cp.log("ddl-operator").exists():
                shutil.copy(cp.log("ddl-operator"), args.operator_log)


def run(cp: ControlPlane, args: argparse.Namespace, more: list[int]) -> int:
    t_setup = time.monotonic()
    install_crds(cp)
    # Leases, renewed a quarter of their duration apart: kwok's default status heartbeat
    # (20-45 s apart) would let the control plane's grace period mark busy nodes NotReady.
    # Each renewal is a write; at thousands of nodes a longer lease keeps them affordable.
    start_kwok(cp, f"--node-lease-duration-seconds={args.lease_seconds}")
    per_rack = math.ceil(args.nodes / (ZONES * RACKS_PER_ZONE))
    nodes: list[str] = []
    docs = []
    for z in range(ZONES):
        for r in range(RACKS_PER_ZONE):
            for n in range(per_rack):
                if len(nodes) < args.nodes:
                    name = f"z{z}-r{r}-n{n}"
                    nodes.append(name)
                    docs.append(node_doc(name, z, r))
    create_all(cp, docs)
    wait_nodes_ready(cp, len(nodes), timeout=120 + 0.25 * len(nodes))
    kubectl(cp, "create", "namespace", "unrelated")
    create_all(cp, unrelated_pods(nodes, 0, args.unrelated_pods))
    wait_all_running(cp, "unrelated", timeout=1800)
    print(
        f"cluster: {len(nodes)} kwok nodes x {GPUS_PER_NODE} GPUs, {args.unrelated_pods} "
        f"unrelated pods running (built in {time.monotonic() - t_setup:.0f}s)",
        flush=True,
    )

    metrics_port = free_port()
    pid = start_operator(cp, metrics_port, *args.operator_arg)
    wait_for(
        "operator /metrics",
        lambda: _scrapes(metrics_port),
        120,
        lambda: cp.log_tail("ddl-operator"),
    )
    time.sleep(2)  # its first lists

    # Stock: the same pods, plain, bound by kube-scheduler alone.
    gangs = args.jobs * args.workers
    kubectl(cp, "create", "namespace", "stock")
    stock_pods = [pod_doc(f"w{i}", "stock", GPUS_PER_NODE) for i in range(gangs)]
    used, requests = cpu_by_component(cp), api_requests(cp)
    stock_names = [p["metadata"]["name"] for p in stock_pods]
    stock_s, stages = pods_running(
        cp, "stock", stock_names, lambda: create_all(cp, stock_pods, parallel=1), 1800
    )
    print(f"stock kube-scheduler: {gangs} pods running in {stock_s:.1f}s", flush=True)
    print(f"  pods: {stages.summary()}", flush=True)
    print(f"  {cpu_share(used, cpu_by_component(cp), stock_s)}", flush=True)
    print(f"  requests: {busiest_requests(requests, api_requests(cp))}", flush=True)
    kubectl(cp, "delete", "namespace", "stock", "--wait=true", "--timeout=280s")

    kubectl(cp, "create", "namespace", "ours")
    probe = WriteProbe(cp, "ours")
    before = scrape(metrics_port)
    decided_before = scrape(metrics_port, DECISION_METRIC)
    jobs = [ddljob(f"job{i}", "ours", args.workers, GPUS_PER_NODE) for i in range(args.jobs)]
    used, requests = cpu_by_component(cp), api_requests(cp)
    ours_s = time_jobs(
        cp, "ours", jobs, 3600, lambda line: print(line, flush=True), breakdown=args.breakdown
    )
    print(f"operator: {args.jobs} DDLJobs running in {ours_s:.1f}s", flush=True)
    print(f"  {cpu_share(used, cpu_by_component(cp), ours_s)}", flush=True)
    print(f"  requests: {busiest_requests(requests, api_requests(cp))}", flush=True)
    burst = scrape(metrics_port) - before
    burst_decisions = scrape(metrics_port, DECISION_METRIC) - decided_before
    burst_writes = list(probe.seconds)
    writes = (
        statistics.quantiles(burst_writes, n=100, method="inclusive")
        if len(burst_writes) > 1
        else []
    )
    kubectl(cp, "create", "namespace", "stock-gangs")
    extra_s, stock_gang_s = side_by_side(cp, "", args.workers)
    passes = scrape(metrics_port)
    rss = peak_rss_mb(pid)
    cpu = cpu_seconds(pid)
    restarts = sum(
        (j.get("status") or {}).get("restarts", 0)
        for j in json.loads(kubectl(cp, "get", "ddlj", "-n", "ours", "-o", "json"))["items"]
    )

    rows = [(args.unrelated_pods, stock_gang_s, extra_s, passes - before, rss)]
    total = args.unrelated_pods
    for target in more:
        create_all(cp, unrelated_pods(nodes, total, target))
        wait_all_running(cp, "unrelated", timeout=3600)
        total = target
        time.sleep(5)  # let the cache take the new pods in
        mark = scrape(metrics_port)
        extra, stock = side_by_side(cp, f"-{target}", args.workers)
        rows.append((target, stock, extra, scrape(metrics_port) - mark, peak_rss_mb(pid)))
    probe.stop()

    ratio = ours_s / stock_s
    p50, p99 = passes.quantile(0.5), passes.quantile(0.99)
    print()
    print(
        f"{len(nodes)} nodes, {args.unrelated_pods} unrelated pods, {args.jobs} jobs x "
        f"{args.workers} workers x {GPUS_PER_NODE} GPUs ({gangs} pods)"
    )
    print(f"{'what':<52} {'value':>10}  goal")
    table = [
        ("stock kube-scheduler, same pods, all Running (s)", f"{stock_s:.1f}", ""),
        ("operator, all DDLJobs Running with rendezvous (s)", f"{ours_s:.1f}", ""),
        ("ratio ours / stock", f"{ratio:.2f}x", _goal(ratio <= GOAL_RATIO, f"<= {GOAL_RATIO}x")),
        ("one more job Running under that load (s)", f"{extra_s:.2f}",
         _goal(extra_s <= GOAL_EXTRA_S, f"<= {GOAL_EXTRA_S} s")),
        ("the same gang as plain pods beside it, kube-scheduler (s)", f"{stock_gang_s:.2f}", ""),
        (f"reconcile pass p50 ({int(passes.count)} passes)", f"{p50 * 1000:.0f} ms", ""),
        ("reconcile pass p99", f"{p99 * 1000:.0f} ms",
         _goal(p99 <= GOAL_P99_S, f"<= {GOAL_P99_S * 1000:.0f} ms")),
        ("pass p99 during the burst of jobs", f"{burst.quantile(0.99) * 1000:.0f} ms", ""),
        ("pass p99 after it (one more job, resyncs)",
         f"{(passes - before - burst).quantile(0.99) * 1000:.0f} ms", ""),
        (f"decision in the burst, p50 ({int(burst_decisions.count)}; no API calls)",
         f"{burst_decisions.quantile(0.5) * 1000:.0f} ms", ""),
        ("decision in the burst, p99 (claim lock, placement, claim)",
         f"{burst_decisions.quantile(0.99) * 1000:.0f} ms", ""),
        (f"one API write during the burst, p50 ({len(burst_writes)} writes)",
         f"{(writes[49] if writes else math.nan) * 1000:.0f} ms", ""),
        ("one API write during the burst, p99",
         f"{(writes[98] if writes else math.nan) * 1000:.0f} ms", ""),
        ("operator peak RSS", f"{rss:.0f} MB",
         _goal(rss <= GOAL_RSS_MB, f"<= {GOAL_RSS_MB:.0f} MB")),
        ("operator CPU time, whole run", f"{cpu:.1f} s", ""),
        ("gang restarts (workers lost to NotReady nodes)", f"{restarts}", "0 expected"),
    ]  # fmt: skip
    for what, value, goal in table:
        print(f"{what:<52} {value:>10}  {goal}")
    if len(rows) > 1:
        print(f"\n{'unrelated pods':>15} {'stock gang (s)':>15} {'one more job (s)':>17} "
              f"{'ratio':>6} {'pass p50':>9} {'pass p99':>9} {'peak RSS':>9}")  # fmt: skip
        for pods, stock, extra, hist, peak in rows:
            print(
                f"{pods:>15} {stock:>15.2f} {extra:>17.2f} {extra / stock:>5.2f}x "
                f"{hist.quantile(0.5) * 1000:>6.0f} ms {hist.quantile(0.99) * 1000:>6.0f} ms "
                f"{peak:>6.0f} MB"
            )
    return 0


def _goal(met: bool, text: str) -> str:
    return f"{text} {'met' if met else 'MISSED'}"


def _scrapes(port: int) -> bool:
    try:
        scrape(port)
    except OSError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
