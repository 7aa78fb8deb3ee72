"""The operator's own reading of a spec: field-named errors instead of a renderer traceback."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ddl_operator.api import constants as c
from ddl_operator.api.models import DDLJob
from ddl_operator.core.render import pod_name, worker_pod
from ddl_operator.core.validate import (
    CHILD_REFUSED,
    CONDITION,
    DNS_LABEL_MAX,
    FieldError,
    child_errors,
    invalid_status,
    max_job_name_length,
    spec_errors,
    template_errors,
)

from builders import DELETE, make_ddljob, set_path

NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


def _job(manifest: dict[str, Any], name: str = "job") -> DDLJob:
    return DDLJob.model_validate(
        {**manifest, "metadata": {"name": name, "namespace": "ml", "uid": "u-1", "generation": 3}}
    )


def _fields(errors: list[FieldError]) -> list[str]:
    return [e.field for e in errors]


def test_the_builders_template_is_usable() -> None:
    job = _job(make_ddljob(gpus=2))
    assert spec_errors(job) == []
    worker_pod(job, 0)


C0 = "spec.template.spec.containers[0]"
# (case id, path under spec.template to change, value, field under spec.template named first)
UNUSABLE: list[tuple[str, str, Any, str]] = [
    ("env-string", "spec.containers.0.env", "X", "spec.containers[0].env"),
    ("env-item-string", "spec.containers.0.env", ["X"], "spec.containers[0].env[0]"),
    ("env-without-name", "spec.containers.0.env", [{"value": 1}], "spec.containers[0].env[0].name"),
    ("env-null", "spec.containers.0.env", None, "spec.containers[0].env"),
    ("mounts-string", "spec.containers.0.volumeMounts", "x", "spec.containers[0].volumeMounts"),
    ("ports-object", "spec.containers.0.ports", {"a": 1}, "spec.containers[0].ports"),
    ("resources-list", "spec.containers.0.resources", [], "spec.containers[0].resources"),
    ("limits-number", "spec.containers.0.resources", {"limits": 4}, "spec.containers[0].resources.limits"),  # noqa: E501
    ("no-image", "spec.containers.0.image", DELETE, "spec.containers[0].image"),
    ("empty-image", "spec.containers.0.image", "", "spec.containers[0].image"),
    ("image-number", "spec.containers.0.image", 7, "spec.containers[0].image"),
    ("labels-list", "metadata.labels", ["a", "b"], "metadata.labels"),
    ("label-value-number", "metadata.labels", {"a": 1}, "metadata.labels[a]"),
    ("annotations-string", "metadata.annotations", "x", "metadata.annotations"),
    ("metadata-list", "metadata", [], "metadata"),
    ("spec-string", "spec", "x", "spec"),
    ("containers-missing", "spec.containers", DELETE, "spec.containers"),
    ("containers-empty", "spec.containers", [], "spec.containers"),
    ("containers-object", "spec.containers", {"name": "x"}, "spec.containers"),
    ("container-string", "spec.containers", ["worker"], "spec.containers[0]"),
    ("gates-string", "spec.schedulingGates", "x", "spec.schedulingGates"),
    ("gate-without-name", "spec.schedulingGates", [{}], "spec.schedulingGates[0].name"),
    ("volumes-object", "spec.volumes", {}, "spec.volumes"),
    ("tolerations-string", "spec.tolerations", "x", "spec.tolerations"),
    ("node-selector-list", "spec.nodeSelector", ["a"], "spec.nodeSelector"),
    ("hostname-number", "spec.hostname", 1, "spec.hostname"),
    ("init-without-image", "spec.initContainers", [{"name": "i"}], "spec.initContainers[0].image"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("path", "value", "field"), [u[1:] for u in UNUSABLE], ids=[u[0] for u in UNUSABLE]
)
def test_an_unusable_template_is_named_by_field(path: str, value: Any, field: str) -> None:
    errors = spec_errors(_job(set_path(make_ddljob(), f"spec.template.{path}", value)))
    assert errors, "accepted"
    assert errors[0].field == f"spec.template.{field}", errors
    assert str(errors[0]).startswith(f"spec.template.{field}: ")


def test_every_problem_is_listed() -> None:
    manifest = set_path(make_ddljob(), "spec.template.spec.containers.0.env", "X")
    manifest = set_path(manifest, "spec.template.metadata.labels", [])
    assert sorted(_fields(spec_errors(_job(manifest)))) == [
        "spec.template.metadata.labels",
        f"{C0}.env",
    ]


def _with_resources(gpus: int, resources: dict[str, Any], container: int = 0) -> DDLJob:
    manifest = make_ddljob(gpus=gpus)
    containers = manifest["spec"]["template"]["spec"]["containers"]
    while len(containers) <= container:
        containers.append({"name": f"side-{len(containers)}", "image": "side:1"})
    containers[container]["resources"] = resources
    return _job(manifest)


@pytest.mark.parametrize(
    ("gpus", "resources", "container", "fields"),
    [
        (2, {"limits": {c.GPU_RESOURCE: 2}}, 0, []),
        (2, {"limits": {c.GPU_RESOURCE: "2"}, "requests": {c.GPU_RESOURCE: 2}}, 0, []),
        (2, {"limits": {"cpu": "4"}}, 0, []),
        (2, {"limits": {c.GPU_RESOURCE: 4}}, 0, [f"{C0}.resources.limits[{c.GPU_RESOURCE}]"]),
        (2, {"requests": {c.GPU_RESOURCE: "1"}}, 0, [f"{C0}.resources.requests[{c.GPU_RESOURCE}]"]),
        (0, {"limits": {c.GPU_RESOURCE: 1}}, 0, [f"{C0}.resources.limits[{c.GPU_RESOURCE}]"]),
        (
            2,
            {"limits": {c.GPU_RESOURCE: 1}},
            1,
            [f"spec.template.spec.containers[1].resources.limits[{c.GPU_RESOURCE}]"],
        ),
    ],
    ids=["equal", "equal-as-string", "no-gpus", "more", "fewer", "cpu-job", "sidecar"],
)
def test_gpus_come_from_gpus_per_worker_alone(
    gpus: int, resources: dict[str, Any], container: int, fields: list[str]
) -> None:
    assert _fields(spec_errors(_with_resources(gpus, resources, container))) == fields


def test_init_containers_get_no_gpus() -> None:
    manifest = set_path(
        make_ddljob(gpus=2),
        "spec.template.spec.initContainers",
        [{"name": "fetch", "image": "x", "resources": {"limits": {c.GPU_RESOURCE: 1}}}],
    )
    assert _fields(spec_errors(_job(manifest))) == [
        f"spec.template.spec.initContainers[0].resources.limits[{c.GPU_RESOURCE}]"
    ]


# Values of every JSON type, for the fields the renderer reads.
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=3),
    lambda inner: (
        st.lists(inner, max_size=2) | st.dictionaries(st.text(max_size=3), inner, max_size=2)
    ),
    max_leaves=4,
)
_CONTAINER_KEYS = ["name", "image", "env", "ports", "volumeMounts", "resources"]
_SPEC_KEYS = ["containers", "initContainers", "schedulingGates", "volumes", "hostname"]


@st.composite
def _templates(draw: st.DrawFn) -> dict[str, Any]:
    """Mostly well-formed templates with a few fields of any shape."""
    container: dict[str, Any] = {"name": "w", "image": "i"}
    for key in draw(st.lists(st.sampled_from(_CONTAINER_KEYS), max_size=3)):
        container[key] = draw(
            _JSON
            | st.lists(st.dictionaries(st.sampled_from(["name", "mountPath", "limits"]), _JSON))
            | st.dictionaries(st.sampled_from(["limits", "requests"]), _JSON)
        )
    spec: dict[str, Any] = {"containers": [container]}
    for key in draw(st.lists(st.sampled_from(_SPEC_KEYS), max_size=2)):
        spec[key] = draw(_JSON | st.lists(st.dictionaries(st.sampled_from(["name"]), _JSON)))
    template: dict[str, Any] = {"spec": spec}
    if draw(st.booleans()):
        template["metadata"] = {"labels": draw(_JSON), "annotations": draw(_JSON)}
    return template


@settings(max_examples=300, deadline=None)
@given(_templates())
def test_a_template_that_passes_never_breaks_the_renderer(template: dict[str, Any]) -> None:
    job = _job(set_path(make_ddljob(gpus=1), "spec.template", template))
    if not template_errors(job.spec.template):
        worker_pod(job, 3, service_account="ddl-worker")


@pytest.mark.parametrize("workers", [1, 2, 9, 10, 11, 99, 100, 101, 1000, 10000])
def test_name_limit_fits_every_slot_below_ten_times_the_workers(workers: int) -> None:
    limit = max_job_name_length(workers)
    top_slot = 10 * workers - 1
    assert len(pod_name("a" * limit, top_slot)) == DNS_LABEL_MAX
    assert len(pod_name("a" * (limit + 1), top_slot)) > DNS_LABEL_MAX


def _refusal(kind: str, name: str, *causes: tuple[str, str]) -> dict[str, Any]:
    """A 422 Status as the API server returns it."""
    return {
        "kind": "Status",
        "status": "Failure",
        "reason": "Invalid",
        "code": 422,
        "message": f'{kind} "{name}" is invalid',
        "details": {
            "name": name,
            "kind": kind,
            "causes": [
                {"reason": "FieldValueInvalid", "field": f, "message": m} for f, m in causes
            ],
        },
    }


def test_a_refused_pod_names_the_template_field() -> None:
    job = _job(make_ddljob())
    refusal = _refusal(
        "Pod", "job-worker-0", ("spec.containers[0].volumeMounts[0].name", 'Not found: "data"')
    )
    (error,) = child_errors(refusal, job)
    assert error.field == f"{C0}.volumeMounts[0].name"
    assert 'Not found: "data"' in error.message and "job-worker-0" in error.message


def test_a_refused_hostname_or_job_label_names_the_job_name() -> None:
    name = "a" * 54
    job = _job(make_ddljob(), name=name)
    refusal = _refusal(
        "Pod",
        pod_name(name, 10),
        ("spec.hostname", f'Invalid value: "{pod_name(name, 10)}": must be no more than 63'),
        ("metadata.labels", f'Invalid value: "{name}": must be no more than 63 characters'),
        ("metadata.labels", 'Invalid value: "bad value!": a valid label must be ...'),
    )
    assert _fields(child_errors(refusal, job)) == [
        "metadata.name",
        "metadata.name",
        "spec.template.metadata.labels",
    ]


def test_a_template_hostname_is_the_templates_fault() -> None:
    job = _job(set_path(make_ddljob(), "spec.template.spec.hostname", "Bad_Host"))
    refusal = _refusal("Pod", "job-worker-0", ("spec.hostname", "Invalid value"))
    assert _fields(child_errors(refusal, job)) == ["spec.template.spec.hostname"]


def test_a_refused_service_names_the_job_name() -> None:
    refusal = _refusal("Service", "my.job", ("metadata.name", "Invalid value: a DNS-1035 label"))
    assert _fields(child_errors(refusal, _job(make_ddljob(), name="my.job"))) == ["metadata.name"]


def test_other_refusals_are_not_the_specs_fault() -> None:
    refusal = _refusal("ServiceAccount", "x", ("metadata.name", "Invalid value"))
    assert child_errors(refusal, _job(make_ddljob())) == []


def test_a_refusal_without_causes_still_names_the_template() -> None:
    refusal = {"message": "Pod is invalid", "details": {"kind": "Pod", "name": "job-worker-0"}}
    (error,) = child_errors(refusal, _job(make_ddljob()))
    assert error.field == "spec.template" and "Pod is invalid" in error.message


def test_invalid_status_says_it_once_and_stays_put() -> None:
    job = _job(make_ddljob())
    errors = [FieldError(f"{C0}.env", "must be a list")]
    first, event = invalid_status(job, job.status, errors, NOW)
    (condition,) = [x for x in first.conditions if x.type == CONDITION]
    assert condition.status == "True" and condition.message == f"{C0}.env: must be a list"
    assert first.message == condition.message and first.observed_generation == 3
    assert event is not None and event.type == "Warning" and f"{C0}.env" in event.message
    # The next pass reads the written status and sees the same problem; its draft may have
    # been rebuilt without the condition. Same status (so no write), no event.
    written = job.model_copy(update={"status": first})
    later = NOW + dt.timedelta(minutes=5)
    rebuilt = first.model_copy(update={"conditions": []})
    second, again = invalid_status(written, rebuilt, errors, later)
    assert second == first and again is None
    # A different problem is news; the condition keeps its transition time.
    other = [FieldError("metadata.name", "too long")]
    third, news = invalid_status(written, rebuilt, other, later, CHILD_REFUSED)
    (changed,) = [x for x in third.conditions if x.type == CONDITION]
    assert news is not None and changed.reason == CHILD_REFUSED
    assert changed.last_transition_time == condition.last_transition_time
