"""`ddl-cluster demo`: the whole product on one machine, from a clean start to a trained job.

Starts the control plane and the local node agent (simulated GPU nodes, one network namespace
per node and pod, shaped inter-node links), `helm install`s the operator chart so the operator
runs as a pod under the chart's RBAC, applies examples/demo-job.yaml and follows it until it
succeeds. Everything keeps running afterwards for a look around; `ddl-cluster down` stops it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ddl_localcluster import netns
from ddl_localcluster.controlplane import REPO_ROOT, ControlPlane, binary, free_port
from ddl_operator.api.constants import ANNOTATION_REPORT

CLUSTER = REPO_ROOT / "examples" / "local-cluster.yaml"
JOB = REPO_ROOT / "examples" / "demo-job.yaml"
CHART = REPO_ROOT / "charts" / "ddl-operator"
RELEASE, RELEASE_NS = "ddl", "ddl-system"
CHECKPOINTS = Path("/tmp/ddl-demo")


def say(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def kubectl(cp: ControlPlane, *args: str, input: str | None = None) -> str:
    return cp.kubectl(*args, input=input)


def helm(cp: ControlPlane, *args: str) -> str:
    proc = subprocess.run(
        [str(binary("helm")), f"--kubeconfig={cp.kubeconfig}", *args],
        capture_output=True,
        text=True,
        timeout=360,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"helm {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def start_cluster(cp: ControlPlane, cluster: Path = CLUSTER) -> None:
    """Control plane, node agent (simulating `cluster`) and the operator chart; reuses
    whatever already runs."""
    running = cp.running()
    if "kube-apiserver" not in running:
        say("starting the control plane (etcd, kube-apiserver, controller-manager, scheduler)")
        cp.start(progress=lambda m: say(f"  {m}"))
    if "nodeagent" not in running:
        say(f"starting the node agent: {cluster.relative_to(REPO_ROOT)}")
        cp.start_node_agent(cluster)
    say("helm install the operator chart (the operator runs as a pod under its RBAC)")
    helm(
        cp,
        "upgrade",
        "--install",
        RELEASE,
        str(CHART),
        "-n",
        RELEASE_NS,
        "--create-namespace",
        "--wait",
        "--timeout=5m",
    )
    kubectl(
        cp,
        "rollout",
        "status",
        f"deployment/{RELEASE}-ddl-operator",
        "-n",
        RELEASE_NS,
        "--timeout=180s",
    )


def start_prometheus(cp: ControlPlane) -> str:
    """Prometheus in the namespace that reaches every pod, published on a host port.

    Scrape targets (worker pods' and the operator pod's metrics ports) come from a file the
    demo rewrites as pods come and go. Returns the host URL.
    """
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        raise RuntimeError("prometheus is not installed: `make system-deps` (Debian's prometheus)")
    pdir = cp.dir / "prometheus"
    pdir.mkdir(exist_ok=True)
    config = {
        "global": {"scrape_interval": "2s", "evaluation_interval": "2s"},
        "scrape_configs": [
            # Worker metrics carry their own job/namespace labels: keep them.
            {
                "job_name": "ddl-workers",
                "honor_labels": True,
                "file_sd_configs": [{"files": [str(pdir / "workers.json")]}],
            },
            {
                "job_name": "ddl-operator",
                "file_sd_configs": [{"files": [str(pdir / "operator.json")]}],
            },
        ],
    }
    for name in ("workers.json", "operator.json"):
        if not (pdir / name).exists():
            (pdir / name).write_text("[]")
    (pdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    state = cp.state()
    port = state.get("ports", {}).get("prometheus") or free_port()
    state.setdefault("ports", {})["prometheus"] = port
    cp.save(state)
    running = cp.running()
    spine = netns_of(cp)
    inside = ["ip", "netns", "exec", spine] if spine else []
    listen = "127.0.0.1:9090" if spine else f"127.0.0.1:{port}"
    if "prometheus" not in running:
        cp.spawn(
            "prometheus",
            [
                *inside,
                prometheus,
                f"--config.file={pdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={pdir / 'data'}",
                f"--web.listen-address={listen}",
            ],
        )
    if spine and "prometheus-relay-in" not in running:
        sock = str(pdir / "web.sock")
        cp.spawn(
            "prometheus-relay-in",
            [
                *inside,
                sys.executable,
                "-m",
                "ddl_localcluster.forward",
                "unix-to-tcp",
                "--unix",
                sock,
                "--connect",
                "127.0.0.1:9090",
            ],
        )
        cp.spawn(
            "prometheus-relay-out",
            [
                sys.executable,
                "-m",
                "ddl_localcluster.forward",
                "tcp-to-unix",
                "--listen",
                f"127.0.0.1:{port}",
                "--unix",
                sock,
            ],
        )
    return f"http://127.0.0.1:{port}"


def netns_of(cp: ControlPlane) -> str | None:
    """The node agent's spine namespace, which reaches every pod; None in loopback mode."""
    name = f"ddl{netns.tag(cp.dir / 'nodeagent')}-spine"
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    return name if name in listed.stdout else None


