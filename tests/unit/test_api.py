"""The API models and the generated CRD: drift, defaults, examples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from ddl_operator.api import constants as c
from ddl_operator.api.crd import CRD_PATHS, REFERENCE_PATH, build_crd, render_crd, render_reference
from ddl_operator.api.models import DDLJob, DDLJobSpec
from ddl_operator.core.render import pod_name
from ddl_operator.core.validate import DNS_LABEL_MAX, SLOT_FACTOR, max_job_name_length

from builders import make_ddljob

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", CRD_PATHS, ids=lambda p: str(p.relative_to(REPO)))
def test_committed_crd_matches_models(path: Path) -> None:
    assert path.exists(), f"{path} is missing; run `make crds`"
    assert path.read_text() == render_crd(), f"{path} is stale; run `make crds`"


def test_committed_reference_matches_models() -> None:
    assert REFERENCE_PATH.read_text() == render_reference(), "docs/api.md is stale; run `make crds`"


def test_crd_has_subresources_columns_and_names() -> None:
    crd = build_crd()
    names = crd["spec"]["names"]
    assert names["shortNames"] == ["ddlj"] and names["categories"] == ["ddl"]
    version = crd["spec"]["versions"][0]
    assert version["subresources"]["scale"]["specReplicasPath"] == ".spec.replicas"
    columns = [col["name"] for col in version["additionalPrinterColumns"]]
    assert columns == [
        "Phase", "Ready", "Replicas", "Epoch", "Throughput", "Sync-Wait", "Age", "Suspend"
    ]  # fmt: skip
    wide = {col["name"] for col in version["additionalPrinterColumns"] if col.get("priority")}
    assert wide == {"Suspend"}, "only -o wide shows spec.suspend; the Phase says Suspended"


def test_suspend_defaults_to_false_and_phase_allows_suspended() -> None:
    spec = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
    assert spec["spec"]["properties"]["suspend"] == {
        **spec["spec"]["properties"]["suspend"], "type": "boolean", "default": False
    }  # fmt: skip
    assert "Suspended" in spec["status"]["properties"]["phase"]["enum"]


def _walk(node: object) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    if isinstance(node, dict):
        out.append(node)
        for value in node.values():
            out.extend(_walk(value))
    elif isinstance(node, list):
        for value in node:
            out.extend(_walk(value))
    return out


def test_schema_is_structural() -> None:
    schema = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for node in _walk(schema):
        assert "$ref" not in node and "title" not in node
        if "anyOf" in node:  # only the int-or-string form Kubernetes accepts
            assert node["x-kubernetes-int-or-string"] is True
            assert node["anyOf"] == [{"type": "integer"}, {"type": "string"}]
        if "properties" in node:
            assert "additionalProperties" not in node
            assert node.get("type") == "object"


def test_defaults_fill_in() -> None:
    spec = DDLJobSpec.model_validate(make_ddljob()["spec"])
    assert spec.topology.levels[0] == c.LABEL_HOSTNAME
    assert spec.allreduce.algorithm == "Auto" and spec.allreduce.bucket_mb == 25
    assert spec.failure_policy.non_retryable_exit_codes == [c.EXIT_CODE_PERMANENT]
    assert spec.procs_per_worker == 1
    assert DDLJobSpec.model_validate(make_ddljob(gpus=8)["spec"]).procs_per_worker == 8


def test_unknown_field_is_refused_by_the_model() -> None:
    with pytest.raises(ValidationError, match="replcias"):
        DDLJobSpec.model_validate({**make_ddljob()["spec"], "replcias": 3})


def test_examples_parse() -> None:
    manifests = sorted((REPO / "examples").glob("*.yaml"))
    assert manifests, "examples/ holds no DDLJob manifest"
    for path in manifests:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == c.KIND:
                DDLJob.model_validate(doc)


def _root() -> dict[str, Any]:
    schema: dict[str, Any] = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def test_name_rules_sit_on_the_root_and_point_at_the_name() -> None:
    root = _root()
    assert root["properties"]["metadata"]["properties"]["name"]["maxLength"] == DNS_LABEL_MAX
    rules = root["x-kubernetes-validations"]
    assert [r["fieldPath"] for r in rules] == [".metadata.name", ".metadata.name"]
    # Both ratchet: an object stored before a rule stays writable (the operator's status).
    assert all(r["optionalOldSelf"] and "oldSelf.hasValue()" in r["rule"] for r in rules)
    # The limit in the rule is the one the renderer's names need.
    room = DNS_LABEL_MAX - len(pod_name("", 0)) + 1
    assert f"({room} - size(string({SLOT_FACTOR} * " in rules[1]["rule"]
    assert f"{max_job_name_length(1)} characters for 1 worker" in rules[1]["message"]


def test_template_types_the_fields_the_operator_reads() -> None:
    template = _root()["properties"]["spec"]["properties"]["template"]
    container = template["properties"]["spec"]["properties"]["containers"]["items"]
    assert container["required"] == ["name", "image"]
    assert container["x-kubernetes-preserve-unknown-fields"] is True
    props = container["properties"]
    assert {props[k]["type"] for k in ("env", "ports", "volumeMounts")} == {"array"}
    assert props["resources"]["properties"]["limits"]["additionalProperties"][
        "x-kubernetes-int-or-string"
    ]
    labels = template["properties"]["metadata"]["properties"]["labels"]
    assert labels == {"type": "object", "additionalProperties": {"type": "string"}}


def test_gpu_rules_name_the_containers() -> None:
    rules = _root()["properties"]["spec"]["x-kubernetes-validations"]
    gpu = [r for r in rules if c.GPU_RESOURCE in r["rule"]]
    assert [r["fieldPath"] for r in gpu] == [
        ".template.spec.containers",
        ".template.spec.containers",
        ".template.spec.initContainers",
    ]
    assert all("gpusPerWorker" in r["message"] for r in gpu)


def test_goodput_policies_default_to_today_and_bound_their_numbers() -> None:
    spec = DDLJobSpec.model_validate(make_ddljob(replicas=4, min_replicas=2)["spec"])
    assert spec.stragglers.action == "Report" and spec.stragglers.threshold == 1.2
    assert spec.elastic is not None and spec.elastic.scaling == "Replicas"
    with pytest.raises(ValidationError, match="threshold"):
        DDLJobSpec.model_validate(make_ddljob(stragglers={"threshold": 1.0})["spec"])
    elastic = {"minReplicas": 1, "maxReplicas": 2, "scalingGain": 1.5}
    with pytest.raises(ValidationError, match="scalingGain"):
        DDLJobSpec.model_validate(make_ddljob(elastic=elastic)["spec"])
    threshold = _root()["properties"]["spec"]["properties"]["stragglers"]["properties"]["threshold"]
    assert threshold["minimum"] == 1.0 and threshold["exclusiveMinimum"] is True, (
        "OpenAPI v3.0's form of an exclusive bound"
    )


def test_goodput_status_is_bounded() -> None:
    status = _root()["properties"]["status"]["properties"]
    assert status["stragglers"]["properties"]["cooling"]["maxItems"] == 64
    sizing = status["sizing"]["properties"]
    assert sizing["tried"]["maxItems"] == 32 and sizing["samples"]["maxItems"] == 16
    assert sizing["message"]["maxLength"] == 1024
    assert "default" not in str(status["sizing"]), "status carries no defaults"
