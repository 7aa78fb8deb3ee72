"""The chart's generated files match their generators; values, schema and README agree."""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from ddl_operator.api import constants
from ddl_operator.api.crd import CRD_PATHS
from ddl_operator.core.render import pod_name
from ddl_operator.observability import OPERATOR_SCRAPE_JOB, WORKER_POD_REGEX
from ddl_operator.observability.alerts import RULES_PATH, render_rules, rule_groups
from ddl_operator.observability.dashboards import DASHBOARD_DIR, DASHBOARDS, render

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "ddl-operator"


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_committed_dashboard_matches_code(name: str) -> None:
    path = DASHBOARD_DIR / name
    assert path.exists(), (
        f"{path} is missing; run python -m ddl_operator.observability.dashboards --write"
    )
    assert path.read_text() == render(DASHBOARDS[name]), (
        f"{path.name} is stale; run python -m ddl_operator.observability.dashboards --write"
    )


def test_no_stray_dashboard_files() -> None:
    assert sorted(p.name for p in DASHBOARD_DIR.glob("*.json")) == sorted(DASHBOARDS)


def test_committed_rules_match_code() -> None:
    assert RULES_PATH.read_text() == render_rules(), (
        "prometheus-rules.yaml is stale; run python -m ddl_operator.observability.alerts --write"
    )


def test_generation_is_byte_stable() -> None:
    for build in DASHBOARDS.values():
        assert render(build) == render(build)
    assert render_rules() == render_rules()


def test_chart_ships_the_generated_crd() -> None:
    assert CHART / "crds" / "ddljobs.ddl-operator.dev.yaml" in CRD_PATHS


def test_chart_version_is_the_project_version() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["version"] == project
    assert chart["appVersion"] == project


def _dashboards() -> Iterator[tuple[str, dict[str, Any]]]:
    for name in sorted(DASHBOARDS):
        yield name, json.loads((DASHBOARD_DIR / name).read_text())


def test_dashboards_are_wired_to_the_datasource_variable() -> None:
    uids = set()
    for name, board in _dashboards():
        uids.add(board["uid"])
        variables = [v["name"] for v in board["templating"]["list"]]
        assert variables[0] == "datasource", name
        assert "namespace" in variables, name
        panels = board["panels"]
        ids = [p["id"] for p in panels]
        assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids"
        for panel in panels:
            if panel["type"] == "row":
                continue
            assert panel.get("description"), f"{name}: panel {panel['title']!r} says nothing"
            assert panel["targets"], f"{name}: panel {panel['title']!r} has no query"
            for target in panel["targets"]:
                assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    assert len(uids) == len(DASHBOARDS)


def test_job_dashboard_has_namespace_and_job_variables() -> None:
    board = json.loads((DASHBOARD_DIR / "ddl-job.json").read_text())
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert {"namespace", "job"} <= set(variables)
    assert "$namespace" in variables["job"]["query"]["query"]


def test_dcgm_pod_pattern_matches_the_operators_pod_names() -> None:
    pattern = WORKER_POD_REGEX.format(job="resnet")
    assert re.fullmatch(pattern, pod_name("resnet", 0))
    assert re.fullmatch(pattern, pod_name("resnet", 17))
    assert not re.fullmatch(pattern, pod_name("resnet-big", 0))


def _metric_names(text: str) -> set[str]:
    return set(re.findall(r"\bddl_(?!operator)[a-z_]+", text))


def test_worker_metrics_queried_are_ones_the_worker_exports() -> None:
    """Names in dashboards and alerts exist in ddl_worker.metrics (histogram and counter
    suffixes are added by prometheus_client at exposition)."""
    exported = _metric_names((REPO / "worker" / "ddl_worker" / "metrics.py").read_text())
    used = _metric_names(RULES_PATH.read_text())
    for _, board in _dashboards():
        used |= _metric_names(json.dumps(board))
    missing = set()
    for name in used:
        family = re.sub(r"_(bucket|sum|count)$", "", name)
        if not {name, family, name.removesuffix("_total")} & exported:
            missing.add(name)
    assert not missing, f"dashboards or alerts query metrics no worker exports: {missing}"