def update_targets(cp: ControlPlane) -> None:
    """Point Prometheus at every running worker pod and the operator pod."""
    pods = json.loads(kubectl(cp, "get", "pods", "-A", "-o", "json"))["items"]
    workers, operators = [], []
    for pod in pods:
        ip = pod.get("status", {}).get("podIP")
        labels = pod["metadata"].get("labels", {})
        if not ip or pod["status"].get("phase") != "Running":
            continue
        if labels.get("ddl-operator.dev/role") == "worker":
            workers.append(f"{ip}:9400")
        elif labels.get("app.kubernetes.io/name") == "ddl-operator":
            operators.append(f"{ip}:9090")
    pdir = cp.dir / "prometheus"
    for name, targets in (("workers.json", workers), ("operator.json", operators)):
        tmp = pdir / f".{name}"
        tmp.write_text(json.dumps([{"targets": sorted(targets)}]))
        tmp.replace(pdir / name)


def prometheus_query(url: str, expr: str) -> list[dict[str, Any]]:
    full = f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(full, timeout=10) as response:
        result: list[dict[str, Any]] = json.loads(response.read())["data"]["result"]
        return result


def print_prometheus_summary(url: str, job: str) -> None:
    """What Prometheus scraped from the job, read back through its HTTP API."""
    sel = f'job="{job}"'
    summary = {
        "samples trained": f"sum(max_over_time(ddl_samples_total{{{sel}}}[10m]))",
        "sync-wait seconds": f"sum(max_over_time(ddl_sync_wait_seconds_total{{{sel}}}[10m]))",
        "allreduce MB, intra-node tier": (
            f'sum(max_over_time(ddl_allreduce_bytes_total{{{sel},tier="intra"}}[10m])) / 1e6'
        ),
        "allreduce MB, inter-node tier": (
            f'sum(max_over_time(ddl_allreduce_bytes_total{{{sel},tier="inter"}}[10m])) / 1e6'
        ),
    }
    for label, expr in summary.items():
        try:
            result = prometheus_query(url, expr)
        except OSError as error:
            say(f"  Prometheus: {label}: unavailable ({error})")
            continue
        value = float(result[0]["value"][1]) if result else float("nan")
        say(f"  Prometheus: {label} = {value:,.1f}")


