"""The Helm chart with the pinned helm: lint, render, server-side dry-run on the real API
server, and its RBAC checked by the API server's own authorizer."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from ddl_localcluster.controlplane import binary, pinned_versions

from kubetools import Kubectl

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "ddl-operator"
MONITORING_CRDS = Path(__file__).parent / "fixtures" / "monitoring.coreos.com-crds.yaml"
SELECTOR_FORBIDDEN = {"helm.sh/chart", "app.kubernetes.io/version"}
# The version of the pinned API server; helm built from source otherwise assumes v1.20.
KUBE_VERSION = pinned_versions()["KUBERNETES_VERSION"]


def helm(command: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """The pinned helm; lint and template check against the pinned Kubernetes version."""
    argv = [str(binary("helm")), command, *args, f"--kube-version={KUBE_VERSION}"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {command} {' '.join(args)} failed:\n{proc.stderr}{proc.stdout}")
    return proc


def custom_values(watched: list[str], dashboards_namespace: str) -> dict[str, Any]:
    """Everything optional switched on, namespaced RBAC, overrides of names and image."""
    return {
        "fullnameOverride": f"ddl-{uuid.uuid4().hex[:6]}",
        "image": {"repository": "registry.example/ml/ddl-operator", "tag": "0.1.0-test"},
        "imagePullSecrets": [{"name": "regcred"}],
        "replicas": 2,
        "leaderElection": {"leaseName": "ddl-operator.example.com"},
        "watch": {"allNamespaces": False, "namespaces": watched},
        "worker": {"serviceAccountName": "trainer"},
        "extraArgs": ["--verbose"],
        "extraEnv": [{"name": "DDL_LOG_FORMAT", "value": "json"}],
        "serviceAccount": {"annotations": {"example.com/role": "ddl"}},
        "podAnnotations": {"example.com/scrape": "true"},
        "podLabels": {"team": "ml-platform"},
        "priorityClassName": "ddl-high",
        "metrics": {"port": 9191},
        "health": {"port": 8181},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}],
        "serviceMonitor": {"enabled": True, "scrapeTimeout": "10s", "labels": {"release": "kp"}},
        "podMonitor": {"enabled": True, "interval": "30s", "labels": {"release": "kp"}},
        "prometheusRule": {
            "enabled": True,
            "labels": {"release": "kp"},
            "additionalRuleLabels": {"team": "ml-platform"},
            "disabled": {"DDLJobStragglerRank": True},
        },
        "dashboards": {
            "namespace": dashboards_namespace,
            "annotations": {"grafana_folder": "DDL"},
        },
    }


def render(release_ns: str, values: dict[str, Any] | None, tmp_path: Path) -> list[dict[str, Any]]:
    args = ["ddl", str(CHART), "--namespace", release_ns, "--include-crds"]
    if values is not None:
        path = tmp_path / "values.yaml"
        path.write_text(yaml.safe_dump(values))
        args += ["--values", str(path)]
    return [d for d in yaml.safe_load_all(helm("template", *args).stdout) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def dry_run(kubectl: Kubectl, docs: list[dict[str, Any]]) -> None:
    """Server-side apply, dry run, strict field validation: every object as the API server
    would store it, with schema, admission and unknown-field checks."""
    proc = kubectl.run(
        "apply",
        "--server-side",
        "--dry-run=server",
        "--validate=strict",
        "--field-manager=chart-test",
        "-f",
        "-",
        input=yaml.safe_dump_all(docs),
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("(server dry run)") == len(docs), proc.stdout


@pytest.fixture(scope="session")
def monitoring_crds(kubectl: Kubectl) -> None:
    kubectl.run("apply", "--server-side", "-f", str(MONITORING_CRDS))
    for name in ("servicemonitors", "podmonitors", "prometheusrules"):
        kubectl.run(
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            f"crd/{name}.monitoring.coreos.com",
        )


@pytest.fixture
def extra_namespaces(kubectl: Kubectl) -> Iterator[list[str]]:
    names = [f"t-{uuid.uuid4().hex[:8]}" for _ in range(3)]
    for name in names:
        kubectl.run("create", "namespace", name)
    yield names
    for name in names:
        kubectl.run("delete", "namespace", name, "--wait=false", check=False)


# ---- lint -----------------------------------------------------------------------------------


def test_lint_with_default_values() -> None:
    helm("lint", "--strict", str(CHART))


def test_lint_with_custom_values(tmp_path: Path) -> None:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(custom_values(["team-a", "team-b"], "monitoring")))
    helm("lint", "--strict", str(CHART), "--values", str(path))


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("watch.allNamespaces=maybe", "allNamespaces"),
        ("metrics.port=70000", "port"),
        ("serviceMonitor.interval=soon", "interval"),
        ("unknownKey=1", "unknownKey"),
        ("image.pullPolicy=Sometimes", "pullPolicy"),
        ("replicas=-1", "replicas"),
        ("leaderElection.leaseName=Not_A_Name", "leaseName"),
    ],
)
def test_schema_refuses_bad_values(setting: str, message: str) -> None:
    proc = helm("lint", str(CHART), "--set", setting, check=False)
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr


def test_watching_no_namespace_is_refused(tmp_path: Path) -> None:
    proc = helm("template", "ddl", str(CHART), "--set", "watch.allNamespaces=false", check=False)
    assert proc.returncode != 0
    assert "watch.namespaces must name at least one namespace" in proc.stderr


def test_replicas_without_a_leader_are_refused() -> None:
    proc = helm(
        "template", "ddl", str(CHART), "--set", "replicas=2",
        "--set", "leaderElection.enabled=false", check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "replicas > 1 needs leaderElection.enabled" in proc.stderr


# ---- rendered manifests -------------------------------------------------------------------


def test_default_render(tmp_path: Path) -> None:
    docs = render("ddl-system", None, tmp_path)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(
        [
            "CustomResourceDefinition",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
            "ValidatingAdmissionPolicy",
            "ValidatingAdmissionPolicyBinding",
            "Deployment",
            "Service",
            "ConfigMap",
            "ConfigMap",
        ]
    )
    (deployment,) = by_kind(docs, "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    # Leader election is on, so a rollout may overlap old and new pods.
    assert spec["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "ddl-operator:0.1.0"
    assert container["args"] == [
        "--all-namespaces",
        "--metrics-port=9090",
        "--liveness-port=8080",
        "--worker-service-account=ddl-worker",
        "--leader-elect",
        "--leader-elect-name=ddl-ddl-operator",
    ]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["resources"]["requests"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "metrics": 9090,
        "health": 8080,
    }
    env = {e["name"]: e.get("value") or e["valueFrom"]["fieldRef"] for e in container["env"]}
    assert env == {
        "POD_NAME": {"fieldPath": "metadata.name"},
        "POD_NAMESPACE": {"fieldPath": "metadata.namespace"},
        "DDL_WORKER_CLUSTER_ROLE": "ddl-ddl-operator-worker",
    }
    # The Lease: get/update of its name only; create cannot be limited by name.
    (lease_role,) = by_kind(docs, "Role")
    assert lease_role["metadata"] == {
        **lease_role["metadata"],
        "name": "ddl-ddl-operator-leader-election",
        "namespace": "ddl-system",
    }
    assert lease_role["rules"] == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "resourceNames": ["ddl-ddl-operator"],
            "verbs": ["get", "update"],
        },
    ]
    (lease_binding,) = by_kind(docs, "RoleBinding")
    assert lease_binding["roleRef"]["name"] == "ddl-ddl-operator-leader-election"
    assert lease_binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "ddl-ddl-operator", "namespace": "ddl-system"}
    ]
    selector = spec["selector"]["matchLabels"]
    assert not SELECTOR_FORBIDDEN & set(selector)
    assert selector.items() <= spec["template"]["metadata"]["labels"].items()
    (service,) = by_kind(docs, "Service")
    assert not SELECTOR_FORBIDDEN & set(service["spec"]["selector"])
    (policy,) = by_kind(docs, "ValidatingAdmissionPolicy")
    assert "endsWith(':ddl-worker')" in policy["spec"]["matchConditions"][0]["expression"]
    assert policy["spec"]["failurePolicy"] == "Fail"
    (binding,) = by_kind(docs, "ValidatingAdmissionPolicyBinding")
    assert "matchResources" not in binding["spec"]  # the operator serves every namespace
    for doc in docs:
        if doc["kind"] != "CustomResourceDefinition":
            assert doc["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
    for configmap in by_kind(docs, "ConfigMap"):
        assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
        ((key, text),) = configmap["data"].items()
        assert key.endswith(".json")
        assert text == (CHART / "dashboards" / key).read_text().rstrip("\n")


def test_rbac_never_touches_secrets(tmp_path: Path) -> None:
    for values in (None, custom_values(["team-a"], "")):
        docs = render("ddl-system", values, tmp_path)
        for role in by_kind(docs, "ClusterRole") + by_kind(docs, "Role"):
            for rule in role["rules"]:
                assert "secrets" not in rule["resources"]
                assert "*" not in rule["resources"] and "*" not in rule["verbs"]


def test_custom_render(tmp_path: Path) -> None:
    values = custom_values(["team-a", "team-b"], "monitoring")
    docs = render("ddl-system", values, tmp_path)
    name = values["fullnameOverride"]
    roles = [r for r in by_kind(docs, "Role") if r["metadata"]["name"] == name]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    worker_accounts = [
        d for d in by_kind(docs, "ServiceAccount") if d["metadata"]["name"] == "trainer"
    ]
    assert sorted(a["metadata"]["namespace"] for a in worker_accounts) == ["team-a", "team-b"]
    worker_bindings = [
        b for b in by_kind(docs, "RoleBinding") if b["roleRef"]["name"] == f"{name}-worker"
    ]
    assert [b["subjects"] for b in worker_bindings] == [
        [{"kind": "ServiceAccount", "name": "trainer", "namespace": ns}]
        for ns in ("team-a", "team-b")
    ]
    (cluster_role,) = [r for r in by_kind(docs, "ClusterRole") if r["metadata"]["name"] == name]
    # Cluster-wide reads only (free GPUs are a cluster property): no pod writes there.
    grants = {res: rule["verbs"] for rule in cluster_role["rules"] for res in rule["resources"]}
    assert grants == {
        "nodes": ["get", "list", "watch"],
        "pods": ["list", "watch"],
        "priorityclasses": ["get", "list", "watch"],
        "customresourcedefinitions": ["get", "list", "watch"],
        "resourceflavors": ["get", "list", "watch"],
    }
    # The workers' policy: the chart's worker account, in the namespaces it gives one to.
    (policy,) = by_kind(docs, "ValidatingAdmissionPolicy")
    (binding,) = by_kind(docs, "ValidatingAdmissionPolicyBinding")
    assert policy["metadata"]["name"] == binding["spec"]["policyName"] == f"{name}-worker-own-pod"
    (match,) = policy["spec"]["matchConditions"]
    assert "endsWith(':trainer')" in match["expression"]
    assert binding["spec"]["validationActions"] == ["Deny"]
    assert binding["spec"]["matchResources"]["namespaceSelector"]["matchExpressions"] == [
        {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["team-a", "team-b"]}
    ]
    (container,) = by_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "registry.example/ml/ddl-operator:0.1.0-test"
    assert container["args"] == [
        "--namespace=team-a",
        "--namespace=team-b",
        "--metrics-port=9191",
        "--liveness-port=8181",
        "--worker-service-account=trainer",
        "--leader-elect",
        f"--leader-elect-name={values['leaderElection']['leaseName']}",
        "--verbose",
    ]
    deployment = by_kind(docs, "Deployment")[0]["spec"]
    assert deployment["replicas"] == 2
    (monitor,) = by_kind(docs, "ServiceMonitor")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["honorLabels"] is True and endpoint["scrapeTimeout"] == "10s"
    assert endpoint["relabelings"] == [
        {"action": "replace", "targetLabel": "job", "replacement": "ddl-operator"}
    ]
    (pods,) = by_kind(docs, "PodMonitor")
    assert pods["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}
    assert pods["spec"]["selector"] == {"matchLabels": {"ddl-operator.dev/role": "worker"}}
    (rule,) = by_kind(docs, "PrometheusRule")
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert "DDLJobStragglerRank" not in alerts
    assert {"DDLJobUnschedulable", "DDLOperatorDown"} <= set(alerts)
    for alert in alerts.values():
        assert alert["labels"]["team"] == "ml-platform" and alert["labels"]["severity"]
        assert (
            "{{ $labels" in alert["annotations"]["summary"] or alert["alert"] == "DDLOperatorDown"
        )
    for configmap in by_kind(docs, "ConfigMap"):
        assert configmap["metadata"]["namespace"] == "monitoring"
        assert configmap["metadata"]["annotations"] == {"grafana_folder": "DDL"}


# ---- the real API server ------------------------------------------------------------------


@pytest.mark.usefixtures("crd_installed")
def test_default_render_passes_server_side_dry_run(
    kubectl: Kubectl, namespace: str, tmp_path: Path
) -> None:
    dry_run(kubectl, render(namespace, None, tmp_path))


@pytest.mark.usefixtures("crd_installed", "monitoring_crds")
def test_custom_render_passes_server_side_dry_run(
    kubectl: Kubectl, namespace: str, extra_namespaces: list[str], tmp_path: Path
) -> None:
    watched, dashboards = extra_namespaces[:2], extra_namespaces[2]
    docs = render(namespace, custom_values(watched, dashboards), tmp_path)
    assert by_kind(docs, "PrometheusRule") and by_kind(docs, "PodMonitor")
    dry_run(kubectl, docs)


@pytest.mark.usefixtures("crd_installed")
def test_rbac_is_enough_and_no_more(
    kubectl: Kubectl, namespace: str, extra_namespaces: list[str], tmp_path: Path
) -> None:
    """Applies the chart's RBAC for real (namespaced mode), then asks the authorizer what the
    operator and a worker may do."""
    job_ns, other_ns = extra_namespaces[0], extra_namespaces[1]
    values = custom_values([job_ns], "")
    docs = render(namespace, values, tmp_path)
    rbac_kinds = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}
    lease = values["leaderElection"]["leaseName"]
    # The chart gives workers their identity in the namespaces it watches.
    rbac = [d for d in docs if d["kind"] in rbac_kinds]
    kubectl.run("apply", "-f", "-", input=yaml.safe_dump_all(rbac))
    name = values["fullnameOverride"]
    operator = f"system:serviceaccount:{namespace}:{name}"
    worker = f"system:serviceaccount:{job_ns}:trainer"
    try:

        def can(user: str, verb: str, resource: str, ns: str | None) -> bool:
            """`resource` as kubectl takes it: `TYPE[/NAME] [--subresource=SUB]`."""
            scope = ["-n", ns] if ns else []
            proc = kubectl.run(
                "auth", "can-i", verb, *resource.split(), *scope, f"--as={user}", check=False
            )
            return proc.stdout.strip() == "yes"

        allowed = [
            ("list", "ddljobs.ddl-operator.dev", job_ns),
            ("patch", "ddljobs.ddl-operator.dev --subresource=status", job_ns),
            ("get", "ddljobs.ddl-operator.dev --subresource=scale", job_ns),
            ("create", "pods", job_ns),
            ("delete", "pods", job_ns),
            ("create", "services", job_ns),
            ("create", "events", job_ns),
            ("create", "events.events.k8s.io", job_ns),
            ("create", "serviceaccounts", job_ns),
            ("create", "rolebindings", job_ns),
            ("patch", "ddljobs.ddl-operator.dev", job_ns),  # Kueue: suspend, admitted size
            ("watch", "nodes", None),
            ("list", "customresourcedefinitions", None),
            ("list", "priorityclasses.scheduling.k8s.io", None),
            # Free GPUs: every unfinished pod, in any namespace, is read (never written).
            ("list", "pods", None),
            ("watch", "pods", other_ns),
            ("create", "leases.coordination.k8s.io", namespace),
            ("get", f"leases.coordination.k8s.io/{lease}", namespace),
            ("update", f"leases.coordination.k8s.io/{lease}", namespace),
        ]
        refused = [
            ("get", "secrets", job_ns),
            ("delete", "ddljobs.ddl-operator.dev", job_ns),
            ("create", "ddljobs.ddl-operator.dev", job_ns),
            ("create", "pods", other_ns),
            ("get", "pods", other_ns),
            ("patch", "pods", other_ns),
            ("delete", "pods", other_ns),
            ("create", "pods --subresource=eviction", other_ns),
            ("get", "pods --subresource=log", other_ns),
            ("create", "pods --subresource=exec", other_ns),
            ("patch", "pods", None),
            ("patch", "nodes", None),
            ("create", "priorityclasses.scheduling.k8s.io", None),
            ("update", "leases.coordination.k8s.io/kube-scheduler", namespace),
            ("get", "leases.coordination.k8s.io/other", namespace),
            ("delete", f"leases.coordination.k8s.io/{lease}", namespace),
            ("create", "leases.coordination.k8s.io", job_ns),
            ("list", "namespaces", None),
            ("create", "clusterrolebindings", None),
        ]
        for verb, resource, ns in allowed:
            assert can(operator, verb, resource, ns), f"operator cannot {verb} {resource}"
        for verb, resource, ns in refused:
            assert not can(operator, verb, resource, ns), f"operator may {verb} {resource}"

        def kueue_may(verb: str, resource: str, ns: str | None) -> bool:
            """Asked of the authorizer directly: `kubectl auth can-i` needs Kueue's CRDs
            installed to resolve the resource's group."""
            kind, _, sub = resource.partition("/")
            attributes = {"group": "kueue.x-k8s.io", "resource": kind, "verb": verb}
            attributes.update({"namespace": ns} if ns else {})
            attributes.update({"subresource": sub} if sub else {})
            review = {
                "apiVersion": "authorization.k8s.io/v1",
                "kind": "SubjectAccessReview",
                "spec": {"user": operator, "resourceAttributes": attributes},
            }
            out = kubectl.run("create", "-o", "json", "-f", "-", input=json.dumps(review))
            return bool(json.loads(out.stdout)["status"].get("allowed"))

        # Kueue: a queued job's Workload and its status where jobs are served; flavors read.
        for verb in ("get", "list", "watch", "create", "patch", "update", "delete"):
            assert kueue_may(verb, "workloads", job_ns), f"operator cannot {verb} workloads"
        assert kueue_may("patch", "workloads/status", job_ns)
        assert kueue_may("watch", "resourceflavors", None)
        for verb, resource, ns in [
            ("create", "workloads", other_ns),
            ("list", "workloads", None),
            ("create", "resourceflavors", None),
            ("create", "clusterqueues", None),
            ("patch", "localqueues", job_ns),
        ]:
            assert not kueue_may(verb, resource, ns), f"operator may {verb} {resource} in {ns}"

        # The operator can give workers an identity itself, and nothing stronger.
        as_operator = f"--as={operator}"
        kubectl.run("create", "serviceaccount", "probe", "-n", job_ns, as_operator)
        kubectl.run(
            "create", "rolebinding", "probe", "-n", job_ns,
            f"--clusterrole={name}-worker", f"--serviceaccount={job_ns}:probe", as_operator,
        )  # fmt: skip
        escalation = kubectl.run(
            "create", "rolebinding", "admin", "-n", job_ns, "--clusterrole=admin",
            f"--serviceaccount={job_ns}:probe", as_operator, check=False,
        )  # fmt: skip
        assert escalation.returncode != 0 and "forbidden" in escalation.stderr

        for verb, resource in [("watch", "ddljobs.ddl-operator.dev"), ("patch", "pods")]:
            assert can(worker, verb, resource, job_ns), f"worker cannot {verb} {resource}"
        for verb, resource in [
            ("get", "pods"),
            ("create", "pods"),
            ("delete", "pods"),
            ("patch", "ddljobs.ddl-operator.dev"),
            ("get", "secrets"),
        ]:
            assert not can(worker, verb, resource, job_ns), f"worker may {verb} {resource}"
    finally:
        for doc in rbac:
            if doc["kind"] in {"ClusterRole", "ClusterRoleBinding"}:
                kubectl.run("delete", doc["kind"], doc["metadata"]["name"], check=False)
