"""The local node agent on the real control plane: nodes, pods as processes, network, teardown."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from ddl_localcluster import netns
from ddl_localcluster.controlplane import ControlPlane, wait_for
from ddl_localcluster.topology import ClusterSpec, TopologyError, rate_bits

from kubetools import NODE_GRACE_SECONDS, Kubectl

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "local-cluster.yaml"
LINK = "50mbit"  # slow enough that a 3 MB transfer measures the shaping, fast enough to be cheap

pytestmark = pytest.mark.integration


class AgentProcess:
    """`python -m ddl_localcluster.nodeagent run` on one cluster description."""

    def __init__(self, kubeconfig: Path, state_dir: Path, spec: ClusterSpec, network: str) -> None:
        self.kubeconfig, self.state_dir, self.spec, self.network = (
            kubeconfig,
            state_dir,
            spec,
            network,
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def _cli(self, *args: str) -> list[str]:
        module = [sys.executable, "-m", "ddl_localcluster.nodeagent"]
        return [*module, *args, "--state-dir", str(self.state_dir)]

    def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        cluster = self.state_dir / "cluster.yaml"
        cluster.write_text(yaml.safe_dump(cluster_yaml(self.spec)))
        with (self.state_dir / "agent.log").open("ab") as log:
            self.proc = subprocess.Popen(
                self._cli(
                    *("run", "--kubeconfig", str(self.kubeconfig), "--cluster", str(cluster)),
                    *("--network", self.network),
                ),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited:\n{self.log()}")
            return self.ctl("status", check=False).returncode == 0

        wait_for("the node agent", ready, 60, self.log)

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            self._cli(*args), capture_output=True, text=True, timeout=60, check=False
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"nodeagent {' '.join(args)}: {proc.stderr}{proc.stdout}")
        return proc

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.ctl("status").stdout)
        return out

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)

    def kill(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def log(self) -> str:
        return (self.state_dir / "agent.log").read_text(errors="replace")[-4000:]

    def pod_log(self, namespace: str, name: str) -> str:
        (path,) = (self.state_dir / "pods").glob(f"{namespace}_{name}_*/main.log")
        return path.read_text()


def cluster_yaml(spec: ClusterSpec) -> dict[str, Any]:
    return {
        "racks": spec.racks,
        "nodesPerRack": spec.nodes_per_rack,
        "gpusPerNode": spec.gpus_per_node,
        "nodeName": spec.node_name,
        "labels": spec.labels,
        "network": {"subnet": spec.subnet, "linkRate": spec.link_rate},
    }


def make_pod(
    name: str,
    node: str,
    command: list[str],
    restart: str = "Never",
    env: list[dict[str, Any]] | None = None,
    grace: int | None = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "restartPolicy": restart,
        "nodeSelector": {"kubernetes.io/hostname": node},
        "containers": [
            {"name": "main", "image": "python:3.11", "command": command, "env": env or []}
        ],
    }
    if grace is not None:
        spec["terminationGracePeriodSeconds"] = grace
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


def run_pod(kubectl: Kubectl, namespace: str, pod: dict[str, Any], phase: str) -> dict[str, Any]:
    kubectl.run("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(pod))
    name = pod["metadata"]["name"]
    kubectl.run(
        "wait",
        "-n",
        namespace,
        f"--for=jsonpath={{.status.phase}}={phase}",
        f"pod/{name}",
        "--timeout=60s",
    )
    return kubectl.get_json("pod", "-n", namespace, name)


def terminated(pod: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, Any] = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    return state


def namespaces_of(state_dir: Path) -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    prefix = f"ddl{netns.tag(state_dir)}-"
    return {line.split()[0] for line in out.stdout.splitlines() if line.startswith(prefix)}


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def spec() -> ClusterSpec:
    test_id = uuid.uuid4().hex[:5]
    return ClusterSpec.load(EXAMPLE).replace(
        node_name=f"na{test_id}-r{{rack}}-n{{node}}", link_rate=LINK, labels={"ddl-test": test_id}
    )


@pytest.fixture(scope="module")
def agent(
    control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory, spec: ClusterSpec
) -> Iterator[AgentProcess]:
    a = AgentProcess(control_plane.kubeconfig, tmp_path_factory.mktemp("agent"), spec, "auto")
    a.start()
    try:
        yield a
    finally:
        a.stop()
        Kubectl(control_plane.kubeconfig).run(
            "delete",
            "nodes",
            "-l",
            f"ddl-test={spec.labels['ddl-test']}",
            "--wait=false",
            check=False,
        )


def node_names(spec: ClusterSpec) -> list[str]:
    return [n.name for n in spec.nodes()]


# -- the description --------------------------------------------------------------------------


def test_the_example_description_is_two_racks_of_two_two_gpu_nodes() -> None:
    spec = ClusterSpec.load(EXAMPLE)
    nodes = spec.nodes()
    assert [n.name for n in nodes] == ["gpu-r0-n0", "gpu-r0-n1", "gpu-r1-n0", "gpu-r1-n1"]
    assert {n.gpus for n in nodes} == {2} and nodes[3].rack == "rack-1"
    assert rate_bits(spec.link_rate or "") == 200_000_000
    with pytest.raises(TopologyError, match="linkRat"):
        ClusterSpec.from_dict({"network": {"linkRat": "1gbit"}})
    with pytest.raises(TopologyError, match="linkRate"):
        ClusterSpec(link_rate="fast")


# -- nodes ------------------------------------------------------------------------------------


def test_nodes_register_with_gpus_topology_labels_and_leases(
    agent: AgentProcess, kubectl: Kubectl, spec: ClusterSpec
) -> None:
    first = spec.nodes()[2]
    node = kubectl.get_json("node", first.name)
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == str(spec.gpus_per_node)
    labels = node["metadata"]["labels"]
    assert labels["topology.kubernetes.io/rack"] == "rack-1"
    assert labels["topology.kubernetes.io/zone"] == "zone-a"
    assert labels["ddl-operator.dev/nvlink-domain"] == f"{first.name}-nvl"
    ready = next(c for c in node["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True"
    lease = kubectl.get_json("lease", "-n", "kube-node-lease", first.name)
    assert lease["spec"]["holderIdentity"] == first.name


# -- pods -------------------------------------------------------------------------------------


def test_a_pod_runs_to_success_and_its_output_is_logged(
    agent: AgentProcess, kubectl: Kubectl, namespace: str, spec: ClusterSpec
) -> None:
    pod = make_pod("hello", node_names(spec)[0], ["sh", "-c", "echo hello from $(hostname)"])
    got = run_pod(kubectl, namespace, pod, "Succeeded")
    assert terminated(got)["exitCode"] == 0
    assert terminated(got)["reason"] == "Completed"
    assert {c["type"]: c["status"] for c in got["status"]["conditions"]}["Ready"] == "False"
    assert "hello from" in agent.pod_log(namespace, "hello")


def test_kubectl_logs_reads_and_follows_a_pod_through_the_api_server(
    agent: AgentProcess, kubectl: Kubectl, namespace: str, spec: ClusterSpec
) -> None:
    node = node_names(spec)[2]
    done = make_pod("lines", node, ["sh", "-c", "for i in 1 2 3; do echo line $i; done"])
    run_pod(kubectl, namespace, done, "Succeeded")
    assert kubectl.run("logs", "-n", namespace, "lines").stdout == "line 1\nline 2\nline 3\n"
    assert kubectl.run("logs", "-n", namespace, "lines", "--tail=1").stdout == "line 3\n"
    wrong = kubectl.run("logs", "-n", namespace, "lines", "-c", "other", check=False)
    assert wrong.returncode != 0 and "container other is not valid" in wrong.stderr

    # -f on a running pod streams until the container exits, then returns.
    slow = make_pod("ticks", node, ["sh", "-c", "for i in 1 2 3; do echo tick $i; sleep 1; done"])
    run_pod(kubectl, namespace, slow, "Running")
    follow = kubectl.run("logs", "-n", namespace, "ticks", "-f", timeout=30)
    assert follow.stdout == "tick 1\ntick 2\ntick 3\n"


def test_a_failing_pod_fails_with_its_exit_code(
    agent: AgentProcess, kubectl: Kubectl, namespace: str, spec: ClusterSpec
) -> None:
    pod = make_pod("boom", node_names(spec)[1], ["sh", "-c", "exit 3"])
    got = run_pod(kubectl, namespace, pod, "Failed")
    assert terminated(got)["exitCode"] == 3
    assert got["status"]["containerStatuses"][0]["restartCount"] == 0


def test_on_failure_restarts_until_success(
    agent: AgentProcess, kubectl: Kubectl, namespace: str, spec: ClusterSpec, tmp_path: Path
) -> None:
    marker = tmp_path / "ran-once"
    script = f"if [ -e {marker} ]; then exit 0; fi; touch {marker}; exit 7"
    pod = make_pod("flaky", node_names(spec)[1], ["sh", "-c", script], restart="OnFailure")
    got = run_pod(kubectl, namespace, pod, "Succeeded")
    status = got["status"]["containerStatuses"][0]
    assert status["restartCount"] == 1
    assert status["lastState"]["terminated"]["exitCode"] == 7


IDENTITY = """
import json, os, socket
from kubernetes import client, config
config.load_kube_config()
review = client.AuthenticationV1Api().create_self_subject_review(
    {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"})
env = {k: os.environ[k] for k in ("POD_NAME", "POD_NAMESPACE", "POD_IP", "NODE_NAME", "HOST_IP",
                                  "GREETING")}
open("/dev/shm/ddl-probe-who", "w").close()
print(json.dumps({"user": review.status.user_info.username,
                  "pod": review.status.user_info.extra["authentication.kubernetes.io/pod-name"],
                  "env": env, "hostname": socket.gethostname(),
                  "resolved": socket.gethostbyname(socket.gethostname()),
                  "shm": sorted(os.listdir("/dev/shm"))}))
"""


def test_a_pod_gets_downward_api_env_and_its_own_service_account_token(
    agent: AgentProcess, kubectl: Kubectl, namespace: str, spec: ClusterSpec
) -> None:
    def field(name: str, path: str) -> dict[str, Any]:
        return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}

    env = [
        field("POD_NAME", "metadata.name"),
        field("POD_NAMESPACE", "metadata.namespace"),
        field("POD_IP", "status.podIP"),
        field("NODE_NAME", "spec.nodeName"),
        field("HOST_IP", "status.hostIP"),
        {"name": "GREETING", "value": "hi $(POD_NAME) $$(POD_NAME)"},
    ]
    node = node_names(spec)[3]
    got = run_pod(
        kubectl, namespace, make_pod("who", node, ["python", "-c", IDENTITY], env=env), "Succeeded"
    )
    out = json.loads(agent.pod_log(namespace, "who").strip().splitlines()[-1])
    assert out["user"] == f"system:serviceaccount:{namespace}:default"
    assert out["pod"] == ["who"]  # the token is bound to this pod
    assert out["env"] == {
        "POD_NAME": "who",
        "POD_NAMESPACE": namespace,
        "POD_IP": got["status"]["podIP"],
        "NODE_NAME": node,
        "HOST_IP": got["status"]["hostIP"],
        "GREETING": "hi who $(POD_NAME)",
    }
    if agent.status()["network"] == "netns":
        # Its own hostname resolves to its own address, as Gloo's rendezvous needs.
        assert (out["hostname"], out["resolved"]) == ("who", got["status"]["podIP"])
        # Its own /dev/shm, as on a real node: nothing of the host's or other pods' in it.
        assert out["shm"] == ["ddl-probe-who"]
        assert not Path("/dev/shm/ddl-probe-who").exists()


def test_deleting_a_pod_sigterms_it_then_sigkills_after_the_grace_period(
    agent: AgentProcess, kubectl: Kubectl, namespace: str, spec: ClusterSpec
) -> None:
    node = node_names(spec)[0]
    polite = "trap 'echo got TERM; exit 0' TERM; while :; do sleep 0.1; done"
    stubborn = "trap '' TERM; while :; do sleep 0.1; done"
    for name, script in (("polite", polite), ("stubborn", stubborn)):
        run_pod(kubectl, namespace, make_pod(name, node, ["sh", "-c", script], grace=2), "Running")
    pid = int(
        kubectl.get_json("pod", "-n", namespace, "stubborn")["status"]["containerStatuses"][0][
            "containerID"
        ].split("//")[1]
    )
    started = time.monotonic()
    kubectl.run("delete", "-n", namespace, "pod", "polite", "stubborn", "--timeout=30s")
    took = time.monotonic() - started
    assert "got TERM" in agent.pod_log(namespace, "polite")
    assert 2 <= took < 15, took  # the stubborn one waited out its 2 s grace, no longer
    assert not alive(pid)


# -- network ----------------------------------------------------------------------------------

RECEIVER = """
import socket, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 9400))
s.listen()
conn, peer = s.accept()
n, first = 0, None
while data := conn.recv(1 << 16):
    first = first or time.monotonic()
    n += len(data)