class JobWatch:
    """Polls the job, prints a line whenever its phase, epoch or progress changes."""

    def __init__(self, cp: ControlPlane, name: str, namespace: str = "default") -> None:
        self.cp = cp
        self.name = name
        self.namespace = namespace
        self.status: dict[str, Any] = {}
        self._last_line = ""
        self._targets_at = 0.0

    def poll(self) -> dict[str, Any]:
        job = json.loads(
            kubectl(self.cp, "get", "ddlj", self.name, "-n", self.namespace, "-o", "json")
        )
        status: dict[str, Any] = job.get("status", {})
        line = (
            f"{status.get('phase', 'Pending'):9} epoch={status.get('epoch', 0)} "
            f"ready={status.get('readyReplicas', 0)}/{job['spec']['replicas']} "
            f"step={status.get('step', 0)} "
            f"throughput={status.get('throughput', 0):.1f} samples/s "
            f"sync-wait={status.get('syncWaitRatio', 0):.0%}"
        )
        if status.get("message"):
            line += f"  ({status['message']})"
        if line != self._last_line:
            say(line)
            self._last_line = line
        if (self.cp.dir / "prometheus").is_dir() and time.monotonic() - self._targets_at > 2:
            update_targets(self.cp)
            self._targets_at = time.monotonic()
        self.status = status
        return status

    def until(self, what: str, check: Any, timeout: float, *, finished_ok: bool = False) -> float:
        """Seconds until check(status); fails if the job ends first (unless finished_ok)."""
        began = time.monotonic()
        while time.monotonic() - began < timeout:
            status = self.poll()
            if check(status):
                return time.monotonic() - began
            if status.get("phase") in TERMINAL and not finished_ok:
                raise RuntimeError(f"job {self.name} ended before {what}: {status}")
            time.sleep(0.5)
        raise RuntimeError(f"{what}: not reached within {timeout:.0f}s; status: {self.status}")

    def train_for(self, seconds: float) -> None:
        """Let the job train for a while (the trainer is paced: a fixed number of steps)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.poll().get("phase") in TERMINAL:
                raise RuntimeError(f"job {self.name} ended early: {self.status}")
            time.sleep(0.5)


TERMINAL = ("Succeeded", "Failed")
RACK = "topology.kubernetes.io/rack"
REPORT = ANNOTATION_REPORT


def membership(status: Mapping[str, Any]) -> dict[str, Any]:
    rdzv: dict[str, Any] = status.get("rendezvous") or {}
    return rdzv


def running_with(workers: int, after_epoch: int = 0) -> Any:
    """A check: the job runs a membership of this many workers, newer than after_epoch."""

    def check(status: Mapping[str, Any]) -> bool:
        rdzv = membership(status)
        return bool(
            status.get("phase") == "Running"
            and rdzv.get("workers") == workers
            and rdzv.get("epoch", 0) > after_epoch
        )

    return check


def contiguous_domains(members: list[Mapping[str, Any]], key: str) -> dict[str, list[int]]:
    """Ranks per domain of one level (the node: key ""), in rank order."""
    by_domain: dict[str, list[int]] = {}
    for m in sorted(members, key=lambda m: int(m["rank"])):
        domain = m["node"] if not key else m.get("domains", {}).get(key, "?")
        by_domain.setdefault(domain, []).append(int(m["rank"]))
    return by_domain


def is_contiguous(by_domain: Mapping[str, list[int]]) -> bool:
    return all(
        ranks == list(range(ranks[0], ranks[0] + len(ranks))) for ranks in by_domain.values()
    )


def show_membership(rdzv: Mapping[str, Any]) -> bool:
    """Prints the rank map and grid; True when ranks of every node and rack are contiguous."""
    members = list(rdzv.get("members", []))
    say(
        f"  epoch {rdzv['epoch']}: {rdzv['workers']} workers, grid "
        f"{'x'.join(map(str, rdzv['grid']))} (processes per node, nodes per rack, racks)"
    )
    for m in sorted(members, key=lambda m: int(m["rank"])):
        say(f"    rank {m['rank']}: {m['pod']} on {m['node']} ({m['domains'].get(RACK, '?')})")
    nodes, racks = contiguous_domains(members, ""), contiguous_domains(members, RACK)
    ranges = ", ".join(
        f"{rack} = ranks {ranks[0]}-{ranks[-1]}" if len(ranks) > 1 else f"{rack} = rank {ranks[0]}"
        for rack, ranks in racks.items()
    )
    packed = is_contiguous(nodes) and is_contiguous(racks)
    say(f"  {ranges}; ranks of each node and rack contiguous: {'yes' if packed else 'NO'}")
    return packed


TRAINING = re.compile(
    r"training in epoch (\d+) from (?:checkpoint step (\d+)|step 0)"
    r"(?:; epoch \d+ had reached step (\d+): (\d+) steps redone)?"
)


@dataclass
class Reform:
    """From an action to training again: the memberships passed through, and what it cost."""

    seconds: float
    workers_by_epoch: dict[int, int]
    rendezvous: dict[str, Any]
    resumed_from: int
    redone: int


def pod_report(cp: ControlPlane, pod: str, namespace: str = "default") -> dict[str, Any] | None:
    """The agent's report annotation on pod (what the operator reads), or None."""
    try:
        found_pod = json.loads(kubectl(cp, "get", "pod", pod, "-n", namespace, "-o", "json"))
        meta = found_pod["metadata"]
        found: dict[str, Any] = json.loads(meta.get("annotations", {})[REPORT])
    except (RuntimeError, KeyError, ValueError):
        return None
    return found


