"""The API models and the generated CRD: drift, defaults, examples."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from ddl_operator.api import constants as c
from ddl_operator.api.crd import CRD_PATHS, REFERENCE_PATH, build_crd, render_crd, render_reference
from ddl_operator.api.models import DDLJob, DDLJobSpec

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
    assert columns == ["Phase", "Ready", "Replicas", "Epoch", "Throughput", "Sync-Wait", "Age"]


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
        assert "$ref" not in node and "anyOf" not in node and "title" not in node
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