print(n, time.monotonic() - first, peer[0], flush=True)
"""
SENDER = """
import socket, sys, time
deadline = time.monotonic() + 20
while True:
    try:
        s = socket.create_connection((sys.argv[1], 9400), timeout=5)
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.1)
s.sendall(b"x" * 3_000_000)
s.shutdown(socket.SHUT_WR)
s.recv(1)  # the receiver's close: every byte arrived before this pod's namespace goes away
"""


def test_pods_on_different_nodes_reach_each_other_over_the_shaped_link(
    agent: AgentProcess, kubectl: Kubectl, namespace: str, spec: ClusterSpec
) -> None:
    if agent.status()["network"] != "netns":
        pytest.skip("no network namespaces here (not root): the agent fell back to loopback")
    here, there = node_names(spec)[0], node_names(spec)[2]
    ips = {}
    # Two receivers on one node both bind port 9400: each pod has its own namespace.
    for name in ("far", "near"):
        got = run_pod(
            kubectl, namespace, make_pod(name, here, ["python", "-c", RECEIVER]), "Running"
        )
        ips[name] = got["status"]["podIP"]
    for name, node, target in (("to-far", there, "far"), ("to-near", here, "near")):
        pod = make_pod(name, node, ["python", "-c", SENDER, ips[target]])
        run_pod(kubectl, namespace, pod, "Succeeded")
    rates = {}
    for name in ("far", "near"):
        kubectl.run(
            "wait", "-n", namespace, "--for=jsonpath={.status.phase}=Succeeded", f"pod/{name}"
        )
        count, seconds, _peer = agent.pod_log(namespace, name).split()
        assert int(count) == 3_000_000
        rates[name] = int(count) * 8 / float(seconds)
    link = rate_bits(LINK)
    assert 0.6 * link < rates["far"] < 1.15 * link, rates
    assert rates["near"] > 3 * link, rates  # inside a node nothing is shaped


# -- node loss --------------------------------------------------------------------------------


def test_node_down_turns_not_ready_kills_pods_and_comes_back(
    agent: AgentProcess, kubectl: Kubectl, namespace: str, spec: ClusterSpec
) -> None:
    node = node_names(spec)[3]
    run_pod(kubectl, namespace, make_pod("victim", node, ["sleep", "600"]), "Running")
    started = time.monotonic()
    agent.ctl("node-down", node, "--kill-pods")
    limit = NODE_GRACE_SECONDS + 10  # the grace, then the node controller's next look
    kubectl.run(
        "wait", "--for=condition=Ready=Unknown", f"node/{node}", f"--timeout={limit + 10}s",
        timeout=limit + 20,
    )  # fmt: skip
    assert time.monotonic() - started < limit
    # A dead machine reports nothing: the API still thinks the pod runs.
    assert kubectl.get_json("pod", "-n", namespace, "victim")["status"]["phase"] == "Running"
    agent.ctl("node-up", node)
    kubectl.run("wait", "--for=condition=Ready=True", f"node/{node}", "--timeout=20s")
    kubectl.run(
        "wait",
        "-n",
        namespace,
        "--for=jsonpath={.status.phase}=Failed",
        "pod/victim",
        "--timeout=20s",
    )
    assert terminated(kubectl.get_json("pod", "-n", namespace, "victim"))["exitCode"] == 137


def test_a_slowdown_outlives_an_agent_restart(
    control_plane: ControlPlane, kubectl: Kubectl, tmp_path: Path
) -> None:
    """The Node's annotation carries the knob across a restart (a straggler stays one)."""
    test_id = uuid.uuid4().hex[:5]
    spec = ClusterSpec.load(EXAMPLE).replace(
        racks=1, node_name=f"nr{test_id}-n{{node}}", link_rate=None, labels={"ddl-test": test_id}
    )
    node = spec.nodes()[1].name
    agent = AgentProcess(control_plane.kubeconfig, tmp_path / "agent", spec, "auto")
    try:
        agent.start()
        agent.ctl("node-slow", node, "0.5")
        agent.stop()
        agent.start()
        assert agent.status()["slowdown"] == {node: 0.5}, agent.log()
        assert f"{node}: slowdown restored" in agent.log()
        agent.ctl("node-slow", node, "1")
        annotations = kubectl.get_json("node", node)["metadata"].get("annotations", {})
        assert "ddl-localcluster.dev/slowdown" not in annotations
        assert agent.status()["slowdown"] == {}
    finally:
        agent.stop()
        kubectl.run("delete", "nodes", "-l", f"ddl-test={test_id}", "--wait=false", check=False)