def reformed(cp: ControlPlane, watch: JobWatch, after_epoch: int, timeout: float = 300) -> Reform:
    """Until rank 0 trains in an epoch newer than after_epoch (its agent says so at once)."""
    began = time.monotonic()
    seen: dict[int, int] = {}
    while time.monotonic() - began < timeout:
        status = watch.poll()
        rdzv = membership(status)
        epoch = int(rdzv.get("epoch", 0))
        members = rdzv.get("members") or []
        if epoch > after_epoch and members:
            # An epoch is announced while its pods are still being placed (no members yet).
            seen[epoch] = int(rdzv["workers"])
            leader = min(members, key=lambda m: int(m["rank"]))["pod"]
            report = pod_report(cp, leader, watch.namespace) or {}
            found = TRAINING.match(str(report.get("message", "")))
            if found and int(found.group(1)) == epoch:
                return Reform(
                    time.monotonic() - began,
                    seen,
                    rdzv,
                    int(found.group(2) or 0),
                    int(found.group(4) or 0),
                )
        if status.get("phase") in TERMINAL:
            raise RuntimeError(f"job {watch.name} ended before it trained again: {status}")
        time.sleep(0.5)
    raise RuntimeError(f"no training after epoch {after_epoch} within {timeout:.0f}s")


def racks_of(rdzv: Mapping[str, Any]) -> list[str]:
    return sorted({m["domains"].get(RACK, "?") for m in rdzv["members"]})


def tell_the_story(cp: ControlPlane, watch: JobWatch, name: str, every: int) -> bool:
    """Placement in one rack, growth across racks, a lost worker, regrowth; True if all held."""
    checks: list[bool] = []
    start = reformed(cp, watch, 0)
    rdzv = start.rendezvous
    checks.append(rdzv["workers"] == 2 and len(racks_of(rdzv)) == 1)
    say(
        f"placed and training {start.seconds:.1f}s after the apply: {rdzv['workers']} workers "
        f"packed in {', '.join(racks_of(rdzv))}"
    )
    checks.append(show_membership(rdzv))
    watch.train_for(5)

    say(f"kubectl scale ddlj/{name} --replicas=4")
    kubectl(cp, "scale", f"ddlj/{name}", "--replicas=4")
    grown = reformed(cp, watch, rdzv["epoch"])
    rdzv = grown.rendezvous
    checks.append(rdzv["workers"] == 4 and len(racks_of(rdzv)) == 2)
    say(
        f"grew to {rdzv['workers']} workers across {len(racks_of(rdzv))} racks at epoch "
        f"{rdzv['epoch']}: training again {grown.seconds:.1f}s after the scale, from checkpoint "
        f"step {grown.resumed_from} ({grown.redone} steps redone)"
    )
    checks.append(show_membership(rdzv))
    watch.train_for(5)

    victim = max(rdzv["members"], key=lambda m: int(m["rank"]))
    node = victim["node"]
    say(
        f"kubectl cordon {node}; kubectl delete pod {victim['pod']} (node maintenance: "
        f"rank {victim['rank']}'s node takes no pods, its worker is deleted)"
    )
    kubectl(cp, "cordon", node)
    kubectl(cp, "delete", "pod", victim["pod"], "--wait=false")
    lost = reformed(cp, watch, rdzv["epoch"])
    rdzv = lost.rendezvous
    checks.extend([rdzv["workers"] == 3, lost.redone <= every])
    say(
        f"shrank to {rdzv['workers']} workers at epoch {rdzv['epoch']}: training again "
        f"{lost.seconds:.1f}s after the eviction, from checkpoint step {lost.resumed_from}: "
        f"{lost.redone} steps lost (checkpoints every {every} steps)"
    )
    checks.append(show_membership(rdzv))
    watch.train_for(5)

    say(f"kubectl uncordon {node} (the node is back)")
    kubectl(cp, "uncordon", node)
    regrown = reformed(cp, watch, rdzv["epoch"])
    rdzv = regrown.rendezvous
    checks.append(regrown.redone <= every)
    say(
        f"regrew to {rdzv['workers']} workers at epoch {rdzv['epoch']}: training again "
        f"{regrown.seconds:.1f}s after the uncordon, from checkpoint step "
        f"{regrown.resumed_from} ({regrown.redone} steps redone)"
    )
    checks.append(show_membership(rdzv))
    checks.append(rdzv["workers"] == 4)
    watch.until("the end of training", lambda s: s.get("phase") in TERMINAL, 600, finished_ok=True)
    return all(checks)