def test_service_monitor_names_the_scrape_job_the_alerts_use() -> None:
    template = (CHART / "templates" / "servicemonitor.yaml").read_text()
    assert f"replacement: {OPERATOR_SCRAPE_JOB}" in template
    assert f'up{{job="{OPERATOR_SCRAPE_JOB}"}}' in RULES_PATH.read_text()


def test_every_alert_has_severity_summary_and_description() -> None:
    for group in rule_groups()["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in {"warning", "critical"}
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]


# ---- values.yaml, values.schema.json and README.md describe the same values --------------


def _documented_keys(values_text: str) -> list[str]:
    """Dotted paths of the keys that a `# --` comment in values.yaml documents."""
    keys: list[str] = []
    stack: list[tuple[int, str]] = []
    pending = False
    for line in values_text.splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            pending = True
            continue
        match = re.match(r"^( *)([A-Za-z][A-Za-z0-9_]*):", line)
        if not match:
            continue
        indent, key = len(match.group(1)), match.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key))
        if pending:
            keys.append(".".join(k for _, k in stack))
            pending = False
    return keys


def _undocumented(node: Any, path: str, documented: set[str]) -> Iterator[str]:
    if path in documented:
        return
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from _undocumented(value, f"{path}.{key}" if path else key, documented)
    else:
        yield path


def test_every_value_is_documented_in_values_yaml() -> None:
    text = (CHART / "values.yaml").read_text()
    documented = set(_documented_keys(text))
    missing = list(_undocumented(yaml.safe_load(text), "", documented))
    assert not missing, f"values without a `# --` comment: {missing}"


def test_readme_table_lists_exactly_the_documented_values() -> None:
    documented = _documented_keys((CHART / "values.yaml").read_text())
    readme = (CHART / "README.md").read_text()
    table = re.findall(
        r"^\| `([A-Za-z0-9_.]+)` \| (?:string|bool|int|list|object) \|", readme, re.M
    )
    assert table == documented


def test_schema_covers_every_documented_value() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    for key in _documented_keys((CHART / "values.yaml").read_text()):
        node = schema
        for part in key.split("."):
            node = node["properties"][part]
            if "$ref" in node:
                node = schema["definitions"][node["$ref"].rsplit("/", 1)[-1]]
        assert node, key


# ---- the workers' reach -------------------------------------------------------------------


def test_worker_policy_guards_the_annotation_the_agent_writes() -> None:
    policy = (CHART / "templates" / "worker-policy.yaml").read_text()
    assert policy.count(f"'{constants.ANNOTATION_REPORT}'") == 2
    assert "kind: ValidatingAdmissionPolicy\n" in policy
    assert "kind: ValidatingAdmissionPolicyBinding\n" in policy
    assert "validationActions: [Deny]" in policy and "failurePolicy: Fail" in policy
    # What the API server adds to a pod-bound token (kubelet's projected token, TokenRequest).
    for extra in ("pod-uid", "pod-name"):
        assert f"'authentication.kubernetes.io/{extra}'" in policy
    assert "request.userInfo.username.endsWith(':{{ .Values.worker.serviceAccountName }}')" in (
        policy
    )


def test_worker_role_patches_pods_and_reads_nothing_of_them() -> None:
    """The agent only annotates its own pod (ddl_worker.kube); it never reads pods."""
    agent = (REPO / "worker" / "ddl_worker" / "kube.py").read_text()
    assert "patch_namespaced_pod(" in agent and "read_namespaced_pod" not in agent
    role = (CHART / "templates" / "worker-rbac.yaml").read_text()
    assert '    resources: ["pods"]\n    verbs: ["patch"]\n' in role
