"""`ddl-cluster demo`: the whole product on one machine, from a clean start to a trained job.

Starts the control plane and the local node agent (simulated GPU nodes, one network namespace
per node and pod, shaped inter-node links), `helm install`s the operator chart so the operator
runs as a pod under the chart's RBAC, applies examples/demo-job.yaml and follows it until it
succeeds. Everything keeps running afterwards for a look around; `ddl-cluster down` stops it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from ddl_localcluster import netns
from ddl_localcluster.controlplane import REPO_ROOT, ControlPlane, binary, free_port

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


def start_cluster(cp: ControlPlane) -> None:
    """Control plane, node agent and the operator chart; reuses whatever already runs."""
    running = cp.running()
    if "kube-apiserver" not in running:
        say("starting the control plane (etcd, kube-apiserver, controller-manager, scheduler)")
        cp.start(progress=lambda m: say(f"  {m}"))
    if "nodeagent" not in running:
        say(f"starting the node agent: {CLUSTER.relative_to(REPO_ROOT)}")
        cp.start_node_agent(CLUSTER)
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


def follow(cp: ControlPlane, name: str, timeout: float) -> dict[str, Any]:
    """Prints a line whenever the job's phase, epoch or progress changes; returns its status."""
    deadline = time.monotonic() + timeout
    last = ""
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        job = json.loads(kubectl(cp, "get", "ddlj", name, "-o", "json"))
        status = job.get("status", {})
        line = (
            f"{status.get('phase', 'Pending'):9} epoch={status.get('epoch', 0)} "
            f"ready={status.get('readyReplicas', 0)}/{job['spec']['replicas']} "
            f"step={status.get('step', 0)} "
            f"throughput={status.get('throughput', 0):.1f} samples/s "
            f"sync-wait={status.get('syncWaitRatio', 0):.0%}"
        )
        if status.get("message"):
            line += f"  ({status['message']})"
        if line != last:
            say(line)
            last = line
        update_targets(cp)
        if status.get("phase") in ("Succeeded", "Failed"):
            return status
        time.sleep(1)
    raise RuntimeError(f"job {name} did not finish within {timeout:.0f}s; status: {status}")


def run(cp: ControlPlane, timeout: float = 900) -> int:
    started = time.monotonic()
    start_cluster(cp)
    prometheus_url = start_prometheus(cp)
    say(f"Prometheus scrapes the workers and the operator: {prometheus_url}")
    shutil.rmtree(CHECKPOINTS, ignore_errors=True)
    name = "demo"
    kubectl(cp, "delete", "ddlj", name, "--ignore-not-found", "--wait=true")
    say(f"kubectl apply -f {JOB.relative_to(REPO_ROOT)}")
    kubectl(cp, "apply", "-f", str(JOB))
    seen_rendezvous = False
    status = follow(cp, name, timeout)
    rdzv = status.get("rendezvous") or {}
    if rdzv.get("members"):
        seen_rendezvous = True
        say(f"last membership: epoch {rdzv['epoch']}, grid {'x'.join(map(str, rdzv['grid']))}")
        for m in rdzv["members"]:
            say(
                f"  worker rank {m['rank']}: {m['pod']} on {m['node']} "
                f"({m['domains'].get('topology.kubernetes.io/rack', '?')})"
            )
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
        f"throughput {status.get('throughput', 0):.1f} samples/s, "
        f"sync-wait {status.get('syncWaitRatio', 0):.0%} of step time (rank 0's last report)"
    )
    print_prometheus_summary(prometheus_url, name)
    say(
        f"look around: Prometheus {prometheus_url}; export KUBECONFIG={cp.kubeconfig}; "
        f"kubectl logs {name}-worker-0 (files under {cp.dir / 'nodeagent' / 'pods'}); "
        f"checkpoints in {CHECKPOINTS}; `make demo-down` stops everything"
    )
    return 0 if status.get("phase") == "Succeeded" and seen_rendezvous else 1
