"""Checks a DDLJob before its children are rendered, and names the job field at fault.

The CRD refuses most bad specs at `kubectl apply`. This is the operator's own strict reading
of what it is about to use (objects stored under an older CRD reach it too), and the mapping of
a child's refusal (a 422 when a worker pod or the Service is created) back to the job's field.
Either way the job gets an `InvalidSpec` condition and an event instead of a retry loop.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from ddl_operator.api import constants as c
from ddl_operator.api.models import Condition, DDLJob, DDLJobSpec, DDLJobStatus
from ddl_operator.core.reconcile import Event
from ddl_operator.core.render import pod_name

DNS_LABEL_MAX: Final = 63
# Service names are DNS-1035 labels: a letter first, so a job name must be one too.
DNS_1035_LABEL: Final = "^[a-z]([-a-z0-9]*[a-z0-9])?$"
# Slots are reused smallest-first, so they pass the worker count only while lost pods are
# still terminating; job names are sized for every slot below this many times the workers.
SLOT_FACTOR: Final = 10
CONDITION: Final = "InvalidSpec"
# Reasons of the condition: the operator cannot render the template as asked / the API server
# refused a child rendered from the spec.
UNUSABLE_TEMPLATE: Final = "UnusableTemplate"
CHILD_REFUSED: Final = "ChildRefused"
TEMPLATE: Final = "spec.template"


@dataclass(frozen=True)
class FieldError:
    """One reason a spec cannot run, on a path of the DDLJob (as kubectl prints paths)."""

    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


def max_job_name_length(max_workers: int) -> int:
    """The longest job name whose worker hostnames `{name}-worker-{slot}` are DNS labels for
    every slot below SLOT_FACTOR x max_workers (the CRD's rule on metadata.name says the same)."""
    return DNS_LABEL_MAX - len(pod_name("", SLOT_FACTOR * max_workers - 1))


def spec_errors(job: DDLJob) -> list[FieldError]:
    """Why the operator cannot render this job's workers as asked; empty when it can."""
    errors = template_errors(job.spec.template)
    return errors or gpu_errors(job.spec)


@dataclass
class _Reader:
    """Walks the template the way the renderer does, collecting what has the wrong shape."""

    errors: list[FieldError] = field(default_factory=list)

    def fail(self, path: str, message: str) -> None:
        self.errors.append(FieldError(path, message))

    def object(self, parent: Mapping[str, Any], key: str, path: str) -> Mapping[str, Any]:
        value = parent.get(key, {})
        if isinstance(value, Mapping):
            return value
        self.fail(f"{path}.{key}", f"must be an object, not {_kind(value)}")
        return {}

    def objects(self, parent: Mapping[str, Any], key: str, path: str) -> list[Mapping[str, Any]]:
        """A list of objects; each item that is not one is reported and skipped."""
        value = parent.get(key, [])
        if not isinstance(value, list):
            self.fail(f"{path}.{key}", f"must be a list, not {_kind(value)}")
            return []
        out = []
        for i, item in enumerate(value):
            if isinstance(item, Mapping):
                out.append(item)
            else:
                self.fail(f"{path}.{key}[{i}]", f"must be an object, not {_kind(item)}")
        return out

    def strings(self, parent: Mapping[str, Any], key: str, path: str) -> None:
        value = parent.get(key, {})
        if not isinstance(value, Mapping):
            self.fail(f"{path}.{key}", f"must be a map of strings, not {_kind(value)}")
            return
        for name, item in value.items():
            if not isinstance(item, str):
                self.fail(f"{path}.{key}[{name}]", f"must be a string, not {_kind(item)}")

    def string(self, parent: Mapping[str, Any], key: str, path: str, required: bool) -> None:
        if key not in parent:
            if required:
                self.fail(f"{path}.{key}", "is required")
            return
        value = parent[key]
        if not isinstance(value, str) or (required and not value):
            self.fail(f"{path}.{key}", f"must be a non-empty string, not {_kind(value)}")


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return f"the string {value!r}"[:80]
    if isinstance(value, int | float):
        return f"the number {value}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__


def template_errors(template: Mapping[str, Any]) -> list[FieldError]:
    """The shapes `render.worker_pod` and the placement rely on, field by field."""
    read = _Reader()
    meta = read.object(template, "metadata", TEMPLATE)
    for key in ("labels", "annotations"):
        read.strings(meta, key, f"{TEMPLATE}.metadata")
    spec = read.object(template, "spec", TEMPLATE)
    where = f"{TEMPLATE}.spec"
    if "containers" not in spec:
        read.fail(f"{where}.containers", "is required")
    containers = read.objects(spec, "containers", where)
    if "containers" in spec and not spec["containers"]:
        read.fail(f"{where}.containers", "must name at least one container")
    for i, container in enumerate(containers):
        path = f"{where}.containers[{i}]"
        read.string(container, "name", path, required=True)
        read.string(container, "image", path, required=True)
        for j, env in enumerate(read.objects(container, "env", path)):
            read.string(env, "name", f"{path}.env[{j}]", required=True)
        read.objects(container, "ports", path)
        read.objects(container, "volumeMounts", path)
        resources = read.object(container, "resources", path)
        for kind in ("limits", "requests"):
            read.object(resources, kind, f"{path}.resources")
    for i, container in enumerate(read.objects(spec, "initContainers", where)):
        path = f"{where}.initContainers[{i}]"
        read.string(container, "name", path, required=True)
        read.string(container, "image", path, required=True)
        resources = read.object(container, "resources", path)
        for kind in ("limits", "requests"):
            read.object(resources, kind, f"{path}.resources")
    for key in ("schedulingGates", "volumes"):
        for j, item in enumerate(read.objects(spec, key, where)):
            read.string(item, "name", f"{where}.{key}[{j}]", required=True)
    read.objects(spec, "tolerations", where)
    read.strings(spec, "nodeSelector", where)
    for key in ("hostname", "subdomain", "serviceAccountName"):
        read.string(spec, key, where, required=False)
    return read.errors


def _gpus_asked(container: Mapping[str, Any]) -> dict[str, Any]:
    """nvidia.com/gpu by resource kind (limits, requests), where the container names it."""
    resources = container.get("resources") or {}
    return {
        kind: resources[kind][c.GPU_RESOURCE]
        for kind in ("limits", "requests")
        if c.GPU_RESOURCE in (resources.get(kind) or {})
    }


def gpu_errors(spec: DDLJobSpec) -> list[FieldError]:
    """GPUs come from gpusPerWorker alone; the template may only repeat the same number.

    Expects a template that passed `template_errors`.
    """
    where = f"{TEMPLATE}.spec"
    pod = spec.template["spec"]
    containers: Sequence[Mapping[str, Any]] = pod["containers"]
    errors = [
        FieldError(
            f"{where}.containers[0].resources.{kind}[{c.GPU_RESOURCE}]",
            f"asks for {value} but gpusPerWorker is {spec.gpus_per_worker}; leave it out "
            "(the operator sets it from gpusPerWorker) or make them equal",
        )
        for kind, value in _gpus_asked(containers[0]).items()
        if str(value) != str(spec.gpus_per_worker)
    ]
    for key, others in (
        ("containers", list(enumerate(containers))[1:]),
        ("initContainers", list(enumerate(pod.get("initContainers") or []))),
    ):
        for i, container in others:
            for kind in _gpus_asked(container):
                errors.append(
                    FieldError(
                        f"{where}.{key}[{i}].resources.{kind}[{c.GPU_RESOURCE}]",
                        "only the first container gets GPUs (gpusPerWorker)",
                    )
                )
    return errors


# Pod fields the operator derives from the job's name rather than from the template.
_NAMED_AFTER_JOB: Final = {
    "metadata.name": None,
    "spec.hostname": "hostname",
    "spec.subdomain": "subdomain",
}


def child_errors(refusal: Mapping[str, Any], job: DDLJob) -> list[FieldError]:
    """A child's refusal (the API server's 422 Status) as errors on the job's own fields.

    Empty when the refused object is not one the job's spec shapes (a worker pod or the
    headless Service): that is the operator's problem, not the user's.
    """
    details = refusal.get("details") or {}
    kind, child = details.get("kind"), details.get("name", "")
    if kind not in ("Pod", "pods", "Service", "services"):
        return []
    what = f"the API server refused {'worker pod' if kind in ('Pod', 'pods') else 'Service'} "
    causes = [x for x in details.get("causes") or [] if isinstance(x, Mapping)]
    if not causes:
        return [FieldError(TEMPLATE, f"{what}{child}: {refusal.get('message', '')}")]
    errors = []
    for cause in causes:
        child_field = str(cause.get("field", ""))
        message = str(cause.get("message", "")) or str(cause.get("reason", "invalid"))
        if kind in ("Service", "services"):
            job_field = "metadata.name"  # the Service is the job's name and nothing else
        else:
            job_field = _pod_field_on_job(child_field, message, job)
        errors.append(FieldError(job_field, f"{message} ({what}{child}: {child_field})"))
    return errors


def _pod_field_on_job(pod_field: str, message: str, job: DDLJob) -> str:
    template_spec = job.spec.template.get("spec") or {}
    top = pod_field.split("[", 1)[0]
    for derived, template_key in _NAMED_AFTER_JOB.items():
        if top == derived and not (template_key and template_key in template_spec):
            return "metadata.name"
    if top == "metadata.labels" and f'"{job.metadata.name}"' in message:
        return "metadata.name"  # the job label's value is the job's name
    if pod_field.startswith(("spec.", "metadata.labels", "metadata.annotations")):
        return f"{TEMPLATE}.{pod_field}"
    return f"{TEMPLATE} (pod field {pod_field})"


def invalid_status(
    job: DDLJob,
    draft: DDLJobStatus,
    errors: Sequence[FieldError],
    now: dt.datetime,
    reason: str = UNUSABLE_TEMPLATE,
) -> tuple[DDLJobStatus, Event | None]:
    """`draft` with the InvalidSpec condition set, and the event to post when it is news.

    News is judged against the job's written status (the draft may have been rebuilt without
    the condition): the condition's time and the event change only when the reasons do, so a
    job that stays invalid costs no writes, and the operator looks again when the job changes.
    """
    message = "; ".join(str(e) for e in errors)[:1024]
    previous = next((x for x in job.status.conditions if x.type == CONDITION), None)
    held = previous is not None and previous.status == "True"
    stamp = now.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    condition = Condition(
        type=CONDITION,
        status="True",
        reason=reason,
        message=message,
        last_transition_time=previous.last_transition_time if previous and held else stamp,
    )
    updated = draft.model_copy(
        update={
            "conditions": [x for x in draft.conditions if x.type != CONDITION] + [condition],
            "message": message,
            "observed_generation": job.metadata.generation,
        }
    )
    news = not (held and previous is not None and previous.message == message)
    return updated, Event("Warning", CONDITION, message) if news else None


__all__ = [
    "CHILD_REFUSED",
    "CONDITION",
    "UNUSABLE_TEMPLATE",
    "FieldError",
    "child_errors",
    "gpu_errors",
    "invalid_status",
    "max_job_name_length",
    "spec_errors",
    "template_errors",
]