def test_node_delete_removes_the_node_and_node_up_brings_it_back(
    agent: AgentProcess, kubectl: Kubectl, spec: ClusterSpec
) -> None:
    node = node_names(spec)[1]
    agent.ctl("node-delete", node)
    assert kubectl.run("get", "node", node, check=False).returncode != 0
    assert agent.status()["nodes"][node] == "deleted"
    agent.ctl("node-up", node)
    kubectl.run("wait", "--for=condition=Ready=True", f"node/{node}", "--timeout=20s")


# -- teardown ---------------------------------------------------------------------------------


@pytest.mark.parametrize("network", ["netns", "loopback"])
def test_teardown_after_sigkill_leaves_no_namespace_or_process(
    control_plane: ControlPlane,
    kubectl: Kubectl,
    namespace: str,
    tmp_path_factory: pytest.TempPathFactory,
    network: str,
) -> None:
    if network == "netns" and os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    test_id = uuid.uuid4().hex[:5]
    one = ClusterSpec(
        racks=1, nodes_per_rack=1, node_name=f"nk{test_id}", labels={"ddl-test": test_id}
    )
    crashed = AgentProcess(control_plane.kubeconfig, tmp_path_factory.mktemp("crash"), one, network)
    crashed.start()
    try:
        got = run_pod(
            kubectl, namespace, make_pod("orphan", one.nodes()[0].name, ["sleep", "600"]), "Running"
        )
        pid = int(got["status"]["containerStatuses"][0]["containerID"].split("//")[1])
        crashed.kill()
        assert alive(pid)  # pods run in their own sessions: the agent's death leaves them
        assert bool(namespaces_of(crashed.state_dir)) == (network == "netns")
        crashed.ctl("teardown")
        assert not namespaces_of(crashed.state_dir)
        wait_for("the orphaned pod process to end", lambda: not alive(pid), 5, lambda: "")
    finally:
        kubectl.run("delete", "node", one.nodes()[0].name, "--wait=false", check=False)


def test_stopping_the_agent_ends_its_pods_and_removes_its_namespaces(
    agent: AgentProcess, kubectl: Kubectl, namespace: str, spec: ClusterSpec
) -> None:
    got = run_pod(
        kubectl, namespace, make_pod("last", node_names(spec)[0], ["sleep", "600"]), "Running"
    )
    pid = int(got["status"]["containerStatuses"][0]["containerID"].split("//")[1])
    agent.stop()
    assert not alive(pid)
    assert not namespaces_of(agent.state_dir)
    assert not (agent.state_dir / netns.RECORD).exists()