def run(cp: ControlPlane, *, quick: bool = False, timeout: float = 900) -> int:
    started = time.monotonic()
    start_cluster(cp)
    prometheus_url = start_prometheus(cp)
    say(f"Prometheus scrapes the workers and the operator: {prometheus_url}")
    shutil.rmtree(CHECKPOINTS, ignore_errors=True)
    manifest = yaml.safe_load(JOB.read_text())
    name = manifest["metadata"]["name"]
    every = int(manifest["spec"]["checkpoint"]["everySteps"])
    if quick:  # the plain run: the same job, fewer steps, nothing done to it
        container = manifest["spec"]["template"]["spec"]["containers"][0]
        container.setdefault("env", []).append({"name": "DDL_TOTAL_STEPS", "value": "150"})
    kubectl(cp, "delete", "ddlj", name, "--ignore-not-found", "--wait=true")
    # A demo stopped halfway may have left its drained node cordoned.
    for node in kubectl(cp, "get", "nodes", "-o", "name").split():
        kubectl(cp, "uncordon", node)
    say(f"kubectl apply -f {JOB.relative_to(REPO_ROOT)}" + (" (150 steps)" if quick else ""))
    kubectl(cp, "apply", "-f", "-", input=json.dumps(manifest))
    watch = JobWatch(cp, name)
    story_ok = True
    if quick:
        watch.until(
            "the end of training", lambda s: s.get("phase") in TERMINAL, timeout, finished_ok=True
        )
    else:
        story_ok = tell_the_story(cp, watch, name, every)
    status = watch.status
    rdzv = membership(status)
    if rdzv.get("members"):
        say(f"last membership: epoch {rdzv['epoch']}, grid {'x'.join(map(str, rdzv['grid']))}")
    print(kubectl(cp, "get", "ddlj", name), end="")
    uid = kubectl(cp, "get", "ddlj", name, "-o", "jsonpath={.metadata.uid}").strip()
    # By uid: events of an earlier run's job of the same name live on for an hour.
    events = kubectl(
        cp,
        "get",
        "events",
        "--field-selector",
        f"involvedObject.uid={uid}",
        "--sort-by=.lastTimestamp",
        "-o",
        "custom-columns=REASON:.reason,MESSAGE:.message",
        "--no-headers",
    )
    for line in events.splitlines():
        say(f"  event {line}")
    say(
        f"{status.get('phase')} in {time.monotonic() - started:.0f}s: step {status.get('step')}, "
        f"epoch {status.get('epoch')}, restarts {status.get('restarts', 0)}, "
        f"throughput {status.get('throughput', 0):.1f} samples/s, "
        f"sync-wait {status.get('syncWaitRatio', 0):.0%} of step time (rank 0's last report)"
    )
    print_prometheus_summary(prometheus_url, name)
    say(
        f"look around: Prometheus {prometheus_url}; export KUBECONFIG={cp.kubeconfig}; "
        f"kubectl logs {name}-worker-0 (files under {cp.dir / 'nodeagent' / 'pods'}); "
        f"checkpoints in {CHECKPOINTS}; `make demo-down` stops everything"
    )
    if not story_ok:
        say("the story did not hold: see the lines marked NO or the steps lost above")
    return 0 if status.get("phase") == "Succeeded" and rdzv.get("members") and story_ok else 1
